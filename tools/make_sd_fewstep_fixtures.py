#!/usr/bin/env python3
"""Few-step diffusion parity fixtures for Kiln: an LCM-distilled U-Net (`time_cond_proj_dim`: the
guidance scale goes in as an embedding, no classifier-free guidance) and the SD-Turbo layout (one
step, Euler with trailing timesteps, guidance off), against diffusers' StableDiffusionPipeline.

Writes tests/fixtures/sd-fewstep/ (see tests/fixtures/README.md, section `sd-fewstep/`):
  sd1-lcm-tiny/        a pipeline exactly as StableDiffusionPipeline.save_pretrained of diffusers
                       0.42 / transformers 5 writes it: a random U-Net with time_cond_proj_dim 32
                       (its cond_proj), an LCMScheduler, a small random VAE, and the text encoder
                       and tokenizer of tests/fixtures/sd/sd1-tiny
  sd1-turbo-tiny/      the same with a plain random U-Net and the scheduler SD-Turbo ships
                       (Euler, "trailing" timesteps)
  taesd-tiny/          a tiny autoencoder (AutoencoderTiny, TAESD's architecture) with random
                       weights, factor 2 and 4 latent channels to fit sd1-tiny, as
                       AutoencoderTiny.save_pretrained writes it; taesd_decode.npy its decoder's
                       image of latents.npy, taesd_pipeline.npy sd1-tiny's DDIM run (4 steps,
                       guidance 3) decoded by it instead of the VAE
  latents.npy          the initial latents [1, 4, 8, 8] of every run
  <run>.npy            each run's image [1, 16, 16, 3] in [0, 1]; noise_<run>.npy the noise the
                       LCM scheduler drew at each step (replayed by the test)
  expected.json        the runs and versions

How to run (CPU only, about 10 s; needs tests/fixtures/sd from tools/make_sd_fixtures.py):

    pip install torch transformers diffusers safetensors numpy
    python3 tools/make_sd_fewstep_fixtures.py
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
from make_sd_fixtures import NoiseRecorder, as_f32, finish_build, init_weights, load_sd1, new_build, write_json  # noqa: E402

import diffusers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

SD1 = REPO / "tests" / "fixtures" / "sd" / "sd1-tiny"
OUT = REPO / "tests" / "fixtures" / "sd-fewstep"
SEED = 777
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"

LCM_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=32)
TURBO_UNET = {k: v for k, v in LCM_UNET.items() if k != "time_cond_proj_dim"}
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=16, scaling_factor=0.18215)
# SimianLuo/LCM_Dreamshaper_v7's scheduler/scheduler_config.json (the keys that matter).
LCM_SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                     num_train_timesteps=1000, original_inference_steps=50, prediction_type="epsilon",
                     set_alpha_to_one=True, steps_offset=1, timestep_scaling=10.0, timestep_spacing="leading")
# stabilityai/sd-turbo's scheduler/scheduler_config.json (the keys that matter).
TURBO_SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, num_train_timesteps=1000,
                       prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing",
                       interpolation_type="linear", use_karras_sigmas=False)

# (run, model, steps, guidance)
RUNS = [
    ("lcm_4_g8", "sd1-lcm-tiny", 4, 8.0),
    ("lcm_2_g1.5", "sd1-lcm-tiny", 2, 1.5),
    ("turbo_1_g0", "sd1-turbo-tiny", 1, 0.0),
    ("turbo_4_g0", "sd1-turbo-tiny", 4, 0.0),
]



def main():
    from diffusers import EulerDiscreteScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    build = new_build(OUT)
    sd1 = load_sd1(SD1)
    from diffusers import AutoencoderKL
    g = torch.Generator().manual_seed(SEED)
    made = {}
    for name, ucfg, sched in [("sd1-lcm-tiny", LCM_UNET, LCMScheduler(**LCM_SCHEDULER)),
                              ("sd1-turbo-tiny", TURBO_UNET, EulerDiscreteScheduler(**TURBO_SCHEDULER))]:
        unet = UNet2DConditionModel(**ucfg).eval()
        init_weights(unet, g, 1.3)
        vae = AutoencoderKL(**VAE).eval()
        init_weights(vae, g, 1.3)
        made[name] = StableDiffusionPipeline(vae=vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer,
                                             unet=unet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    models = {}
    for name, pipe in made.items():
        pipe.save_pretrained(str(build / name), safe_serialization=True)
        models[name] = StableDiffusionPipeline.from_pretrained(str(build / name), safety_checker=None,
                                                               requires_safety_checker=False)
        models[name].set_progress_bar_config(disable=True)
    assert models["sd1-lcm-tiny"].unet.config.time_cond_proj_dim == 32

    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED + 1))
    arrays = {"latents": as_f32(latents)}
    runs = {}
    for name, model, steps, guidance in RUNS:
        pipe = models[model]
        with NoiseRecorder() as rec, torch.no_grad():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                       latents=latents.clone(), generator=torch.Generator().manual_seed(0), output_type="np")
        im = out.images
        assert im.shape == (1, 16, 16, 3)
        arrays[name] = as_f32(im)
        if rec.drawn:
            arrays["noise_" + name] = as_f32(torch.stack(rec.drawn))
        sched = pipe.scheduler
        runs[name] = dict(model=model, steps=steps, guidance=guidance, scheduler=type(sched).__name__,
                          timesteps=[int(t) for t in sched.timesteps], cfg=bool(pipe.do_classifier_free_guidance),
                          noise_draws=len(rec.drawn), image_std=round(float(im.std()), 4))
        print(name, runs[name], flush=True)
    assert not runs["lcm_4_g8"]["cfg"] and runs["turbo_1_g0"]["timesteps"] == [999]
    # The tiny autoencoder.
    from diffusers import AutoencoderTiny, DDIMScheduler
    taesd = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(2, 1), latent_channels=4).eval()
    init_weights(taesd, g, 1.3)
    taesd.save_pretrained(str(build / "taesd-tiny"), safe_serialization=True)
    taesd = AutoencoderTiny.from_pretrained(str(build / "taesd-tiny")).eval()
    with torch.no_grad():
        arrays["taesd_decode"] = as_f32(taesd.decode(latents).sample)
    sd1.scheduler = DDIMScheduler.from_config(sd1.scheduler.config)
    sd1.vae = taesd
    sd1.set_progress_bar_config(disable=True)
    with torch.no_grad():
        im = sd1(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=3.0,
                 latents=latents.clone(), output_type="np").images
    arrays["taesd_pipeline"] = as_f32(im)
    taesd_run = dict(model="sd1-tiny", decoder="taesd-tiny", steps=4, guidance=3.0,
                                  scheduler="DDIMScheduler", image_std=round(float(im.std()), 4))
    for k, v in sorted(arrays.items()):
        np.save(build / f"{k}.npy", v, allow_pickle=False)
    import transformers
    write_json(build / "expected.json", {
        "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "prompt": PROMPT, "negative_prompt": NEGATIVE, "runs": runs,
        "taesd": taesd_run,
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    total = finish_build(build, OUT, 4e6)
    print("total bytes", total)


if __name__ == "__main__":
    main()
