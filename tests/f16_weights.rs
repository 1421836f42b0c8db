//! An f32 run of a checkpoint stored in f16 (`Precision::CPU_F32`, what `--dtype f32` resolves
//! to with the own CPU kernels) keeps the linear weights in f16 and widens them exactly in
//! every product: half the memory, nothing to convert at load. This proves that the weights
//! really are kept in f16 (so two different paths are compared), that a LoRA's patched
//! weights are not (they are f32 sums), and that the images and latents are the f32 path's
//! bit for bit, on the single-file tiny model (written in f16), with and without LoRAs; the
//! text encoders' linear weights likewise.

mod common;

use candle_core::{DType, Device};
use common::{Source, cases, fixtures, pipeline};
use dmd2::checkpoint::{self, ModelParts};
use dmd2::lora::{self, LoraSpec};
use dmd2::pipeline::Pipeline;
use dmd2::precision::{Precision, RunPrecision};
use dmd2::weights::ComponentWeights;

const CPU_F32: RunPrecision = RunPrecision {
    unet: Precision::CPU_F32,
    vae: Precision::F32,
    text: Precision::CPU_F32,
};

fn open(specs: &[LoraSpec]) -> ModelParts {
    let mut parts = checkpoint::open(&Source::SingleFile.path()).unwrap();
    lora::apply_loras(&mut parts, specs).unwrap();
    parts
}

/// A component's rank-2 tensors by the dtype `precision` loads them in.
fn dtypes_of(c: &std::sync::Arc<ComponentWeights>, precision: Precision) -> Vec<(String, DType)> {
    let vb = c.var_builder(precision, &Device::Cpu);
    c.map
        .keys()
        .filter(|n| c.rank_of(n) == Some(2))
        .map(|n| (n.clone(), vb.get_unchecked(n).unwrap().dtype()))
        .collect()
}

/// The UNet's rank-2 tensors by the dtype `precision` loads them in.
fn matrix_dtypes(parts: &ModelParts, precision: Precision) -> Vec<(String, DType)> {
    dtypes_of(&parts.unet, precision)
}

#[test]
fn linear_weights_stay_f16_unless_patched() {
    let parts = open(&[]);
    let kept = matrix_dtypes(&parts, Precision::CPU_F32);
    assert!(kept.len() > 10, "the tiny UNet has linear layers");
    for (name, dtype) in &kept {
        assert_eq!(parts.unet.stored_dtype(name), Some(safetensors::Dtype::F16));
        assert_eq!(*dtype, DType::F16, "{name}");
    }
    // The memory estimate counts them at two bytes.
    let linear: u64 = kept
        .iter()
        .map(|(n, _)| {
            let source = &parts.unet.map[n].source;
            parts
                .unet
                .files
                .shape_of(source)
                .unwrap()
                .iter()
                .product::<usize>() as u64
        })
        .sum();
    assert_eq!(
        parts.unet.bytes_in(Precision::F32) - parts.unet.bytes_in(Precision::CPU_F32),
        2 * linear
    );
    // The text encoders' matrices too (their embedding tables are widened by the model).
    for te in [&parts.text_encoder, &parts.text_encoder_2] {
        let d = dtypes_of(te, Precision::CPU_F32);
        assert!(!d.is_empty());
        assert!(d.iter().all(|(_, d)| *d == DType::F16));
    }
    // The plain f32 precision widens them at load, as before.
    assert!(
        matrix_dtypes(&parts, Precision::F32)
            .iter()
            .all(|(_, d)| *d == DType::F32)
    );
    // A LoRA's targets are f32 sums; the rest stay f16.
    let lora = fixtures().join("lora/peft.safetensors");
    let parts = open(&[LoraSpec {
        path: lora,
        weight: 0.8,
    }]);
    let dtypes = matrix_dtypes(&parts, Precision::CPU_F32);
    for (name, dtype) in &dtypes {
        let want = if parts.unet.patches.contains_key(name) {
            DType::F32
        } else {
            DType::F16
        };
        assert_eq!(*dtype, want, "{name}");
    }
    assert!(dtypes.iter().any(|(_, d)| *d == DType::F32), "LoRA targets");
    assert!(dtypes.iter().any(|(_, d)| *d == DType::F16), "untouched");
}

#[test]
fn f16_kept_weights_make_the_f32_images_bit_for_bit() {
    let exact = pipeline(Source::SingleFile);
    let kept = Pipeline::load(open(&[]), &Device::Cpu, CPU_F32).unwrap();
    let mut n = 0;
    for c in cases().into_iter().filter(|c| c.model == "tiny") {
        let req = c.request();
        let a = exact.generate(&req, &mut |_, _| {}).unwrap();
        let b = kept.generate(&req, &mut |_, _| {}).unwrap();
        let bits = |t: &candle_core::Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert!(bits(&a.latents) == bits(&b.latents), "{}: latents", c.name);
        assert!(a.rgb == b.rgb, "{}: image", c.name);
        n += 1;
    }
    assert!(n > 0, "no reference case for the tiny model");
}

#[test]
fn f16_kept_weights_with_a_lora_make_the_f32_image() {
    let specs = [LoraSpec {
        path: fixtures().join("lora/peft.safetensors"),
        weight: 0.8,
    }];
    let c = cases().into_iter().find(|c| c.model == "tiny").unwrap();
    let req = c.request();
    let a = Pipeline::load(open(&specs), &Device::Cpu, RunPrecision::F32)
        .unwrap()
        .generate(&req, &mut |_, _| {})
        .unwrap();
    let b = Pipeline::load(open(&specs), &Device::Cpu, CPU_F32)
        .unwrap()
        .generate(&req, &mut |_, _| {})
        .unwrap();
    assert!(a.rgb == b.rgb, "{}: image with a LoRA", c.name);
}
