//! The GPU check, as one program (scripts/gpu-check.sh runs it on a lent GPU machine, built
//! here with `--features cuda`; on the CPU it runs the same steps as a dry run):
//!
//! 1. every committed reference case (tests/fixtures/refs, tests/fixtures/variants/refs) on
//!    the device in f32: final latents (relative error) and pixels (levels) against diffusers';
//! 2. the same cases in f16 (the GPU default: f16 text encoders and UNet, VAE in f32) against
//!    the device's f32 images, by PSNR;
//! 3. a full-size SDXL (random weights, built on the device) timed for a 4-step image: text
//!    encoders, 4 UNet steps, VAE decode, in f16 (VAE f32), with the device's peak memory
//!    where the backend reports it.
//!
//! cargo run --release [--features cuda] --example gpu_check -- [--device cpu|cuda|metal]
//!     [--size 1024] [--runs 2] [--skip-bench] [--out DIR]
//!
//! Writes DIR/gpu-check.json (every number) and prints a summary; exits 1 if a parity check
//! fails (f32: latents ≤ 1e-3 relative, pixels ≤ 2 levels; f16: ≥ 30 dB).

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use dmd2::checkpoint;
use dmd2::clip::ClipTextModel;
use dmd2::config::sdxl_base;
use dmd2::device::{DeviceChoice, select};
use dmd2::pipeline::{Pipeline, Request};
use dmd2::precision::{DtypeChoice, Precision, RunPrecision};
use dmd2::random_weights;
use dmd2::unet::UNet;
use dmd2::vae::VaeDecoder;
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    timesteps: Vec<usize>,
    guidance_scale: f64,
    seed: u64,
    width: usize,
    height: usize,
}

impl Case {
    fn request(&self) -> Request {
        Request {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            prompt_syntax: Default::default(),
            sampler: dmd2::scheduler::SamplerSpec::dmd2(self.timesteps.clone()),
            cfg: self.guidance_scale,
            seed: self.seed,
            width: self.width,
            height: self.height,
            init: None,
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The model sources of a case's model; the tiny single file is written from the folder into
/// `scratch` (as the tests do).
fn sources(model: &str, scratch: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(match model {
        "tiny" => {
            let single = scratch.join("tiny.safetensors");
            if !single.exists() {
                let parts = checkpoint::open(&fixtures().join("tiny"))?;
                checkpoint::writer::write_single_file(&parts, &single, Some(DType::F16))?;
            }
            vec![
                ("folder".into(), fixtures().join("tiny")),
                ("single file".into(), single),
            ]
        }
        "tiny2" => vec![("single file".into(), fixtures().join("tiny2.safetensors"))],
        v => vec![("folder".into(), fixtures().join("variants").join(v))],
    })
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let d = (&a - &b)?.abs()?.max(0)?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-12))
}

/// Step 1 and 2: every reference case in f32 and f16 on `dev`.
fn parity(dev: &Device, scratch: &Path) -> Result<(Vec<serde_json::Value>, bool)> {
    let mut rows = Vec::new();
    let mut ok = true;
    for dir in [fixtures().join("refs"), fixtures().join("variants/refs")] {
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
        for c in cases {
            let refs = candle_core::safetensors::load(
                dir.join(format!("{}.safetensors", c.name)),
                &Device::Cpu,
            )?;
            let want_px = refs["image"].flatten_all()?.to_vec1::<u8>()?;
            for (what, path) in sources(&c.model, scratch)? {
                let mut images: Vec<Vec<u8>> = Vec::new();
                let mut row = json!({"case": c.name, "source": what});
                for dtype in [DtypeChoice::F32, DtypeChoice::F16] {
                    let precision = RunPrecision::resolve(dtype, dev, 0)?;
                    let parts = checkpoint::open(&path)?;
                    let p = Pipeline::load(parts, dev, precision)?;
                    let t = Instant::now();
                    let g = p.generate(&c.request(), &mut |_, _| {})?;
                    let secs = t.elapsed().as_secs_f64();
                    if dtype == DtypeChoice::F32 {
                        let lat = rel_err(&g.latents, &refs["final_latents"])?;
                        let px = max_level_diff(&g.rgb, &want_px);
                        let pass = lat <= 1e-3 && px <= 2;
                        ok &= pass;
                        row["f32"] = json!({"latents_rel_err": lat, "max_level_diff": px, "seconds": secs, "pass": pass});
                    } else {
                        let db = psnr(&g.rgb, &images[0]);
                        let pass = db >= 30.0;
                        ok &= pass;
                        row["f16"] = json!({"psnr_vs_f32_db": if db.is_finite() { db } else { 999.0 }, "seconds": secs, "pass": pass});
                    }
                    images.push(g.rgb);
                }
                println!("{row}");
                rows.push(row);
            }
        }
    }
    Ok((rows, ok))
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Step 3: a full-size SDXL with random weights, a 4-step image at `size`², f16 (VAE f32).
fn bench(dev: &Device, size: usize, runs: usize) -> Result<serde_json::Value> {
    let half = Precision::uniform(if dev.is_cpu() { DType::F32 } else { DType::F16 });
    let t0 = Instant::now();
    let te1 = ClipTextModel::new(
        &sdxl_base::text_encoder(),
        random_weights::var_builder_with(half, dev),
    )?;
    let te2 = ClipTextModel::new(
        &sdxl_base::text_encoder_2(),
        random_weights::var_builder_with(half, dev),
    )?;
    let unet = UNet::new(
        &sdxl_base::unet(),
        random_weights::var_builder_with(half, dev),
    )?;
    let vae = VaeDecoder::new(
        &sdxl_base::vae(),
        random_weights::var_builder_with(Precision::F32, dev),
    )?;
    sync(dev)?;
    let build = t0.elapsed().as_secs_f64();
    let act = half.activations;
    let l = size / 8;
    let ids = Tensor::arange(0u32, 77, dev)?.unsqueeze(0)?;
    let s = size as f32;
    let time_ids = Tensor::new(&[s, s, 0.0, 0.0, s, s], dev)?
        .unsqueeze(0)?
        .to_dtype(act)?;
    let mut steps = Vec::new();
    let mut totals = Vec::new();
    let (mut encode_t, mut decode_t) = (Vec::new(), Vec::new());
    // One warm-up image, then `runs` timed ones.
    for run in 0..=runs {
        sync(dev)?;
        let t = Instant::now();
        let c1 = te1.encode(&ids)?;
        let c2 = te2.encode(&ids)?;
        let ctx = Tensor::cat(&[&c1.penultimate, &c2.penultimate], 2)?.to_dtype(act)?;
        let pooled = c2.pooled.context("no pooled output")?.to_dtype(act)?;
        sync(dev)?;
        let te = t.elapsed().as_secs_f64();
        let mut x = Tensor::randn(0f32, 1.0, (1, 4, l, l), dev)?.to_dtype(act)?;
        let mut step_t = Vec::new();
        for t_step in [999.0, 749.0, 499.0, 249.0] {
            let ts = Instant::now();
            let eps = unet.forward(&x, t_step, &ctx, &pooled, &time_ids)?;
            x = (&x - &eps)?;
            sync(dev)?;
            step_t.push(ts.elapsed().as_secs_f64());
        }
        let td = Instant::now();
        let img = vae.decode(&x.to_dtype(DType::F32)?)?;
        let _ = img.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        let dec = td.elapsed().as_secs_f64();
        let total = t.elapsed().as_secs_f64();
        println!(
            "run {run}: encode {te:.3} s, steps {step_t:.3?} s, decode {dec:.3} s, total {total:.3} s"
        );
        if run > 0 {
            steps.extend(step_t);
            totals.push(total);
            encode_t.push(te);
            decode_t.push(dec);
        }
    }
    Ok(json!({
        "size": size,
        "precision": if dev.is_cpu() { "f32" } else { "f16 (VAE f32)" },
        "build_random_model_seconds": build,
        "encode_seconds": median(encode_t),
        "unet_step_seconds": median(steps),
        "decode_seconds": median(decode_t),
        "image_seconds": median(totals),
        "runs": runs,
    }))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let device = match opt("--device").as_deref() {
        None | Some("cuda") => DeviceChoice::Cuda,
        Some("cpu") => DeviceChoice::Cpu,
        Some("metal") => DeviceChoice::Metal,
        Some(d) => bail!("--device {d}: cpu, cuda or metal"),
    };
    let size: usize = opt("--size").map_or(Ok(1024), |s| s.parse())?;
    let runs: usize = opt("--runs").map_or(Ok(2), |s| s.parse())?;
    let out = PathBuf::from(opt("--out").unwrap_or_else(|| "gpu-check".into()));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let dev = select(device)?;
    println!("device: {dev:?}; dmd2 {}", env!("CARGO_PKG_VERSION"));
    let t = Instant::now();
    let (cases, ok) = parity(&dev, &out)?;
    println!(
        "parity: {} runs, all within tolerance: {ok} ({:.1} s)",
        cases.len(),
        t.elapsed().as_secs_f64()
    );
    let bench = if args.iter().any(|a| a == "--skip-bench") {
        serde_json::Value::Null
    } else {
        let b = bench(&dev, size, runs)?;
        println!("full-size SDXL, random weights: {b}");
        b
    };
    let report = json!({"device": format!("{dev:?}"), "parity_ok": ok, "cases": cases, "sdxl_4_step": bench});
    std::fs::write(
        out.join("gpu-check.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if !ok {
        bail!(
            "a parity check failed (see {}/gpu-check.json)",
            out.display()
        );
    }
    Ok(())
}
