#!/usr/bin/env python3
"""LoRA parity fixtures for Kiln: random LoRAs for tests/fixtures/sd/sd1-tiny's U-Net and text
encoder, saved as people download them, and diffusers' images with them merged.

Writes tests/fixtures/sd-lora/ (see tests/fixtures/README.md, section `sd-lora/`):
  peft.safetensors     the diffusers/PEFT layout, exactly as StableDiffusionPipeline.save_lora_weights
                       of diffusers 0.42 (peft 0.21) writes it: `unet.<module>.lora_A.weight` /
                       `lora_B.weight`, `text_encoder.<module>...`, rank and alpha in the header's
                       `lora_adapter_metadata` (U-Net: rank 4, alpha 8, attention projections and
                       ResNet convolutions (3x3 LoRA-C); text encoder: rank 2, alpha 2)
  kohya.safetensors    the same LoRA in the kohya-ss naming most downloaded files use
                       (`lora_unet_<module with _>.lora_down.weight` / `lora_up.weight` / `alpha`,
                       `lora_te_...`), written by this script as sd-scripts names them; diffusers
                       loads it through its own kohya converter for the reference
  unet-only.safetensors a second LoRA (U-Net attention only, rank 2), to stack with the first
  <run>.npy            images [1, 16, 16, 3] in [0, 1] from sd1-tiny's latents.npy, DDIM, 4 steps,
                       guidance 3, with the LoRAs fused at the run's scales
  expected.json        the runs and versions

How to run (CPU only, about 10 s; needs tests/fixtures/sd from tools/make_sd_fixtures.py):

    pip install torch transformers diffusers peft safetensors numpy
    python3 tools/make_sd_lora_fixtures.py
"""
import hashlib
import json
import pathlib
import shutil
import sys

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_sd_fixtures import as_f32, finish_build, load_sd1, new_build, write_json  # noqa: E402

import diffusers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

SD1 = REPO / "tests" / "fixtures" / "sd" / "sd1-tiny"
OUT = REPO / "tests" / "fixtures" / "sd-lora"
SEED = 31337
STEPS = 4
GUIDANCE = 3.0
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# (run, [(file, scale)])
RUNS = [
    ("peft_s1", [("peft.safetensors", 1.0)]),
    ("peft_s0.7", [("peft.safetensors", 0.7)]),
    ("kohya_s0.7", [("kohya.safetensors", 0.7)]),
    ("peft_s0.7_unet_only_s1.5", [("peft.safetensors", 0.7), ("unet-only.safetensors", 1.5)]),
]


def pipeline():
    from diffusers import DDIMScheduler
    return load_sd1(SD1, DDIMScheduler)


def randomize(module, g, scale):
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p[0].numel()) ** 0.5)


def metadata(cfg):
    """A LoraConfig as save_lora_weights records it, its module set sorted (Python's set order
    follows the hash seed, and the file should not change between runs)."""
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return d


def kohya(sd, meta):
    """PEFT keys -> kohya-ss names (sd-scripts' for SD 1.x: diffusers module paths, dots as
    underscores), with each module's alpha as a tensor."""
    out = {}
    for k, v in sd.items():
        comp, rest = k.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp]
        # sd-scripts names the text encoder's modules under transformers 4's `text_model.`.
        path = ("text_model." + module) if comp == "text_encoder" and not module.startswith("text_model.") else module
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(meta[comp]["lora_alpha"]))
    return out


def main():
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    build = new_build(OUT)
    g = torch.Generator().manual_seed(SEED)

    # The LoRA as training would leave it, saved by diffusers.
    pipe = pipeline()
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=True)
    tcfg = LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights=True)
    pipe.unet.add_adapter(ucfg)
    # transformers 5's own add_adapter wants peft >= 0.22, which PyPI's mirror here lacks:
    # PEFT's injection is what it calls.
    from peft import inject_adapter_in_model
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    randomize(pipe.unet, g, 0.5)
    randomize(pipe.text_encoder, g, 0.5)
    StableDiffusionPipeline.save_lora_weights(
        str(build), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=metadata(ucfg), text_encoder_lora_adapter_metadata=metadata(tcfg),
        weight_name="peft.safetensors", safe_serialization=True)
    with safe_open(str(build / "peft.safetensors"), "pt") as f:
        header_meta = f.metadata()
    meta_json = json.loads(header_meta["lora_adapter_metadata"])
    meta = {"unet": {"lora_alpha": 8, "r": 4}, "text_encoder": {"lora_alpha": 2, "r": 2}}
    peft_sd = load_file(str(build / "peft.safetensors"))
    save_file(kohya(peft_sd, meta), str(build / "kohya.safetensors"))

    # A second, U-Net-only LoRA.
    pipe2 = pipeline()
    u2 = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=True)
    pipe2.unet.add_adapter(u2)
    randomize(pipe2.unet, g, 0.8)
    StableDiffusionPipeline.save_lora_weights(
        str(build), unet_lora_layers=get_peft_model_state_dict(pipe2.unet), unet_lora_adapter_metadata=metadata(u2),
        weight_name="unet-only.safetensors", safe_serialization=True)

    latents = torch.from_numpy(np.load(SD1 / "latents.npy"))
    arrays, runs = {}, {}
    with torch.no_grad():
        base = pipeline()(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          latents=latents.clone(), output_type="np").images
    arrays["no_lora"] = as_f32(base)
    for name, loras in RUNS:
        p = pipeline()
        names = []
        for i, (file, scale) in enumerate(loras):
            p.load_lora_weights(str(build), weight_name=file, adapter_name=f"a{i}")
            names.append(f"a{i}")
        p.set_adapters(names, [s for _, s in loras])
        p.fuse_lora(adapter_names=names, lora_scale=1.0)
        p.unload_lora_weights()
        with torch.no_grad():
            im = p(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=latents.clone(), output_type="np").images
        arrays[name] = as_f32(im)
        runs[name] = dict(loras=[[f, s] for f, s in loras], diff_from_no_lora=round(float(np.abs(im - base).max()), 4))
        print(name, runs[name], flush=True)
    # The kohya file says what the PEFT one says.
    assert np.abs(arrays["kohya_s0.7"] - arrays["peft_s0.7"]).max() < 1e-4
    assert runs["peft_s1"]["diff_from_no_lora"] > 0.05
    for k, v in sorted(arrays.items()):
        np.save(build / f"{k}.npy", v, allow_pickle=False)
    import peft
    import transformers
    write_json(build / "expected.json", {
        "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__,
        "peft_version": peft.__version__, "torch_version": torch.__version__,
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE, "scheduler": "ddim",
        "latents": "tests/fixtures/sd/sd1-tiny/latents.npy", "peft_header_metadata": meta_json, "runs": runs,
        "n_keys": {"peft": len(peft_sd), "kohya": len(load_file(str(build / "kohya.safetensors")))},
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    total = finish_build(build, OUT, 2e6)
    print("total bytes", total)


if __name__ == "__main__":
    main()
