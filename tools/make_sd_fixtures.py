#!/usr/bin/env python3
"""Stable Diffusion parity fixtures for Kiln: tiny random-weight SD 1.x / SD 2.x pipelines in
diffusers layout, a locally built CLIP BPE tokenizer (vocab.json + merges.txt, no tokenizer.json),
and diffusers' outputs for them (text encoder, one UNet call, one VAE decode, whole 4-step
pipeline runs with five schedulers and two guidance scales).

Writes tests/fixtures/sd/<case>/ (see tests/fixtures/README.md, section `sd/`). Deterministic:
weights from a seeded torch.Generator (seed 1234 + case index), the tokenizer's merges learned by a
plain Python BPE loop on seeded generated captions, the Zen of Python and six stdlib module
docstrings (so another CPython may learn other merges). Running it twice gives
byte-identical files (with the package versions below).

How to run (CPU only, no network beyond PyPI, about 20 s):

    pip install torch transformers diffusers safetensors numpy tokenizers
    python3 tools/make_sd_fixtures.py

Versions used to produce the committed files: Python 3.11.7, torch 2.15.0 (the +cu132 wheel, run
on CPU), diffusers 0.42.1, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6,
regex 2026.5.9.

Notes:
  * transformers 5 has no Python ("slow") CLIP tokenizer any more: `CLIPTokenizer` is the
    tokenizers-backed one and `CLIPTokenizerFast` is the same class. The script checks its ids
    against its own re-implementation of OpenAI's CLIP `simple_tokenizer` BPE (without ftfy /
    html.unescape, with NFC) on every string it records.
  * References are computed in float32 (`sd2-v-tiny`'s weights are stored in f16 and upcast),
    CPU, deterministic algorithms, one thread.
  * Noise drawn by the schedulers (Euler ancestral, LCM) comes from torch's CPU generator, which a
    Rust engine cannot reproduce: the script records every tensor the scheduler draws (by wrapping
    the `randn_tensor` each scheduler module imported) so that a test can feed them back.
"""
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import tempfile
import unicodedata

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import regex  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "sd"
SEED = 1234
STEPS = 4
GUIDANCES = [1.0, 3.0]
N_MERGES = 400
MAX_LEN = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_PAT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"

TOKENIZER_STRINGS = [
    "",
    "A Photo Of An ASTRONAUT Riding a HoRsE",
    "hello,world!!! (masterpiece:1.2) [red|blue]; 'quoted' -- dash... ?!",
    "it's they're we'll I'd you've I'm don't",
    "1234 3.14 2024-01-01 x2 v1.5 1girl",
    "café naïve crème brûlée, 東京タワー, Привет мир 🚀🎨",
    "cafe\u0301 decomposed e + combining acute",
    "   leading\t\ttabs\n\nnewlines   and   trailing   ",
    "<|startoftext|>a cat<|endoftext|> sitting",
    ", ".join(["a very long prompt with many many words"] * 12),
]

# --------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE with `</w>` word ends, built from scratch
# --------------------------------------------------------------------------------------------

ADJ = ["red", "blue", "green", "golden", "dark", "bright", "small", "large", "old", "young", "happy",
       "beautiful", "detailed", "cinematic", "cute", "ancient", "futuristic", "misty", "sunny", "quiet"]
NOUN = ["cat", "dog", "horse", "astronaut", "castle", "forest", "mountain", "city", "robot", "woman",
        "man", "flower", "river", "ship", "dragon", "house", "tree", "car", "bird", "portrait"]
PLACE = ["on the moon", "in a forest", "by the sea", "in the city", "at night", "in the rain",
         "under the stars", "on a hill", "in a garden", "in space", "at sunset", "in winter"]
STYLE = ["highly detailed", "oil painting", "digital art", "photo", "4k", "8k", "trending on artstation",
         "sharp focus", "studio lighting", "watercolor", "concept art", "low quality", "blurry",
         "watermark", "masterpiece", "best quality", "bokeh", "35mm film"]


def corpus_lines():
    """The Zen of Python, the module docstrings of a few stdlib modules, 600 seeded captions."""
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    import inspect
    rng = random.Random(SEED)
    lines = codecs.decode(this.s, "rot13").split("\n")
    for mod in ("textwrap", "json", "collections", "string", "random", "statistics"):
        lines += inspect.getdoc(__import__(mod)).split("\n")
    for _ in range(600):
        s = f"a {rng.choice(['photo', 'painting', 'picture', 'drawing'])} of a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(PLACE)}"
        for _ in range(rng.randrange(0, 4)):
            s += ", " + rng.choice(STYLE)
        lines.append(s)
    lines.append(PROMPT)
    lines.append(NEGATIVE)
    return lines


def bytes_to_unicode():
    """OpenAI CLIP / GPT-2 byte -> printable unicode char map, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENC = bytes_to_unicode()


def clip_words(text):
    """CLIP's text cleaning + pre-tokenization (as transformers 5's CLIPTokenizer: NFC, \\s+ -> ' ',
    lowercase; then the CLIP regex), each word as byte-level unicode chars."""
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text).lower()
    return ["".join(BYTE_ENC[b] for b in w.encode("utf-8")) for w in regex.findall(CLIP_PAT, text)]


def learn_merges(lines, n_merges):
    counts = {}
    for line in lines:
        for w in clip_words(line):
            if w in (BOS, EOS):
                continue
            sym = tuple(w[:-1]) + (w[-1] + "</w>",)
            counts[sym] = counts.get(sym, 0) + 1
    words = sorted(counts.items())
    merges, made = [], set()
    while len(merges) < n_merges:
        pairs = {}
        for sym, c in words:
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        cand = sorted((p for p in pairs.items() if "".join(p[0]) not in made), key=lambda kv: (-kv[1], kv[0]))
        if not cand or cand[0][1] < 2:
            break
        pair = cand[0][0]
        merges.append(pair)
        made.add("".join(pair))
        new_words = []
        for sym, c in words:
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words.append((tuple(out), c))
        words = new_words
    return merges


def build_vocab(merges):
    """CLIP's vocab order: 256 byte chars, the same with `</w>`, one token per merge, then
    <|startoftext|>, <|endoftext|>."""
    toks = list(BYTE_ENC.values())
    toks += [t + "</w>" for t in toks]
    toks += ["".join(m) for m in merges]
    toks += [BOS, EOS]
    assert len(set(toks)) == len(toks)
    return {t: i for i, t in enumerate(toks)}


def ref_encode(text, vocab, merges, specials):
    """OpenAI CLIP simple_tokenizer BPE (no ftfy / html.unescape), with the special tokens split
    out of the text first, as transformers does (bos, eos, and the pad token: "!" for SD 2.x).
    Returns ids without bos/eos."""
    ranks = {m: i for i, m in enumerate(merges)}
    ids = []
    for part in regex.split("(" + "|".join(regex.escape(t) for t in specials) + ")", text):
        if part in specials:
            ids.append(vocab[part])
            continue
        for w in clip_words(part):
            word = tuple(w[:-1]) + (w[-1] + "</w>",)
            while len(word) > 1:
                pairs = set(zip(word, word[1:]))
                best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
                if best not in ranks:
                    break
                out, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        out.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        out.append(word[i])
                        i += 1
                word = tuple(out)
            ids += [vocab[t] for t in word]
    return ids


def write_json(path, obj):
    def finite(o):
        # JSON has no Infinity/NaN (scheduler configs carry lambda_min_clipped = -inf).
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        return o

    path.write_text(json.dumps(finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def write_tokenizer(tok_dir, vocab, merges, pad_token, max_len=MAX_LEN):
    """Files as in runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 tokenizer/
    (no tokenizer.json)."""
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def added(s):
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    write_json(tok_dir / "special_tokens_map.json", {
        "bos_token": added(BOS), "eos_token": added(EOS), "pad_token": pad_token, "unk_token": added(EOS)})
    write_json(tok_dir / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": added(BOS), "do_lower_case": True, "eos_token": added(EOS),
        "errors": "replace", "model_max_length": max_len, "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer", "unk_token": added(EOS)})


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}
SD21_SCHEDULER = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# Keys of runwayml/stable-diffusion-v1-5's unet/ and vae/ config.json (diffusers 0.6 layout):
# sd1-tiny keeps only these, so that a loader must supply diffusers' defaults for the rest.
SD15_UNET_KEYS = ["_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
                  "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding",
                  "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor",
                  "norm_eps", "norm_num_groups", "out_channels", "sample_size", "up_block_types"]
SD15_VAE_KEYS = ["_class_name", "_diffusers_version", "act_fn", "block_out_channels", "down_block_types",
                 "in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "out_channels",
                 "sample_size", "up_block_types"]

CASES = [
    dict(name="sd1-tiny", dtype="float32", variant=None, pad_token="<|endoftext|>", old_layout=True,
         scheduler=SD15_SCHEDULER,
         unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=8, use_linear_projection=False),
         clip=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=MAX_LEN, hidden_act="quick_gelu", projection_dim=32),
         vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16, scaling_factor=0.18215)),
    dict(name="sd2-v-tiny", dtype="float16", variant="fp16", pad_token="!", old_layout=False,
         scheduler=SD21_SCHEDULER,
         unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 48), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                   attention_head_dim=(2, 3), norm_num_groups=16, use_linear_projection=True,
                   upcast_attention=True),
         clip=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                   max_position_embeddings=MAX_LEN, hidden_act="gelu", projection_dim=48),
         vae=dict(block_out_channels=(32, 48), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16, scaling_factor=0.18215)),
]


def init_weights(model, g, gain):
    """Seeded init, independent of the libraries' own: conv/linear N(0, (gain/sqrt(fan_in))^2),
    biases N(0, 0.1^2), norm weights U(0.6, 1.4), norm biases N(0, 0.1^2), embeddings N(0, 0.5^2)."""
    with torch.no_grad():
        for _, mod in sorted(model.named_modules()):
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (gain / fan_in ** 0.5))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 0.8 + 0.6)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5)
    n_set = sum(p.numel() for m in model.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding))
                for p in m.parameters(recurse=False))
    assert n_set == sum(p.numel() for p in model.parameters()), "a parameter was left with its library init"


def build_pipeline(case, idx, tok_dir, vocab):
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    g = torch.Generator().manual_seed(SEED + idx)
    tcfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                          pad_token_id=vocab[case["pad_token"]], layer_norm_eps=1e-5, **case["clip"])
    text_encoder = CLIPTextModel(tcfg).eval()
    init_weights(text_encoder, g, 1.0)
    unet = UNet2DConditionModel(**case["unet"]).eval()
    init_weights(unet, g, 1.3)
    vae = AutoencoderKL(**case["vae"]).eval()
    init_weights(vae, g, 1.3)
    sched_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[case["scheduler"]["_class_name"]]
    scheduler = sched_cls.from_config({k: v for k, v in case["scheduler"].items() if not k.startswith("_")})
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    dtype = getattr(torch, case["dtype"])
    if dtype != torch.float32:
        # The stored weights are the f16 rounding; the reference runs in f32 on exactly those.
        pipe.to(dtype)
    return pipe


def save_pipeline(case, pipe, case_dir, vocab, merges):
    """`sd2-v-tiny` stays exactly as `save_pretrained` of diffusers 0.42 / transformers 5 writes
    it (its text encoder's tensors have no `text_model.` prefix, the tokenizer and the scheduler
    are what those libraries save). `sd1-tiny` is then rewritten into the layout of the folder
    people download as runwayml/stable-diffusion-v1-5, which older libraries wrote: a loader must
    read both."""
    pipe.save_pretrained(str(case_dir), safe_serialization=True, variant=case["variant"])
    if not case["old_layout"]:
        return
    write_tokenizer(case_dir / "tokenizer", vocab, merges, case["pad_token"])
    write_json(case_dir / "scheduler" / "scheduler_config.json", case["scheduler"])
    # transformers 5's CLIPTextModel has no `text_model` wrapper and saves `embeddings.…`,
    # `encoder.…`, `final_layer_norm.…`; the published SD 1.5 text encoder (transformers 4) has
    # `text_model.` in front, which transformers 5 strips on load.
    from safetensors.torch import load_file, save_file
    st = case_dir / "text_encoder" / "model.safetensors"
    sd = load_file(str(st))
    assert not any(k.startswith("text_model.") for k in sd)
    save_file({"text_model." + k: v for k, v in sd.items()}, str(st), metadata={"format": "pt"})
    te = case_dir / "text_encoder" / "config.json"
    cfg = json.loads(te.read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    # runwayml/stable-diffusion-v1-5's VAE (and many other published VAEs) still has the
    # names of diffusers' old AttentionBlock in its mid blocks: query/key/value/proj_attn
    # (2-D Linear weights, as to_q/to_k/to_v/to_out.0); diffusers renames them on load.
    vp = case_dir / "vae" / "diffusion_pytorch_model.safetensors"
    vsd = load_file(str(vp))
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def old_name(k):
        m = regex.fullmatch(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
        return k if m is None else f"{m[1]}.{ren[m[2]]}.{m[3]}"
    new_vsd = {old_name(k): v for k, v in vsd.items()}
    assert sum(k != old_name(k) for k in vsd) == 16
    save_file(new_vsd, str(vp), metadata={"format": "pt"})
    for key in ("unet", "vae"):
        p = case_dir / key / "config.json"
        c = json.loads(p.read_text())
        keep = SD15_UNET_KEYS if key == "unet" else SD15_VAE_KEYS
        write_json(p, {k: c[k] for k in keep})
    write_json(te, dict(sorted(cfg.items())))


def load_pipeline(case, case_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(case_dir), variant=case["variant"],
                                                   torch_dtype=getattr(torch, case["dtype"]))
    return pipe.to(torch.float32)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------

SCHEDULERS = [  # (file tag, diffusers class, extra config)
    ("ddim", "DDIMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("lcm", "LCMScheduler", {}),
]
SCHED_MODULES = ["scheduling_ddim", "scheduling_euler_discrete", "scheduling_euler_ancestral_discrete",
                 "scheduling_dpmsolver_multistep", "scheduling_lcm"]


class NoiseRecorder:
    """Wraps the `randn_tensor` that each scheduler module imported and records what it returns;
    with `replay`, returns those tensors in order instead of drawing."""

    def __init__(self, replay=None):
        import importlib
        self.mods = [importlib.import_module("diffusers.schedulers." + m) for m in SCHED_MODULES]
        self.orig = [m.randn_tensor for m in self.mods]
        self.drawn = []
        self.replay = None if replay is None else list(replay)

    def __enter__(self):
        for m, f in zip(self.mods, self.orig):
            def wrapped(shape, *a, _f=f, **kw):
                if self.replay is not None:  # hand back recorded noise instead of drawing
                    t = self.replay.pop(0)
                    assert tuple(t.shape) == tuple(shape)
                else:
                    t = _f(shape, *a, **kw)
                self.drawn.append(t.detach().clone())
                return t
            m.randn_tensor = wrapped
        return self

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self.orig):
            m.randn_tensor = f


def jsonable(cfg):
    """A scheduler config as JSON; `_use_default_values` (the keys that took the class default,
    which from_config does not carry over to another class) sorted, as it is built from a set."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()}
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def f32(t):
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy(), dtype="<f4")


def run_case(pipe, latents, unet_in, unet_t, vae_in):
    """All reference outputs of one pipeline. Returns (arrays, info)."""
    import diffusers
    arrays, info = {}, {}
    tok = pipe.tokenizer
    with torch.no_grad():
        ids = tok([NEGATIVE, PROMPT], padding="max_length", max_length=MAX_LEN, truncation=True,
                  return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids).last_hidden_state
        arrays["text_hidden"] = f32(hidden)
        # The pipeline's own prompt encoding must be exactly this.
        pe, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        assert torch.equal(pe, hidden[1:]) and torch.equal(ne, hidden[:1])
        arrays["unet_out"] = f32(pipe.unet(unet_in, unet_t, encoder_hidden_states=hidden).sample)
        arrays["vae_out"] = f32(pipe.vae.decode(vae_in).sample)
    info["ids"] = ids.tolist()
    base_config = pipe.scheduler.config
    info["schedulers"] = {}
    for tag, cls_name, extra in SCHEDULERS:
        cls = getattr(diffusers, cls_name)
        sched = cls.from_config(base_config, **extra)
        probe = cls.from_config(base_config, **extra)
        probe.set_timesteps(STEPS)
        sinfo = {"class": cls_name, "config": jsonable(sched.config),
                 "timesteps": [int(t) for t in probe.timesteps],
                 "sigmas": [float(s) for s in probe.sigmas] if hasattr(probe, "sigmas") else None,
                 "init_noise_sigma": float(probe.init_noise_sigma), "runs": {}}
        pipe.scheduler = sched
        for gs in GUIDANCES:
            steps = []

            def on_step(p, i, t, kw):
                steps.append(kw["latents"].detach().clone())
                return kw
            with NoiseRecorder() as rec, torch.no_grad():
                out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=gs,
                           latents=latents.clone(), generator=torch.Generator().manual_seed(0),
                           output_type="np", callback_on_step_end=on_step,
                           callback_on_step_end_tensor_inputs=["latents"])
            key = f"{tag}_g{gs:g}"
            img = out.images
            assert img.shape == (1, 16, 16, 3) and img.dtype == np.float32
            arrays["image_" + key] = np.ascontiguousarray(img, dtype="<f4")
            arrays["final_latents_" + key] = f32(steps[-1])
            arrays["steps_" + key] = f32(torch.stack(steps))
            if rec.drawn:
                arrays["noise_" + key] = f32(torch.stack(rec.drawn))
                # The recorded noise is all the randomness: replayed under another seed, it gives
                # the same image.
                pipe.scheduler = cls.from_config(base_config, **extra)
                with NoiseRecorder(replay=rec.drawn) as rep, torch.no_grad():
                    out2 = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=gs,
                                latents=latents.clone(), generator=torch.Generator().manual_seed(4321),
                                output_type="np")
                assert not rep.replay and np.array_equal(out2.images, img), key
            # The image is the VAE decode of the final latents / scaling_factor, denormalized.
            with torch.no_grad():
                dec = pipe.vae.decode(steps[-1] / pipe.vae.config.scaling_factor).sample
            manual = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            assert np.abs(manual - img).max() < 1e-6
            sinfo["runs"][f"g{gs:g}"] = {
                "guidance_scale": gs, "do_classifier_free_guidance": bool(pipe.do_classifier_free_guidance),
                "noise_draws": len(rec.drawn), "image_std": float(img.std()),
                "image_clipped_fraction": float(((img <= 0) | (img >= 1)).mean())}
        info["schedulers"][tag] = sinfo
    pipe.scheduler = cls_restore(base_config)
    return arrays, info


def cls_restore(config):
    import diffusers
    return getattr(diffusers, config["_class_name"]).from_config(config)



# --------------------------------------------------------------------------------------------
# Shared with the scripts that build on these fixtures (make_sd_edit/fewstep/lora_fixtures.py)
# --------------------------------------------------------------------------------------------

def as_f32(a):
    """A torch tensor or numpy array as contiguous little-endian f32 (what the .npy files hold)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().to(torch.float32).cpu().numpy()
    return np.ascontiguousarray(np.asarray(a), dtype="<f4")


def new_build(out):
    """An empty `<out>.new` folder to build into (the old one removed)."""
    build = out.parent / (out.name + ".new")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    return build


def finish_build(build, out, limit):
    """Checks the build's size against `limit` bytes and puts it in place of `out`; the size."""
    total = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    assert total < limit, total
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    return total


def load_sd1(path, scheduler=None):
    """The sd1-tiny pipeline in f32 (optionally with another scheduler class), progress bars off."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def main():
    build = OUT.parent / (OUT.name + ".new")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    import diffusers
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    merges = learn_merges(corpus_lines(), N_MERGES)
    vocab = build_vocab(merges)
    assert len(merges) == N_MERGES
    summary = {}
    for idx, case in enumerate(CASES):
        name = case["name"]
        case_dir = build / name
        case_dir.mkdir()
        with tempfile.TemporaryDirectory() as td:
            tok_dir = pathlib.Path(td) / "tokenizer"
            write_tokenizer(tok_dir, vocab, merges, case["pad_token"])
            pipe = build_pipeline(case, idx, tok_dir, vocab)
        save_pipeline(case, pipe, case_dir, vocab, merges)
        pipe.to(torch.float32)
        # The scheduler as the folder has it: for sd2-v-tiny that is diffusers' full saved config,
        # whose explicit `timestep_spacing` "leading" then carries over to the other schedulers'
        # from_config (SD 2.1's published file has no such key: Euler would take "linspace").
        pipe.scheduler = cls_restore(json.loads((case_dir / "scheduler" / "scheduler_config.json").read_text()))

        # Tokenizer: both class names load the folder (sd1-tiny: vocab.json + merges.txt;
        # sd2-v-tiny: the tokenizer.json transformers 5 saves) and agree with the reference BPE;
        # `pad` is the folder's pad token.
        tk = CLIPTokenizer.from_pretrained(str(case_dir / "tokenizer"))
        tkf = CLIPTokenizerFast.from_pretrained(str(case_dir / "tokenizer"))
        assert tk.model_max_length == MAX_LEN and tk.pad_token == case["pad_token"]
        tok_cases = []
        for s in TOKENIZER_STRINGS + [PROMPT, NEGATIVE]:
            enc = tk(s, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
            assert tkf(s, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids == enc
            raw = ref_encode(s, vocab, merges, [BOS, EOS, case["pad_token"]])
            assert tk(s, add_special_tokens=False).input_ids == raw, (s, raw)
            body = raw[:MAX_LEN - 2]
            manual = [vocab[BOS]] + body + [vocab[EOS]]
            manual += [vocab[case["pad_token"]]] * (MAX_LEN - len(manual))
            assert enc == manual, s
            tok_cases.append({"text": s, "ids": enc, "n_tokens": len(raw), "truncated": len(raw) > MAX_LEN - 2})
        assert any(c["truncated"] for c in tok_cases)

        g = torch.Generator().manual_seed(SEED + 100 + idx)
        latents = torch.randn((1, 4, 8, 8), generator=g)
        unet_in = torch.randn((2, 4, 8, 8), generator=g)
        unet_t = 981
        vae_in = torch.randn((1, 4, 8, 8), generator=g) / case["vae"]["scaling_factor"]

        arrays, info = run_case(pipe, latents, unet_in, unet_t, vae_in)
        arrays.update(latents=f32(latents), unet_in=f32(unet_in), vae_in=f32(vae_in))
        tp = [c for c in tok_cases if c["text"] in (PROMPT, NEGATIVE)]
        assert info["ids"] == [tp[1]["ids"], tp[0]["ids"]]

        # Reloading the folder reproduces everything (configs rewritten to the old layout included).
        re_pipe = load_pipeline(case, case_dir)
        assert type(re_pipe.scheduler).__name__ == case["scheduler"]["_class_name"]
        assert re_pipe.tokenizer.pad_token == case["pad_token"]
        for a, b in zip(pipe.components.values(), re_pipe.components.values()):
            if isinstance(a, torch.nn.Module):
                sa, sb = a.state_dict(), b.state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), type(a)
                assert all(p.dtype == torch.float32 for p in b.parameters())
        re_arrays, re_info = run_case(re_pipe, latents, unet_in, unet_t, vae_in)
        # Bit-equal on the machine that first made these files; on others torch's CPU kernels
        # (chosen by CPU features and buffer alignment) can differ in the last bits (1.5e-6 seen).
        for k, v in re_arrays.items():
            assert np.allclose(v, arrays[k], rtol=0, atol=1e-5 * (1 + np.abs(v).max())), \
                (name, k, np.abs(v - arrays[k]).max())
        def rounded(o):
            if isinstance(o, float):
                return float(f"{o:.4g}")
            if isinstance(o, dict):
                return {k: rounded(v) for k, v in o.items()}
            return [rounded(v) for v in o] if isinstance(o, list) else o
        assert json.dumps(rounded(re_info)) == json.dumps(rounded(info))

        for k, v in sorted(arrays.items()):
            np.save(case_dir / f"{k}.npy", v, allow_pickle=False)
        sched_cfg = jsonable(pipe.scheduler.config)
        write_json(case_dir / "expected.json", {
            "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dtype_on_disk": case["dtype"], "variant": case["variant"], "compute_dtype": "float32",
            "prompt": PROMPT, "negative_prompt": NEGATIVE,
            "prompt_ids": tp[0]["ids"], "negative_prompt_ids": tp[1]["ids"],
            "text_hidden_batch": ["negative_prompt", "prompt"],
            "unet_timestep": unet_t,
            "vae_scaling_factor": case["vae"]["scaling_factor"],
            "steps": STEPS, "generator_seed": 0,
            "do_classifier_free_guidance": {f"g{gs:g}": gs > 1 for gs in GUIDANCES},
            "pipeline_scheduler": {"class": case["scheduler"]["_class_name"], "config": sched_cfg},
            "schedulers": info["schedulers"],
            "tokenizer": tok_cases,
            "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                       for k, v in sorted(arrays.items())},
        })
        size = sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file())
        summary[name] = size
        stats = {k: round(float(np.std(v)), 3) for k, v in arrays.items()
                 if k in ("text_hidden", "unet_out", "vae_out") or k.startswith("image_")}
        print(name, size, stats, flush=True)
        for tag, s in info["schedulers"].items():
            print("  ", tag, s["timesteps"], {g: (r["noise_draws"], round(r["image_std"], 3),
                                                  round(r["image_clipped_fraction"], 3)) for g, r in s["runs"].items()})
    total = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    assert total < 15e6, total
    if OUT.exists():
        shutil.rmtree(OUT)
    build.rename(OUT)
    print("total bytes", total)
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(hashlib.sha256(p.read_bytes()).hexdigest()[:16], p.stat().st_size, p.relative_to(OUT))


if __name__ == "__main__":
    main()
