"""Time diffusers (PyTorch) on SDXL base's full-size shapes with random weights, to compare
with `cargo run --release --example bench` (CPU) or `--example gpu_check` (GPU) in the same
sitting.

    python examples/bench_diffusers.py unet --size 512 --batch 1 --runs 3 [--dtype f32|bf16|f16]
    python examples/bench_diffusers.py vae --size 512
    python examples/bench_diffusers.py taesd --size 1024       # AutoencoderTiny, taesdxl's config
    python examples/bench_diffusers.py image --size 1024 --device cuda --dtype f16

`image`: what a 4-step DMD2 image costs past the text encoders: 4 UNet steps (batch 1, CFG
off) and the VAE decode, the VAE in f32 as the SDXL pipeline's force_upcast keeps it.
`--device cuda` synchronises before reading the clock.

Needs torch and diffusers (pip install torch diffusers); never run by CI. Prints the median and
spread of several runs after one warm-up, like the Rust harness.
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.13025,
)


def timed(fn, runs, sync=lambda: None):
    fn()
    sync()
    ts = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["unet", "vae", "taesd", "image"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    l = a.size // 8
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}")
    with torch.inference_mode():
        if a.what in ("unet", "image"):
            m = UNet2DConditionModel(**UNET).to(dev, dtype).eval()
            x = torch.randn(a.batch, 4, l, l, dtype=dtype, device=dev)
            ctx = torch.randn(a.batch, 77, 2048, dtype=dtype, device=dev)
            cond = {
                "text_embeds": torch.randn(a.batch, 1280, dtype=dtype, device=dev),
                "time_ids": torch.tensor([[a.size, a.size, 0, 0, a.size, a.size]] * a.batch, dtype=dtype, device=dev),
            }
        if a.what in ("vae", "image"):
            vae_dtype = torch.float32 if a.what == "image" else dtype
            v = AutoencoderKL(**VAE).to(dev, vae_dtype).eval()
            z = torch.randn(1, 4, l, l, dtype=vae_dtype, device=dev)
        if a.what == "taesd":
            v = AutoencoderTiny().to(dev, dtype).eval()
            z = torch.randn(1, 4, l, l, dtype=dtype, device=dev)
        if a.what == "unet":
            ts = timed(lambda: m(x, 999, ctx, added_cond_kwargs=cond), a.runs, sync)
            label = f"UNet step {a.size}x{a.size} batch {a.batch} {a.dtype}"
        elif a.what == "vae":
            ts = timed(lambda: v.decode(z), a.runs, sync)
            label = f"VAE decode {a.size}x{a.size} {a.dtype}"
        elif a.what == "taesd":
            ts = timed(lambda: v.decode(z), a.runs, sync)
            label = f"tiny VAE (TAESDXL) decode {a.size}x{a.size} {a.dtype}"
        else:
            def image():
                lat = x
                for t in (999, 749, 499, 249):
                    lat = lat - m(lat, t, ctx, added_cond_kwargs=cond).sample
                v.decode(lat.float() / VAE["scaling_factor"])

            ts = timed(image, a.runs, sync)
            label = f"4 UNet steps + VAE decode {a.size}x{a.size} {a.dtype} (VAE f32)"
            if dev.type == "cuda":
                label += f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(f"{label}: median {statistics.median(ts):.3f} s (min {ts[0]:.3f}, max {ts[-1]:.3f}, n={len(ts)})")


if __name__ == "__main__":
    main()
