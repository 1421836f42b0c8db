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
//! The names themselves, and the maps for writing single files, are [`crate::keymap`]'s.

use crate::config::{Activation, ClipConfig, UNetConfig, VaeConfig};
use crate::keymap::plan::{Plan, fmt_shape, shape_matches};
use crate::keymap::{
    Component, ComponentMaps, Mapped, OriginalTensor, Result, SingleFileError, Transform,
    original_tensors,
};
use crate::keymap::{
    NORM_GROUPS, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX,
    heads_for_width, inconsistent,
};
use std::collections::{BTreeMap, BTreeSet};

const NORM_EPS: f64 = 1e-5;
const LAYER_NORM_EPS: f64 = 1e-5;

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

/// Recognise an original-layout SDXL checkpoint from its tensor names and shapes, infer the
/// four configurations and map every model tensor to its source.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<SingleFileLayout> {
    classify(shapes)?;
    let s = Shapes(shapes);
    let text_encoder = infer_clip_l(&s)?;
    let text_encoder_2 = infer_open_clip(&s)?;
    let (vae, vae_in_channels) = infer_vae(&s)?;
    let unet = infer_unet(&s, &text_encoder, &text_encoder_2)?;

    let plan = Plan::for_configs(
        &unet,
        &text_encoder,
        &text_encoder_2,
        &vae,
        Some(vae_in_channels),
    )?;

    let (maps, used) = map_entries(&s, plan.entries)?;
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

/// Each planned tensor found in the file (under its name or its alias) with a compatible
/// shape; returns the maps and the file's keys they use.
fn map_entries(
    s: &Shapes,
    entries: Vec<crate::keymap::plan::Entry>,
) -> Result<(ComponentMaps, BTreeSet<String>)> {
    let mut maps: ComponentMaps = Component::ALL
        .iter()
        .map(|&c| (c, BTreeMap::new()))
        .collect();
    let mut used = BTreeSet::new();
    for mut e in entries {
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
    Ok((maps, used))
}

/// An original-layout VAE on its own (`--vae sdxl_vae.safetensors`, keys `encoder.*`,
/// `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, optionally under `first_stage_model.`):
/// its configuration inferred from the shapes as for a whole checkpoint, and the map from
/// diffusers names to the file's keys.
pub fn detect_vae(
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<(VaeConfig, BTreeMap<String, Mapped>)> {
    let prefixed: bool = shapes.keys().any(|k| k.starts_with(VAE_PREFIX));
    let owned: BTreeMap<String, Vec<usize>>;
    let shapes = if prefixed {
        shapes
    } else {
        owned = shapes
            .iter()
            .map(|(k, v)| (format!("{VAE_PREFIX}{k}"), v.clone()))
            .collect();
        &owned
    };
    let s = Shapes(shapes);
    let (vae, in_channels) = infer_vae(&s)?;
    let plan = Plan::for_vae(&vae, Some(in_channels))?;
    let (mut maps, _) = map_entries(&s, plan.entries)?;
    let mut map = maps.remove(&Component::Vae).unwrap_or_default();
    if !prefixed {
        for m in map.values_mut() {
            if let Some(k) = m.source.strip_prefix(VAE_PREFIX) {
                m.source = k.to_string();
            }
        }
    }
    Ok((vae, map))
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
        // No config says otherwise: the SDXL VAE's needs.
        force_upcast: true,
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
