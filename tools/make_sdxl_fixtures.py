#!/usr/bin/env python3
"""SDXL parity fixtures for Kiln: a tiny random-weight Stable Diffusion XL pipeline (two text
encoders, pooled text embeddings and add_time_ids, transformer_layers_per_block, the SDXL VAE
scaling) and the SDXL-Turbo layout, against diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline.

Writes tests/fixtures/sdxl/ (see tests/fixtures/README.md, section `sdxl/`):
  sdxl-tiny/           a pipeline exactly as StableDiffusionXLPipeline.save_pretrained of diffusers
                       0.42 / transformers 5 writes it with variant="fp16" (the weights SDXL repos
                       ship, `*.fp16.safetensors`): CLIPTextModel (quick_gelu) and
                       CLIPTextModelWithProjection (gelu, eos_token_id 2 as SDXL's config has it),
                       both with tests/fixtures/sd/sd1-tiny's vocabulary (tokenizer_2 pads with
                       "!", as SDXL's does); a U-Net with addition_embed_type "text_time",
                       transformer_layers_per_block (1, 2), a DownBlock2D first, linear
                       projections; a VAE with scaling_factor 0.13025 and force_upcast; SDXL
                       base's EulerDiscreteScheduler; force_zeros_for_empty_prompt
  sdxl-turbo-tiny/     the same models with SDXL-Turbo's scheduler (Euler, "trailing")
  prompt_embeds.npy,   encode_prompt's outputs for the prompt: both encoders' penultimate hidden
  pooled.npy           states side by side [1, 77, 80], and the second encoder's projected pooled
                       output [1, 24]
  latents.npy,         the initial latents of the 16 x 16 runs and of the 16 x 24 (h x w) one
  latents_wide.npy
  noise.npy            the noise the img2img run adds (randn_tensor handed this tensor)
  lora.safetensors     a random LoRA on the U-Net and both text encoders as
                       StableDiffusionXLPipeline.save_lora_weights writes it (PEFT names:
                       unet., text_encoder., text_encoder_2.); lora_s0.8.npy the euler_g5 run with
                       it fused at scale 0.8
  lora-kohya.safetensors  the same LoRA in kohya-ss's SDXL names (sd-scripts': the U-Net's
                       original SGM paths, lora_unet_input_blocks_4_1_..., lora_te1_/lora_te2_
                       for the encoders, alpha tensors); diffusers loads it to the same image
  <run>.npy            each run's image [1, h, w, 3] in [0, 1]
  expected.json        the runs and versions

The reference runs load the fp16 files into f32 (the values Kiln reads) and run on the CPU.

How to run (CPU only, about 15 s; needs tests/fixtures/sd and tests/fixtures/sd-edit from
tools/make_sd_fixtures.py and tools/make_sd_edit_fixtures.py):

    pip install torch transformers diffusers safetensors numpy pillow
    python3 tools/make_sdxl_fixtures.py
"""
import hashlib
import pathlib
import sys

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_sd_fixtures import as_f32, finish_build, init_weights, new_build, write_json  # noqa: E402
from make_sd_edit_fixtures import patched  # noqa: E402

import diffusers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

SD1 = REPO / "tests" / "fixtures" / "sd" / "sd1-tiny"
EDIT = REPO / "tests" / "fixtures" / "sd-edit"
OUT = REPO / "tests" / "fixtures" / "sdxl"
SEED = 2024
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"

TE1 = dict(vocab_size=914, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=912, eos_token_id=913,
           pad_token_id=1, projection_dim=32)
TE2 = dict(vocab_size=914, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
           projection_dim=24)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=32 + 48,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=16, scaling_factor=0.13025, force_upcast=True)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json.
BASE_SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                      interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
                      sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)
# stabilityai/sdxl-turbo's scheduler/scheduler_config.json (the keys that differ).
TURBO_SCHEDULER = dict(BASE_SCHEDULER, timestep_spacing="trailing")

# (run, model, pipeline, scheduler class, steps, guidance, negative prompt, (h, w), strength)
RUNS = [
    ("euler_g5", "sdxl-tiny", "t2i", "EulerDiscreteScheduler", 4, 5.0, NEGATIVE, (16, 16), None),
    # No negative prompt: force_zeros_for_empty_prompt makes its embeddings zeros.
    ("euler_g5_zero_negative", "sdxl-tiny", "t2i", "EulerDiscreteScheduler", 4, 5.0, None, (16, 16), None),
    ("dpmpp_2m_g3", "sdxl-tiny", "t2i", "DPMSolverMultistepScheduler", 4, 3.0, NEGATIVE, (16, 16), None),
    ("euler_g1_wide", "sdxl-tiny", "t2i", "EulerDiscreteScheduler", 3, 1.0, None, (16, 24), None),
    ("turbo_1_g0", "sdxl-turbo-tiny", "t2i", "EulerDiscreteScheduler", 1, 0.0, None, (16, 16), None),
    ("img2img_euler_s0.6_g5", "sdxl-tiny", "img2img", "EulerDiscreteScheduler", 4, 5.0, NEGATIVE, (16, 16), 0.6),
]


def build(out):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    g = torch.Generator().manual_seed(SEED)
    te1 = CLIPTextModel(CLIPTextConfig(**TE1)).eval()
    init_weights(te1, g, 1.0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2)).eval()
    init_weights(te2, g, 1.0)
    unet = UNet2DConditionModel(**UNET).eval()
    init_weights(unet, g, 1.3)
    vae = AutoencoderKL(**VAE).eval()
    init_weights(vae, g, 1.3)
    tok1 = CLIPTokenizer.from_pretrained(str(SD1 / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(SD1 / "tokenizer"), pad_token="!")
    for name, sched in (("sdxl-tiny", BASE_SCHEDULER), ("sdxl-turbo-tiny", TURBO_SCHEDULER)):
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(sched),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.to(torch.float16).save_pretrained(str(out / name), safe_serialization=True, variant="fp16")
        pipe.to(torch.float32)
    assert (out / "sdxl-tiny" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (out / "sdxl-tiny" / "text_encoder_2" / "model.fp16.safetensors").is_file()


def load(path):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), variant="fp16", torch_dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora(out, base, arrays, runs):
    """A LoRA on all three parts saved by diffusers, and the euler_g5 run with it fused."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    sys.path.insert(0, str(REPO / "tools"))
    from make_sd_lora_fixtures import metadata, randomize
    g = torch.Generator().manual_seed(SEED + 10)
    pipe = load(out / "sdxl-tiny")
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=True,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.2"])
    tcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=True)
    pipe.unet.add_adapter(ucfg)
    # transformers 5's add_adapter wants peft >= 0.22, which PyPI's mirror here lacks: PEFT's
    # injection is what it calls.
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    inject_adapter_in_model(tcfg, pipe.text_encoder_2)
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        randomize(m, g, 0.15)
    StableDiffusionXLPipeline.save_lora_weights(
        str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=metadata(ucfg), text_encoder_lora_adapter_metadata=metadata(tcfg),
        text_encoder_2_lora_adapter_metadata=metadata(tcfg), weight_name="lora.safetensors",
        safe_serialization=True)
    p = load(out / "sdxl-tiny")
    p.load_lora_weights(str(out), weight_name="lora.safetensors", adapter_name="a")
    p.set_adapters(["a"], [0.8])
    p.fuse_lora(adapter_names=["a"], lora_scale=1.0)
    p.unload_lora_weights()
    run = dict(RUNS_BY_NAME["euler_g5"])
    with torch.no_grad():
        im = p(PROMPT, negative_prompt=run["negative_prompt"], num_inference_steps=run["steps"],
               guidance_scale=run["guidance"], height=16, width=16,
               latents=torch.from_numpy(arrays["latents"]).clone(), output_type="np").images
    arrays["lora_s0.8"] = as_f32(im)
    diff = float(np.abs(im - arrays["euler_g5"]).max())
    assert diff > 0.05, diff
    # The kohya (SGM-named) file: diffusers converts its U-Net part back to the same fused
    # weights. (Its text-encoder part it maps to the old `to_q_lora` names, which transformers
    # 5's CLIP drops as unexpected keys, so only the U-Net is compared here; Kiln's test checks
    # the whole file against lora_s0.8.)
    from safetensors.torch import load_file, save_file
    save_file(kohya_sgm(load_file(str(out / "lora.safetensors")), pipe.unet.config), str(out / "lora-kohya.safetensors"))
    pk = load(out / "sdxl-tiny")
    pk.load_lora_weights(str(out), weight_name="lora-kohya.safetensors", adapter_name="k")
    pk.set_adapters(["k"], [0.8])
    pk.fuse_lora(adapter_names=["k"], lora_scale=1.0)
    pk.unload_lora_weights()
    su, sk = p.unet.state_dict(), pk.unet.state_dict()
    changed = [k for k in su if not torch.equal(su[k], base.unet.state_dict()[k])]
    assert changed and all(float((su[k] - sk[k]).abs().max()) < 1e-6 for k in su), "the kohya U-Net differs"
    runs["lora_s0.8"] = dict(run, lora="lora.safetensors", lora_scale=0.8, diff_from_no_lora=round(diff, 4))
    print("lora_s0.8", runs["lora_s0.8"], flush=True)


def kohya_sgm(sd, unet_cfg):
    """PEFT keys -> kohya-ss's SDXL names: the U-Net's modules at their original (SGM) paths
    (input_blocks / middle_block / output_blocks, ResNet layers in_layers / emb_layers /
    out_layers / skip_connection), lora_te1_ / lora_te2_ for the text encoders, dots as
    underscores, each module's alpha as a tensor (the file's metadata alphas: 8 for the U-Net, 4
    for the encoders)."""
    L = unet_cfg.layers_per_block
    up_cross = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def resnet(rest):
        return [res.get(rest[0], rest[0])] + rest[1:]

    def sgm(path):
        p = path.split(".")
        if p[0] == "down_blocks":
            lvl, kind, idx, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "downsamplers":
                return f"input_blocks.{1 + lvl * (L + 1) + L}.0.op"
            k = 1 + lvl * (L + 1) + idx
            return ".".join([f"input_blocks.{k}.{0 if kind == 'resnets' else 1}"] + (resnet(rest) if kind == "resnets" else rest))
        if p[0] == "up_blocks":
            lvl, kind, idx, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "upsamplers":
                return f"output_blocks.{lvl * (L + 1) + L}.{2 if up_cross[lvl] else 1}.conv"
            k = lvl * (L + 1) + idx
            return ".".join([f"output_blocks.{k}.{0 if kind == 'resnets' else 1}"] + (resnet(rest) if kind == "resnets" else rest))
        if p[0] == "mid_block":
            j = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(p[1:3])]
            return ".".join([f"middle_block.{j}"] + (resnet(p[3:]) if p[1] == "resnets" else p[3:]))
        raise ValueError(path)

    out = {}
    for k, v in sd.items():
        comp, rest = k.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if comp == "unet":
            name, alpha = "lora_unet_" + sgm(module).replace(".", "_"), 8.0
        else:
            m = module if module.startswith("text_model.") else "text_model." + module
            name, alpha = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp] + m.replace(".", "_"), 4.0
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


RUNS_BY_NAME = {r[0]: dict(model=r[1], pipeline=r[2], scheduler=r[3], steps=r[4], guidance=r[5],
                           negative_prompt=r[6], height=r[7][0], width=r[7][1], strength=r[8]) for r in RUNS}


def main():
    import PIL
    import transformers
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_mod
    from PIL import Image

    out = new_build(OUT)
    build(out)
    models = {name: load(out / name) for name in ("sdxl-tiny", "sdxl-turbo-tiny")}
    base = models["sdxl-tiny"]
    assert base.text_encoder.dtype == torch.float32 and base.vae.config.force_upcast
    assert base.config.force_zeros_for_empty_prompt

    arrays = {}
    with torch.no_grad():
        pe, _, pooled, _ = base.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    arrays["prompt_embeds"], arrays["pooled"] = as_f32(pe), as_f32(pooled)
    latents = {
        (16, 16): torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED + 1)),
        (16, 24): torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(SEED + 2)),
    }
    arrays["latents"], arrays["latents_wide"] = as_f32(latents[(16, 16)]), as_f32(latents[(16, 24)])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED + 3))
    arrays["noise"] = as_f32(noise)
    init = Image.open(EDIT / "init.png").convert("RGB")

    runs = {}
    for name, model, kind, sched_cls, steps, guidance, negative, (h, w), strength in RUNS:
        pipe = models[model]
        sched = getattr(diffusers, sched_cls).from_config(pipe.scheduler.config)
        if kind == "t2i":
            pipe.scheduler = sched
            with torch.no_grad():
                im = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                          height=h, width=w, latents=latents[(h, w)].clone(), output_type="np").images
        else:
            i2i = StableDiffusionXLImg2ImgPipeline(**dict(pipe.components, scheduler=sched))
            i2i.set_progress_bar_config(disable=True)
            assert not i2i.config.requires_aesthetics_score
            with patched(img2img_mod, noise) as p, torch.no_grad():
                im = i2i(PROMPT, image=init, strength=strength, negative_prompt=negative,
                         num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
            assert p.calls == 1
        assert im.shape == (1, h, w, 3), im.shape
        arrays[name] = as_f32(im)
        runs[name] = dict(model=model, pipeline=kind, scheduler=sched_cls, steps=steps, guidance=guidance,
                          negative_prompt=negative, height=h, width=w, strength=strength,
                          image_std=round(float(im.std()), 4))
        print(name, runs[name], flush=True)
    lora(out, base, arrays, runs)
    # Zero negative embeddings are not the same as an encoded empty prompt's, and the runs differ.
    assert np.abs(arrays["euler_g5"] - arrays["euler_g5_zero_negative"]).max() > 0.02

    for k, v in sorted(arrays.items()):
        np.save(out / f"{k}.npy", v, allow_pickle=False)
    write_json(out / "expected.json", {
        "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "pillow_version": PIL.__version__, "prompt": PROMPT,
        "negative_prompt": NEGATIVE, "runs": runs,
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    total = finish_build(out, OUT, 5e6)
    print("total bytes", total)


if __name__ == "__main__":
    main()
