#!/usr/bin/env python3
"""Train Kiln's default image model: a small Stable Diffusion pipeline that draws coloured shapes.

Data: procedurally generated 64x64 pictures of one shape (circle, square, triangle) in one colour
on a background of another (red, green, blue, yellow, white, black), captioned
"a red circle on a blue background" — 90 combinations, random position and size. Nothing is
downloaded.

Model (diffusers layout, loadable by StableDiffusionPipeline):
  tokenizer/     CLIP BPE (vocab.json + merges.txt) learned on the captions
  text_encoder/  CLIPTextModel, 2 layers, width 64, 16 positions
  unet/          UNet2DConditionModel, channels (32, 64), cross-attention, 8x8 latents
  vae/           AutoencoderKL, channels (8, 16, 32, 64), factor 8, 4 latent channels
  scheduler/     DPMSolverMultistepScheduler (DPM++ 2M), scaled-linear betas as SD 1.x

Training, all on CPU: the VAE first (MSE + L1 on the decoded posterior mean, small KL), then the U-Net and the text encoder
together on the VAE's latents (epsilon prediction, 10% empty captions for classifier-free
guidance). Deterministic given --seed on one machine (fixed threads, seeded generators).

Quality: a small checker finds the background (border median), the shape mask (pixels far
from it), the shape's colour (nearest palette colour of the mask median) and its kind (how much
of its bounding box the mask fills: square ~1, circle ~0.79, triangle ~0.5). It is first run on
the training pictures (its own accuracy), then on images the trained pipeline generates for all
90 prompts x 2 seeds with Kiln's defaults (20 steps, guidance 7.5). Writes report.json, a sample
grid samples.png, and reference/ (fixed latents and diffusers' image for them, which Kiln's tests
compare with the engine's output).

    python3 tools/train_image_model.py --out models/image-shapes     # about 45 min on a free core
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sd_fixtures as clipbpe  # noqa: E402  (CLIP BPE learner and tokenizer writer)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle"]
SIZE = 64
MAX_LEN = 16
LAT = SIZE // 8  # latent side (VAE factor 8, as SD)
STEPS, GUIDANCE = 20, 7.5  # Kiln's `kiln image` defaults
REFERENCE_PROMPT = "a red circle on a blue background"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/image-shapes"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dataset", type=int, default=20000, help="pictures encoded for U-Net training")
    p.add_argument("--probe", action="store_true", help="time a few steps of each stage and exit")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def combos():
    return [(c, s, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]


def caption(color, shape, bg):
    return f"a {color} {shape} on a {bg} background"


def draw(color, shape, bg, rng):
    """One 64x64 RGB uint8 picture, drawn at 4x and box-filtered (anti-aliased edges)."""
    ss = 4
    n = SIZE * ss
    r = rng.uniform(11, 19)
    cx, cy = rng.uniform(r + 4, SIZE - r - 4), rng.uniform(r + 4, SIZE - r - 4)
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / ss
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.9
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:  # upward triangle, apex at top, base at the bottom, as wide as it is tall
        top, bot = cy - r, cy + r
        t = (y - top) / (bot - top)
        m = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r)
    cov = m.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))[..., None]
    img = cov * np.array(COLORS[color], np.float64) + (1 - cov) * np.array(COLORS[bg], np.float64)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def nearest_color(rgb):
    names = list(COLORS)
    d = [np.sum((np.asarray(rgb, np.float64) - COLORS[k]) ** 2) for k in names]
    return names[int(np.argmin(d))]


def check(img):
    """(color, shape, background) read off a picture, or None parts where it cannot tell."""
    img = img.astype(np.float64)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_color(bg_rgb)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    full = np.percentile(dist, 99.5)  # a pixel well inside the shape
    if full < 80:
        return None, None, bg
    mask = dist > 0.5 * full  # half coverage: the shape's edge
    if mask.sum() < 40:
        return None, None, bg
    color = nearest_color(np.median(img[dist > 0.8 * full], axis=0))
    ys, xs = np.nonzero(mask)
    w = np.percentile(xs, 99.5) - np.percentile(xs, 0.5) + 1
    h = np.percentile(ys, 99.5) - np.percentile(ys, 0.5) + 1
    fill = mask.sum() / (w * h)
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return color, shape, bg


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def build_models(vocab):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Few norm groups: with one channel per group, GroupNorm would normalise each channel of a
    # flat-coloured picture to zero and the network could not carry the colour itself.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 32, 64], norm_num_groups=2,
    )
    tcfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=64,
        bos_token_id=vocab[clipbpe.BOS], eos_token_id=vocab[clipbpe.EOS], pad_token_id=vocab[clipbpe.EOS],
        layer_norm_eps=1e-5, hidden_act="quick_gelu",
    )
    text_encoder = CLIPTextModel(tcfg)
    unet = UNet2DConditionModel(
        sample_size=LAT, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8,
    )
    return vae, text_encoder, unet


def scheduler_config():
    return {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
        "algorithm_type": "dpmsolver++", "solver_order": 2, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
        "lower_order_final": True, "final_sigmas_type": "zero", "use_karras_sigmas": False,
        "trained_betas": None,
    }


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    rng = np.random.default_rng(args.seed)
    all_combos = combos()
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    # The checker on ground truth: how often it reads a training picture right.
    gt = [(c, draw(*c, rng)) for c in all_combos for _ in range(5)]
    ok = sum(check(img) == c for c, img in gt)
    report["checker_accuracy_on_training_pictures"] = round(ok / len(gt), 4)
    print(f"checker reads {ok}/{len(gt)} training pictures right", flush=True)

    # Tokenizer.
    caps = [caption(*c) for c in all_combos]
    merges = clipbpe.learn_merges(caps, 200)
    vocab = clipbpe.build_vocab(merges)
    vae, text_encoder, unet = build_models(vocab)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in
              [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]}
    report["parameters"] = counts
    print(f"parameters: {counts}", flush=True)

    def picture_batch(n):
        cs = [all_combos[i] for i in rng.integers(0, len(all_combos), n)]
        imgs = np.stack([draw(*c, rng) for c in cs])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        return cs, x

    # --- VAE -----------------------------------------------------------------------------------
    vae_steps = 5 if args.probe else args.vae_steps
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(vae_steps):
        lr = 1e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        _, x = picture_batch(args.batch)
        # Decode the posterior mean (a plain autoencoder; sampling only slows training here and the
        # U-Net learns the means), with a light KL term that keeps the latents near unit scale.
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / (4 * (LAT) ** 2)
        loss = mse + 0.5 * torch.nn.functional.l1_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == vae_steps - 1:
            print(f"vae {step}/{vae_steps} mse {mse.item():.5f} kl {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    if args.probe:
        print(f"probe: vae {(time.time() - t0) / vae_steps:.2f} s/step")
    report["vae_train_seconds"] = round(time.time() - t0)

    # Latents of a fixed dataset (posterior means), and the scaling factor that makes them unit-std.
    n_data = 256 if args.probe else args.dataset
    data_caps, lat = [], []
    with torch.no_grad():
        for i in range(0, n_data, 256):
            cs, x = picture_batch(min(256, n_data - i))
            data_caps += [caption(*c) for c in cs]
            lat.append(vae.encode(x).latent_dist.mean)
            if i == 0:
                rec = ((vae.decode(lat[0]).sample.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
                ok = sum(check(r) == c for r, c in zip(rec, cs))
                psnr = 10 * math.log10(4 / torch.nn.functional.mse_loss(vae.decode(lat[0]).sample.clamp(-1, 1), x).item())
                report["vae_reconstruction"] = {"psnr_db": round(psnr, 2), "checker_rate": round(ok / len(cs), 4)}
                print(f"vae reconstructions: {psnr:.1f} dB, checker {ok}/{len(cs)}", flush=True)
    lat = torch.cat(lat)
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    lat = lat * scaling
    print(f"latents {tuple(lat.shape)}, scaling factor {scaling:.4f}", flush=True)

    # --- U-Net + text encoder ------------------------------------------------------------------
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    clipbpe.write_tokenizer(out / "tokenizer", vocab, merges, clipbpe.EOS, max_len=MAX_LEN)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    uniq = sorted(set(data_caps) | {""})
    tok_ids = {c: tokenizer(c, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids[0] for c in uniq}
    ids_all = torch.stack([tok_ids[c] for c in data_caps])
    empty = tok_ids[""]
    sched_cfg = scheduler_config()
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    acp = train_sched.alphas_cumprod

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in list(unet.state_dict().items()) + [("te." + k, v) for k, v in text_encoder.state_dict().items()]}
    unet_steps = 5 if args.probe else args.unet_steps
    unet.train()
    text_encoder.train()
    t0 = time.time()
    tgen = torch.Generator().manual_seed(args.seed)
    for step in range(unet_steps):
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / unet_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, lat.shape[0], (args.batch,), generator=tgen)
        x0 = lat[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(len(idx), generator=tgen) < 0.1
        ids[drop] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=tgen)
        noise = torch.randn(x0.shape, generator=tgen)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        cond = text_encoder(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in list(unet.state_dict().items()) + [("te." + k, v) for k, v in text_encoder.state_dict().items()]:
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
        if step % 100 == 0 or step == unet_steps - 1:
            print(f"unet {step}/{unet_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    if args.probe:
        print(f"probe: unet {(time.time() - t0) / unet_steps:.2f} s/step")
        return
    report["unet_train_seconds"] = round(time.time() - t0)
    report["unet_final_loss"] = round(loss.item(), 4)
    unet.load_state_dict({k: ema[k] for k in unet.state_dict()})
    text_encoder.load_state_dict({k: ema["te." + k] for k in text_encoder.state_dict()})
    unet.eval()
    text_encoder.eval()

    # --- Save (f16 weights), reload as a user would ------------------------------------------
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler.from_config(sched_cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    clipbpe.write_tokenizer(out / "tokenizer", vocab, merges, clipbpe.EOS, max_len=MAX_LEN)
    clipbpe.write_json(out / "scheduler" / "scheduler_config.json", sched_cfg)
    # Published SD text encoders (transformers 4) name their tensors `text_model.…`.
    from safetensors.torch import load_file, save_file
    st = out / "text_encoder" / "model.safetensors"
    sd = load_file(str(st))
    if not any(k.startswith("text_model.") for k in sd):
        save_file({"text_model." + k: v for k, v in sd.items()}, str(st), metadata={"format": "pt"})
    model_index = json.loads((out / "model_index.json").read_text())
    model_index.pop("image_encoder", None)
    clipbpe.write_json(out / "model_index.json", model_index)

    pipe = StableDiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float16).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt, latents, raw=False):
        with torch.no_grad():
            img = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                       height=SIZE, width=SIZE, output_type="np").images[0]
        u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        return (u8, img.astype(np.float32)) if raw else u8

    # --- Quality: the checker on generated images ----------------------------------------------
    g = torch.Generator().manual_seed(args.seed + 1)
    hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
    per_shape = {s: [0, 0] for s in SHAPES}
    grid = []
    n = 0
    t0 = time.time()
    for rep in range(2):
        for c in all_combos:
            latents = torch.randn((1, 4, LAT, LAT), generator=g)
            img = generate(caption(*c), latents)
            got = check(img)
            hits["color"] += got[0] == c[0]
            hits["shape"] += got[1] == c[1]
            hits["background"] += got[2] == c[2]
            hits["all"] += got == c
            per_shape[c[1]][0] += got == c
            per_shape[c[1]][1] += 1
            n += 1
            if rep == 0 and c[0] in ("red", "yellow", "white") and c[2] in ("blue", "black", "green"):
                grid.append(img)
    report["generated_checker_rates"] = {k: round(v / n, 4) for k, v in hits.items()}
    report["generated_all_correct_by_shape"] = {s: round(a / b, 4) for s, (a, b) in per_shape.items()}
    report["generated_images"] = n
    report["generation_seconds_each"] = round((time.time() - t0) / n, 3)
    print(f"generated {n} images: {report['generated_checker_rates']}", flush=True)

    # Sample grid for the README (9 columns).
    from PIL import Image
    cols = 9
    rows = [np.concatenate(grid[i : i + cols], axis=1) for i in range(0, len(grid) - cols + 1, cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((cols * SIZE * 2, len(rows) * SIZE * 2), Image.NEAREST).save(out / "samples.png")

    # --- Reference for Kiln's tests: fixed latents, diffusers' image ---------------------------
    ref = out / "reference"
    ref.mkdir(exist_ok=True)
    latents = torch.randn((1, 4, LAT, LAT), generator=torch.Generator().manual_seed(2024))
    np.save(ref / "latents.npy", latents.numpy().astype(np.float32))
    img, raw = generate(REFERENCE_PROMPT, latents, raw=True)
    Image.fromarray(img).save(ref / "image.png")
    np.save(ref / "image.npy", raw)  # [H, W, 3] in [0, 1], before 8-bit rounding
    clipbpe.write_json(ref / "reference.json", {
        "prompt": REFERENCE_PROMPT, "steps": STEPS, "guidance": GUIDANCE, "scheduler": "dpm++2m",
        "width": SIZE, "height": SIZE, "latents": "latents.npy", "image": "image.npy", "checker": list(check(img))})
    report["total_seconds"] = round(time.time() - t_start)
    clipbpe.write_json(out / "report.json", report)
    print(f"done in {time.time() - t_start:.0f}s -> {out}")


if __name__ == "__main__":
    main()
