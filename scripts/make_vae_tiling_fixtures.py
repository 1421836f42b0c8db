#!/usr/bin/env python3
"""Reference for dmd2's `--vae-tiling`: diffusers' AutoencoderKL.tiled_decode on the tiny
fixture VAE (tests/fixtures/tiny/vae, made by make_fixtures.py; not modified here).

For each case, smooth random latents (a coarse torch.randn field, nearest-upsampled, as
sampler outputs are smooth) are divided by the scaling factor and decoded twice in float32
on the CPU: whole (`vae.decode`, only to print how far tiling moves the image) and tiled (`vae.tiled_decode` with `tile_sample_min_size`
= tile * 8 and `tile_latent_min_size` = tile, overlap factor 0.25 as diffusers sets it).

Writes tests/fixtures/vae_tiling.safetensors:
    <case>.latents  f32 [1, 4, h, w]     sampler latents (before / scaling_factor)
    <case>.tiled    f32 [1, 3, 8h, 8w]   tiled_decode output in [-1, 1]
    <case>.tile     i64 [1]              tile size in latents
Case names: "<h>x<w>_t<tile>".

Run by hand (never in CI):  /work/pyenv/bin/python scripts/make_vae_tiling_fixtures.py
Made with torch 2.15.0 (CPU), diffusers 0.42.1.
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
CASES = [(24, 40, 16), (32, 32, 24), (16, 40, 8)]


def main():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(ROOT / "tests/fixtures/tiny/vae", torch_dtype=torch.float32)
    vae.eval()
    out = {}
    for h, w, tile in CASES:
        name = f"{h}x{w}_t{tile}"
        coarse = torch.randn(1, 4, h // 8, w // 8)
        latents = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
        z = latents / vae.config.scaling_factor
        vae.tile_sample_min_size = tile * 8
        vae.tile_latent_min_size = tile
        with torch.no_grad():
            whole = vae.decode(z).sample
            tiled = vae.tiled_decode(z).sample
        out[f"{name}.latents"] = latents.contiguous()
        out[f"{name}.tiled"] = tiled.contiguous()
        out[f"{name}.tile"] = torch.tensor([tile], dtype=torch.int64)
        diff = ((tiled / 2 + 0.5).clamp(0, 1) * 255).round() - ((whole / 2 + 0.5).clamp(0, 1) * 255).round()
        print(f"{name}: tiled vs whole max {diff.abs().max().item():.0f} levels")
    save_file(out, ROOT / "tests/fixtures/vae_tiling.safetensors")


if __name__ == "__main__":
    main()
