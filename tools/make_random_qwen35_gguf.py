#!/usr/bin/env python3
"""A random-weight Qwen 3.5-shaped GGUF for tools/bench-vs.sh: transformers' Qwen3_5ForCausalLM
(three Gated DeltaNet layers to each gated full-attention layer, as every Qwen 3.5) at about
SmolLM2-135M's size, saved by transformers and converted by llama.cpp's own converter to Q8_0.
With --moe, Qwen3_5MoeForCausalLM of the same layers with a mixture of experts in each (32
experts of width 256, 4 per token, and a shared expert of 512: about 450M parameters of which
about 100M run per token, as Qwen 3.5 MoE's ratio of active to total).

    python3 tools/make_random_qwen35_gguf.py --llama-cpp <llama.cpp source> [--moe] OUT.gguf

Needs torch, transformers >= 5.25, tokenizers, gguf-py (from the llama.cpp source). The
tokenizer is tests/fixtures/llm-arch/qwen35-f32's (a small byte-level BPE); the vocabulary is
padded to 32000 rows as a config's vocab_size may be, so the head costs what a small model's does.
Only speed is measured on this file: its weights are random.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "llm-arch" / "qwen35-f32"

CONFIG = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, linear_conv_kernel_dim=4, linear_key_head_dim=64,
    linear_value_head_dim=64, linear_num_key_heads=8, linear_num_value_heads=16,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    vocab_size=32000,
)
MOE = dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
           shared_expert_intermediate_size=512)

CONVERT = r"""
import runpy, sys
llama_dir = sys.argv[1]
sys.path.insert(0, llama_dir + "/gguf-py")
sys.path.insert(0, llama_dir)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=pathlib.Path)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("out", type=pathlib.Path)
    args = ap.parse_args()
    import torch
    import transformers

    fx = json.loads((FIXTURE / "config.json").read_text())
    torch.manual_seed(0)
    kind = "Qwen3_5Moe" if args.moe else "Qwen3_5"
    config = {**CONFIG, **(MOE if args.moe else {})}
    cfg = getattr(transformers, kind + "TextConfig")(
        bos_token_id=fx["bos_token_id"], eos_token_id=fx["eos_token_id"], pad_token_id=None,
        initializer_range=0.02, **config)
    model = getattr(transformers, kind + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape) * 7 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape) * 0.5 - 3.0)
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) or "experts" in name:
                p.copy_(torch.randn(p.shape) * 0.02)  # the init leaves some of these zero
    work = pathlib.Path(tempfile.mkdtemp(prefix="kiln_qwen35_bench_"))
    try:
        model.save_pretrained(str(work))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(FIXTURE / f, work / f)
        cmd = [sys.executable, "-c", CONVERT, str(args.llama_cpp), str(work), "--outtype", "q8_0",
               "--outfile", str(args.out), "--no-mtp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            raise SystemExit("convert_hf_to_gguf.py failed")
    finally:
        shutil.rmtree(work)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {n / 1e6:.0f}M parameters, {args.out.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
