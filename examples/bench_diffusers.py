"""Time diffusers (PyTorch, CPU) on SDXL base's full-size shapes with random weights, to compare
with `cargo run --release --example bench` in the same sitting.

    python examples/bench_diffusers.py unet --size 512 --batch 1 --runs 3 [--dtype f32|bf16]
    python examples/bench_diffusers.py vae --size 512

Needs torch and diffusers (pip install torch diffusers); never run by CI. Prints the median and
spread of several runs after one warm-up, like the Rust harness.
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

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


def timed(fn, runs):
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["unet", "vae"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    torch.manual_seed(0)
    l = a.size // 8
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with torch.inference_mode():
        if a.what == "unet":
            m = UNet2DConditionModel(**UNET).to(dtype).eval()
            x = torch.randn(a.batch, 4, l, l, dtype=dtype)
            ctx = torch.randn(a.batch, 77, 2048, dtype=dtype)
            cond = {
                "text_embeds": torch.randn(a.batch, 1280, dtype=dtype),
                "time_ids": torch.tensor([[a.size, a.size, 0, 0, a.size, a.size]] * a.batch, dtype=dtype),
            }
            ts = timed(lambda: m(x, 999, ctx, added_cond_kwargs=cond), a.runs)
            label = f"UNet step {a.size}x{a.size} batch {a.batch} {a.dtype}"
        else:
            m = AutoencoderKL(**VAE).to(dtype).eval()
            z = torch.randn(1, 4, l, l, dtype=dtype)
            ts = timed(lambda: m.decode(z), a.runs)
            label = f"VAE decode {a.size}x{a.size} {a.dtype}"
    print(f"{label}: median {statistics.median(ts):.3f} s (min {ts[0]:.3f}, max {ts[-1]:.3f}, n={len(ts)})")


if __name__ == "__main__":
    main()
