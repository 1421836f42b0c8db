#!/usr/bin/env python3
"""Reference fixtures for `--vae` and the tiny VAE: diffusers' SDXL pipelines on the tiny
model with its VAE swapped for
  - a second random AutoencoderKL (other widths, `force_upcast: false`), saved as a diffusers
    folder (kl/) and as an original-layout (LDM) single file (kl_ldm.safetensors; verified by
    diffusers' own `AutoencoderKL.from_single_file`);
  - a random narrow AutoencoderTiny with taesdxl's config fields (tiny/), encoder and decoder
    of different widths so that each is read on its own;
float32 on CPU, LCMScheduler at DMD2's timesteps.

Writes tests/fixtures/vae/:
  kl/{config.json, diffusion_pytorch_model.safetensors}, kl_ldm.safetensors,
  tiny/{config.json, diffusion_pytorch_model.safetensors},
  cases.json, <case>.safetensors (`image`: the final uint8 image [H, W, 3]; `latents`: the
  sampler's final latents), tiny_decode.safetensors (`latents`, `decoded`: AutoencoderTiny.decode
  of large random latents, raw, exercising the decoder's tanh clamp).

Run by hand (never in CI), after scripts/make_fixtures.py and make_img2img_fixtures.py:

    /work/pyenv/bin/python scripts/make_vae_fixtures.py
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_fixtures import randomize_, vae_to_ldm  # noqa: E402

TINY = ROOT / "tests/fixtures/tiny"
IMG2IMG = ROOT / "tests/fixtures/img2img"
OUT = ROOT / "tests/fixtures/vae"
STEPS_4 = [999, 749, 499, 249]

KL_CONFIG = dict(
    block_out_channels=[32, 32, 32, 32],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,
)

# taesdxl's config (madebyollin/taesdxl) with narrower blocks.
TINY_CONFIG = dict(
    act_fn="relu",
    encoder_block_out_channels=[16, 16, 16, 16],
    decoder_block_out_channels=[24, 24, 24, 24],
    num_encoder_blocks=[1, 3, 3, 3],
    num_decoder_blocks=[3, 3, 3, 1],
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    latent_magnitude=3,
    latent_shift=0.5,
    scaling_factor=1.0,
    upsampling_scaling_factor=2,
    force_upcast=False,
)

CASES = [
    dict(name="kl_txt2img", vae="kl", kind="txt2img", prompt="a photo of a cat", seed=31, guidance_scale=1.0),
    dict(name="kl_img2img", vae="kl", kind="img2img", prompt="a red car", seed=32, guidance_scale=1.0,
         strength=0.5),
    dict(name="tiny_txt2img", vae="tiny", kind="txt2img", prompt="a watercolor painting of a lighthouse",
         seed=33, guidance_scale=1.5, negative_prompt="blurry"),
    dict(name="tiny_img2img", vae="tiny", kind="img2img", prompt="a photo of a dog", seed=34,
         guidance_scale=1.0, strength=0.75),
]


def save_f16(model, folder):
    """A diffusers folder with float16 weights (the random values are f16-representable)."""
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def main():
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    torch.manual_seed(0)
    kl = AutoencoderKL(**KL_CONFIG)
    randomize_(kl, 901, torch.float16)
    save_f16(kl, OUT / "kl")
    ldm = {k: v.to(torch.float16).contiguous() for k, v in vae_to_ldm(kl.state_dict(), kl.config).items()}
    save_file(ldm, str(OUT / "kl_ldm.safetensors"))
    again = AutoencoderKL.from_single_file(str(OUT / "kl_ldm.safetensors"), config=str(OUT / "kl"),
                                           torch_dtype=torch.float32)
    for k, v in kl.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"LDM round trip: {k}"

    tiny = AutoencoderTiny(**TINY_CONFIG)
    # A gentler last decoder conv keeps most decoded values inside [0, 1] (no clipping).
    last = f"decoder.layers.{len(tiny.decoder.layers) - 1}.weight"
    randomize_(tiny, 902, torch.float16, gains={last: 0.15})
    tiny.decoder.layers[-1].bias.add_(0.5)  # centred on mid-grey (0.5 is f16-exact)
    save_f16(tiny, OUT / "tiny")

    base = StableDiffusionXLPipeline.from_pretrained(TINY, torch_dtype=torch.float32, add_watermarker=False)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    vaes = dict(kl=kl, tiny=tiny)
    init = Image.open(IMG2IMG / "init.png").convert("RGB")
    cases = []
    for case in CASES:
        comps = dict(base.components, vae=vaes[case["vae"]])
        rec = {}
        if case["kind"] == "txt2img":
            pipe = StableDiffusionXLPipeline(**comps)
            extra = dict(width=64, height=64)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(**comps)
            extra = dict(image=init, strength=case["strength"])
        pipe.set_progress_bar_config(disable=True)
        orig_decode = pipe.vae.decode

        def decode(z, *a, _rec=rec, _orig=orig_decode, **k):
            _rec["vae_input"] = z.clone()
            return _orig(z, *a, **k)

        pipe.vae.decode = decode
        image = pipe(prompt=case["prompt"], negative_prompt=case.get("negative_prompt"), timesteps=STEPS_4,
                     guidance_scale=case["guidance_scale"], generator=torch.Generator().manual_seed(case["seed"]),
                     output_type="pil", **extra).images[0]
        pipe.vae.decode = orig_decode
        rec["image"] = torch.from_numpy(np.array(image))
        save_file({k: v.contiguous() for k, v in rec.items()}, str(OUT / f"{case['name']}.safetensors"))
        image.save(OUT / f"{case['name']}.png")
        a = np.array(image)
        if "vae_input" in rec and case["vae"] == "tiny":
            raw = tiny.decoder.layers(torch.tanh(rec["vae_input"] / 3) * 3)
            print(f"    decoded (before clamping to [0, 1]): mean {raw.mean():.3f} std {raw.std():.3f}")
        print(f"  {case['name']}: {image.width}x{image.height}, pixels {a.min()}..{a.max()}, "
              f"clipped {np.mean((a == 0) | (a == 255)):.1%}")
        cases.append(dict(case, model="tiny", timesteps=STEPS_4, width=image.width, height=image.height,
                          init=None if case["kind"] == "txt2img" else "img2img/init.png"))

    # The decoder alone on latents large enough for its tanh(x / 3) · 3 clamp to bite.
    gen = torch.Generator().manual_seed(903)
    z = torch.randn((2, 4, 6, 10), generator=gen) * 4
    decoded = tiny.decode(z).sample
    save_file({"latents": z.contiguous(), "decoded": decoded.contiguous()}, str(OUT / "tiny_decode.safetensors"))

    with open(OUT / "cases.json", "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
