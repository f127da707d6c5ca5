#!/usr/bin/env python3
"""transformers' reference for the real checkpoints that tools/fetch-real-model.sh fetches
(SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M): tokenizer ids of tricky strings, greedy ids and
log-probabilities of a few prompts (and, where the file has a chat template, of a chat question),
from transformers loading the GGUF itself (its tokenizer converter, gguf-py dequantization to f32,
its graph in eager f32, a KV cache as generate() uses; one deterministic thread, so a rerun writes
the same file). Writes tests/fixtures/real/<file>.json,
which tests/tests/real_model.rs compares Kiln with when the GGUF is in the cache.

    pip install torch==2.15.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 sentencepiece protobuf
    python3 tools/make_real_model_reference.py $(tools/fetch-real-model.sh all)
"""
import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_llm_fixtures as mlf  # noqa: E402  (the greedy loop; sets torch threads on import)

import torch  # noqa: E402

REPO = mlf.REPO
OUT = REPO / "tests" / "fixtures" / "real"
NEW_TOKENS = 24
STRINGS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "x  y   z    w",
    "tabs\tand\nnewlines\n\n\tmixed \t \n",
    "Café déjà vu — naïve façade, crème brûlée",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🚀🦙 and 👨\u200d👩\u200d👧 zwj",
    "digits 3 33 333 3333 12345678 3.14159",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # comment\n",
    "\u00a0nbsp\u3000ideographic space",
]
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n",
]


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    for arg in sys.argv[1:]:
        reference(pathlib.Path(arg))


def reference(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    print(model.config)
    runs = []
    prompts = [(text, tok.encode(text)) for text in PROMPTS]  # BOS as the GGUF says
    # transformers' GGUF tokenizer leaves the file's template out: take it from the metadata.
    import gguf
    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is not None:
        chat = tok.apply_chat_template(CHAT, chat_template=field.contents(), add_generation_prompt=True,
                                       tokenize=False)
        prompts.append(({"chat": CHAT, "rendered": chat}, tok.encode(chat, add_special_tokens=False)))
    for text, ids in prompts:
        r = mlf.greedy_cached(model, ids, NEW_TOKENS)
        runs.append({"prompt": text, "prompt_ids": ids, **r, "text": tok.decode(r["ids"])})
        print(repr(text), "->", repr(tok.decode(r["ids"])), "min margin", min(r["margins"]), flush=True)
    tokenizer = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in STRINGS]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / (path.stem + ".json")
    out.write_text(json.dumps({"file": path.name, "sha256": sha, "runs": runs, "tokenizer": tokenizer},
                              indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", out)


if __name__ == "__main__":
    main()
