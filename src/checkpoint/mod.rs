//! Checkpoint formats: where the weights of a model come from and how their names map to
//! the model's (diffusers) names.
//!
//! - a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, …), see [`diffusers`];
//! - an original-layout (LDM/sgm) single-file `.safetensors`, see [`single_file`];
//! - add-ons replacing one component: a UNet ([`unet_file`]), a VAE ([`vae_file`]).

pub mod diffusers;
pub mod single_file;
pub mod unet_file;
pub mod vae_file;
pub mod writer;

use crate::config::{ClipConfig, SchedulerConfig, UNetConfig, VaeArch};
use crate::keymap::Component;
use crate::tokenizer::ClipTokenizer;
use crate::weights::ComponentWeights;
use anyhow::{Result, bail};
use std::path::Path;
use std::sync::Arc;

/// Everything needed to build the SDXL pipeline, before any tensor is read.
pub struct ModelParts {
    /// What the model was loaded from, for messages and metadata.
    pub name: String,
    pub layout: Layout,
    pub unet_config: UNetConfig,
    pub text_encoder_config: ClipConfig,
    pub text_encoder_2_config: ClipConfig,
    pub vae_config: VaeArch,
    pub unet: Arc<ComponentWeights>,
    pub text_encoder: Arc<ComponentWeights>,
    pub text_encoder_2: Arc<ComponentWeights>,
    pub vae: Arc<ComponentWeights>,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    /// SDXL pipelines use zero negative embeddings when CFG is on and no negative prompt
    /// was given (`model_index.json`'s `force_zeros_for_empty_prompt`, true for SDXL).
    pub force_zeros_for_empty_prompt: bool,
    /// The folder's scheduler config (SDXL's for a single file).
    pub scheduler: SchedulerConfig,
    /// Textual-inversion embeddings the prompts may name (none unless the user adds some).
    pub embeddings: crate::embeddings::Embeddings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    SingleFile,
}

/// Open a model from a diffusers folder or a single-file checkpoint.
pub fn open(path: &Path) -> Result<ModelParts> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if path.is_dir() {
        diffusers::open(path)
    } else {
        open_single_file(path)
    }
}

/// An original-layout single file: architecture inferred from the tensor shapes, tokenizers
/// from the compiled-in CLIP vocabulary.
fn open_single_file(path: &Path) -> Result<ModelParts> {
    let files = Arc::new(crate::weights::WeightFiles::open(&[path.to_path_buf()])?);
    let layout = single_file::detect(&files.shapes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // Shapes inferred from a stranger's file are checked like a config's fields.
    let check = |what: &str, r: Result<()>| {
        r.map_err(|e| anyhow::anyhow!("{}: unsupported {what} shapes: {e}", path.display()))
    };
    check("UNet", layout.unet.validate())?;
    check("text encoder 1", layout.text_encoder.validate())?;
    check("text encoder 2", layout.text_encoder_2.validate())?;
    check("VAE", layout.vae.validate())?;
    let mut maps = layout.maps;
    let mut take = |c: Component| {
        Arc::new(ComponentWeights {
            files: files.clone(),
            map: maps.remove(&c).unwrap_or_default(),
            patches: Default::default(),
            non_finite: Default::default(),
            merge_scratch: Default::default(),
        })
    };
    Ok(ModelParts {
        name: path.display().to_string(),
        layout: Layout::SingleFile,
        unet: take(Component::Unet),
        text_encoder: take(Component::TextEncoder),
        text_encoder_2: take(Component::TextEncoder2),
        vae: take(Component::Vae),
        unet_config: layout.unet,
        text_encoder_config: layout.text_encoder,
        text_encoder_2_config: layout.text_encoder_2,
        vae_config: VaeArch::Kl(layout.vae),
        tokenizer: ClipTokenizer::builtin("<|endoftext|>")?,
        tokenizer_2: ClipTokenizer::builtin("!")?,
        force_zeros_for_empty_prompt: true,
        scheduler: SchedulerConfig::default(),
        embeddings: Default::default(),
    })
}
