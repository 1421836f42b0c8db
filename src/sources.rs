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

/// `--unet FILE_OR_REPO_FILE`
pub fn replace_unet(parts: &mut ModelParts, spec: &str) -> Result<()> {
    let path = hub::resolve_file(spec)?;
    crate::checkpoint::unet_file::replace_unet(parts, &path)
}

/// `--lora` values, local or from the Hub; returns one report per LoRA.
pub fn apply_loras(parts: &mut ModelParts, specs: &[LoraSpec]) -> Result<Vec<lora::MergeReport>> {
    let resolved = specs
        .iter()
        .map(|s| {
            Ok(LoraSpec {
                path: hub::resolve_file(&s.path.to_string_lossy())?,
                weight: s.weight,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    lora::apply_loras(parts, &resolved)
}
