//! Compute precision: which dtype each part of the model is stored and computed in.
//!
//! - `f32` everywhere: the reference path (parity with diffusers in f32).
//! - `bf16` on the CPU: the UNet's weight matrices and convolution kernels stored in bf16
//!   (half the memory), multiplied through the CPU's bf16 dot-product instructions with f32
//!   accumulation ([`crate::kernels::bf16`]); activations are rounded to bf16 where they enter
//!   a matrix product and kept in f32 between layers, so norms, softmax and residual sums run
//!   in f32. Biases and norm weights stay f32. The VAE stays f32 (Winograd convolutions,
//!   [`crate::kernels::winograd`], beat the bf16 product there).
//! - `bf16` / `f16` on a GPU: everything in that dtype (candle's kernels), except that an f16
//!   run decodes with the VAE in f32, as diffusers' `force_upcast` does for the SDXL VAE.
//! - `f16` on the CPU with `DMD2_KERNELS=candle`: the GPU's f16 path run through candle's CPU
//!   f16 ops (slow; it exists so the GPU's dtype logic is tested on machines without one).

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use clap::ValueEnum;

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// f16 on a GPU; on the CPU bf16 when it has AVX-512 BF16 and the model is of real size
    /// (≥ 100 M UNet parameters), f32 otherwise.
    Auto,
    F32,
    Bf16,
    F16,
}

/// UNets smaller than this (test models) stay in f32 under `auto`: bf16 buys them nothing
/// and f32 keeps them exactly comparable with diffusers' f32 outputs.
pub const AUTO_BF16_MIN_PARAMS: u64 = 100_000_000;

/// How one model component keeps its tensors and runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Tensors of rank ≥ 2 (linear weights, convolution kernels, embeddings).
    pub matrices: DType,
    /// Tensors of rank ≤ 1 (biases, norm weights).
    pub vectors: DType,
    /// Activations passed between layers.
    pub activations: DType,
    /// CPU f32 runs with the own kernels: linear weights stored in f16 in the file (and not
    /// changed by a LoRA) are kept in f16 and widened exactly in every product — the same
    /// results as f32 weights with half their memory, and half the fresh memory to fault in
    /// while loading ([`crate::kernels::gemm::PackedF16`]).
    pub f16_linear_as_stored: bool,
}

impl Precision {
    pub const F32: Precision = Precision::uniform(DType::F32);

    pub const fn uniform(dtype: DType) -> Self {
        Self {
            matrices: dtype,
            vectors: dtype,
            activations: dtype,
            f16_linear_as_stored: false,
        }
    }

    /// f32, with linear weights stored in f16 kept so: the CPU's f32 path (own kernels).
    pub const CPU_F32: Precision = Precision {
        f16_linear_as_stored: true,
        ..Precision::F32
    };

    /// bf16 matrices, f32 everything else: the CPU's bf16 path.
    pub const CPU_BF16: Precision = Precision {
        matrices: DType::BF16,
        vectors: DType::F32,
        activations: DType::F32,
        f16_linear_as_stored: false,
    };

    /// The dtype a tensor of this rank is kept in.
    pub fn dtype_for_rank(&self, rank: usize) -> DType {
        if rank >= 2 {
            self.matrices
        } else {
            self.vectors
        }
    }

    /// Whether a tensor of this rank stored as `stored` is kept so instead of in its rank's
    /// dtype: an f32 run's matrices stored in f16 ([`Precision::f16_linear_as_stored`]).
    pub fn keeps_stored_f16(&self, rank: usize, stored: DType) -> bool {
        self.f16_linear_as_stored
            && rank == 2
            && self.dtype_for_rank(rank) == DType::F32
            && stored == DType::F16
    }

    /// Bytes per parameter, counting every tensor as a matrix (an upper bound).
    pub fn weight_bytes(&self) -> usize {
        self.matrices
            .size_in_bytes()
            .max(self.vectors.size_in_bytes())
    }

    /// "f32", "bf16" or "f16".
    pub fn short_name(&self) -> &'static str {
        match self.matrices {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        }
    }

    pub fn name(&self) -> &'static str {
        match (self.matrices, self.activations) {
            (DType::BF16, DType::F32) => "bf16 (bf16 weights, f32 accumulation)",
            (DType::BF16, _) => "bf16",
            (DType::F16, _) => "f16",
            _ if self.f16_linear_as_stored => "f32 (f16-stored linear weights widened exactly)",
            _ => "f32",
        }
    }
}

/// The precisions of a run: the UNet's and the VAE's (the text encoders follow the UNet on a
/// GPU and stay f32 on the CPU, where they cost under a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPrecision {
    pub unet: Precision,
    pub vae: Precision,
    pub text: Precision,
}

impl RunPrecision {
    pub const F32: RunPrecision = RunPrecision {
        unet: Precision::F32,
        vae: Precision::F32,
        text: Precision::F32,
    };

    /// Whether the UNet computes with f32 weights (as stored or widened from f16).
    pub fn is_f32(&self) -> bool {
        self.unet.matrices == DType::F32
    }

    /// Resolves `--dtype` for a device and a UNet of `unet_params` parameters.
    pub fn resolve(choice: DtypeChoice, device: &Device, unet_params: u64) -> Result<Self> {
        if device.is_cpu() {
            let bf16 = match choice {
                DtypeChoice::F32 => false,
                DtypeChoice::Bf16 => true,
                DtypeChoice::Auto => {
                    crate::kernels::Tier::current().has(crate::kernels::Level::Avx512Bf16)
                        && unet_params >= AUTO_BF16_MIN_PARAMS
                }
                DtypeChoice::F16 if !crate::kernels::own() => return Ok(Self::f16_upcast_vae()),
                DtypeChoice::F16 => bail!(
                    "--dtype f16 runs on a GPU only (the CPU has no fast f16 path); use --dtype bf16 or f32"
                ),
            };
            let p = if bf16 {
                Precision::CPU_BF16
            } else if crate::kernels::own() {
                Precision::CPU_F32
            } else {
                Precision::F32
            };
            // The VAE decodes in f32 either way: its 3×3 convolutions run as Winograd
            // F(2×2, 3×3) in f32, faster than the direct bf16 product (5.5 s vs 6.1 s at 512²).
            // The text encoders compute in f32 either way (they cost a second or two); in an
            // f32 run their linear weights stored in f16 stay f16 as the UNet's do.
            let text = if p == Precision::CPU_F32 {
                p
            } else {
                Precision::F32
            };
            return Ok(Self {
                unet: p,
                vae: Precision::F32,
                text,
            });
        }
        Ok(match choice {
            DtypeChoice::F32 => Self::F32,
            DtypeChoice::Bf16 => {
                let p = Precision::uniform(DType::BF16);
                Self {
                    unet: p,
                    vae: p,
                    text: p,
                }
            }
            DtypeChoice::Auto | DtypeChoice::F16 => Self::f16_upcast_vae(),
        })
    }

    /// An f16 run decodes in f16 when the VAE's config allows it (`force_upcast: false`: the
    /// fp16-fix VAE, the tiny VAE), as diffusers' pipelines upcast only when it says so.
    pub fn with_vae_upcast(self, force_upcast: bool) -> Self {
        let f16 = Precision::uniform(DType::F16);
        if !force_upcast && self.unet == f16 && self.vae == Precision::F32 {
            Self { vae: f16, ..self }
        } else {
            self
        }
    }

    /// f16 everywhere but the VAE, which decodes in f32: diffusers' `force_upcast` (the SDXL
    /// VAE overflows in f16).
    fn f16_upcast_vae() -> Self {
        let p = Precision::uniform(DType::F16);
        Self {
            unet: p,
            vae: Precision::F32,
            text: p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an f16 run with a VAE that allows it decodes in f16; f32 and bf16 runs keep their
    /// VAE precision.
    #[test]
    fn vae_upcast_follows_the_config() {
        let f16 = Precision::uniform(DType::F16);
        let gpu_f16 = RunPrecision::f16_upcast_vae();
        assert_eq!(gpu_f16.with_vae_upcast(true).vae, Precision::F32);
        assert_eq!(gpu_f16.with_vae_upcast(false).vae, f16);
        assert_eq!(RunPrecision::F32.with_vae_upcast(false), RunPrecision::F32);
        let bf16 = RunPrecision {
            unet: Precision::CPU_BF16,
            ..RunPrecision::F32
        };
        assert_eq!(bf16.with_vae_upcast(false), bf16);
    }

    #[test]
    fn cpu_choices() {
        let cpu = Device::Cpu;
        // f32 with the own kernels keeps f16-stored linear weights in f16 (the same results).
        let cpu_f32 = if crate::kernels::own() {
            Precision::CPU_F32
        } else {
            Precision::F32
        };
        let r = RunPrecision::resolve(DtypeChoice::F32, &cpu, 3_000_000_000).unwrap();
        assert_eq!((r.unet, r.vae, r.text), (cpu_f32, Precision::F32, cpu_f32));
        assert!(r.is_f32());
        let r = RunPrecision::resolve(DtypeChoice::Bf16, &cpu, 1000).unwrap();
        assert_eq!(r.unet, Precision::CPU_BF16);
        assert_eq!(r.vae, Precision::F32);
        assert_eq!(r.text, Precision::F32);
        // Small models stay f32 under auto; big ones follow the CPU.
        let r = RunPrecision::resolve(DtypeChoice::Auto, &cpu, 1000).unwrap();
        assert_eq!(r.unet, cpu_f32);
        let r = RunPrecision::resolve(DtypeChoice::Auto, &cpu, 2_600_000_000).unwrap();
        let want = if crate::kernels::Tier::current().has(crate::kernels::Level::Avx512Bf16) {
            Precision::CPU_BF16
        } else {
            cpu_f32
        };
        assert_eq!(r.unet, want);
        let e = RunPrecision::resolve(DtypeChoice::F16, &cpu, 1000).unwrap_err();
        assert!(e.to_string().contains("GPU"), "{e}");
    }

    #[test]
    fn ranks() {
        assert_eq!(Precision::CPU_BF16.dtype_for_rank(4), DType::BF16);
        assert_eq!(Precision::CPU_BF16.dtype_for_rank(2), DType::BF16);
        assert_eq!(Precision::CPU_BF16.dtype_for_rank(1), DType::F32);
        assert_eq!(Precision::CPU_BF16.dtype_for_rank(0), DType::F32);
        // Only an f32 run's f16-stored matrices stay as stored.
        assert!(Precision::CPU_F32.keeps_stored_f16(2, DType::F16));
        assert!(!Precision::CPU_F32.keeps_stored_f16(4, DType::F16));
        assert!(!Precision::CPU_F32.keeps_stored_f16(1, DType::F16));
        assert!(!Precision::CPU_F32.keeps_stored_f16(2, DType::BF16));
        assert!(!Precision::F32.keeps_stored_f16(2, DType::F16));
        assert!(!Precision::CPU_BF16.keeps_stored_f16(2, DType::F16));
    }
}
