#!/usr/bin/env python3
"""LLM parity fixtures for Kiln: small random-weight transformers models, GGUF files written by
llama.cpp's own converter, and transformers' greedy outputs for each of them.

Writes tests/fixtures/llm/<case>/ (see tests/fixtures/README.md, section `llm/`). Deterministic:
seeded weights (torch.Generator, seed 1234 + case index), tokenizers trained single-threaded on
text that ships with CPython (stdlib docstrings + `this`) plus fixed Unicode lines. Running it twice
gives byte-identical files (with the package versions below).

How to run (CPU only, no network beyond PyPI, a few minutes):

    pip install torch transformers sentencepiece protobuf safetensors gguf==0.19.0 numpy tokenizers
    mkdir -p /tmp/lcp && cd /tmp/lcp
    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz
    cd -  # back to the repository
    python3 tools/make_llm_fixtures.py --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

(`--no-binary llama-cpp-python`, not `:all:`: the latter builds cmake from source.)

Versions used to produce the committed files: Python 3.11.7 (the stdlib docstrings are part of the
tokenizer training text, so another CPython may train other tokenizers), torch 2.15.0 (CPU),
transformers 5.24.0, tokenizers 0.23.3, sentencepiece 0.2.3, protobuf 7.36.2, safetensors 0.8.0,
gguf 0.19.0, numpy 2.4.6, Jinja2 3.1.6, llama.cpp as vendored in llama-cpp-python 0.3.36
(convert_hf_to_gguf.py + its conversion/ package + its gguf-py).

GGUF paths:
  * `convert`: llama.cpp's convert_hf_to_gguf.py, run unmodified in a subprocess with its own
    vendored gguf-py, except for one monkeypatch: our freshly trained byte-level tokenizers have
    no entry in the converter's `get_vocab_base_pre()` hash table (llama.cpp adds one per known
    model with convert_hf_to_gguf_update.py), so the patch returns the pre-tokenizer name that
    matches how the tokenizer was built: "gpt-2" (ByteLevel with GPT-2's regex) or "qwen2"
    (Qwen2's Split regex + ByteLevel without regex).
  * `repack`: gguf-py (pip gguf 0.19.0) GGUFReader of the converter's f32 file -> GGUFWriter with
    all metadata copied (general.file_type updated), 2D weights re-quantized: Q4_0 with gguf-py's
    own quantizer; Q4_K / Q6_K with the simple block encoders below (gguf-py 0.19 can only
    dequantize those); 1D tensors (norms) stay F32 as in llama.cpp.

References: greedy argmax loop, transformers forward in float32 (eager attention, whole sequence
re-run each step, no generate() processors), log_softmax and top-2 margins in float64 from the
float32 logits. For a GGUF run the transformers model gets gguf-py's dequantization of every GGUF
tensor (llama.cpp's Q/K row permutation undone for llama) and runs the same loop.
"""
import argparse
import codecs
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "llm"
SEED = 1234
NEW_TOKENS = 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system_message %}{{ '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français si possible."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4 🙂"},
    {"role": "user", "content": "  And 3×3?\nThanks!  "},
]
TOKENIZER_STRINGS = [
    "Hello world",
    "",
    "  leading spaces and trailing  ",
    "x  y   z    w",
    "tabs\tand\nnewlines\n\n\tmixed \t \n",
    "Café déjà vu — naïve façade, crème brûlée",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🚀🦙 and 👨\u200d👩\u200d👧 zwj",
    "digits 3 33 333 3333 12345678 3.14159",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<s>[INST] hi [/INST] ok</s>",
    "def f(x):\n    return x**2  # comment\n",
    "\u00a0nbsp\u3000ideographic space",
]
PROMPT_TEXTS = [
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Return a new list containing all items from the iterable",
    "The quick brown fox jumps over the lazy dog.",
    "Simple is better than complex; flat is better than nested.",
    "def main():\n    print('hello, world')",
    "Café déjà vu: 3.14159 and 42 apples",
    "Errors should never pass silently, unless explicitly silenced.",
    "Now is better than never. Although never is often better",
    "Return the sum of the values; raise ValueError if empty.",
    "If the implementation is hard to explain, it's a bad idea.",
    "class Point:\n    x: int\n    y: int",
    "Namespaces are one honking great idea -- let's do more",
]
UNICODE_LINES = [
    "Café déjà vu, naïve façade — crème brûlée à la française.",
    "Größe, Übermaß, Straße; ÆØÅ æøå; señor, niño, año.",
    "日本語のテキストと中文文本。東京は大きな都市です。",
    "한국어 문장입니다. Привет, мир! Γειά σου κόσμε.",
    "emoji 🚀 rocket, 🦙 llama, 🙂 smile, ✅ check.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828",
    "Tabs\tand  double  spaces,\ttrailing tabs\t\t",
]
STDLIB_MODULES = [
    "collections", "json", "re", "textwrap", "string", "functools", "itertools", "random",
    "statistics", "pathlib", "argparse", "decimal", "fractions", "datetime", "calendar", "csv",
    "difflib", "heapq", "bisect", "shutil", "tempfile", "logging", "typing", "dataclasses", "enum",
    "inspect", "ast", "zipfile", "tarfile", "email.message", "http.client", "urllib.parse",
    "unittest.case", "subprocess", "threading", "queue",
]


# --------------------------------------------------------------------------------------------
# Training text and tokenizers
# --------------------------------------------------------------------------------------------

def corpus_paragraphs():
    """Docstrings of a fixed list of stdlib modules (module + public members, sorted), the Zen
    of Python, and fixed Unicode lines repeated so that their characters get merges."""
    paras = []
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    paras.append(codecs.decode(this.s, "rot13"))
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            paras.append(doc)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                paras.append(doc)
    paras += ["\n".join(UNICODE_LINES)] * 30
    return paras


def train_bytelevel(paras, style):
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        # GPT-2 / SmolLM style: ByteLevel pre-tokenizer with GPT-2's regex; specials are ids 0..2.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = SPECIALS
    else:
        # Qwen2 style: NFC, Split on Qwen2's regex, ByteLevel without regex; specials appended last.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ])
        specials = []
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=800, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(paras, trainer)
    if style == "qwen2":
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def train_spm(paras, workdir):
    import sentencepiece as spm
    lines = [l for p in paras for l in p.split("\n") if l.strip()]
    model = io.BytesIO()
    # Llama-2 style options (as in its tokenizer.model's trainer_spec). Sentences from an iterator
    # and the model into memory, so that no temporary path ends up in the trainer_spec.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=800, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
        split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    (workdir / "spm.model").write_bytes(model.getvalue())
    return workdir / "spm.model"


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def install_tokenizer(case_dir, kind, toks):
    """Write tokenizer.json (+ tokenizer.model), tokenizer_config.json. Returns token ids."""
    if kind in ("gpt2", "qwen2"):
        tok = toks[kind]
        tok.save(str(case_dir / "tokenizer.json"), pretty=True)
        ids = {s: tok.token_to_id(s) for s in SPECIALS}
        added = {str(ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for s in SPECIALS}
        if kind == "gpt2":  # SmolLM-like
            cfg = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
                   "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}
            bos, eos = ids["<|endoftext|>"], ids["<|im_end|>"]
        else:  # Qwen2-Instruct-like: no bos
            cfg = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None}
            bos, eos = None, ids["<|im_end|>"]
        cfg.update({"chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
                    "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"})
        write_json(case_dir / "tokenizer_config.json", cfg)
        return {"bos": bos, "eos": eos, "endoftext": ids["<|endoftext|>"], "im_end": ids["<|im_end|>"],
                "vocab": tok.get_vocab_size(with_added_tokens=True)}
    # SentencePiece (Llama-2 style). transformers 5's LlamaTokenizer(vocab_file=...) ignores the
    # file; from_pretrained on a folder holding only tokenizer.model converts it (vocab, merges,
    # byte fallback, bos post-processor). Its pre-tokenizer is Metaspace, which does not prepend
    # "▁" to text that already starts with a space (sentencepiece and llama.cpp do); so, as in
    # meta-llama/Llama-2-7b-hf's tokenizer.json, the "▁" prefix and space replacement are done by
    # the normalizer instead (Prepend + Replace, no pre-tokenizer). That also prefixes text that
    # follows a special token, like llama.cpp's SPM tokenizer.
    from transformers import LlamaTokenizer
    with tempfile.TemporaryDirectory() as td:
        shutil.copy(toks["spm"], pathlib.Path(td) / "tokenizer.model")
        t = LlamaTokenizer.from_pretrained(td, legacy=True, add_bos_token=True, add_eos_token=False)
        t.save_pretrained(td + "/out")
        tj = json.loads((pathlib.Path(td) / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] and len(tj["model"]["vocab"]) == 800
    write_json(case_dir / "tokenizer.json", tj)
    shutil.copy(toks["spm"], case_dir / "tokenizer.model")
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, s in enumerate(["<unk>", "<s>", "</s>"])}
    write_json(case_dir / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<s>", "chat_template": LLAMA2_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "model_max_length": 512, "pad_token": None,
        # Not "LlamaTokenizer": transformers 5 then rebuilds a Metaspace pipeline and ignores
        # tokenizer.json's normalizer (it differs from sentencepiece on leading spaces).
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"})
    return {"bos": 1, "eos": 2, "vocab": 800}


def tokenizer_cases(case_dir, kind, spm_model):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tk = Tokenizer.from_file(str(case_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(case_dir))
    out = []
    for s in TOKENIZER_STRINGS:
        ids = tk.encode(s, add_special_tokens=False).ids
        assert hf.encode(s, add_special_tokens=False) == ids, (kind, s)
        if kind == "spm" and "<s>" not in s and "</s>" not in s:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=str(spm_model))
            assert sp.encode(s) == ids, (s, sp.encode(s), ids)
        out.append({"text": s, "ids": ids})
    rendered = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    return out, {"messages": CHAT_MESSAGES, "rendered": rendered}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

CASES = [
    dict(name="llama-gqa-f32", arch="llama", tok="gpt2", dtype="float32", std=0.15,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
         gguf=[("model-f32.gguf", "convert", "f32"), ("model-q8_0.gguf", "convert", "q8_0")]),
    dict(name="llama-mqa-tied-bf16", arch="llama", tok="spm", dtype="bfloat16", std=0.15,
         cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
         gguf=[("model-f16.gguf", "convert", "f16")]),
    dict(name="llama3-rope-f16", arch="llama", tok="gpt2", dtype="float16", std=0.15, shard="150KB",
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
         gguf=[]),
    dict(name="qwen2-f32", arch="qwen2", tok="qwen2", dtype="float32", std=0.15, v5_config=True,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
         gguf=[("model-f32.gguf", "convert", "f32")]),
    dict(name="llama-q-256", arch="llama", tok="gpt2", dtype="float32", std=0.08,
         cfg=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
         gguf=[("model-q8_0.gguf", "convert", "q8_0"), ("model-q4_0.gguf", "repack", "q4_0"),
               ("model-q4_k_m.gguf", "repack", "q4_k_m")]),
]


def build_model(case, idx, tokinfo):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    Config, Model = (LlamaConfig, LlamaForCausalLM) if case["arch"] == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = Config(vocab_size=tokinfo["vocab"], bos_token_id=tokinfo["bos"], eos_token_id=tokinfo["eos"],
                 pad_token_id=None, initializer_range=case["std"], attn_implementation="eager", **case["cfg"])
    torch.manual_seed(SEED + idx)
    model = Model(cfg).eval()
    # Explicit seeded init, independent of transformers' init order: weights N(0, std), norm
    # weights U(0.6, 1.4) (so that a missing norm scale shows), biases N(0, 0.2).
    g = torch.Generator().manual_seed(SEED + idx)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not listed separately
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * case["std"])
    return model


def save_model(case, model, case_dir, gen_eos):
    dtype = getattr(torch, case["dtype"])
    model = model.to(dtype)
    kw = {"max_shard_size": case["shard"]} if "shard" in case else {}
    model.save_pretrained(str(case_dir), **kw)
    cfgp = case_dir / "config.json"
    cfg = json.loads(cfgp.read_text())
    if not case.get("v5_config"):
        # transformers >= 5 writes "rope_parameters" and "dtype"; almost every checkpoint in the
        # wild has the older top-level "rope_theta" (+ "rope_scaling") and "torch_dtype".
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rp
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("attn_implementation", None)
    write_json(cfgp, dict(sorted(cfg.items())))
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": gen_eos,
           "transformers_version": cfg["transformers_version"]}
    write_json(case_dir / "generation_config.json", gen)


def load_reference(case_dir):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager")
    return m.float().eval()


def greedy(model, prompt):
    ids = list(prompt)
    out, lps, margins = [], [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            lps.append(float(lp[nxt]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(nxt)
    return {"ids": out, "logprobs": lps, "margins": margins}


def greedy_cached(model, prompt, new_tokens=NEW_TOKENS):
    """greedy() with a KV cache (prefill, then one token per step), as generate() runs: what
    differs for models whose rotary embedding depends on the sequence length (LongRoPE).
    transformers 5.25 returns the cache as `.cache` (and still takes `past_key_values=`)."""
    def cache_of(r):
        return r.cache if hasattr(r, "cache") else r.past_key_values
    out, lps, margins = [], [], []
    with torch.no_grad():
        r = model(torch.tensor([prompt]), use_cache=True)
        past, logits = cache_of(r), r.logits[0, -1]
        for _ in range(new_tokens):
            logits = logits.double()
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            lps.append(float(lp[nxt]))
            margins.append(float(top.values[0] - top.values[1]))
            r = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, logits = cache_of(r), r.logits[0, -1]
    return {"ids": out, "logprobs": lps, "margins": margins}


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

CONVERT_WRAPPER = r"""
import runpy, sys
llama_dir, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, llama_dir + "/gguf-py")
sys.path.insert(0, llama_dir)
import conversion.base as base
def get_vocab_base_pre(self, tokenizer):
    return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(llama_dir, model_dir, outtype, outfile, pre):
    cmd = [sys.executable, "-c", CONVERT_WRAPPER, str(llama_dir), pre, str(model_dir),
           "--outtype", outtype, "--outfile", str(outfile)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py failed for {model_dir} {outtype}")


def f16_round(x):
    return x.astype(np.float16).astype(np.float32)


def quantize_q4_k(x):
    """Q4_K blocks (ggml block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles). Simple min/max per 32-element sub-block; not ggml's iterative search."""
    x = x.reshape(-1, 8, 32).astype(np.float32)
    nb = x.shape[0]
    mn = np.minimum(x.min(-1), 0.0)             # sub-block minimum (<= 0), stored as -dmin*m
    mx = x.max(-1)
    scale = (mx - mn) / 15.0                     # per sub-block step
    d = f16_round(scale.max(-1) / 63.0)          # super-block scale of the 6-bit scales
    dmin = f16_round((-mn).max(-1) / 63.0)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    m = np.clip(np.round(np.divide(-mn, dmin[:, None], out=np.zeros_like(mn), where=dmin[:, None] > 0)), 0, 63)
    step = (d[:, None] * sc)[..., None]
    off = (dmin[:, None] * m)[..., None]
    q = np.clip(np.round(np.divide(x + off, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    scales = np.zeros((nb, 12), np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] & 0x30) << 2)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] & 0x30) << 2)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)   # byte g*32+l: sub 2g low, 2g+1 high
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(nb, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(nb, 2), scales, qs], axis=1)


def quantize_q6_k(x):
    """Q6_K blocks (ggml block_q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8
    scales, f16 d). Simple max-abs per 16-element sub-block."""
    x = x.reshape(-1, 16, 16).astype(np.float32)
    nb = x.shape[0]
    scale = np.abs(x).max(-1) / 31.0
    d = f16_round(scale.max(-1) / 127.0)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), -128, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(np.divide(x, step, out=np.zeros_like(x), where=step != 0)), -32, 31) + 32
    q = q.astype(np.uint8).reshape(nb, 2, 128)                     # element e = h*128 + r
    lo, hi = q & 0x0F, q >> 4
    ql = (lo[:, :, 0:64] | (lo[:, :, 64:128] << 4)).reshape(nb, 128)
    qh = (hi[:, :, 0:32] | (hi[:, :, 32:64] << 2) | (hi[:, :, 64:96] << 4) | (hi[:, :, 96:128] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8),
                           d.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1)


def quantize(x2d, qtype):
    from gguf import GGMLQuantizationType as Q, quants
    if qtype in (Q.Q8_0, Q.Q4_0):
        return quants.quantize(x2d, qtype)
    enc = {Q.Q4_K: (quantize_q4_k, 144), Q.Q6_K: (quantize_q6_k, 210)}[qtype]
    rows = x2d.shape[0]
    blocks = enc[0](x2d.reshape(-1, 256))
    assert blocks.shape[1] == enc[1]
    return blocks.reshape(rows, -1)


def copy_fields(r, w, ftype):
    """Every metadata key of reader `r` into writer `w`, with general.file_type set to `ftype`."""
    import gguf
    for field in r.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = int(ftype) if field.name == "general.file_type" else field.contents()
        w.add_key_value(field.name, val, vtype, sub_type=sub)


def repack(src, dst, scheme):
    import gguf
    from gguf import GGMLQuantizationType as Q
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[scheme]
    copy_fields(r, w, ftype)
    for t in r.tensors:
        assert t.tensor_type == Q.F32, t.name
        data = np.array(t.data, dtype=np.float32)
        if data.ndim == 1:
            w.add_tensor(t.name, data)
            continue
        if scheme == "q4_0":
            qt = Q.Q4_0
        else:
            parts = t.name.split(".")
            six = t.name in ("token_embd.weight", "output.weight") or (
                parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down"))
            qt = Q.Q6_K if six else Q.Q4_K
        qd = quantize(data, qt)
        back = gguf.quants.dequantize(qd, qt)
        rel = np.sqrt(((back - data) ** 2).mean() / (data ** 2).mean())
        assert rel < {Q.Q4_0: 0.15, Q.Q4_K: 0.15, Q.Q6_K: 0.04}[qt], (t.name, qt, rel)
        w.add_tensor(t.name, qd, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


HF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute(w, n_head):
    # Inverse of llama.cpp's LlamaModel.permute:
    #   w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(path, arch, cfg):
    """gguf-py dequantization of every tensor, renamed to HF names (Q/K un-permuted for llama)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    sd, types = {}, {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        types[t.name] = t.tensor_type.name
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
            if arch == "llama" and parts[2] == "attn_q":
                w = unpermute(w, cfg.num_attention_heads)
            elif arch == "llama" and parts[2] == "attn_k":
                w = unpermute(w, cfg.num_key_value_heads)
        else:
            raise AssertionError(f"unexpected tensor {t.name}")
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
    return sd, types, r


def check_gguf_tokenizer(reader, kind, case_dir, spm_model):
    f = reader.fields
    model = f["tokenizer.ggml.model"].contents()
    tj = json.loads((case_dir / "tokenizer.json").read_text())
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert "tokenizer.ggml.token_type" in f
    info = {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": f["tokenizer.ggml.pre"].contents()}
    for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
              "add_eos_token", "add_space_prefix"):
        if "tokenizer.ggml." + k in f:
            info[k] = f["tokenizer.ggml." + k].contents()
    if kind == "spm":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(spm_model))
        assert model == "llama"
        assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = f["tokenizer.ggml.scores"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        # The converter gives control tokens (<unk>, <s>, </s>) the score -1000.
        want = [-1000.0 if types[i] == 3 else sp.get_score(i) for i in range(sp.get_piece_size())]
        assert np.allclose(scores, want)
    else:
        assert model == "gpt2"
        vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
        assert tokens == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = f["tokenizer.ggml.merges"].contents()
        tjm = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
        assert merges == tjm
        assert info["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "qwen2": "qwen2"}[kind]
        rebuilt_ids_check(tokens, merges, kind, case_dir)
    return info


def rebuilt_ids_check(tokens, merges, kind, case_dir):
    """What the Rust side will do: rebuild a `tokenizers` tokenizer from GGUF tokens + merges +
    the pre-tokenizer named by tokenizer.ggml.pre, and get tokenizer.json's ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    ref = Tokenizer.from_file(str(case_dir / "tokenizer.json"))
    for s in TOKENIZER_STRINGS:
        assert tok.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False).ids, s


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=pathlib.Path,
                    help="llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist)")
    args = ap.parse_args()
    assert (args.llama_cpp / "convert_hf_to_gguf.py").is_file()
    # Build next to OUT and swap at the end, so that a half-written tree never sits in OUT.
    final_out = OUT
    build = OUT.parent / (OUT.name + ".new")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    globals()["OUT"] = build
    work = pathlib.Path(tempfile.mkdtemp(prefix="kiln_llm_"))
    paras = corpus_paragraphs()
    toks = {"gpt2": train_bytelevel(paras, "gpt2"), "qwen2": train_bytelevel(paras, "qwen2"),
            "spm": train_spm(paras, work)}
    summary = {}
    for idx, case in enumerate(CASES):
        name = case["name"]
        case_dir = OUT / name
        case_dir.mkdir()
        tokinfo = install_tokenizer(case_dir, case["tok"], toks)
        gen_eos = [tokinfo["im_end"], tokinfo["endoftext"]] if case["tok"] == "qwen2" else tokinfo["eos"]
        model = build_model(case, idx, tokinfo)
        save_model(case, model, case_dir, gen_eos)
        ref = load_reference(case_dir)
        # The reloaded folder must be the model we built (config rewrite included).
        with torch.no_grad():
            probe = torch.arange(0, 40).unsqueeze(0) % tokinfo["vocab"]
            fresh = build_model(case, idx, tokinfo)  # f32 buffers (rotary inv_freq) untouched
            fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            a = fresh(probe).logits
            b = ref(probe).logits
            fresh_rot, ref_rot = fresh.model.rotary_emb, ref.model.rotary_emb
            assert ref_rot.inv_freq.dtype == torch.float32
            assert torch.equal(fresh_rot.inv_freq, ref_rot.inv_freq)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (name, (a - b).abs().max())
            if "rope_scaling" in case["cfg"]:
                # The llama3 scaling must matter at these lengths (else the case tests nothing).
                plain = build_model({**case, "cfg": {k: v for k, v in case["cfg"].items() if k != "rope_scaling"}},
                                    idx, tokinfo)
                plain.load_state_dict(fresh.state_dict())
                assert (plain(probe).logits - b).abs().max() > 0.05
        tok_cases, chat = tokenizer_cases(case_dir, case["tok"], toks["spm"])

        # GGUF files.
        runs_models = [("hf", ref)]
        gguf_info = {}
        f32_tmp = None
        for fname, how, outtype in case["gguf"]:
            pre = {"gpt2": "gpt-2", "qwen2": "qwen2", "spm": "default"}[case["tok"]]
            if how == "convert":
                convert(args.llama_cpp, case_dir, outtype, case_dir / fname, pre)
            else:
                if f32_tmp is None:
                    f32_tmp = work / f"{name}-f32.gguf"
                    convert(args.llama_cpp, case_dir, "f32", f32_tmp, pre)
                repack(f32_tmp, case_dir / fname, outtype)
            sd, types, reader = gguf_state_dict(case_dir / fname, case["arch"], ref.config)
            m = load_reference(case_dir)
            expected = set(m.state_dict().keys())
            if ref.config.tie_word_embeddings:
                expected.discard("lm_head.weight")
            assert set(sd) == expected, (fname, set(sd) ^ expected)
            if outtype in ("f32", "f16"):
                ref_sd = ref.state_dict()
                maxdiff = max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd)
                assert maxdiff <= (0 if outtype == "f32" else 1e-4), (fname, maxdiff)
            m.load_state_dict(sd, strict=False)
            if ref.config.tie_word_embeddings:
                assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
            runs_models.append((fname, m))
            info = check_gguf_tokenizer(reader, case["tok"], case_dir, toks["spm"])
            kv = {k: (v.contents() if len(v.types) == 1 or k.startswith("general") else f"[{len(v.data)} items]")
                  for k, v in reader.fields.items() if not k.startswith("GGUF.") and not k.startswith("tokenizer.ggml.")
                  and k != "tokenizer.chat_template"}
            gguf_info[fname] = {"tokenizer": info, "kv": kv, "tensor_types": sorted(set(types.values())),
                                "tensors": types}

        # Prompt: of the candidate texts, the first 10 ids (bos + 9 for SPM); pick the candidate
        # whose greedy runs have the largest smallest top-2 margin.
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(str(case_dir / "tokenizer.json"))
        best = None
        for text in PROMPT_TEXTS:
            ids = tk.encode(text, add_special_tokens=False).ids
            prompt = ([tokinfo["bos"]] + ids[:9]) if case["tok"] == "spm" else ids[:10]
            assert len(prompt) >= 8
            runs = [{"weights": w, **greedy(m, prompt)} for w, m in runs_models]
            worst = min(min(r["margins"]) for r in runs)
            if best is None or worst > best[0]:
                best = (worst, prompt, runs)
        worst, prompt, runs = best
        write_json(case_dir / "expected.json", {"prompt_ids": prompt, "runs": runs,
                                                 "tokenizer": tok_cases, "chat": chat})
        size = sum(p.stat().st_size for p in case_dir.iterdir())
        summary[name] = {"bytes": size, "files": sorted(p.name for p in case_dir.iterdir()),
                         "min_margin": {r["weights"]: min(r["margins"]) for r in runs},
                         "gguf": gguf_info}
        print(name, size, summary[name]["min_margin"], flush=True)
    shutil.rmtree(work)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    assert total < 25e6, total
    (work.parent / "kiln_llm_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if final_out.exists():
        shutil.rmtree(final_out)
    build.rename(final_out)
    print("total bytes", total)
    for p in sorted(final_out.rglob("*")):
        if p.is_file():
            print(hashlib.sha256(p.read_bytes()).hexdigest()[:16], p.stat().st_size, p.relative_to(final_out))


if __name__ == "__main__":
    main()
