//! The path GPUs take, run on the CPU: with `DMD2_KERNELS=candle` every op goes through
//! candle's own implementation (the code CUDA and Metal run), and `--dtype f16` takes the
//! GPU's dtype logic (f16 text encoders and UNet, the VAE upcast to f32, the NaN guard)
//! through candle's CPU f16 ops. On every reference case the f32 image through candle equals
//! the own kernels' (±1 level) and the f16 image stays within 30 dB PSNR of it; an f16
//! overflow that f32 survives stops at the NaN guard with the step named and no file.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn generate(env: &[(&str, &str)], model: &Path, c: &Case, dtype: &str, out: &Path) -> Output {
    let ts: Vec<String> = c.timesteps.iter().map(|t| t.to_string()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dmd2"));
    cmd.args(["gen", "--model"])
        .arg(model)
        .args(["--prompt", &c.prompt])
        .args(["--timesteps", &ts.join(",")])
        .args(["--cfg", &c.guidance_scale.to_string()])
        .args(["--seed", &c.seed.to_string()])
        .args(["--width", &c.width.to_string()])
        .args(["--height", &c.height.to_string()])
        .args(["--dtype", dtype, "--verbose", "-o"])
        .arg(out)
        .envs(env.iter().copied());
    if let Some(n) = &c.negative_prompt {
        cmd.args(["--negative-prompt", n]);
    }
    cmd.output().expect("run dmd2")
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
        .into_raw()
}

#[test]
fn candle_ops_and_the_f16_path_match_f32_on_every_case() {
    let dir = fresh_dir("gpu-path", "cases");
    let candle = [("DMD2_KERNELS", "candle")];
    let mut worst_db = f64::INFINITY;
    for c in cases() {
        for src in Source::for_case(&c) {
            let tag = format!("{}-{src:?}", c.name);
            let own = dir.join(format!("{tag}-own.png"));
            let f32_path = dir.join(format!("{tag}-candle-f32.png"));
            let f16_path = dir.join(format!("{tag}-candle-f16.png"));
            for (env, dtype, out) in [
                (&[][..], "f32", &own),
                (&candle[..], "f32", &f32_path),
                (&candle[..], "f16", &f16_path),
            ] {
                let o = generate(env, &src.path(), &c, dtype, out);
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(o.status.success(), "{tag} {env:?} {dtype}: {err}");
                if !env.is_empty() {
                    assert!(err.contains("CPU kernels: candle's"), "{err}");
                }
                if dtype == "f16" {
                    assert!(err.contains("precision: UNet f16, VAE f32"), "{err}");
                }
            }
            let own = pixels(&own);
            let diff = max_level_diff(&pixels(&f32_path), &own);
            assert!(
                diff <= 1,
                "{tag}: candle f32 is {diff} levels from the own kernels"
            );
            let db = psnr(&pixels(&f16_path), &own);
            assert!(db >= 30.0, "{tag}: f16 image {db:.1} dB from f32");
            worst_db = worst_db.min(db);
        }
    }
    eprintln!("f16 through candle: worst PSNR against f32 {worst_db:.1} dB");
}

/// A weight that f32 holds but f16 cannot (1e5 > 65504) overflows on the f16 path: the NaN
/// guard stops the image at step 1 instead of writing a black one.
#[test]
fn f16_overflow_stops_at_the_nan_guard() {
    use candle_core::{DType, Device, Tensor};
    let dir = fresh_dir("gpu-path", "overflow");
    // tiny2 is stored in bf16, which holds 1e5.
    let src = fixtures().join("tiny2.safetensors");
    let mut ts = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let key = "model.diffusion_model.input_blocks.0.0.bias";
    let b = &ts[key];
    let big = Tensor::full(1e5f32, b.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    ts.insert(key.to_string(), big);
    let model = dir.join("big.safetensors");
    candle_core::safetensors::save(&ts, &model).unwrap();
    let c = cases().into_iter().find(|c| c.model == "tiny2").unwrap();
    let candle = [("DMD2_KERNELS", "candle")];
    let ok = generate(&candle, &model, &c, "f32", &dir.join("f32.png"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = dir.join("f16.png");
    let o = generate(&candle, &model, &c, "f16", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("step 1 of"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}
