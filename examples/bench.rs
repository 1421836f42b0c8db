//! Speed benchmarks at SDXL base's full size with random weights (no download).
//!
//! cargo run --release --example bench -- [gemm|unet|vae|text|all] [--size 512] [--batch 1] [--runs 3]
//!
//! Prints the median and spread of several timed runs after one warm-up, with the achieved
//! GFLOP/s, and the machine's measured f32 GEMM rate for comparison.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use dmd2::clip::ClipTextModel;
use dmd2::config::sdxl_base;
use dmd2::random_weights;
use dmd2::unet::UNet;
use dmd2::vae::VaeDecoder;
use std::time::Instant;

/// FLOPs (2 per multiply-add) of SDXL base's UNet step and VAE decode, batch 1, as counted
/// with PyTorch's FlopCounterMode on diffusers' models.
fn unet_flops(size: usize) -> f64 {
    match size {
        512 => 1.59e12,
        1024 => 6.76e12,
        s => 6.76e12 * (s as f64 / 1024.0).powi(2),
    }
}

fn vae_flops(size: usize) -> f64 {
    match size {
        512 => 2.5e12,
        1024 => 10.5e12,
        s => 10.5e12 * (s as f64 / 1024.0).powi(2),
    }
}

fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?; // warm-up
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v)
}

fn report(what: &str, times: &[f64], flops: Option<f64>) {
    let median = times[times.len() / 2];
    let spread = times[times.len() - 1] - times[0];
    let rate = flops
        .map(|f| format!(", {:.0} GFLOP/s", f / median / 1e9))
        .unwrap_or_default();
    println!(
        "{what}: median {median:.3} s (min {:.3}, max {:.3}, spread {spread:.3}, n={}){rate}",
        times[0],
        times[times.len() - 1],
        times.len()
    );
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().cloned().unwrap_or_else(|| "all".into());
    let opt = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let size = opt("--size", 512);
    let batch = opt("--batch", 1);
    let runs = opt("--runs", 3);
    let dev = Device::Cpu;
    let dtype = DType::F32;
    println!("threads: {}", candle_core::utils::get_num_threads());

    if what == "gemm" || what == "all" {
        let n = 2048;
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let t = time_runs(5, || {
            a.matmul(&b)?;
            Ok(())
        })?;
        report(
            &format!("gemm f32 {n}x{n}x{n}"),
            &t,
            Some(2.0 * (n as f64).powi(3)),
        );
    }
    if what == "text" || what == "all" {
        let te1 = ClipTextModel::new(
            &sdxl_base::text_encoder(),
            random_weights::var_builder(dtype, &dev),
        )?;
        let te2 = ClipTextModel::new(
            &sdxl_base::text_encoder_2(),
            random_weights::var_builder(dtype, &dev),
        )?;
        let ids = Tensor::arange(0u32, 77, &dev)?.unsqueeze(0)?;
        let t = time_runs(runs, || {
            te1.encode(&ids)?;
            te2.encode(&ids)?;
            Ok(())
        })?;
        report("text encoding (both encoders, 1 prompt)", &t, None);
    }
    if what == "unet" || what == "all" {
        let t0 = Instant::now();
        let unet = UNet::new(&sdxl_base::unet(), random_weights::var_builder(dtype, &dev))?;
        println!(
            "built random SDXL UNet in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let l = size / 8;
        let x = Tensor::randn(0f32, 1.0, (batch, 4, l, l), &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (batch, 77, 2048), &dev)?;
        let pooled = Tensor::randn(0f32, 1.0, (batch, 1280), &dev)?;
        let s = size as f32;
        let ids = Tensor::new(&[s, s, 0.0, 0.0, s, s], &dev)?
            .unsqueeze(0)?
            .repeat((batch, 1))?;
        let t = time_runs(runs, || {
            unet.forward(&x, 999.0, &ctx, &pooled, &ids)?;
            Ok(())
        })?;
        report(
            &format!("UNet step {size}x{size} batch {batch}"),
            &t,
            Some(unet_flops(size) * batch as f64),
        );
    }
    if what == "vae" || what == "all" {
        let vae = VaeDecoder::new(&sdxl_base::vae(), random_weights::var_builder(dtype, &dev))?;
        let l = size / 8;
        let z = Tensor::randn(0f32, 1.0, (1, 4, l, l), &dev)?;
        let t = time_runs(runs, || {
            vae.decode(&z)?;
            Ok(())
        })?;
        report(
            &format!("VAE decode {size}x{size}"),
            &t,
            Some(vae_flops(size)),
        );
    }
    Ok(())
}
