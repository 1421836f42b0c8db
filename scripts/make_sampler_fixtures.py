#!/usr/bin/env python3
"""Reference runs of the teacher's samplers for dmd2's Rust tests.

Loads the tiny SDXL diffusers folder (tests/fixtures/tiny, made by make_fixtures.py; not
modified here) into diffusers' StableDiffusionXLPipeline, swaps in EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler and DDIMScheduler with
`Class.from_config(pipe.scheduler.config, timestep_spacing=...)` exactly as diffusers users
do (the folder's scheduler config is SDXL base's: scaled_linear 0.00085 -> 0.012, 1000 train
steps, steps_offset 1, leading spacing, epsilon prediction, set_alpha_to_one False,
clip_sample False), runs each case in float32 on the CPU with
`generator=torch.Generator('cpu').manual_seed(seed)`, and writes:

  tests/fixtures/samplers/cases.json
      [{name, model, prompt, negative_prompt, guidance_scale, seed, width, height,
        sampler ("euler" | "euler-a" | "ddim"), spacing ("leading" | "trailing" |
        "linspace"), steps}]

  tests/fixtures/samplers/<name>.safetensors
      timesteps        f64 [steps]  scheduler.timesteps as the UNet sees them (exact)
      sigmas           f32 [steps+1] scheduler.sigmas (Euler kinds only)
      init_noise_sigma f32 [1]      scheduler.init_noise_sigma after set_timesteps
      init_latents     f32 [1,4,h,w] latents after prepare_latents (noise * init_noise_sigma)
      step_latents_<i> f32           latents after each scheduler step
      final_latents    f32           the last of them
      draws            i64 [1]      how many torch.randn calls the scheduler made on the
                                    image's generator during the loop (counted by replaying
                                    the generator state)
      image            u8 [H,W,3]   the pipeline's PIL output

Run by hand (never in CI), after make_fixtures.py:

    /work/pyenv/bin/python scripts/make_sampler_fixtures.py

Made with torch 2.15.0 (CPU), diffusers 0.42.1. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
OUT = FIXTURES / "samplers"

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
}

CASES = [
    dict(name="euler", sampler="euler", spacing="leading", steps=12, guidance_scale=5.0, seed=11,
         prompt="a watercolor painting of a lighthouse", negative_prompt="blurry, low quality"),
    dict(name="euler_a", sampler="euler-a", spacing="leading", steps=8, guidance_scale=4.0, seed=12,
         prompt="an astronaut riding a horse", negative_prompt=None),
    dict(name="ddim", sampler="ddim", spacing="leading", steps=10, guidance_scale=3.0, seed=13,
         prompt="a photo of a cat", negative_prompt="ugly"),
    dict(name="euler_trailing", sampler="euler", spacing="trailing", steps=7, guidance_scale=1.0, seed=14,
         prompt="a cozy cabin in a snowy forest", negative_prompt=None),
    dict(name="euler_linspace", sampler="euler", spacing="linspace", steps=9, guidance_scale=2.0, seed=15,
         prompt="a red car", negative_prompt=None),
    dict(name="euler_a_trailing", sampler="euler-a", spacing="trailing", steps=6, guidance_scale=1.0, seed=16,
         prompt="a bowl of fruit", negative_prompt=None),
    dict(name="ddim_trailing", sampler="ddim", spacing="trailing", steps=6, guidance_scale=1.0, seed=17,
         prompt="a mountain lake at dawn", negative_prompt=None),
    dict(name="ddim_linspace", sampler="ddim", spacing="linspace", steps=7, guidance_scale=1.0, seed=18,
         prompt="a city at night", negative_prompt=None),
]
for _c in CASES:
    _c.update(model="tiny", width=64, height=64)


def own_memory_(pipe):
    """Freshly allocated (aligned) parameters, as make_fixtures.py does, so results do not
    depend on where the safetensors mapping put them."""
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp)
        for p in module.parameters():
            p.data = p.data.clone()
        for m in module.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.clone()


def count_draws(seed, after_state, shape, max_draws=64):
    """How many randn(shape) draws take a fresh generator (after the initial latents) to
    `after_state`."""
    g = torch.Generator("cpu").manual_seed(seed)
    torch.randn(shape, generator=g)  # the initial latents
    for n in range(max_draws + 1):
        if torch.equal(g.get_state(), after_state):
            return n
        torch.randn(shape, generator=g)
    raise AssertionError("generator state not reached")


def run_case(pipe, base_config, case):
    cls = SCHEDULERS[case["sampler"]]
    pipe.scheduler = cls.from_config(base_config, timestep_spacing=case["spacing"])
    sch = pipe.scheduler
    rec = {}
    steps = []
    orig_latents = pipe.prepare_latents

    def prepare_latents(*a, **k):
        out = orig_latents(*a, **k)
        rec["init_latents"] = out.clone()
        rec["timesteps"] = sch.timesteps.to(torch.float64).clone()
        if hasattr(sch, "sigmas"):
            rec["sigmas"] = sch.sigmas.to(torch.float32).clone()
        rec["init_noise_sigma"] = torch.as_tensor(sch.init_noise_sigma, dtype=torch.float32).reshape(1)
        return out

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    pipe.prepare_latents = prepare_latents
    g = torch.Generator("cpu").manual_seed(case["seed"])
    try:
        with torch.no_grad():
            image = pipe(
                prompt=case["prompt"],
                negative_prompt=case["negative_prompt"],
                num_inference_steps=case["steps"],
                guidance_scale=case["guidance_scale"],
                generator=g,
                width=case["width"],
                height=case["height"],
                output_type="pil",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            ).images[0]
    finally:
        del pipe.prepare_latents
    assert len(steps) == case["steps"] == len(rec["timesteps"])
    for i, s in enumerate(steps):
        rec[f"step_latents_{i}"] = s
    rec["final_latents"] = steps[-1].clone()
    rec["draws"] = torch.tensor([count_draws(case["seed"], g.get_state(), tuple(rec["init_latents"].shape))])
    rec["image"] = torch.from_numpy(np.array(image, dtype=np.uint8).copy())
    return {k: v.contiguous() for k, v in sorted(rec.items())}, sch


def main():
    torch.set_grad_enabled(False)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    own_memory_(pipe)
    base_config = pipe.scheduler.config
    OUT.mkdir(parents=True, exist_ok=True)
    for f in OUT.glob("*"):
        f.unlink()
    for case in CASES:
        rec, sch = run_case(pipe, base_config, case)
        save_file(rec, str(OUT / f"{case['name']}.safetensors"))
        ts = rec["timesteps"].tolist()
        img = rec["image"].float()
        print(
            f"  {case['name']:17s} {type(sch).__name__:32s} {case['spacing']:8s} timesteps {ts[:3]}..{ts[-1]} "
            f"init_noise_sigma {rec['init_noise_sigma'].item():.6f} draws {rec['draws'].item()} "
            f"image mean {img.mean():.1f} std {img.std():.1f}"
        )
        assert img.std() > 5, "image looks blank"
    (OUT / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")

    for f in OUT.glob("*"):
        f.chmod(0o644)
    total = sum(f.stat().st_size for f in OUT.glob("*"))
    print(f"[done] {OUT.relative_to(ROOT)}: {total} bytes")


if __name__ == "__main__":
    main()
