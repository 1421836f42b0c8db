//! Where model files come from: local paths or Hugging Face repos (through [`crate::hub`]),
//! and the add-ons merged at load (LoRAs, a replacement UNet).

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
