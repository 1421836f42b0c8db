//! The names of SDXL's weights in the two layouts users have them in: diffusers folders
//! (`unet/diffusion_pytorch_model.safetensors`, …) and original (LDM/sgm) single files
//! (`model.diffusion_model.…`, `conditioner.embedders.{0,1}.…`, `first_stage_model.…`).
//!
//! - the vocabulary: the four [`Component`]s (with their diffusers folders and original
//!   prefixes: the one table the folder loader, the Hub and LoRA naming read), how a stored
//!   tensor becomes a model tensor ([`Transform`], [`Mapped`]), and how an original tensor is
//!   assembled from diffusers tensors ([`Assemble`], [`OriginalTensor`]);
//! - [`plan`]: for given configurations, every model tensor with its original name, transform
//!   and shapes — the key tables, generated from the configurations, never guessed;
//! - [`canonical_maps`] / [`original_tensors`]: that plan as maps, for writing single files and
//!   naming LoRA modules.
//!
//! It depends on the configurations only: [`crate::checkpoint`] uses it to read files,
//! [`crate::checkpoint::writer`] to write them, [`crate::lora`] to name modules.

pub mod plan;

use crate::config::{ClipConfig, UNetConfig, VaeConfig};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Prefix of the UNet tensors.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of text encoder 1 (CLIP ViT-L/14, Hugging Face layout).
pub const TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.transformer.text_model.";
/// Prefix of text encoder 2 (OpenCLIP ViT-bigG/14, OpenCLIP layout).
pub const TEXT_ENCODER_2_PREFIX: &str = "conditioner.embedders.1.model.";
/// Prefix of the VAE tensors.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// Attention head width of every SDXL-family model: heads = width / 64.
pub const HEAD_WIDTH: usize = 64;
/// Group-norm groups of the SDXL UNet and VAE.
pub const NORM_GROUPS: usize = 32;

/// How a file tensor becomes the model tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transform {
    Identity,
    /// Rows `[start, start + len)` of dim 0 (split of OpenCLIP's fused attention
    /// `in_proj_weight` `[3d, d]` / `in_proj_bias` `[3d]` into q, k, v).
    Rows {
        start: usize,
        len: usize,
    },
    /// 2-D transpose (OpenCLIP `text_projection` is stored as Wᵀ: `[hidden, proj]` → linear
    /// weight `[proj, hidden]`).
    Transpose,
    /// `[C_out, C_in, 1, 1]` → `[C_out, C_in]` (VAE mid-block attention q/k/v/proj_out stored
    /// as 1x1 convolutions).
    Squeeze1x1,
}

impl Transform {
    /// The shape after the transform, or `None` when the transform does not apply to a tensor
    /// of shape `source`.
    pub fn apply_to_shape(&self, source: &[usize]) -> Option<Vec<usize>> {
        match self {
            Transform::Identity => Some(source.to_vec()),
            Transform::Rows { start, len } => {
                let (&rows, rest) = source.split_first()?;
                if start.checked_add(*len)? > rows {
                    return None;
                }
                let mut out = Vec::with_capacity(source.len());
                out.push(*len);
                out.extend_from_slice(rest);
                Some(out)
            }
            Transform::Transpose => match source {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
            Transform::Squeeze1x1 => match source {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                _ => None,
            },
        }
    }
}

/// Where one model tensor comes from in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub source: String,
    pub transform: Transform,
}

/// The four models of an SDXL checkpoint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
    Vae,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Unet,
        Component::TextEncoder,
        Component::TextEncoder2,
        Component::Vae,
    ];

    /// The component's sub-folder in a diffusers pipeline folder.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Vae => "vae",
        }
    }

    /// The stem of the component's weight files in its folder (`STEM.safetensors`,
    /// `STEM.fp16.safetensors`, `STEM.safetensors.index.json`).
    pub fn weights_stem(self) -> &'static str {
        match self {
            Component::Unet | Component::Vae => "diffusion_pytorch_model",
            Component::TextEncoder | Component::TextEncoder2 => "model",
        }
    }

    /// The component of a diffusers folder name.
    pub fn from_folder(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.folder() == name)
    }

    /// The prefix of the component's tensors in an original-layout file.
    pub fn source_prefix(self) -> &'static str {
        match self {
            Component::Unet => UNET_PREFIX,
            Component::TextEncoder => TEXT_ENCODER_PREFIX,
            Component::TextEncoder2 => TEXT_ENCODER_2_PREFIX,
            Component::Vae => VAE_PREFIX,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder (CLIP ViT-L)",
            Component::TextEncoder2 => "text encoder 2 (OpenCLIP ViT-bigG)",
            Component::Vae => "VAE",
        })
    }
}

/// Per component: diffusers-named target → where it comes from in the file.
pub type ComponentMaps = HashMap<Component, BTreeMap<String, Mapped>>;

/// Why a file is not a usable SDXL single-file checkpoint (or why configurations have no
/// single-file layout). The messages are one line, meant
/// to follow the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SingleFileError {
    #[error("empty checkpoint: it holds no tensors")]
    Empty,
    #[error(
        "not an SDXL checkpoint: no `{TEXT_ENCODER_2_PREFIX}*` (OpenCLIP bigG) keys — this looks like {looks_like}"
    )]
    NotSdxl { looks_like: String },
    #[error(
        "looks like a diffusers {what} state dict, not a full checkpoint (use the diffusers folder it belongs to)"
    )]
    DiffusersStateDict { what: &'static str },
    #[error("looks like a LoRA (`{example}`), not a full checkpoint")]
    Lora { example: String },
    #[error("incomplete SDXL checkpoint: no `{prefix}*` keys, so no {component}")]
    MissingComponent {
        component: Component,
        prefix: &'static str,
    },
    #[error("{component}: missing tensor `{key}`")]
    MissingKey { component: Component, key: String },
    #[error("{component}: tensor `{key}` has shape {found:?}, expected {expected}")]
    ShapeMismatch {
        component: Component,
        key: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{component}: {message}")]
    Inconsistent {
        component: Component,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, SingleFileError>;

pub(crate) fn inconsistent(component: Component, message: impl Into<String>) -> SingleFileError {
    SingleFileError::Inconsistent {
        component,
        message: message.into(),
    }
}

/// The maps [`crate::checkpoint::single_file::detect`] returns for a file of these
/// configurations, built from the configurations alone (VAE attention weights as 1x1 convolutions, as sgm stores them). For
/// writing a model loaded from a diffusers folder back as a single file.
pub fn canonical_maps(
    unet: &UNetConfig,
    text_encoder: &ClipConfig,
    text_encoder_2: &ClipConfig,
    vae: &VaeConfig,
) -> Result<ComponentMaps> {
    let plan = plan::Plan::for_configs(unet, text_encoder, text_encoder_2, vae, None)?;
    let mut maps: ComponentMaps = Component::ALL
        .iter()
        .map(|&c| (c, BTreeMap::new()))
        .collect();
    for e in plan.entries {
        maps.entry(e.component).or_default().insert(
            e.target,
            Mapped {
                source: e.source,
                transform: e.transform,
            },
        );
    }
    Ok(maps)
}

/// How the diffusers tensors of an [`OriginalTensor`] make it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assemble {
    /// The single part as it is.
    Identity,
    /// The parts concatenated along dim 0, in order (OpenCLIP's fused q/k/v).
    ConcatRows,
    /// The single part transposed (OpenCLIP `text_projection`).
    Transpose,
    /// The single `[C_out, C_in]` part reshaped to `[C_out, C_in, 1, 1]`.
    Unsqueeze1x1,
}

/// One tensor of an original-layout file and the diffusers tensors it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalTensor {
    /// The name in the single file.
    pub key: String,
    pub component: Component,
    /// diffusers names within `component`, in order; several only for [`Assemble::ConcatRows`].
    pub parts: Vec<String>,
    pub assemble: Assemble,
}

/// Group maps (from a file's detection or [`canonical_maps`]) by original tensor, sorted by key: what
/// a writer needs to rebuild the single file from diffusers-named tensors.
pub fn original_tensors(maps: &ComponentMaps) -> Vec<OriginalTensor> {
    /// The component, the parts with their order key, and how they assemble.
    type Group<'a> = (Component, Vec<(usize, &'a str)>, Assemble);
    let mut by_key: BTreeMap<&str, Group> = BTreeMap::new();
    for c in Component::ALL {
        let Some(map) = maps.get(&c) else { continue };
        for (target, m) in map {
            let (order, assemble) = match m.transform {
                Transform::Identity => (0, Assemble::Identity),
                Transform::Rows { start, .. } => (start, Assemble::ConcatRows),
                Transform::Transpose => (0, Assemble::Transpose),
                Transform::Squeeze1x1 => (0, Assemble::Unsqueeze1x1),
            };
            by_key
                .entry(m.source.as_str())
                .or_insert_with(|| (c, Vec::new(), assemble))
                .1
                .push((order, target.as_str()));
        }
    }
    by_key
        .into_iter()
        .map(|(key, (component, mut parts, assemble))| {
            parts.sort();
            OriginalTensor {
                key: key.to_string(),
                component,
                parts: parts.into_iter().map(|(_, p)| p.to_string()).collect(),
                assemble,
            }
        })
        .collect()
}

/// Attention heads for a width: width / 64 when 64 divides it, else 1.
pub fn heads_for_width(width: usize) -> usize {
    if width >= HEAD_WIDTH && width.is_multiple_of(HEAD_WIDTH) {
        width / HEAD_WIDTH
    } else {
        1
    }
}
