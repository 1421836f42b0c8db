//! Loading a model for generation, in the order the work happens:
//! resolve (local path or Hub) → open (headers and configs only) → replace the UNet → attach
//! LoRAs → choose the precision → plan memory (VAE tiling) → build the [`Pipeline`] (the one
//! expensive step: every tensor read, converted and merged). [`open`] does the cheap half, so
//! a caller can check its outputs against the files the model is made of before
//! [`Opened::build`] does the rest; what the caller should tell the user comes back in a
//! [`LoadReport`].

use crate::checkpoint::ModelParts;
use crate::lora::{LoraSpec, MergeReport};
use crate::pipeline::{self, Pipeline};
use crate::precision::{DtypeChoice, RunPrecision};
use anyhow::{Result, bail};
use candle_core::Device;
use std::path::PathBuf;

/// What to load.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A local path or a Hub reference (`ORG/NAME[@REV][/FILE]`).
    pub model: String,
    /// A replacement UNet (path or `REPO/FILE`).
    pub unet: Option<String>,
    /// A replacement VAE (path, repo, `REPO/FILE` or an alias, see
    /// [`crate::sources::resolve_vae`]).
    pub vae: Option<String>,
    /// LoRAs merged at load, in order.
    pub loras: Vec<LoraSpec>,
    /// Textual-inversion embeddings: files, and directories of them.
    pub embeddings: Vec<PathBuf>,
    pub embedding_dirs: Vec<PathBuf>,
}

/// How the model will run: what the memory plan needs to know.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub width: usize,
    pub height: usize,
    /// Images per UNet call.
    pub batch: usize,
    /// Classifier-free guidance doubles the UNet's batch.
    pub cfg: bool,
}

/// The memory policy.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPolicy {
    /// Decode in tiles of this many pixels (`--vae-tiling`), or `None` for whole decodes
    /// unless they would not fit.
    pub vae_tiling: Option<usize>,
    /// The tile size to fall back to when a whole decode would not fit.
    pub tile_px: usize,
    /// Go on even when the estimate exceeds the memory available.
    pub force: bool,
}

/// A model opened but not loaded: configs known, headers read, LoRAs matched.
pub struct Opened {
    pub parts: ModelParts,
    /// The resolved model path (a folder or a file).
    pub model_path: PathBuf,
    /// The resolved `--vae` path (a folder or a file).
    pub vae_path: Option<PathBuf>,
    /// One report per LoRA, in order.
    pub loras: Vec<MergeReport>,
    /// Every file the model is read from (weights, LoRAs, the replacement UNet).
    pub input_files: Vec<PathBuf>,
}

/// What loading found that the user should hear about.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub precision: RunPrecision,
    /// VAE tile size in pixels, when decoding in tiles.
    pub vae_tile_px: Option<usize>,
    /// Tiling was turned on because a whole decode would not fit.
    pub tiling_forced_by_memory: bool,
    /// `--dtype auto` chose bf16 weights because f32 ones would not fit.
    pub bf16_for_memory: bool,
    /// Weight tensors holding NaN or Inf, as `FILE: tensor`.
    pub non_finite: Vec<String>,
}

/// Resolves and opens `spec`: configs, headers and LoRA name matching, no tensor data.
pub fn open(spec: &ModelSpec) -> Result<Opened> {
    let model_path = crate::sources::resolve_model(&spec.model)?;
    let mut parts = crate::checkpoint::open(&model_path)?;
    let mut input_files = Vec::new();
    if let Some(u) = &spec.unet {
        input_files.push(crate::sources::replace_unet(&mut parts, u)?);
    }
    let vae_path = spec
        .vae
        .as_deref()
        .map(|v| crate::sources::replace_vae(&mut parts, v))
        .transpose()?;
    let (loras, lora_files) = crate::sources::apply_loras(&mut parts, &spec.loras)?;
    input_files.extend(lora_files);
    let embeddings = crate::embeddings::Embeddings::load(&spec.embeddings, &spec.embedding_dirs)?;
    embeddings.check_widths(
        parts.text_encoder_config.hidden_size,
        parts.text_encoder_2_config.hidden_size,
    )?;
    input_files.extend(embeddings.iter().map(|e| e.path.clone()));
    parts.embeddings = embeddings;
    for c in [
        &parts.unet,
        &parts.vae,
        &parts.text_encoder,
        &parts.text_encoder_2,
    ] {
        input_files.extend(c.files.paths.iter().cloned());
    }
    input_files.sort();
    input_files.dedup();
    Ok(Opened {
        parts,
        model_path,
        vae_path,
        loras,
        input_files,
    })
}

impl Opened {
    /// Chooses the precision and the VAE tiling, then loads every tensor into a [`Pipeline`]
    /// on `device`. A run that would not fit in memory is refused before any tensor is read
    /// (unless `memory.force`). With `prompts` (all the run's prompts, known up front) the
    /// text encoders encode them and are freed before the UNet loads
    /// ([`Pipeline::load_for_prompts`]).
    pub fn build(
        self,
        device: &Device,
        dtype: DtypeChoice,
        run: RunShape,
        memory: MemoryPolicy,
        prompts: Option<&[(crate::prompt_syntax::PromptSyntax, &str)]>,
    ) -> Result<(Pipeline, LoadReport)> {
        let parts = self.parts;
        let (precision, bf16_for_memory) =
            choose_precision(dtype, device, parts.unet.numel(), |p| {
                !device.is_cpu() || memory.force || plan_memory(&parts, p, run, memory).is_ok()
            })?;
        let precision = precision.with_vae_upcast(parts.vae_config.force_upcast());
        let (vae_tile_px, tiling_forced_by_memory) = if device.is_cpu() && !memory.force {
            plan_memory(&parts, precision, run, memory)?
        } else {
            (memory.vae_tiling, false)
        };
        // Kept to read the non-finite weights found while the pipeline loads them.
        let components = [
            parts.unet.clone(),
            parts.vae.clone(),
            parts.text_encoder.clone(),
            parts.text_encoder_2.clone(),
        ];
        let mut pipe = match prompts {
            Some(p) => Pipeline::load_for_prompts(parts, device, precision, p)?,
            None => Pipeline::load(parts, device, precision)?,
        };
        pipe.set_vae_tiling(vae_tile_px.map(|px| px / pipe.vae().scale_factor()));
        // Blocks freed while loading (tensors a weight was packed from) have shapes the
        // denoising loop does not share: back to the system.
        crate::memory::release_cached();
        let non_finite = components.iter().flat_map(|c| c.non_finite()).collect();
        Ok((
            pipe,
            LoadReport {
                precision,
                vae_tile_px,
                tiling_forced_by_memory,
                bf16_for_memory,
                non_finite,
            },
        ))
    }
}

/// The run's precision: as `dtype` resolves, except that `auto` takes bf16 weights (half the
/// memory; every CPU tier runs them) for a full-size UNet whose f32 weights would not `fit`.
/// Returns whether that happened.
fn choose_precision(
    dtype: DtypeChoice,
    device: &Device,
    unet_params: u64,
    fits: impl Fn(RunPrecision) -> bool,
) -> Result<(RunPrecision, bool)> {
    let p = RunPrecision::resolve(dtype, device, unet_params)?;
    if dtype == DtypeChoice::Auto
        && p.is_f32()
        && unet_params >= crate::precision::AUTO_BF16_MIN_PARAMS
        && !fits(p)
    {
        let bf16 = RunPrecision::resolve(DtypeChoice::Bf16, device, unet_params)?;
        if bf16 != p {
            return Ok((bf16, true));
        }
    }
    Ok((p, false))
}

/// The VAE tiling a run needs on the CPU: as asked, or tiles when a whole decode would not
/// fit; an error when even that would not fit.
fn plan_memory(
    parts: &ModelParts,
    precision: RunPrecision,
    run: RunShape,
    memory: MemoryPolicy,
) -> Result<(Option<usize>, bool)> {
    let estimate = |tile: Option<usize>| {
        pipeline::estimate_bytes(
            parts, precision, run.width, run.height, run.batch, run.cfg, tile,
        )
    };
    let Some(have) = pipeline::available_memory() else {
        return Ok((memory.vae_tiling, false));
    };
    let mut tile = memory.vae_tiling;
    let mut forced = false;
    if estimate(tile) > have
        && tile.is_none()
        && run.width.max(run.height) > memory.tile_px
        && estimate(Some(memory.tile_px)) <= have
    {
        tile = Some(memory.tile_px);
        forced = true;
    }
    let need = estimate(tile);
    if need > have {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        bail!(
            "{}x{} with batch size {} needs about {:.1} GiB, {:.1} GiB of memory is available; use a smaller size or batch, or --force to try anyway",
            run.width,
            run.height,
            run.batch,
            gib(need),
            gib(have)
        );
    }
    Ok((tile, forced))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` falls back to bf16 only for a full-size UNet whose f32 weights do not fit; an
    /// explicit `--dtype f32` is never changed.
    #[test]
    fn auto_takes_bf16_when_f32_does_not_fit() {
        let cpu = Device::Cpu;
        let big = 2_600_000_000;
        let f32_never_fits = |p: RunPrecision| !p.is_f32();
        let (p, changed) = choose_precision(DtypeChoice::Auto, &cpu, big, f32_never_fits).unwrap();
        assert_eq!(p.unet, crate::precision::Precision::CPU_BF16);
        let native_bf16 = crate::kernels::Tier::current().has(crate::kernels::Level::Avx512Bf16);
        assert_eq!(changed, !native_bf16);
        let (p, changed) = choose_precision(DtypeChoice::F32, &cpu, big, f32_never_fits).unwrap();
        assert!(p.is_f32() && !changed);
        let (p, changed) = choose_precision(DtypeChoice::Auto, &cpu, 1000, f32_never_fits).unwrap();
        assert!(p.is_f32() && !changed);
        let (p, changed) = choose_precision(DtypeChoice::Auto, &cpu, big, |_| true).unwrap();
        assert!(!changed);
        assert_eq!(p.unet == crate::precision::Precision::CPU_BF16, native_bf16);
    }
}
