"""Makes tests/fixtures/schedulers/: diffusers' schedules and step loops for Kiln's scheduler tests.

    python3 tools/make_scheduler_fixtures.py

Versions used for the committed files: Python 3.11.7, diffusers 0.42.1, torch 2.15.0 (CPU), numpy.
Deterministic: running it twice gives identical files.

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
"""

import json
import os

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


def main():
    os.makedirs(OUT, exist_ok=True)
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


if __name__ == "__main__":
    main()
