//! `dmd2 merge --model M --lora L[:W]… --output merged.safetensors [--dtype f16]`: bake LoRAs
//! into an original-layout SDXL single file, which then loads without any merge.

use crate::checkpoint::{self, writer};
use crate::error::bad_input;
use crate::lora::{self, LoraSpec};
use anyhow::{Result, bail};
use candle_core::DType;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputDtype {
    F16,
    Bf16,
    F32,
}

impl From<OutputDtype> for DType {
    fn from(d: OutputDtype) -> Self {
        match d {
            OutputDtype::F16 => DType::F16,
            OutputDtype::Bf16 => DType::BF16,
            OutputDtype::F32 => DType::F32,
        }
    }
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// SDXL model: a diffusers folder or an original-layout single-file .safetensors.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// A LoRA to bake in, with its weight (default 1.0); repeatable. Weights may be negative
    /// or above 1.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    pub lora: Vec<LoraSpec>,
    /// The single file to write (original SDXL layout).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Convert every tensor to this dtype (default: keep each tensor's stored dtype).
    #[arg(long, value_enum)]
    pub dtype: Option<OutputDtype>,
    /// List the LoRA modules not found in the model and the keys ignored.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(a: MergeArgs) -> Result<()> {
    // The output is checked before any tensor is read: not a directory, not one of the
    // inputs (by device and inode), a device or FIFO written directly.
    let inputs: Vec<crate::output::FileId> = std::iter::once(&a.model)
        .chain(a.lora.iter().map(|l| &l.path))
        .filter_map(|p| crate::output::FileId::of(p))
        .collect();
    crate::output::check_target(&a.output, &inputs).map_err(bad_input)?;
    let t0 = Instant::now();
    let mut parts = checkpoint::open(&a.model).map_err(bad_input)?;
    let reports = lora::apply_loras(&mut parts, &a.lora).map_err(bad_input)?;
    for r in &reports {
        if !a.quiet {
            crate::stderr!("{r}");
        }
        if a.verbose {
            for line in r.details() {
                crate::stderr!("{line}");
            }
        }
    }
    if a.lora.is_empty() && !a.quiet {
        crate::stderr!("no --lora given: converting {} as it is", a.model.display());
    }
    writer::write_single_file(&parts, &a.output, a.dtype.map(DType::from))?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    if size == 0 && std::fs::metadata(&a.output).is_ok_and(|m| m.is_file()) {
        bail!("{}: nothing written", a.output.display());
    }
    if !a.quiet {
        crate::stderr!(
            "wrote {} ({:.2} GB) in {:.1} s",
            a.output.display(),
            size as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
