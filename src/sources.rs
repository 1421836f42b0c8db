//! Where model files come from: local paths or Hugging Face repos, and the add-ons merged
//! at load (LoRAs, a replacement UNet).

use crate::checkpoint::ModelParts;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Split `PATH[:WEIGHT]` at the last colon when what follows is a number.
pub fn split_weight(spec: &str) -> (&str, f32) {
    if let Some((p, w)) = spec.rsplit_once(':')
        && let Ok(w) = w.trim().parse::<f32>()
        && !p.is_empty()
    {
        return (p, w);
    }
    (spec, 1.0)
}

/// A `--model` value as a local path.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    bail!("{spec}: no such file or directory")
}

pub fn replace_unet(_parts: &mut ModelParts, spec: &str) -> Result<()> {
    bail!("{spec}: --unet is not available in this build yet")
}

pub fn apply_loras(_parts: &mut ModelParts, specs: &[String]) -> Result<Vec<String>> {
    bail!(
        "{}: LoRA merging is not available in this build yet",
        specs.join(", ")
    )
}
