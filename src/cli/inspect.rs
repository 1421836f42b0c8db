//! `dmd2 inspect FILE`: say what a file is — an SDXL checkpoint (layout, inferred
//! architecture, dtypes, parameter count) or a LoRA (format, ranks, alphas, modules, parts).

use crate::error::bad_input;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A LoRA .safetensors, an original-layout SDXL .safetensors or a diffusers folder.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let text = crate::lora::describe_file(&a.file).map_err(bad_input)?;
    crate::stdio::write_stdout(format!("{text}\n").as_bytes())
}
