//! Where model files come from: local paths or Hugging Face repos (through [`crate::hub`]),
//! and the add-ons merged at load (LoRAs, a replacement UNet or VAE).

use crate::checkpoint::ModelParts;
use crate::hub;
use crate::lora::{self, LoraSpec};
use anyhow::Result;
use std::path::PathBuf;

/// A `--model` value: a local path, or a repo id fetched into the Hugging Face cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    hub::resolve_model(&hub::ModelRef::parse(spec)?)
}

/// `--unet FILE_OR_REPO_FILE`; returns the file read.
pub fn replace_unet(parts: &mut ModelParts, spec: &str) -> Result<PathBuf> {
    let path = hub::resolve_file(spec)?;
    crate::checkpoint::unet_file::replace_unet(parts, &path)?;
    Ok(path)
}

/// Short names for the VAEs SDXL users swap in, each a Hub repo (a local path of the same
/// name wins).
pub const VAE_ALIASES: [(&str, &str); 2] = [
    // madebyollin's tiny VAE for SDXL latents (TAESDXL), as DMD2's demo decodes with.
    ("taesdxl", "madebyollin/taesdxl"),
    // The SDXL VAE fine-tuned not to overflow in f16 (decodes in f16 on a GPU).
    ("sdxl-vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix"),
];

/// A `--vae` / `--preview-vae` value's local path: an alias's repo, a repo or a file in one,
/// or a local path.
pub fn resolve_vae(spec: &str) -> Result<PathBuf> {
    let spec = match VAE_ALIASES.iter().find(|(name, _)| *name == spec) {
        Some((_, repo)) if !std::path::Path::new(spec).exists() => repo,
        _ => spec,
    };
    hub::resolve_vae(spec)
}

/// Opens the VAE `spec` names (see [`resolve_vae`]); returns it and its path.
pub fn open_vae(spec: &str) -> Result<(crate::checkpoint::vae_file::VaeSource, PathBuf)> {
    let path = resolve_vae(spec)?;
    Ok((crate::checkpoint::vae_file::open(&path)?, path))
}

/// `--vae`: the model decodes (and encodes) with this VAE; returns its path.
pub fn replace_vae(parts: &mut ModelParts, spec: &str) -> Result<PathBuf> {
    let (vae, path) = open_vae(spec)?;
    let want = parts.unet_config.out_channels;
    if vae.arch.latent_channels() != want {
        anyhow::bail!(
            "{}: the VAE has {} latent channels, the model's UNet makes {want}",
            path.display(),
            vae.arch.latent_channels()
        );
    }
    parts.vae_config = vae.arch;
    parts.vae = std::sync::Arc::new(vae.weights);
    Ok(path)
}

/// `--lora` values, local or from the Hub; returns one report per LoRA and the files read.
pub fn apply_loras(
    parts: &mut ModelParts,
    specs: &[LoraSpec],
) -> Result<(Vec<lora::MergeReport>, Vec<PathBuf>)> {
    let resolved = specs
        .iter()
        .map(|s| {
            Ok(LoraSpec {
                path: hub::resolve_file(&s.path.to_string_lossy())?,
                weight: s.weight,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let files = resolved.iter().map(|s| s.path.clone()).collect();
    Ok((lora::apply_loras(parts, &resolved)?, files))
}
