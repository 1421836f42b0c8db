#!/usr/bin/env python3
"""Reference fixtures for img2img and inpainting: diffusers' StableDiffusionXLImg2ImgPipeline
and StableDiffusionXLInpaintPipeline (4-channel UNet) with LCMScheduler at DMD2's
timesteps, on the tiny model, float32 on CPU; and PIL's Lanczos resize and grey conversion
for the resampling code.

Writes tests/fixtures/img2img/:
  init.png (64x64), init_odd.png (83x70), mask.png (64x64, soft-edged, grey levels),
  cases.json, <case>.safetensors (`image`: the final uint8 image [H, W, 3];
  `image_latents`: the scaled VAE sample; `init_latents`: the first latents) and <case>.png,
  resize.safetensors (a random image, PIL's resizes, grey conversion and Gaussian blurs of it).

Run by hand (never in CI), after scripts/make_fixtures.py:

    /work/pyenv/bin/python scripts/make_img2img_fixtures.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/fixtures/tiny"
OUT = ROOT / "tests/fixtures/img2img"
STEPS_4 = [999, 749, 499, 249]


def smooth_image(w, h, seed):
    """A smooth colourful picture (gradients and blobs), uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        img[..., c] = 0.5 + 0.25 * np.sin(x / w * (2 + c) * np.pi + rng.uniform(0, 6)) \
            + 0.25 * np.cos(y / h * (3 - c) * np.pi + rng.uniform(0, 6))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 15)
        col = rng.uniform(0, 1, 3)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        a = np.clip((r - d) / 3, 0, 1)[..., None]
        img = img * (1 - a) + col * a
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def soft_mask(w, h):
    """White rectangle with a soft grey border (levels 0..255), as an RGB PNG."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.minimum.reduce([x - 16, 48 - x, y - 20, 52 - y])
    m = np.clip(d / 6 + 0.5, 0, 1)
    g = (m * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(np.stack([g, g, g], -1), "RGB")


CASES = [
    dict(name="img2img_half", kind="img2img", init="init.png", prompt="a photo of a cat", negative_prompt=None,
         strength=0.5, guidance_scale=1.0, seed=21),
    dict(name="img2img_cfg", kind="img2img", init="init.png", prompt="a watercolor painting of a lighthouse",
         negative_prompt="blurry, low quality", strength=0.75, guidance_scale=2.0, seed=22),
    dict(name="img2img_odd_size", kind="img2img", init="init_odd.png", prompt="an astronaut riding a horse",
         negative_prompt=None, strength=0.5, guidance_scale=1.0, seed=23),
    dict(name="img2img_resized", kind="img2img", init="init.png", prompt="a red car", negative_prompt=None,
         strength=1.0, guidance_scale=1.0, seed=24, width=64, height=48),
    dict(name="inpaint_default", kind="inpaint", init="init.png", mask="mask.png", prompt="a photo of a dog",
         negative_prompt=None, strength=None, guidance_scale=1.0, seed=25),
    dict(name="inpaint_full_cfg", kind="inpaint", init="init.png", mask="mask.png", prompt="a bowl of fruit",
         negative_prompt=None, strength=1.0, guidance_scale=2.5, seed=26),
    dict(name="inpaint_half", kind="inpaint", init="init.png", mask="mask.png", prompt="a red car",
         negative_prompt="ugly", strength=0.5, guidance_scale=1.5, seed=27),
]


def main():
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    smooth_image(64, 64, 1).save(OUT / "init.png")
    smooth_image(83, 70, 2).save(OUT / "init_odd.png")
    soft_mask(64, 64).save(OUT / "mask.png")

    i2i = StableDiffusionXLImg2ImgPipeline.from_pretrained(TINY, torch_dtype=torch.float32, add_watermarker=False)
    i2i.scheduler = LCMScheduler.from_config(i2i.scheduler.config)
    inp = StableDiffusionXLInpaintPipeline(**i2i.components)
    for p in (i2i, inp):
        p.set_progress_bar_config(disable=True)

    cases = []
    for case in CASES:
        rec = {}
        pipe = i2i if case["kind"] == "img2img" else inp
        orig = pipe.scheduler.add_noise

        def add_noise(x, noise, t, _orig=orig, _rec=rec):
            out = _orig(x, noise, t)
            if "init_latents" not in _rec:
                _rec["image_latents"] = x.clone()
                _rec["init_latents"] = out.clone()
            return out

        pipe.scheduler.add_noise = add_noise
        init = Image.open(OUT / case["init"]).convert("RGB")
        kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], timesteps=STEPS_4,
                      guidance_scale=case["guidance_scale"], generator=torch.Generator().manual_seed(case["seed"]),
                      output_type="pil")
        if case["kind"] == "img2img":
            if "width" in case:
                # The img2img pipeline takes the image's size: a user resizes first (Lanczos).
                init = init.resize((case["width"], case["height"]), Image.LANCZOS)
            image = pipe(image=init, strength=case["strength"], **kwargs).images[0]
        else:
            mask = Image.open(OUT / case["mask"])
            extra = {} if case["strength"] is None else dict(strength=case["strength"])
            image = pipe(image=init, mask_image=mask, width=init.width, height=init.height, **kwargs, **extra).images[0]
        pipe.scheduler.add_noise = orig
        rec["image"] = torch.from_numpy(np.array(image))
        save_file({k: v.contiguous() for k, v in rec.items()}, str(OUT / f"{case['name']}.safetensors"))
        image.save(OUT / f"{case['name']}.png")
        cases.append(dict(case, model="tiny", timesteps=STEPS_4, width=image.width, height=image.height))
        print(f"  {case['name']}: {image.width}x{image.height}")

    # PIL's resize and grey conversion on random images.
    rng = np.random.default_rng(7)
    res = {}
    src = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    res["src"] = torch.from_numpy(src)
    for w, h in [(53, 37), (24, 16), (64, 48), (100, 80), (7, 5), (53, 20), (20, 37)]:
        res[f"lanczos_{w}x{h}"] = torch.from_numpy(np.array(Image.fromarray(src, "RGB").resize((w, h), Image.LANCZOS)))
    grey = Image.fromarray(src, "RGB").convert("L")
    res["grey"] = torch.from_numpy(np.array(grey))
    res["grey_lanczos_30x30"] = torch.from_numpy(np.array(grey.resize((30, 30), Image.LANCZOS)))
    # PIL's GaussianBlur (diffusers' mask_processor.blur), small to larger than the image.
    from PIL import ImageFilter
    for r in ["0.7", "2.5", "4", "30"]:
        res[f"grey_blur_{r}"] = torch.from_numpy(np.array(grey.filter(ImageFilter.GaussianBlur(float(r)))))
    res["rgb_blur_4"] = torch.from_numpy(np.array(Image.fromarray(src, "RGB").filter(ImageFilter.GaussianBlur(4))))
    save_file(res, str(OUT / "resize.safetensors"))

    with open(OUT / "cases.json", "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
