//! Speed benchmarks at SDXL base's full size with random weights (no download).
//!
//! cargo run --release --example bench -- [gemm|unet|vae|taesd|text|all] [--size 512] [--batch 1] [--runs 3] [--dtype f32|f32-f16|bf16]
//!
//! `vae` is SDXL's VAE decode, `taesd` the tiny VAE's (TAESDXL's shapes, `--vae taesdxl`).
//!
//! Prints the median and spread of several timed runs after one warm-up, with the achieved
//! GFLOP/s, and the machine's measured f32 GEMM rate for comparison.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use dmd2::clip::ClipTextModel;
use dmd2::config::sdxl_base;
use dmd2::precision::Precision;
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

/// The tiny VAE's decode: 2·9·C² multiply-adds per pixel per 3×3 convolution of C = 64
/// channels, counted per level from TAESDXL's layer list (`vae::tiny`), plus the first and
/// last convolutions.
fn taesd_flops(size: usize) -> f64 {
    let conv = |px: f64, c_in: f64, c_out: f64| 2.0 * 9.0 * c_in * c_out * px;
    let latent = (size as f64 / 8.0).powi(2);
    let mut f = conv(latent, 4.0, 64.0);
    // Levels at 1/8, 1/4, 1/2 of the size: 3 blocks (3 convs each), then the upsampling
    // convolution at twice the side; the last level at full size: 1 block and the output.
    for (level, blocks) in [(1.0, 3.0), (4.0, 3.0), (16.0, 3.0)] {
        f += blocks * 3.0 * conv(latent * level, 64.0, 64.0);
        f += conv(latent * level * 4.0, 64.0, 64.0);
    }
    f += 3.0 * conv(latent * 64.0, 64.0, 64.0) + conv(latent * 64.0, 64.0, 3.0);
    f
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

/// The own GEMM on every CPU tier up to this process's (`DMD2_CPU` caps it), next to candle's
/// matmul (the `gemm` crate, which picks its own kernels): a square f32 product, then the
/// UNet's shapes at 512² — a 3x3 convolution (weight · im2col) and linear layers
/// (activations · Wᵀ) — as f32 products and as bf16 products with the weight packed at load.
fn bench_gemm(n: usize) -> Result<()> {
    use dmd2::kernels::gemm::{Exec, Lhs, Operand, PackedA, PackedB, Product, Rhs, Src, gemm};
    use dmd2::kernels::{Tier, num_threads};
    let threads = num_threads();
    let vals = |len: usize, p: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * p) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let tiers: Vec<Tier> = Tier::runnable()
        .into_iter()
        .filter(|t| *t <= Tier::current())
        .collect();
    let dev = Device::Cpu;
    let (a, b) = (vals(n * n, 7919), vals(n * n, 104729));
    let (at, bt) = (
        Tensor::from_slice(&a, (n, n), &dev)?,
        Tensor::from_slice(&b, (n, n), &dev)?,
    );
    let flops = Some(2.0 * (n as f64).powi(3));
    let t = time_runs(5, || {
        at.matmul(&bt)?;
        Ok(())
    })?;
    report(&format!("gemm f32 {n}x{n}x{n} candle matmul"), &t, flops);
    fn op(data: Src, rs: usize, cs: usize) -> Operand {
        Operand { data, rs, cs }
    }
    let mut c = vec![0f32; n * n];
    for &tier in &tiers {
        let x = Exec {
            tier,
            product: Product::F32,
            threads,
        };
        let t = time_runs(5, || {
            let (l, r) = (op(Src::F32(&a), n, 1), op(Src::F32(&b), n, 1));
            gemm(
                x,
                [n, n, n],
                (&mut c, n),
                false,
                Lhs::Strided(l),
                Rhs::Strided(r),
            );
            Ok(())
        })?;
        report(&format!("gemm f32 {n}x{n}x{n} own {tier}"), &t, flops);
    }
    for (what, m, nn, k, linear) in [
        ("conv 320→320 3x3 at 64²", 320, 4096, 2880, false),
        ("conv 1280→1280 3x3 at 16²", 1280, 256, 11520, false),
        ("linear 4096 tokens 640→640", 4096, 640, 640, true),
        ("linear 256 tokens 1280→10240", 256, 10240, 1280, true),
    ] {
        let (a, b) = (vals(m * k, 7919), vals(k * nn, 104729));
        let a16: Vec<half::bf16> = a.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let b16: Vec<half::bf16> = b.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let mut c = vec![0f32; m * nn];
        let flops = Some(2.0 * (m * nn * k) as f64);
        // A linear layer's b holds W [nn × k] (B = Wᵀ); a convolution's a holds its kernel.
        let (brs, bcs) = if linear { (1, k) } else { (nn, 1) };
        let (pa, pb) = if linear {
            (None, Some(PackedB::from_transposed(&b16, nn, k)))
        } else {
            (Some(PackedA::new(&a16, m, k)), None)
        };
        println!("{what}:");
        for &tier in &tiers {
            for product in [Product::F32, Product::Bf16] {
                let x = Exec {
                    tier,
                    product,
                    threads,
                };
                let t = time_runs(3, || {
                    let (lhs, rhs) = match (product, &pa, &pb) {
                        (Product::F32, ..) => (
                            Lhs::Strided(op(Src::F32(&a), k, 1)),
                            Rhs::Strided(op(Src::F32(&b), brs, bcs)),
                        ),
                        (_, _, Some(pb)) => (Lhs::Strided(op(Src::F32(&a), k, 1)), Rhs::Packed(pb)),
                        (_, Some(pa), _) => {
                            (Lhs::Packed(pa), Rhs::Strided(op(Src::F32(&b), nn, 1)))
                        }
                        _ => unreachable!(),
                    };
                    gemm(x, [m, nn, k], (&mut c, nn), false, lhs, rhs);
                    Ok(())
                })?;
                let p = if product == Product::F32 {
                    "f32 "
                } else {
                    "bf16"
                };
                report(&format!("  {p} own {tier}"), &t, flops);
            }
        }
        let (at, bt) = (
            Tensor::from_slice(&a, (m, k), &dev)?,
            Tensor::from_slice(&b, if linear { (nn, k) } else { (k, nn) }, &dev)?,
        );
        let t = time_runs(3, || {
            if linear {
                at.matmul(&bt.t()?)?;
            } else {
                at.matmul(&bt)?;
            }
            Ok(())
        })?;
        report("  f32  candle matmul", &t, flops);
    }
    Ok(())
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
    // --dtype bf16: the CPU bf16 path (bf16 weight matrices, f32 accumulation).
    let precision = match args
        .iter()
        .position(|a| a == "--dtype")
        .and_then(|i| args.get(i + 1))
    {
        Some(d) if d == "bf16" => Precision::CPU_BF16,
        // f32 with the linear weights in f16, as `gen --dtype f32` keeps an fp16 checkpoint's.
        Some(d) if d == "f32-f16" => Precision::CPU_F32,
        Some(d) if d != "f32" => anyhow::bail!("--dtype must be f32, f32-f16 or bf16"),
        _ => Precision::F32,
    };
    let tag = if precision == Precision::F32 {
        "f32"
    } else if precision == Precision::CPU_F32 {
        "f32, f16 linear weights"
    } else {
        "bf16"
    };
    println!(
        "threads: {}, CPU tier: {} (best here: {})",
        candle_core::utils::get_num_threads(),
        dmd2::kernels::Tier::current(),
        dmd2::kernels::Tier::best()
    );

    if what == "gemm" || what == "all" {
        bench_gemm(2048)?;
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
        let unet = UNet::new(
            &sdxl_base::unet(),
            random_weights::var_builder_with(precision, &dev),
        )?;
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
            &format!("UNet step {size}x{size} batch {batch} {tag}"),
            &t,
            Some(unet_flops(size) * batch as f64),
        );
    }
    if what == "vae" || what == "all" {
        let vae = VaeDecoder::new(
            &sdxl_base::vae(),
            random_weights::var_builder_with(precision, &dev),
        )?;
        let l = size / 8;
        let z = Tensor::randn(0f32, 1.0, (1, 4, l, l), &dev)?;
        let t = time_runs(runs, || {
            vae.decode(&z)?;
            Ok(())
        })?;
        report(
            &format!("VAE decode {size}x{size} {tag}"),
            &t,
            Some(vae_flops(size)),
        );
    }
    if what == "taesd" || what == "all" {
        let taesd = dmd2::vae::TinyDecoder::new(
            &dmd2::config::TinyVaeConfig::taesdxl(),
            random_weights::var_builder_with(Precision::F32, &dev),
        )?;
        let l = size / 8;
        let z = Tensor::randn(0f32, 1.0, (1, 4, l, l), &dev)?;
        let t = time_runs(runs, || {
            taesd.decode(&z)?;
            Ok(())
        })?;
        report(
            &format!("tiny VAE (TAESDXL) decode {size}x{size} f32"),
            &t,
            Some(taesd_flops(size)),
        );
    }
    Ok(())
}
