//! Original-layout (LDM / sgm) SDXL single-file checkpoints, as users download them
//! (`sd_xl_base_1.0.safetensors` and its fine-tunes).
//!
//! [`detect`] takes the tensor names and shapes of such a file (no tensor data) and returns
//! the four model configurations, inferred from the shapes alone, plus for every tensor the
//! models expect under their diffusers names the file tensor it comes from and how to
//! reshape it ([`Transform`]). The names are exactly those of a diffusers folder's files
//! (`unet/diffusion_pytorch_model.safetensors`, `vae/…`, and `text_encoder{,_2}/model.safetensors`
//! without the `text_model.` prefix), so both formats load through one model builder.
//!
//! # How the architecture is inferred
//!
//! Nothing comes from a table of known models; every size is read from a shape, so SDXL base,
//! slimmer SDXL-family models (SSD-1B-like, with other transformer depths) and tiny test
//! checkpoints are handled alike.
//!
//! - UNet: the number of levels is the number of downsamplers (`input_blocks.N.0.op`) plus one;
//!   `layers_per_block` follows from the number of input blocks (`levels · (layers + 1)`,
//!   counting `conv_in`); the width of each level from its first resnet; attention and the
//!   transformer depth per level from `input_blocks.N.1.transformer_blocks.K`; the up blocks'
//!   depths separately from `output_blocks` (all blocks of one level must agree); the mid block's
//!   depth from `middle_block.1` (`None` without attention); linear projections when `proj_in`
//!   is 2-D; the cross-attention width from `attn2.to_k`; the added-conditioning input from
//!   `label_emb.0.0`, and `addition_time_embed_dim` = (that − text encoder 2's projection
//!   width) / 6. Heads: width / 64 when it divides, else 1 (every SDXL-family model uses
//!   64-wide heads; shapes cannot tell). Levels without attention get depth 1 (diffusers'
//!   default, what SDXL's own `config.json` says; the value is unused).
//! - CLIP: vocabulary and width from the token embedding, positions from the position
//!   embedding, layer count, MLP width from `fc1`/`c_fc`, heads = width / 64 (else 1), CLIP-L
//!   uses quick-GELU and bigG exact GELU, and bigG's projection width from `text_projection`.
//! - VAE: widths and resnets per level from the encoder, latent channels from
//!   `post_quant_conv`, output channels from the decoder's `conv_out`, mid-block attention
//!   when `mid.attn_1` is there; scaling factor 0.13025 (SDXL's; the file does not say).
//!
//! Then every tensor the inferred configuration needs is looked up with its expected shape,
//! so a missing or mis-shaped tensor is reported by name. Tensors the layout did not use are
//! listed in [`SingleFileLayout::unused`] (EMA copies, `position_ids`, `logit_scale`, …).
//!
//! # Writing single files
//!
//! [`canonical_maps`] builds the same maps from configurations alone (for a model loaded from
//! a diffusers folder) and [`original_tensors`] groups them by original tensor, with the
//! operation that assembles each one from its diffusers tensors.

use crate::config::{Activation, ClipConfig, UNetConfig, VaeConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
const NORM_EPS: f64 = 1e-5;
const LAYER_NORM_EPS: f64 = 1e-5;

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

/// What [`detect`] found in a single file.
#[derive(Debug, Clone)]
pub struct SingleFileLayout {
    pub unet: UNetConfig,
    pub text_encoder: ClipConfig,
    pub text_encoder_2: ClipConfig,
    pub vae: VaeConfig,
    /// diffusers-named target → where it comes from in the file (all four components present).
    pub maps: ComponentMaps,
    /// Source keys the layout did not use (reported, not fatal; e.g. `model_ema.*`,
    /// `position_ids`, `logit_scale`), sorted.
    pub unused: Vec<String>,
}

impl SingleFileLayout {
    /// The file's tensors grouped for writing back; see [`original_tensors`].
    pub fn original_tensors(&self) -> Vec<OriginalTensor> {
        original_tensors(&self.maps)
    }
}

/// Why a file is not a usable SDXL single-file checkpoint. The messages are one line, meant
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

type Result<T> = std::result::Result<T, SingleFileError>;

fn inconsistent(component: Component, message: impl Into<String>) -> SingleFileError {
    SingleFileError::Inconsistent {
        component,
        message: message.into(),
    }
}

/// Recognise an original-layout SDXL checkpoint from its tensor names and shapes, infer the
/// four configurations and map every model tensor to its source.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<SingleFileLayout> {
    classify(shapes)?;
    let s = Shapes(shapes);
    let text_encoder = infer_clip_l(&s)?;
    let text_encoder_2 = infer_open_clip(&s)?;
    let (vae, vae_in_channels) = infer_vae(&s)?;
    let unet = infer_unet(&s, &text_encoder, &text_encoder_2)?;

    let mut plan = Plan::default();
    plan_unet(&mut plan, &unet)?;
    plan_clip_l(&mut plan, &text_encoder)?;
    plan_open_clip(&mut plan, &text_encoder_2)?;
    plan_vae(&mut plan, &vae, Some(vae_in_channels))?;

    let mut maps: ComponentMaps = Component::ALL
        .iter()
        .map(|&c| (c, BTreeMap::new()))
        .collect();
    let mut used = BTreeSet::new();
    for mut e in plan.entries {
        if let Some(alias) = e.alias.take().filter(|a| !s.has(&e.source) && s.has(a)) {
            e.source = alias;
        }
        let found = s.get(e.component, &e.source)?;
        let transform = if shape_matches(found, &e.source_shape) {
            e.transform
        } else if e.transform == Transform::Squeeze1x1 && shape_matches(found, &e.target_shape) {
            // Already stored as a linear weight (some conversions do that).
            Transform::Identity
        } else {
            return Err(SingleFileError::ShapeMismatch {
                component: e.component,
                key: e.source,
                found: found.to_vec(),
                expected: fmt_shape(&e.source_shape),
            });
        };
        used.insert(e.source.clone());
        maps.entry(e.component).or_default().insert(
            e.target,
            Mapped {
                source: e.source,
                transform,
            },
        );
    }
    let unused = shapes
        .keys()
        .filter(|k| !used.contains(k.as_str()))
        .cloned()
        .collect();
    Ok(SingleFileLayout {
        unet,
        text_encoder,
        text_encoder_2,
        vae,
        maps,
        unused,
    })
}

/// The maps [`detect`] would return for a file of these configurations, built from the
/// configurations alone (VAE attention weights as 1x1 convolutions, as sgm stores them). For
/// writing a model loaded from a diffusers folder back as a single file.
pub fn canonical_maps(
    unet: &UNetConfig,
    text_encoder: &ClipConfig,
    text_encoder_2: &ClipConfig,
    vae: &VaeConfig,
) -> Result<ComponentMaps> {
    let mut plan = Plan::default();
    plan_unet(&mut plan, unet)?;
    plan_clip_l(&mut plan, text_encoder)?;
    plan_open_clip(&mut plan, text_encoder_2)?;
    plan_vae(&mut plan, vae, None)?;
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

/// Group maps (from [`detect`] or [`canonical_maps`]) by original tensor, sorted by key: what
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

// ---------------------------------------------------------------------------------------
// Recognising the file

fn classify(shapes: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    let Some(first) = shapes.keys().next() else {
        return Err(SingleFileError::Empty);
    };
    let s = Shapes(shapes);
    if s.has_prefix(TEXT_ENCODER_2_PREFIX) {
        for c in [Component::Unet, Component::TextEncoder, Component::Vae] {
            if !s.has_prefix(c.source_prefix()) {
                return Err(SingleFileError::MissingComponent {
                    component: c,
                    prefix: c.source_prefix(),
                });
            }
        }
        return Ok(());
    }
    let any = |needle: &str| shapes.keys().any(|k| k.contains(needle));
    let not_sdxl = |looks_like: &str| {
        Err(SingleFileError::NotSdxl {
            looks_like: looks_like.to_string(),
        })
    };
    if let Some(k) = shapes.keys().find(|k| {
        k.starts_with("lora_")
            || k.contains(".lora_down.")
            || k.contains(".lora_A.")
            || k.contains(".lora_up.")
    }) {
        return Err(SingleFileError::Lora {
            example: k.escape_debug().to_string(),
        });
    }
    if s.has_prefix("cond_stage_model.transformer.") {
        return not_sdxl("a Stable Diffusion 1.x checkpoint (`cond_stage_model.transformer.*`)");
    }
    if s.has_prefix("cond_stage_model.model.") {
        return not_sdxl("a Stable Diffusion 2.x checkpoint (`cond_stage_model.model.*`)");
    }
    if s.has_prefix("conditioner.embedders.0.model.") {
        return not_sdxl(
            "an SDXL refiner checkpoint (OpenCLIP bigG only, as `conditioner.embedders.0.model.*`), which dmd2 does not run",
        );
    }
    if any("double_blocks.") {
        return not_sdxl("a Flux transformer checkpoint (`double_blocks.*`)");
    }
    if any("joint_blocks.") {
        return not_sdxl("a Stable Diffusion 3 transformer checkpoint (`joint_blocks.*`)");
    }
    let diffusers_unet = ["", "unet."].iter().any(|p| {
        s.has_prefix(&format!("{p}down_blocks."))
            || s.has(&format!("{p}conv_in.weight")) && s.has_prefix(&format!("{p}up_blocks."))
    });
    if diffusers_unet {
        return Err(SingleFileError::DiffusersStateDict { what: "UNet" });
    }
    if s.has_prefix("encoder.down_blocks.") || s.has_prefix("decoder.up_blocks.") {
        return Err(SingleFileError::DiffusersStateDict { what: "VAE" });
    }
    if s.has_prefix("text_model.encoder.layers.") || s.has_prefix("encoder.layers.") {
        return Err(SingleFileError::DiffusersStateDict {
            what: "CLIP text encoder",
        });
    }
    if s.has_prefix(UNET_PREFIX) {
        return not_sdxl(
            "a bare UNet (only `model.diffusion_model.*`), with no text encoders or VAE",
        );
    }
    if s.has_prefix(VAE_PREFIX) || s.has_prefix("encoder.down.") {
        return not_sdxl("a bare VAE, with no UNet or text encoders");
    }
    not_sdxl(&format!(
        "nothing dmd2 recognises (first tensor: `{}`)",
        first.escape_debug()
    ))
}

/// Read-only view of the file's shapes with the look-ups inference needs.
struct Shapes<'a>(&'a BTreeMap<String, Vec<usize>>);

impl<'a> Shapes<'a> {
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.with_prefix(prefix).next().is_some()
    }

    fn with_prefix<'p>(&self, prefix: &'p str) -> impl Iterator<Item = &'a String> + use<'a, 'p> {
        self.0
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(k, _)| k)
            .take_while(move |k| k.starts_with(prefix))
    }

    fn get(&self, component: Component, key: &str) -> Result<&'a [usize]> {
        self.0
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| SingleFileError::MissingKey {
                component,
                key: key.to_string(),
            })
    }

    /// The shape of `key`, which must have rank `N`.
    fn dims<const N: usize>(&self, component: Component, key: &str) -> Result<[usize; N]> {
        let found = self.get(component, key)?;
        <[usize; N]>::try_from(found).map_err(|_| SingleFileError::ShapeMismatch {
            component,
            key: key.to_string(),
            found: found.to_vec(),
            expected: format!("a {N}-D tensor"),
        })
    }

    /// Number of consecutive indices `prefix0.`, `prefix1.`, … present, counting from 0.
    /// Bounded by the number of keys whatever the names.
    fn count(&self, prefix: &str) -> usize {
        let present: BTreeSet<usize> = self
            .with_prefix(prefix)
            .filter_map(|k| {
                k.get(prefix.len()..)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .collect();
        (0..).take_while(|i| present.contains(i)).count()
    }
}

// ---------------------------------------------------------------------------------------
// Inferring the configurations

fn positive(component: Component, what: &str, v: usize) -> Result<usize> {
    if v == 0 {
        Err(inconsistent(component, format!("{what} is 0")))
    } else {
        Ok(v)
    }
}

fn infer_clip_l(s: &Shapes) -> Result<ClipConfig> {
    let c = Component::TextEncoder;
    let p = TEXT_ENCODER_PREFIX;
    let [vocab, hidden] = s.dims::<2>(c, &format!("{p}embeddings.token_embedding.weight"))?;
    let [positions, _] = s.dims::<2>(c, &format!("{p}embeddings.position_embedding.weight"))?;
    let layers = s.count(&format!("{p}encoder.layers."));
    if layers == 0 {
        return Err(SingleFileError::MissingKey {
            component: c,
            key: format!("{p}encoder.layers.0.mlp.fc1.weight"),
        });
    }
    let [intermediate, _] = s.dims::<2>(c, &format!("{p}encoder.layers.0.mlp.fc1.weight"))?;
    Ok(ClipConfig {
        vocab_size: positive(c, "the vocabulary size", vocab)?,
        hidden_size: positive(c, "the hidden width", hidden)?,
        intermediate_size: positive(c, "the MLP width", intermediate)?,
        num_hidden_layers: layers,
        num_attention_heads: heads_for_width(hidden),
        max_position_embeddings: positive(c, "the number of positions", positions)?,
        activation: Activation::QuickGelu,
        layer_norm_eps: LAYER_NORM_EPS,
        projection_dim: None,
    })
}

fn infer_open_clip(s: &Shapes) -> Result<ClipConfig> {
    let c = Component::TextEncoder2;
    let p = TEXT_ENCODER_2_PREFIX;
    let [vocab, hidden] = s.dims::<2>(c, &format!("{p}token_embedding.weight"))?;
    let [positions, _] = s.dims::<2>(c, &format!("{p}positional_embedding"))?;
    let layers = s.count(&format!("{p}transformer.resblocks."));
    if layers == 0 {
        return Err(SingleFileError::MissingKey {
            component: c,
            key: format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
        });
    }
    let [intermediate, _] =
        s.dims::<2>(c, &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?;
    let [_, projection] = s.dims::<2>(c, &format!("{p}text_projection"))?;
    Ok(ClipConfig {
        vocab_size: positive(c, "the vocabulary size", vocab)?,
        hidden_size: positive(c, "the hidden width", hidden)?,
        intermediate_size: positive(c, "the MLP width", intermediate)?,
        num_hidden_layers: layers,
        num_attention_heads: heads_for_width(hidden),
        max_position_embeddings: positive(c, "the number of positions", positions)?,
        activation: Activation::Gelu,
        layer_norm_eps: LAYER_NORM_EPS,
        projection_dim: Some(positive(c, "the projection width", projection)?),
    })
}

fn check_groups(component: Component, channels: &[usize]) -> Result<()> {
    for &ch in channels {
        if ch == 0 || !ch.is_multiple_of(NORM_GROUPS) {
            return Err(inconsistent(
                component,
                format!(
                    "block width {ch} is not a positive multiple of the {NORM_GROUPS} group-norm groups"
                ),
            ));
        }
    }
    Ok(())
}

/// Returns the configuration and the encoder's input channels.
fn infer_vae(s: &Shapes) -> Result<(VaeConfig, usize)> {
    let c = Component::Vae;
    let p = VAE_PREFIX;
    let [_, in_channels, _, _] = s.dims::<4>(c, &format!("{p}encoder.conv_in.weight"))?;
    let levels = s.count(&format!("{p}encoder.down."));
    let layers = s.count(&format!("{p}encoder.down.0.block."));
    if levels == 0 || layers == 0 {
        return Err(SingleFileError::MissingKey {
            component: c,
            key: format!("{p}encoder.down.0.block.0.conv1.weight"),
        });
    }
    let mut channels = Vec::with_capacity(levels);
    for i in 0..levels {
        let n = s.count(&format!("{p}encoder.down.{i}.block."));
        if n != layers {
            return Err(inconsistent(
                c,
                format!("encoder level {i} has {n} resnets, level 0 has {layers}"),
            ));
        }
        let [ch, _, _, _] = s.dims::<4>(c, &format!("{p}encoder.down.{i}.block.0.conv1.weight"))?;
        channels.push(ch);
    }
    check_groups(c, &channels)?;
    let up_levels = s.count(&format!("{p}decoder.up."));
    if up_levels != levels {
        return Err(inconsistent(
            c,
            format!("the decoder has {up_levels} levels, the encoder {levels}"),
        ));
    }
    for i in 0..levels {
        let n = s.count(&format!("{p}decoder.up.{i}.block."));
        if n != layers + 1 {
            return Err(inconsistent(
                c,
                format!(
                    "decoder level {i} has {n} resnets, expected {} (one more than the encoder's)",
                    layers + 1
                ),
            ));
        }
    }
    let [latent_channels, _, _, _] = s.dims::<4>(c, &format!("{p}post_quant_conv.weight"))?;
    let [out_channels, _, _, _] = s.dims::<4>(c, &format!("{p}decoder.conv_out.weight"))?;
    let enc_attn = s.has_prefix(&format!("{p}encoder.mid.attn_1."));
    let dec_attn = s.has_prefix(&format!("{p}decoder.mid.attn_1."));
    if enc_attn != dec_attn {
        return Err(inconsistent(
            c,
            "mid-block attention in only one of encoder and decoder",
        ));
    }
    let config = VaeConfig {
        latent_channels: positive(c, "the latent channel count", latent_channels)?,
        out_channels: positive(c, "the output channel count", out_channels)?,
        block_out_channels: channels,
        layers_per_block: layers,
        norm_num_groups: NORM_GROUPS,
        scaling_factor: VaeConfig::SDXL_SCALING_FACTOR,
        latents_mean_std: None,
        use_post_quant_conv: true,
        mid_block_add_attention: enc_attn,
    };
    Ok((config, positive(c, "the input channel count", in_channels)?))
}

/// Transformer depth of an attention slot (`…N.1.`), 0 when there is none.
fn attention_depth(s: &Shapes, c: Component, prefix: &str) -> Result<usize> {
    let depth = s.count(&format!("{prefix}transformer_blocks."));
    if depth == 0 && s.has(&format!("{prefix}proj_in.weight")) {
        return Err(inconsistent(
            c,
            format!("`{prefix}` has a projection but no transformer blocks"),
        ));
    }
    Ok(depth)
}

/// One depth for all blocks of a level (0: no attention), or an error naming the level.
fn level_depth(c: Component, what: &str, depths: &[usize]) -> Result<usize> {
    match depths.split_first() {
        Some((&d, rest)) if rest.iter().all(|&x| x == d) => Ok(d),
        _ => Err(inconsistent(
            c,
            format!(
                "{what}: the transformer depth differs between its blocks ({depths:?}); dmd2 needs one depth per block \
                 (0 = no attention)"
            ),
        )),
    }
}

fn infer_unet(s: &Shapes, te1: &ClipConfig, te2: &ClipConfig) -> Result<UNetConfig> {
    let c = Component::Unet;
    let p = UNET_PREFIX;
    let [c0, in_channels, _, _] = s.dims::<4>(c, &format!("{p}input_blocks.0.0.weight"))?;
    let [out_channels, _, _, _] = s.dims::<4>(c, &format!("{p}out.2.weight"))?;
    let n_in = s.count(&format!("{p}input_blocks."));
    let downs: Vec<usize> = (0..n_in)
        .filter(|k| s.has(&format!("{p}input_blocks.{k}.0.op.weight")))
        .collect();
    let levels = downs.len() + 1;
    // conv_in, then per level `layers` resnets (+ attention) and a downsampler but the last.
    let layers = (n_in / levels).saturating_sub(1);
    let fits = n_in == levels * (layers + 1)
        && layers > 0
        && downs
            .iter()
            .enumerate()
            .all(|(i, &k)| k == (layers + 1) * (i + 1));
    if !fits {
        return Err(inconsistent(
            c,
            format!(
                "{n_in} input blocks with downsamplers at {downs:?} do not form levels of equal resnet counts"
            ),
        ));
    }
    let mut channels = Vec::with_capacity(levels);
    let mut down_attention = Vec::with_capacity(levels);
    let mut down_depth = Vec::with_capacity(levels);
    let mut attention_prefixes = Vec::new();
    for i in 0..levels {
        let first = 1 + (layers + 1) * i;
        let [ch, _, _, _] =
            s.dims::<4>(c, &format!("{p}input_blocks.{first}.0.in_layers.2.weight"))?;
        channels.push(ch);
        let mut depths = Vec::with_capacity(layers);
        for j in 0..layers {
            let prefix = format!("{p}input_blocks.{}.1.", first + j);
            let d = attention_depth(s, c, &prefix)?;
            if d > 0 {
                attention_prefixes.push(prefix);
            }
            depths.push(d);
        }
        let d = level_depth(c, &format!("down level {i}"), &depths)?;
        down_attention.push(d > 0);
        down_depth.push(d.max(1));
    }
    if channels.first() != Some(&c0) {
        return Err(inconsistent(
            c,
            format!(
                "conv_in gives {c0} channels, the first level has {:?}",
                channels.first()
            ),
        ));
    }
    check_groups(c, &channels)?;

    let n_out = s.count(&format!("{p}output_blocks."));
    if n_out != levels * (layers + 1) {
        return Err(inconsistent(
            c,
            format!(
                "{n_out} output blocks, expected {} for {levels} levels of {layers} resnets",
                levels * (layers + 1)
            ),
        ));
    }
    let mut up_attention = Vec::with_capacity(levels);
    let mut up_depth = Vec::with_capacity(levels);
    for b in 0..levels {
        let mut depths = Vec::with_capacity(layers + 1);
        for j in 0..=layers {
            let prefix = format!("{p}output_blocks.{}.1.", (layers + 1) * b + j);
            let d = attention_depth(s, c, &prefix)?;
            if d > 0 {
                attention_prefixes.push(prefix);
            }
            depths.push(d);
        }
        let d = level_depth(c, &format!("up block {b}"), &depths)?;
        up_attention.push(d > 0);
        up_depth.push(d.max(1));
    }

    let mid_prefix = format!("{p}middle_block.1.");
    let mid_depth = attention_depth(s, c, &mid_prefix)?;
    let mid_transformer_depth = if mid_depth > 0 {
        attention_prefixes.push(mid_prefix);
        Some(mid_depth)
    } else {
        if s.has_prefix(&format!("{p}middle_block.1."))
            || s.has_prefix(&format!("{p}middle_block.2."))
        {
            return Err(inconsistent(
                c,
                "the middle block has more than one resnet but no attention, which no diffusers UNet has",
            ));
        }
        None
    };

    let Some(first_attention) = attention_prefixes.first() else {
        return Err(inconsistent(
            c,
            "no cross-attention transformer anywhere: not an SDXL-family UNet",
        ));
    };
    let proj_in_key = format!("{first_attention}proj_in.weight");
    let use_linear_projection = match s.get(c, &proj_in_key)?.len() {
        2 => true,
        4 => false,
        _ => {
            return Err(SingleFileError::ShapeMismatch {
                component: c,
                key: proj_in_key.clone(),
                found: s.get(c, &proj_in_key)?.to_vec(),
                expected: "a 2-D (linear) or 4-D (1x1 convolution) tensor".into(),
            });
        }
    };
    let [_, cross_attention_dim] = s.dims::<2>(
        c,
        &format!("{first_attention}transformer_blocks.0.attn2.to_k.weight"),
    )?;
    let context = te1.hidden_size.saturating_add(te2.hidden_size);
    if cross_attention_dim != context {
        return Err(inconsistent(
            c,
            format!(
                "cross-attention width {cross_attention_dim} ≠ the text encoders' widths {} + {}",
                te1.hidden_size, te2.hidden_size
            ),
        ));
    }

    let [_, adm] = s.dims::<2>(c, &format!("{p}label_emb.0.0.weight"))?;
    let pooled = te2.projection_dim.unwrap_or(0);
    let addition_time_embed_dim = match adm.checked_sub(pooled) {
        Some(rest) if rest > 0 && rest.is_multiple_of(6) => rest / 6,
        _ => {
            return Err(inconsistent(
                c,
                format!(
                    "added-conditioning width {adm} is not text encoder 2's projection width {pooled} plus 6 time embeddings"
                ),
            ));
        }
    };

    Ok(UNetConfig {
        in_channels: positive(c, "the input channel count", in_channels)?,
        out_channels: positive(c, "the output channel count", out_channels)?,
        heads: channels.iter().map(|&w| heads_for_width(w)).collect(),
        block_out_channels: channels,
        layers_per_block: layers,
        down_attention,
        down_transformer_depth: down_depth,
        up_attention,
        up_transformer_depth: up_depth,
        mid_transformer_depth,
        cross_attention_dim,
        norm_num_groups: NORM_GROUPS,
        norm_eps: NORM_EPS,
        use_linear_projection,
        addition_time_embed_dim,
        projection_class_embeddings_input_dim: adm,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
    })
}

// ---------------------------------------------------------------------------------------
// The tensor plan: every target, its source and both shapes, from configurations alone

/// Configurations asking for more levels, layers or transformer blocks than this are refused
/// by [`canonical_maps`] (no real model comes near; it bounds the work on hostile configs).
const MAX_REPEAT: usize = 4096;

/// A dimension that any size matches (the VAE's input channels when unknown).
const ANY: usize = usize::MAX;

fn shape_matches(found: &[usize], expected: &[usize]) -> bool {
    found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|(&f, &e)| e == ANY || f == e)
}

fn fmt_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|&d| {
            if d == ANY {
                "?".to_string()
            } else {
                d.to_string()
            }
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

struct Entry {
    component: Component,
    target: String,
    source: String,
    transform: Transform,
    target_shape: Vec<usize>,
    source_shape: Vec<usize>,
    /// Another name the source goes by in some files.
    alias: Option<String>,
}

#[derive(Default)]
struct Plan {
    entries: Vec<Entry>,
}

impl Plan {
    fn push(
        &mut self,
        component: Component,
        target: String,
        source: String,
        transform: Transform,
        target_shape: Vec<usize>,
    ) {
        let source_shape = match (&transform, target_shape.as_slice()) {
            (Transform::Transpose, [a, b]) => vec![*b, *a],
            (Transform::Squeeze1x1, [o, i]) => vec![*o, *i, 1, 1],
            _ => target_shape.clone(),
        };
        self.entries.push(Entry {
            component,
            target,
            source,
            transform,
            target_shape,
            source_shape,
            alias: None,
        });
    }

    /// Let the last `n` entries' sources also be found under `replace(from, to)`.
    fn alias_last(&mut self, n: usize, from: &str, to: &str) {
        let len = self.entries.len();
        for e in self.entries.iter_mut().skip(len.saturating_sub(n)) {
            e.alias = Some(e.source.replace(from, to));
        }
    }

    /// `target.weight` ← `source.weight` and, with `bias`, `target.bias` ← `source.bias` (shape `[w[0]]`).
    fn linear(&mut self, c: Component, target: &str, source: &str, weight: Vec<usize>, bias: bool) {
        let rows = weight.first().copied().unwrap_or(0);
        self.push(
            c,
            format!("{target}.weight"),
            format!("{source}.weight"),
            Transform::Identity,
            weight,
        );
        if bias {
            self.push(
                c,
                format!("{target}.bias"),
                format!("{source}.bias"),
                Transform::Identity,
                vec![rows],
            );
        }
    }

    fn norm(&mut self, c: Component, target: &str, source: &str, width: usize) {
        self.linear(c, target, source, vec![width], true);
    }
}

fn mul(a: usize, b: usize) -> usize {
    a.saturating_mul(b)
}

/// `Some(v[i])`, or an error saying which configuration list is too short.
fn at(c: Component, what: &str, v: &[usize], i: usize) -> Result<usize> {
    v.get(i)
        .copied()
        .ok_or_else(|| inconsistent(c, format!("configuration list {what} has no entry {i}")))
}

fn flag(c: Component, what: &str, v: &[bool], i: usize) -> Result<bool> {
    v.get(i)
        .copied()
        .ok_or_else(|| inconsistent(c, format!("configuration list {what} has no entry {i}")))
}

fn unet_resnet(plan: &mut Plan, target: &str, source: &str, cin: usize, cout: usize, temb: usize) {
    let u = Component::Unet;
    plan.norm(
        u,
        &format!("{target}.norm1"),
        &format!("{source}.in_layers.0"),
        cin,
    );
    plan.linear(
        u,
        &format!("{target}.conv1"),
        &format!("{source}.in_layers.2"),
        vec![cout, cin, 3, 3],
        true,
    );
    plan.linear(
        u,
        &format!("{target}.time_emb_proj"),
        &format!("{source}.emb_layers.1"),
        vec![cout, temb],
        true,
    );
    plan.norm(
        u,
        &format!("{target}.norm2"),
        &format!("{source}.out_layers.0"),
        cout,
    );
    plan.linear(
        u,
        &format!("{target}.conv2"),
        &format!("{source}.out_layers.3"),
        vec![cout, cout, 3, 3],
        true,
    );
    if cin != cout {
        plan.linear(
            u,
            &format!("{target}.conv_shortcut"),
            &format!("{source}.skip_connection"),
            vec![cout, cin, 1, 1],
            true,
        );
    }
}

fn unet_transformer(
    plan: &mut Plan,
    target: &str,
    source: &str,
    ch: usize,
    depth: usize,
    cfg: &UNetConfig,
) {
    let u = Component::Unet;
    let proj = if cfg.use_linear_projection {
        vec![ch, ch]
    } else {
        vec![ch, ch, 1, 1]
    };
    plan.norm(u, &format!("{target}.norm"), &format!("{source}.norm"), ch);
    plan.linear(
        u,
        &format!("{target}.proj_in"),
        &format!("{source}.proj_in"),
        proj.clone(),
        true,
    );
    for k in 0..depth {
        let t = format!("{target}.transformer_blocks.{k}");
        let s = format!("{source}.transformer_blocks.{k}");
        for n in ["norm1", "norm2", "norm3"] {
            plan.norm(u, &format!("{t}.{n}"), &format!("{s}.{n}"), ch);
        }
        for (attn, kv) in [("attn1", ch), ("attn2", cfg.cross_attention_dim)] {
            plan.linear(
                u,
                &format!("{t}.{attn}.to_q"),
                &format!("{s}.{attn}.to_q"),
                vec![ch, ch],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_k"),
                &format!("{s}.{attn}.to_k"),
                vec![ch, kv],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_v"),
                &format!("{s}.{attn}.to_v"),
                vec![ch, kv],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_out.0"),
                &format!("{s}.{attn}.to_out.0"),
                vec![ch, ch],
                true,
            );
        }
        // GEGLU: one projection to twice the 4x inner width.
        plan.linear(
            u,
            &format!("{t}.ff.net.0.proj"),
            &format!("{s}.ff.net.0.proj"),
            vec![mul(ch, 8), ch],
            true,
        );
        plan.linear(
            u,
            &format!("{t}.ff.net.2"),
            &format!("{s}.ff.net.2"),
            vec![ch, mul(ch, 4)],
            true,
        );
    }
    plan.linear(
        u,
        &format!("{target}.proj_out"),
        &format!("{source}.proj_out"),
        proj,
        true,
    );
}

fn plan_unet(plan: &mut Plan, cfg: &UNetConfig) -> Result<()> {
    let u = Component::Unet;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let layers = cfg.layers_per_block;
    let lists_ok = n > 0
        && cfg.down_attention.len() == n
        && cfg.down_transformer_depth.len() == n
        && cfg.up_attention.len() == n
        && cfg.up_transformer_depth.len() == n;
    if !lists_ok || layers == 0 {
        return Err(inconsistent(
            u,
            "configuration lists do not match block_out_channels",
        ));
    }
    let depths = cfg
        .down_transformer_depth
        .iter()
        .chain(&cfg.up_transformer_depth)
        .chain(&cfg.mid_transformer_depth);
    if n > MAX_REPEAT || layers > MAX_REPEAT || depths.copied().any(|d| d > MAX_REPEAT) {
        return Err(inconsistent(
            u,
            format!("configuration repeats a block more than {MAX_REPEAT} times"),
        ));
    }
    let p = |k: &str| format!("{UNET_PREFIX}{k}");
    let c0 = at(u, "block_out_channels", ch, 0)?;
    let last = at(u, "block_out_channels", ch, n - 1)?;
    let temb = mul(c0, 4);
    plan.linear(
        u,
        "conv_in",
        &p("input_blocks.0.0"),
        vec![c0, cfg.in_channels, 3, 3],
        true,
    );
    plan.linear(
        u,
        "time_embedding.linear_1",
        &p("time_embed.0"),
        vec![temb, c0],
        true,
    );
    plan.linear(
        u,
        "time_embedding.linear_2",
        &p("time_embed.2"),
        vec![temb, temb],
        true,
    );
    plan.linear(
        u,
        "add_embedding.linear_1",
        &p("label_emb.0.0"),
        vec![temb, cfg.projection_class_embeddings_input_dim],
        true,
    );
    plan.linear(
        u,
        "add_embedding.linear_2",
        &p("label_emb.0.2"),
        vec![temb, temb],
        true,
    );

    for i in 0..n {
        let out = at(u, "block_out_channels", ch, i)?;
        let mut cin = if i == 0 {
            c0
        } else {
            at(u, "block_out_channels", ch, i - 1)?
        };
        let attention = flag(u, "down_attention", &cfg.down_attention, i)?;
        let depth = at(u, "down_transformer_depth", &cfg.down_transformer_depth, i)?;
        for j in 0..layers {
            let idx = 1 + (layers + 1) * i + j;
            unet_resnet(
                plan,
                &format!("down_blocks.{i}.resnets.{j}"),
                &p(&format!("input_blocks.{idx}.0")),
                cin,
                out,
                temb,
            );
            if attention {
                let (t, s) = (
                    format!("down_blocks.{i}.attentions.{j}"),
                    p(&format!("input_blocks.{idx}.1")),
                );
                unet_transformer(plan, &t, &s, out, depth, cfg);
            }
            cin = out;
        }
        if i + 1 < n {
            let s = p(&format!("input_blocks.{}.0.op", (layers + 1) * (i + 1)));
            plan.linear(
                u,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                &s,
                vec![out, out, 3, 3],
                true,
            );
        }
    }

    unet_resnet(
        plan,
        "mid_block.resnets.0",
        &p("middle_block.0"),
        last,
        last,
        temb,
    );
    if let Some(depth) = cfg.mid_transformer_depth {
        unet_transformer(
            plan,
            "mid_block.attentions.0",
            &p("middle_block.1"),
            last,
            depth,
            cfg,
        );
        unet_resnet(
            plan,
            "mid_block.resnets.1",
            &p("middle_block.2"),
            last,
            last,
            temb,
        );
    }

    for b in 0..n {
        let level = n - 1 - b;
        let out = at(u, "block_out_channels", ch, level)?;
        let prev = if b == 0 {
            last
        } else {
            at(u, "block_out_channels", ch, level + 1)?
        };
        let below = if level == 0 {
            c0
        } else {
            at(u, "block_out_channels", ch, level - 1)?
        };
        let attention = flag(u, "up_attention", &cfg.up_attention, b)?;
        let depth = at(u, "up_transformer_depth", &cfg.up_transformer_depth, b)?;
        for j in 0..=layers {
            let o = (layers + 1) * b + j;
            // The skip connections come back in reverse; the last one of a level is the input
            // of the level (the output of the level below, or conv_in).
            let skip = if j == layers { below } else { out };
            let res_in = if j == 0 { prev } else { out };
            let (t, s) = (
                format!("up_blocks.{b}.resnets.{j}"),
                p(&format!("output_blocks.{o}.0")),
            );
            unet_resnet(plan, &t, &s, res_in.saturating_add(skip), out, temb);
            if attention {
                let (t, s) = (
                    format!("up_blocks.{b}.attentions.{j}"),
                    p(&format!("output_blocks.{o}.1")),
                );
                unet_transformer(plan, &t, &s, out, depth, cfg);
            }
        }
        if b + 1 < n {
            let slot = if attention { 2 } else { 1 };
            let s = p(&format!(
                "output_blocks.{}.{slot}.conv",
                (layers + 1) * b + layers
            ));
            plan.linear(
                u,
                &format!("up_blocks.{b}.upsamplers.0.conv"),
                &s,
                vec![out, out, 3, 3],
                true,
            );
        }
    }
    plan.norm(u, "conv_norm_out", &p("out.0"), c0);
    plan.linear(
        u,
        "conv_out",
        &p("out.2"),
        vec![cfg.out_channels, c0, 3, 3],
        true,
    );
    Ok(())
}

fn check_clip(c: Component, cfg: &ClipConfig) -> Result<()> {
    if cfg.num_hidden_layers == 0 || cfg.hidden_size == 0 {
        return Err(inconsistent(c, "configuration has no layers or zero width"));
    }
    if cfg.num_hidden_layers > MAX_REPEAT {
        return Err(inconsistent(
            c,
            format!("configuration has more than {MAX_REPEAT} layers"),
        ));
    }
    Ok(())
}

fn plan_clip_l(plan: &mut Plan, cfg: &ClipConfig) -> Result<()> {
    let c = Component::TextEncoder;
    check_clip(c, cfg)?;
    let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
    let p = |k: &str| format!("{TEXT_ENCODER_PREFIX}{k}");
    for (t, rows) in [
        ("embeddings.token_embedding", cfg.vocab_size),
        ("embeddings.position_embedding", cfg.max_position_embeddings),
    ] {
        plan.linear(c, t, &p(t), vec![rows, h], false);
    }
    for l in 0..cfg.num_hidden_layers {
        let t = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let name = format!("{t}.self_attn.{proj}");
            plan.linear(c, &name, &p(&name), vec![h, h], true);
        }
        for (name, shape) in [
            ("layer_norm1", vec![h]),
            ("layer_norm2", vec![h]),
            ("mlp.fc1", vec![m, h]),
            ("mlp.fc2", vec![h, m]),
        ] {
            let name = format!("{t}.{name}");
            plan.linear(c, &name, &p(&name), shape, true);
        }
    }
    plan.norm(c, "final_layer_norm", &p("final_layer_norm"), h);
    Ok(())
}

fn plan_open_clip(plan: &mut Plan, cfg: &ClipConfig) -> Result<()> {
    let c = Component::TextEncoder2;
    check_clip(c, cfg)?;
    let Some(projection) = cfg.projection_dim else {
        return Err(inconsistent(
            c,
            "configuration has no projection width (text_projection)",
        ));
    };
    let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
    let p = |k: &str| format!("{TEXT_ENCODER_2_PREFIX}{k}");
    plan.linear(
        c,
        "embeddings.token_embedding",
        &p("token_embedding"),
        vec![cfg.vocab_size, h],
        false,
    );
    plan.push(
        c,
        "embeddings.position_embedding.weight".into(),
        p("positional_embedding"),
        Transform::Identity,
        vec![cfg.max_position_embeddings, h],
    );
    for l in 0..cfg.num_hidden_layers {
        let t = format!("encoder.layers.{l}");
        let s = p(&format!("transformer.resblocks.{l}"));
        for (k, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
            let rows = Transform::Rows {
                start: mul(k, h),
                len: h,
            };
            for (suffix, fused, shape) in [
                ("weight", "in_proj_weight", vec![h, h]),
                ("bias", "in_proj_bias", vec![h]),
            ] {
                let mut source_shape = shape.clone();
                source_shape[0] = mul(3, h);
                plan.entries.push(Entry {
                    component: c,
                    target: format!("{t}.self_attn.{proj}.{suffix}"),
                    source: format!("{s}.attn.{fused}"),
                    transform: rows.clone(),
                    target_shape: shape,
                    source_shape,
                    alias: None,
                });
            }
        }
        plan.linear(
            c,
            &format!("{t}.self_attn.out_proj"),
            &format!("{s}.attn.out_proj"),
            vec![h, h],
            true,
        );
        plan.norm(c, &format!("{t}.layer_norm1"), &format!("{s}.ln_1"), h);
        plan.norm(c, &format!("{t}.layer_norm2"), &format!("{s}.ln_2"), h);
        plan.linear(
            c,
            &format!("{t}.mlp.fc1"),
            &format!("{s}.mlp.c_fc"),
            vec![m, h],
            true,
        );
        plan.linear(
            c,
            &format!("{t}.mlp.fc2"),
            &format!("{s}.mlp.c_proj"),
            vec![h, m],
            true,
        );
    }
    plan.norm(c, "final_layer_norm", &p("ln_final"), h);
    plan.push(
        c,
        "text_projection.weight".into(),
        p("text_projection"),
        Transform::Transpose,
        vec![projection, h],
    );
    Ok(())
}

fn vae_resnet(plan: &mut Plan, target: &str, source: &str, cin: usize, cout: usize) {
    let v = Component::Vae;
    plan.norm(
        v,
        &format!("{target}.norm1"),
        &format!("{source}.norm1"),
        cin,
    );
    plan.linear(
        v,
        &format!("{target}.conv1"),
        &format!("{source}.conv1"),
        vec![cout, cin, 3, 3],
        true,
    );
    plan.norm(
        v,
        &format!("{target}.norm2"),
        &format!("{source}.norm2"),
        cout,
    );
    plan.linear(
        v,
        &format!("{target}.conv2"),
        &format!("{source}.conv2"),
        vec![cout, cout, 3, 3],
        true,
    );
    if cin != cout {
        plan.linear(
            v,
            &format!("{target}.conv_shortcut"),
            &format!("{source}.nin_shortcut"),
            vec![cout, cin, 1, 1],
            true,
        );
        // diffusers' loader also takes the diffusers name; some converters keep it.
        plan.alias_last(2, ".nin_shortcut.", ".conv_shortcut.");
    }
}

fn vae_mid(plan: &mut Plan, part: &str, ch: usize, attention: bool) {
    let v = Component::Vae;
    let s = |k: &str| format!("{VAE_PREFIX}{part}.mid.{k}");
    vae_resnet(
        plan,
        &format!("{part}.mid_block.resnets.0"),
        &s("block_1"),
        ch,
        ch,
    );
    if attention {
        let t = format!("{part}.mid_block.attentions.0");
        plan.norm(v, &format!("{t}.group_norm"), &s("attn_1.norm"), ch);
        for (target, source) in [
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ] {
            let (t, src) = (format!("{t}.{target}"), s(&format!("attn_1.{source}")));
            plan.push(
                v,
                format!("{t}.weight"),
                format!("{src}.weight"),
                Transform::Squeeze1x1,
                vec![ch, ch],
            );
            plan.push(
                v,
                format!("{t}.bias"),
                format!("{src}.bias"),
                Transform::Identity,
                vec![ch],
            );
        }
    }
    vae_resnet(
        plan,
        &format!("{part}.mid_block.resnets.1"),
        &s("block_2"),
        ch,
        ch,
    );
}

fn plan_vae(plan: &mut Plan, cfg: &VaeConfig, in_channels: Option<usize>) -> Result<()> {
    let v = Component::Vae;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    if n == 0 || cfg.layers_per_block == 0 {
        return Err(inconsistent(
            v,
            "configuration has no levels or no resnets per level",
        ));
    }
    if n > MAX_REPEAT || cfg.layers_per_block > MAX_REPEAT {
        return Err(inconsistent(
            v,
            format!("configuration repeats a block more than {MAX_REPEAT} times"),
        ));
    }
    let layers = cfg.layers_per_block;
    let p = |k: &str| format!("{VAE_PREFIX}{k}");
    let c0 = at(v, "block_out_channels", ch, 0)?;
    let last = at(v, "block_out_channels", ch, n - 1)?;
    let latent = cfg.latent_channels;
    plan.linear(
        v,
        "encoder.conv_in",
        &p("encoder.conv_in"),
        vec![c0, in_channels.unwrap_or(ANY), 3, 3],
        true,
    );
    for i in 0..n {
        let out = at(v, "block_out_channels", ch, i)?;
        let mut cin = if i == 0 {
            c0
        } else {
            at(v, "block_out_channels", ch, i - 1)?
        };
        for j in 0..layers {
            vae_resnet(
                plan,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &p(&format!("encoder.down.{i}.block.{j}")),
                cin,
                out,
            );
            cin = out;
        }
        if i + 1 < n {
            let (t, s) = (
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                p(&format!("encoder.down.{i}.downsample.conv")),
            );
            plan.linear(v, &t, &s, vec![out, out, 3, 3], true);
        }
    }
    vae_mid(plan, "encoder", last, cfg.mid_block_add_attention);
    plan.norm(v, "encoder.conv_norm_out", &p("encoder.norm_out"), last);
    plan.linear(
        v,
        "encoder.conv_out",
        &p("encoder.conv_out"),
        vec![mul(latent, 2), last, 3, 3],
        true,
    );
    plan.linear(
        v,
        "quant_conv",
        &p("quant_conv"),
        vec![mul(latent, 2), mul(latent, 2), 1, 1],
        true,
    );
    plan.linear(
        v,
        "post_quant_conv",
        &p("post_quant_conv"),
        vec![latent, latent, 1, 1],
        true,
    );
    plan.linear(
        v,
        "decoder.conv_in",
        &p("decoder.conv_in"),
        vec![last, latent, 3, 3],
        true,
    );
    vae_mid(plan, "decoder", last, cfg.mid_block_add_attention);
    for b in 0..n {
        // diffusers numbers the decoder's up blocks from the deepest level, LDM from the top.
        let level = n - 1 - b;
        let out = at(v, "block_out_channels", ch, level)?;
        let mut cin = if b == 0 {
            last
        } else {
            at(v, "block_out_channels", ch, level + 1)?
        };
        for j in 0..=layers {
            let (t, s) = (
                format!("decoder.up_blocks.{b}.resnets.{j}"),
                p(&format!("decoder.up.{level}.block.{j}")),
            );
            vae_resnet(plan, &t, &s, cin, out);
            cin = out;
        }
        if b + 1 < n {
            let (t, s) = (
                format!("decoder.up_blocks.{b}.upsamplers.0.conv"),
                p(&format!("decoder.up.{level}.upsample.conv")),
            );
            plan.linear(v, &t, &s, vec![out, out, 3, 3], true);
        }
    }
    plan.norm(v, "decoder.conv_norm_out", &p("decoder.norm_out"), c0);
    plan.linear(
        v,
        "decoder.conv_out",
        &p("decoder.conv_out"),
        vec![cfg.out_channels, c0, 3, 3],
        true,
    );
    Ok(())
}
