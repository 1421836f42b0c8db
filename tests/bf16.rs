//! The CPU bf16 path (`--dtype bf16`: bf16 weight matrices, f32 accumulation) against the f32
//! path on the fixture models: every reference case's image within a PSNR of 35 dB. A second
//! check runs the VAE in bf16 too (the bf16 product path for convolutions).
//!
//! On a CPU without AVX-512 BF16 the same precision runs through the fallback (bf16 weights
//! cast to f32 per call), so the test holds there too.

mod common;

use candle_core::Device;
use common::{Source, cases, pipeline, psnr};
use dmd2::checkpoint;
use dmd2::pipeline::Pipeline;
use dmd2::precision::{DtypeChoice, Precision, RunPrecision};

#[test]
fn bf16_images_within_35_db_of_f32() {
    let bf16 = RunPrecision::resolve(DtypeChoice::Bf16, &Device::Cpu, 0).unwrap();
    assert_eq!(bf16.unet, Precision::CPU_BF16);
    for src in [Source::Folder, Source::SingleFile] {
        let parts = checkpoint::open(&src.path()).unwrap();
        let fast = Pipeline::load(parts, &Device::Cpu, bf16).unwrap();
        assert_eq!(fast.precision(), bf16);
        let exact = pipeline(src);
        let mut worst = f64::INFINITY;
        for c in cases().into_iter().filter(|c| c.model == "tiny") {
            let req = c.request();
            let a = exact.generate(&req, &mut |_, _| {}).unwrap();
            let b = fast.generate(&req, &mut |_, _| {}).unwrap();
            let p = psnr(&a.rgb, &b.rgb);
            eprintln!("{} {src:?}: PSNR {p:.1} dB", c.name);
            assert!(
                p >= 35.0,
                "{} {src:?}: bf16 image at {p:.1} dB from f32",
                c.name
            );
            // Not the same image either: the bf16 path really ran.
            assert!(
                p.is_finite(),
                "{}: bf16 gave the f32 image bit for bit",
                c.name
            );
            worst = worst.min(p);
        }
        assert!(worst.is_finite(), "no reference case for the tiny model");
        eprintln!("{src:?}: worst PSNR {worst:.1} dB");
    }
}

#[test]
fn bf16_vae_decode_within_35_db_of_f32() {
    let all_bf16 = RunPrecision {
        unet: Precision::CPU_BF16,
        vae: Precision::CPU_BF16,
        text: Precision::F32,
    };
    let parts = checkpoint::open(&Source::Folder.path()).unwrap();
    let fast = Pipeline::load(parts, &Device::Cpu, all_bf16).unwrap();
    let exact = pipeline(Source::Folder);
    let z = candle_core::Tensor::randn(0f32, 1.0, (1, 4, 16, 24), &Device::Cpu).unwrap();
    let a = exact.decode(&z).unwrap();
    let b = fast.decode(&z).unwrap();
    let p = psnr(&a[0], &b[0]);
    eprintln!("VAE bf16: PSNR {p:.1} dB");
    assert!(p >= 35.0 && p.is_finite(), "bf16 VAE at {p:.1} dB");
}
