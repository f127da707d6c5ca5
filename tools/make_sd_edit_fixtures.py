#!/usr/bin/env python3
"""img2img and inpainting parity fixtures for Kiln: diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on tiny random-weight pipelines, with an init image, a mask and the
noise they add fixed.

Writes tests/fixtures/sd-edit/ (see tests/fixtures/README.md, section `sd-edit/`):
  sd1-inpaint-tiny/    an inpainting pipeline (a U-Net with 9 input channels: latents, mask, masked
                       image latents) exactly as StableDiffusionInpaintPipeline.save_pretrained of
                       diffusers 0.42 / transformers 5 writes it: its own random U-Net and VAE,
                       the text encoder, tokenizer and scheduler of tests/fixtures/sd/sd1-tiny
  init.png, mask.png   the 16 x 16 init image and mask (white = repaint, a few gray pixels either
                       side of the 0.5 threshold), as PNG and as init.npy / mask.npy (8-bit values
                       as f32, [h, w, 3])
  mask64.png,          masks for the embedded default image model (models/image-shapes, 64 x 64),
  mask64-alpha.png     used by the server and browser tests: a white square on black, and the
                       same square as transparent pixels in an opaque RGBA image (OpenAI's
                       image-edit masks: transparent = repaint)
  encode_noise.npy     the noise of the one run that encodes to a draw from the latent distribution
                       (diffusers' default) instead of its mean
  noise.npy            the noise [1, 4, 8, 8] every run adds (diffusers draws it with randn_tensor;
                       the script hands this tensor back instead)
  encoder_mean.npy     sd1-tiny's VAE encoder on the init image: the latent distribution's mean
  <run>.npy            each run's image, [1, 16, 16, 3] in [0, 1] (output_type "np")
  expected.json        the runs (pipeline, model, scheduler, strength, guidance, steps) and versions

The VAE encodings take the latent distribution's mean (diffusers' retrieve_latents with
sample_mode "argmax"), as Kiln does by default; one run draws a sample from it as diffusers does
by default, with recorded noise.

How to run (CPU only, no network beyond PyPI, about 20 s; needs tests/fixtures/sd from
tools/make_sd_fixtures.py):

    pip install torch transformers diffusers safetensors numpy pillow
    python3 tools/make_sd_edit_fixtures.py

Versions used to produce the committed files: Python 3.11.7, torch 2.15.0 (the +cu132 wheel, run
on CPU), diffusers 0.42.1, transformers 5.24.0, numpy, pillow as printed into expected.json.
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
from make_sd_fixtures import as_f32, finish_build, init_weights, load_sd1, new_build, write_json  # noqa: E402

import diffusers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

SD1 = REPO / "tests" / "fixtures" / "sd" / "sd1-tiny"
OUT = REPO / "tests" / "fixtures" / "sd-edit"
SEED = 4242
STEPS = 4
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
SIZE = 16

INPAINT_UNET = dict(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8)
INPAINT_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   sample_size=16, scaling_factor=0.18215)

# (run name, model folder, pipeline, scheduler class, strength, guidance)
RUNS = [
    ("img2img_ddim_s0.6_g3", "sd1-tiny", "img2img", "DDIMScheduler", 0.6, 3.0),
    ("img2img_euler_s0.6_g3", "sd1-tiny", "img2img", "EulerDiscreteScheduler", 0.6, 3.0),
    ("img2img_dpmpp_2m_s0.8_g1", "sd1-tiny", "img2img", "DPMSolverMultistepScheduler", 0.8, 1.0),
    ("img2img_euler_s1_g1", "sd1-tiny", "img2img", "EulerDiscreteScheduler", 1.0, 1.0),
    ("inpaint4_euler_s1_g3", "sd1-tiny", "inpaint", "EulerDiscreteScheduler", 1.0, 3.0),
    ("inpaint4_ddim_s0.75_g3", "sd1-tiny", "inpaint", "DDIMScheduler", 0.75, 3.0),
    ("inpaint4_dpmpp_2m_s0.75_g1", "sd1-tiny", "inpaint", "DPMSolverMultistepScheduler", 0.75, 1.0),
    ("inpaint9_ddim_s1_g3", "sd1-inpaint-tiny", "inpaint", "DDIMScheduler", 1.0, 3.0),
    ("inpaint9_euler_s0.5_g1", "sd1-inpaint-tiny", "inpaint", "EulerDiscreteScheduler", 0.5, 1.0),
    # diffusers' default encoding: a draw from the latent distribution, with encode_noise.npy.
    ("img2img_euler_s0.6_g3_sample", "sd1-tiny", "img2img", "EulerDiscreteScheduler", 0.6, 3.0),
]


def images():
    """A deterministic 16 x 16 picture (gradients, a disc, seeded speckle) and a mask: a white
    rectangle, with gray pixels at 120 and 135 (repaint below/above 0.5 after PIL's luma)."""
    g = np.random.default_rng(SEED)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    r = 255 * x / (SIZE - 1)
    gg = 255 * y / (SIZE - 1)
    b = np.where((x - 9.5) ** 2 + (y - 6.5) ** 2 < 16, 230.0, 40.0)
    img = np.stack([r, gg, b], -1) + g.normal(0, 12, (SIZE, SIZE, 3))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[4:12, 3:10] = 255
    mask[12, 3] = (120, 120, 120)   # L 120 -> kept
    mask[12, 4] = (135, 135, 135)   # L 135 -> repainted
    mask[3, 9] = (250, 10, 250)     # L 109 -> kept (luma, not the mean)
    return img, mask


def patched(module, noise, encode_noise=None):
    """The pipeline module with randn_tensor returning `noise` and retrieve_latents taking the
    latent distribution's mean, or with `encode_noise` its draw `mean + std * encode_noise`
    (DiagonalGaussianDistribution.sample with that noise); restores them on exit."""
    class Patch:
        def __enter__(self):
            self.saved = module.randn_tensor, module.retrieve_latents
            self.calls = 0

            def randn(shape, *a, **kw):
                assert tuple(shape) == tuple(noise.shape), shape
                self.calls += 1
                return noise.clone()
            module.randn_tensor = randn
            if encode_noise is None:
                module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
            else:
                module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": (
                    enc.latent_dist.mean + enc.latent_dist.std * encode_noise)
            return self

        def __exit__(self, *exc):
            module.randn_tensor, module.retrieve_latents = self.saved
    return Patch()



def build_inpaint_pipeline(sd1, out_dir):
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
    g = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**INPAINT_UNET).eval()
    init_weights(unet, g, 1.3)
    vae = AutoencoderKL(**INPAINT_VAE).eval()
    init_weights(vae, g, 1.3)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer,
                                          unet=unet, scheduler=sd1.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    re = StableDiffusionInpaintPipeline.from_pretrained(str(out_dir), safety_checker=None,
                                                        requires_safety_checker=False)
    for a, b in ((unet, re.unet), (vae, re.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return re


def main():
    import diffusers
    import PIL
    import transformers
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_mod
    from PIL import Image

    build = new_build(OUT)
    sd1 = load_sd1(SD1)
    inpaint = build_inpaint_pipeline(sd1, build / "sd1-inpaint-tiny")
    models = {"sd1-tiny": sd1, "sd1-inpaint-tiny": inpaint}

    img, mask = images()
    Image.fromarray(img, "RGB").save(build / "init.png")
    Image.fromarray(mask, "RGB").save(build / "mask.png")
    init_pil = Image.open(build / "init.png").convert("RGB")
    mask_pil = Image.open(build / "mask.png").convert("RGB")
    assert np.array_equal(np.asarray(init_pil), img) and np.array_equal(np.asarray(mask_pil), mask)
    arrays = {"init": as_f32(img), "mask": as_f32(mask)}
    m64 = np.zeros((64, 64, 3), np.uint8)
    m64[16:48, 20:44] = 255
    Image.fromarray(m64, "RGB").save(build / "mask64.png")
    a64 = np.full((64, 64, 4), 255, np.uint8)
    a64[..., :3] = (10, 20, 30)
    a64[16:48, 20:44, 3] = 0
    Image.fromarray(a64, "RGBA").save(build / "mask64-alpha.png")

    noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(SEED))
    arrays["noise"] = as_f32(noise)
    encode_noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(SEED + 1))
    arrays["encode_noise"] = as_f32(encode_noise)
    with torch.no_grad():
        pix = sd1.image_processor.preprocess(init_pil)
        assert tuple(pix.shape) == (1, 3, SIZE, SIZE)
        arrays["encoder_mean"] = as_f32(sd1.vae.encode(pix).latent_dist.mean)

    runs = {}
    for name, model, kind, sched_cls, strength, guidance in RUNS:
        base = models[model]
        sched = getattr(diffusers, sched_cls).from_config(base.scheduler.config)
        comps = dict(base.components, scheduler=sched)
        if kind == "img2img":
            pipe, mod = StableDiffusionImg2ImgPipeline(**comps), img2img_mod
            kw = {}
        else:
            pipe, mod = StableDiffusionInpaintPipeline(**comps), inpaint_mod
            kw = dict(mask_image=mask_pil, height=SIZE, width=SIZE)
        pipe.set_progress_bar_config(disable=True)
        sampled = name.endswith("_sample")
        with patched(mod, noise, encode_noise if sampled else None) as p, torch.no_grad():
            out = pipe(PROMPT, image=init_pil, strength=strength, num_inference_steps=STEPS,
                       guidance_scale=guidance, negative_prompt=NEGATIVE, output_type="np", **kw)
        assert p.calls == 1, (name, p.calls)
        im = out.images
        assert im.shape == (1, SIZE, SIZE, 3), im.shape
        arrays[name] = as_f32(im)
        runs[name] = dict(model=model, pipeline=kind, scheduler=sched_cls, strength=strength,
                          encoding="sample" if sampled else "mean",
                          guidance=guidance, steps=STEPS, image_std=round(float(im.std()), 4),
                          steps_run=min(int(STEPS * strength), STEPS))
        print(name, runs[name], flush=True)
    # The runs differ from each other (the image and mask matter).
    assert np.abs(arrays["inpaint4_euler_s1_g3"] - arrays["img2img_euler_s1_g1"]).max() > 0.05

    for k, v in sorted(arrays.items()):
        np.save(build / f"{k}.npy", v, allow_pickle=False)
    write_json(build / "expected.json", {
        "diffusers_version": diffusers.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "numpy_version": np.__version__, "pillow_version": PIL.__version__,
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "size": SIZE,
        "encoding": "latent distribution mean (retrieve_latents sample_mode argmax)",
        "runs": runs,
        "arrays": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()[:16]}
                   for k, v in sorted(arrays.items())},
    })
    total = finish_build(build, OUT, 4e6)
    print("total bytes", total)


if __name__ == "__main__":
    main()
