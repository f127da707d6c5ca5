"""Makes tests/fixtures/schedulers/: diffusers' schedules and step loops for Kiln's scheduler tests.

    python3 tools/make_scheduler_fixtures.py               # everything
    python3 tools/make_scheduler_fixtures.py high_counts   # high_counts.json only

Versions used for the committed files: Python 3.11.7, diffusers 0.42.1, torch 2.15.0 (CPU), numpy;
high_counts.json (made later, alone) with the same diffusers and torch (PyPI's default wheel, run
on the CPU) and numpy 2.4.6. Deterministic on one machine: running it twice gives identical files.
On another CPU torch's f32 kernels may round differently by an ulp (regenerating everything on the
machine that made high_counts.json changed a few sigmas in cases.json and values in the .npy loops
by one ulp), which the tests' tolerances absorb; so only high_counts.json was regenerated.

Shared inputs (seeded torch CPU generator 1234):
  sample.npy          [1, 4, 8, 8]      initial unscaled latents (standard normal)
  model_outputs.npy   [10, 2, 4, 8, 8]  model output of step i, batch [uncond, cond]
  noise.npy           [10, 4, 8, 8]     the noise handed to step i by randn_tensor
Without CFG step i's model output is model_outputs[i, 1]; with CFG (guidance 3) it is
uncond + 3 * (cond - uncond) computed in torch f32, exactly as StableDiffusionPipeline does.
The ancestral and LCM steps draw their noise through `randn_tensor`, which the script replaces
in those modules by a function that returns noise[i] at step i (and checks the shape).

cases.json lists every case: scheduler class, the scheduler_config.json text given to
`from_config`, steps, cfg, and what set_timesteps gave (timesteps, sigmas where the scheduler
has them, init_noise_sigma), plus the file of its step loop:
  <case>.npy          [steps, 2, 4, 8, 8]  [:, 0] = scale_model_input(sample_i, t_i) (the UNet
                                           input of step i, one copy), [:, 1] = prev_sample of step i

high_counts.json: set_timesteps at every step count 1..=num_train_timesteps, for each scheduler
class and config above (epsilon; the prediction type does not change timesteps). Per class and
config:
  refused    runs [first, last, why] of the counts whose schedule diffusers refuses
             (set_timesteps raises ValueError) or that degenerate: a timestep outside
             0..num_train_timesteps-1, or one repeated (a step of size zero)
  schedules  for the counts 500, 998, 999, 1000 (LCM: original_inference_steps - 1 and itself)
             that do not degenerate: the number of timesteps, the first and last 4, and an
             FNV-1a 64 digest of them all as little-endian f32 (every schedule in full would be
             over 1 MB); sigmas (Euler, Euler a, DPM++) at 16 evenly spaced indices and their
             sum in f64 (torch's f32 sigma table differs by an ulp between CPUs, so no digest)
  loops      for those counts, degenerate or not: how diffusers' own step loop ends, run on
             [1, 4, 2, 2] random model outputs ("finite", "NaN or infinite at step i" or the
             exception), which shows that the refused schedules really fail in diffusers
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "schedulers")
SHAPE = (1, 4, 8, 8)
MAX_STEPS = 10
GUIDANCE = 3.0
HIGH_COUNTS = [500, 998, 999, 1000]

CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}

# SD 1.5's scheduler_config.json (a PNDMScheduler config) as every class reads it.
SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    # name: (config, step counts)
    "sd15": ({**SD15, "timestep_spacing": "leading"}, [4, 10]),
    "sd2": ({**SD15, "timestep_spacing": "trailing"}, [4, 10]),
    "linear": (
        {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
         "timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False},
        [4, 10],
    ),
    # Cosine betas, DDIM/LCM with x0 clipping, LCM with a shorter distillation schedule.
    "cosine_clip": (
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "timestep_spacing": "leading",
         "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.5,
         "original_inference_steps": 20, "timestep_scaling": 5.0},
        [4],
    ),
    # DPM++ 2M with the heun second-order formula (DPMSolverMultistep cases only).
    "heun": ({**SD15, "timestep_spacing": "trailing", "solver_type": "heun"}, [10]),
}
ONLY = {"heun": DPMSolverMultistepScheduler}


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: hands out noise[i] at the i-th call."""

    def __init__(self, noise):
        self.noise = noise
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        z = self.noise[self.calls].reshape(SHAPE).clone()
        self.calls += 1
        return z


def run_case(cls, config, steps, cfg, pred, sample0, outs, noise):
    sched = cls.from_config({**config, "prediction_type": pred})
    sched.set_timesteps(steps)
    feed = NoiseFeed(noise)
    scheduling_euler_ancestral_discrete.randn_tensor = feed
    scheduling_lcm.randn_tensor = feed
    init = float(sched.init_noise_sigma)
    sample = sample0 * sched.init_noise_sigma
    rows = []
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(sample, t)
        if cfg:
            m_uncond, m_cond = outs[i, 0:1], outs[i, 1:2]
            m = m_uncond + GUIDANCE * (m_cond - m_uncond)
        else:
            m = outs[i, 1:2]
        sample = sched.step(m, t, sample, return_dict=False)[0]
        rows.append(torch.stack([model_in[0], sample[0]]))
    draws = feed.calls
    sigmas = getattr(sched, "sigmas", None)
    if cls in (DDIMScheduler, LCMScheduler):
        sigmas = None  # these have no sigma schedule (DDIM's attribute is not set by set_timesteps)
    return {
        "timesteps": [float(t) for t in sched.timesteps],
        "sigmas": None if sigmas is None else [float(s) for s in sigmas],
        "init_noise_sigma": init,
        "noise_draws": draws,
    }, torch.stack(rows).numpy().astype(np.float32)


def fnv1a64(values):
    """FNV-1a 64 of the values as little-endian f32 (the Rust test computes the same)."""
    h = 0xCBF29CE484222325
    for b in np.asarray(values, dtype="<f4").tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def sigmas_of(cls, sched):
    if cls in (DDIMScheduler, LCMScheduler):
        return None  # no sigma schedule
    return sched.sigmas.numpy().astype(np.float32)


def degenerate(cls, config, steps):
    """Why diffusers' schedule of `steps` steps cannot be run, or None (and the scheduler)."""
    sched = cls.from_config({**config, "prediction_type": "epsilon"})
    try:
        sched.set_timesteps(steps)
    except ValueError:
        return "set_timesteps raises ValueError", None
    ts = sched.timesteps.numpy().astype(np.float64)
    top = config["num_train_timesteps"] - 1
    out = [t for t in ts if not 0 <= t <= top]
    if out:
        return f"timestep {out[0]:g} outside 0..={top}", sched
    same = [a for a, b in zip(ts, ts[1:]) if b >= a]
    if same:
        return f"timestep {same[0]:g} repeated", sched
    return None, sched


def diffusers_loop(sched, cls):
    """Runs diffusers' step loop on small random model outputs: how it ends."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn((1, 4, 2, 2), generator=g) * sched.init_noise_sigma
    try:
        for i, t in enumerate(sched.timesteps):
            sched.scale_model_input(x, t)
            m = torch.randn((1, 4, 2, 2), generator=g)
            kw = {"generator": g} if cls in (EulerAncestralDiscreteScheduler, LCMScheduler) else {}
            x = sched.step(m, t, x, return_dict=False, **kw)[0]
            if not torch.isfinite(x).all():
                return f"NaN or infinite at step {i + 1}"
    except Exception as e:  # noqa: BLE001 - recorded as the outcome
        return f"{type(e).__name__}: {e}"
    return "finite"


def high_counts():
    """set_timesteps at every count for every class and config (see the docstring)."""
    scheduling_euler_ancestral_discrete.randn_tensor = ORIGINAL_RANDN[0]
    scheduling_lcm.randn_tensor = ORIGINAL_RANDN[1]
    out = []
    for cname, cls in CLASSES.items():
        for kname, (config, _) in CONFIGS.items():
            if ONLY.get(kname, cls) is not cls:
                continue
            tt = config["num_train_timesteps"]
            refused = []
            for steps in range(1, tt + 1):
                why, _ = degenerate(cls, config, steps)
                if why and refused and refused[-1][1] == steps - 1 and refused[-1][2] == why:
                    refused[-1][1] = steps
                elif why:
                    refused.append([steps, steps, why])
            orig = config.get("original_inference_steps", 50)
            counts = [orig - 1, orig] if cls is LCMScheduler else HIGH_COUNTS
            schedules, loops = [], []
            for steps in counts:
                why, sched = degenerate(cls, config, steps)
                loops.append([steps, "refused by set_timesteps" if sched is None else diffusers_loop(sched, cls)])
                if why:
                    continue
                sched.set_timesteps(steps)  # the loop above advanced its state
                ts = sched.timesteps.numpy().astype(np.float32)
                sg = sigmas_of(cls, sched)
                at = np.unique(np.linspace(0, len(sg) - 1, 16).round().astype(int)) if sg is not None else []
                schedules.append({
                    "steps": steps, "len": len(ts),
                    "timesteps_head": [float(t) for t in ts[:4]], "timesteps_tail": [float(t) for t in ts[-4:]],
                    "timesteps_fnv": fnv1a64(ts),
                    "sigmas_at": None if sg is None else [[int(i), float(sg[i])] for i in at],
                    "sigmas_sum": None if sg is None else float(sg.astype(np.float64).sum()),
                })
            cfg_json = json.dumps({"_class_name": cls.__name__, **config, "prediction_type": "epsilon"})
            out.append({"name": f"{cname}-{kname}", "class": cls.__name__, "config": cfg_json,
                        "refused": refused, "schedules": schedules, "loops": loops})
    with open(os.path.join(OUT, "high_counts.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
                   "configs": out}, f, indent=1)
        f.write("\n")
    print(f"{len(out)} high-count configs")


ORIGINAL_RANDN = (scheduling_euler_ancestral_discrete.randn_tensor, scheduling_lcm.randn_tensor)


def main():
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] == ["high_counts"]:
        high_counts()
        return
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    sample0 = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    outs = torch.randn((MAX_STEPS, 2) + SHAPE[1:], generator=g, dtype=torch.float32)
    noise = torch.randn((MAX_STEPS,) + SHAPE[1:], generator=g, dtype=torch.float32)
    np.save(os.path.join(OUT, "sample.npy"), sample0.numpy())
    np.save(os.path.join(OUT, "model_outputs.npy"), outs.numpy())
    np.save(os.path.join(OUT, "noise.npy"), noise.numpy())
    cases = []
    for cname, cls in CLASSES.items():
        for kname, (config, step_counts) in CONFIGS.items():
            if ONLY.get(kname, cls) is not cls:
                continue
            for pred in ["epsilon", "v_prediction"]:
                for steps in step_counts:
                    for cfg in [False, True]:
                        name = f"{cname}-{kname}-{pred}-{steps}{'-cfg' if cfg else ''}"
                        cfg_json = json.dumps({"_class_name": cls.__name__, **config, "prediction_type": pred})
                        info, loop = run_case(cls, config, steps, cfg, pred, sample0, outs, noise)
                        np.save(os.path.join(OUT, name + ".npy"), loop)
                        cases.append({"name": name, "class": cls.__name__, "config": cfg_json, "steps": steps,
                                      "cfg": cfg, "guidance": GUIDANCE if cfg else 1.0, **info})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases")
    high_counts()


if __name__ == "__main__":
    main()
