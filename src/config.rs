//! Model configurations: the UNet, the two CLIP text encoders and the VAE.
//!
//! They are read from diffusers' `config.json` files for folder models, and inferred from
//! tensor shapes for single-file checkpoints (see `checkpoint::single_file`).

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The SDXL UNet (diffusers' `UNet2DConditionModel` with `addition_embed_type = "text_time"`).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Per down level: does it carry cross-attention transformers?
    pub down_attention: Vec<bool>,
    /// Per down level: transformer blocks in each `Transformer2DModel`.
    pub down_transformer_depth: Vec<usize>,
    /// Per up block, in forward order (the deepest level first).
    pub up_attention: Vec<bool>,
    pub up_transformer_depth: Vec<usize>,
    /// `None` when the mid block has no attention.
    pub mid_transformer_depth: Option<usize>,
    /// Attention heads per down level (up blocks use the mirrored level).
    pub heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub addition_time_embed_dim: usize,
    pub projection_class_embeddings_input_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl UNetConfig {
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Width of the pooled text embedding the added conditioning expects.
    pub fn pooled_dim(&self) -> usize {
        self.projection_class_embeddings_input_dim
            .saturating_sub(6 * self.addition_time_embed_dim)
    }

    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_diffusers_value(&v)
            .with_context(|| format!("{}: unsupported UNet config", path.display()))
    }

    pub fn from_diffusers_value(v: &Value) -> Result<Self> {
        let block_out_channels: Vec<usize> = serde_json::from_value(
            v.get("block_out_channels")
                .cloned()
                .context("missing block_out_channels")?,
        )?;
        let n = block_out_channels.len();
        let down_types: Vec<String> = serde_json::from_value(
            v.get("down_block_types")
                .cloned()
                .context("missing down_block_types")?,
        )?;
        let up_types: Vec<String> = serde_json::from_value(
            v.get("up_block_types")
                .cloned()
                .context("missing up_block_types")?,
        )?;
        if down_types.len() != n || up_types.len() != n {
            bail!("block type lists do not match block_out_channels");
        }
        match v.get("addition_embed_type").and_then(Value::as_str) {
            Some("text_time") => {}
            other => bail!("addition_embed_type is {other:?}, SDXL needs \"text_time\""),
        }
        check_unet_features(v, &down_types, &up_types)?;
        let layers_per_block = usize_field(v, "layers_per_block", 2)?;
        let depth = per_level(v.get("transformer_layers_per_block"), n, 1)?;
        let up_depth = match v.get("reverse_transformer_layers_per_block") {
            Some(Value::Null) | None => depth.iter().rev().copied().collect(),
            Some(x) => {
                let rows: Vec<Value> = serde_json::from_value(x.clone())?;
                rows.iter()
                    .map(uniform_depth)
                    .collect::<Result<Vec<_>>>()
                    .context("bad reverse_transformer_layers_per_block")?
            }
        };
        // diffusers names the head count `attention_head_dim` for historical reasons;
        // `num_attention_heads` wins when present.
        let heads_v = match v.get("num_attention_heads") {
            Some(Value::Null) | None => v.get("attention_head_dim"),
            some => some,
        };
        let heads = per_level(heads_v, n, 8)?;
        let mid_type = v
            .get("mid_block_type")
            .and_then(Value::as_str)
            .unwrap_or("UNetMidBlock2DCrossAttn");
        let mid_transformer_depth = match mid_type {
            "UNetMidBlock2DCrossAttn" => Some(depth[n - 1]),
            "UNetMidBlock2D" => None,
            other => bail!("unsupported mid_block_type {other}"),
        };
        let cross_attention_dim = usize_field(v, "cross_attention_dim", 2048)?;
        let c = Self {
            in_channels: usize_field(v, "in_channels", 4)?,
            out_channels: usize_field(v, "out_channels", 4)?,
            layers_per_block,
            down_attention: down_types
                .iter()
                .map(|t| t.starts_with("CrossAttn"))
                .collect(),
            down_transformer_depth: depth,
            up_attention: up_types
                .iter()
                .map(|t| t.starts_with("CrossAttn"))
                .collect(),
            up_transformer_depth: up_depth,
            mid_transformer_depth,
            heads,
            cross_attention_dim,
            norm_num_groups: usize_field(v, "norm_num_groups", 32)?,
            norm_eps: f64_field(v, "norm_eps", 1e-5),
            use_linear_projection: v
                .get("use_linear_projection")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            addition_time_embed_dim: usize_field(v, "addition_time_embed_dim", 256)?,
            projection_class_embeddings_input_dim: usize_field(
                v,
                "projection_class_embeddings_input_dim",
                2816,
            )?,
            flip_sin_to_cos: v
                .get("flip_sin_to_cos")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            freq_shift: f64_field(v, "freq_shift", 0.0),
            block_out_channels,
        };
        c.validate()?;
        Ok(c)
    }

    /// The arithmetic the UNet's construction relies on: positive sizes, channel counts the
    /// norm groups and attention heads divide. Each error names the field.
    pub fn validate(&self) -> Result<()> {
        const MAX: usize = 1 << 16;
        let sane = |what: &str, v: usize| -> Result<()> {
            if v == 0 || v > MAX {
                bail!("{what} = {v} is out of range (1..={MAX})");
            }
            Ok(())
        };
        if self.block_out_channels.is_empty() {
            bail!("block_out_channels is empty");
        }
        for &c in &self.block_out_channels {
            sane("block_out_channels entry", c)?;
            if !c.is_multiple_of(self.norm_num_groups.max(1)) {
                bail!(
                    "norm_num_groups = {} does not divide block_out_channels entry {c}",
                    self.norm_num_groups
                );
            }
        }
        sane("norm_num_groups", self.norm_num_groups)?;
        sane("in_channels", self.in_channels)?;
        sane("out_channels", self.out_channels)?;
        sane("layers_per_block", self.layers_per_block)?;
        sane("cross_attention_dim", self.cross_attention_dim)?;
        sane("addition_time_embed_dim", self.addition_time_embed_dim)?;
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps = {} is not a positive number", self.norm_eps);
        }
        if self.pooled_dim() == 0 {
            bail!(
                "projection_class_embeddings_input_dim = {} leaves no room for the pooled text embedding beside 6 × addition_time_embed_dim",
                self.projection_class_embeddings_input_dim
            );
        }
        for (level, (&c, &heads)) in self.block_out_channels.iter().zip(&self.heads).enumerate() {
            let attends = self.down_attention.get(level).copied().unwrap_or(false)
                || self
                    .up_attention
                    .iter()
                    .rev()
                    .nth(level)
                    .copied()
                    .unwrap_or(false)
                || (level + 1 == self.block_out_channels.len()
                    && self.mid_transformer_depth.is_some());
            if attends && (heads == 0 || !c.is_multiple_of(heads)) {
                bail!(
                    "attention_head_dim: level {level} has {c} channels and {heads} heads; the heads must divide the channels"
                );
            }
        }
        for &d in self
            .down_transformer_depth
            .iter()
            .chain(&self.up_transformer_depth)
            .chain(&self.mid_transformer_depth)
        {
            if d > 256 {
                bail!("transformer_layers_per_block entry {d} is out of range");
            }
        }
        Ok(())
    }
}

/// diffusers UNet options that change the computation in ways this UNet does not implement
/// (e.g. the guidance embedding of LCM-distilled UNets, `time_cond_proj_dim`): refused by
/// name instead of being ignored. Each field may be absent, or hold one of the values listed
/// (SDXL's first); `null` entries accept JSON null.
fn check_unet_features(v: &Value, down: &[String], up: &[String]) -> Result<()> {
    let accepted: [(&str, Value); 23] = [
        ("time_cond_proj_dim", Value::Null),
        ("class_embed_type", Value::Null),
        ("num_class_embeds", Value::Null),
        ("encoder_hid_dim", Value::Null),
        ("encoder_hid_dim_type", Value::Null),
        ("cross_attention_norm", Value::Null),
        ("time_embedding_dim", Value::Null),
        ("time_embedding_act_fn", Value::Null),
        ("timestep_post_act", Value::Null),
        ("mid_block_only_cross_attention", Value::Null),
        ("act_fn", "silu".into()),
        ("resnet_time_scale_shift", "default".into()),
        ("time_embedding_type", "positional".into()),
        ("attention_type", "default".into()),
        ("conv_in_kernel", 3.into()),
        ("conv_out_kernel", 3.into()),
        ("downsample_padding", 1.into()),
        ("only_cross_attention", false.into()),
        ("dual_cross_attention", false.into()),
        ("center_input_sample", false.into()),
        ("class_embeddings_concat", false.into()),
        ("resnet_skip_time_act", false.into()),
        ("resnet_out_scale_factor", 1.0.into()),
    ];
    for (key, want) in &accepted {
        let Some(got) = v.get(*key) else { continue };
        let same = match (got, want) {
            (Value::Null, _) => true,
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            // `only_cross_attention` may be one flag per level.
            (Value::Array(a), want) if *key == "only_cross_attention" => {
                a.iter().all(|x| x == want)
            }
            (a, b) => a == b,
        };
        if !same {
            bail!("{key} = {got} is not supported (SDXL UNets have {want})");
        }
    }
    if let Some(f) = v.get("mid_block_scale_factor").and_then(Value::as_f64)
        && f != 1.0
    {
        bail!("mid_block_scale_factor = {f} is not supported (SDXL UNets have 1)");
    }
    for t in down {
        if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D") {
            bail!("down block type {t} is not supported (CrossAttnDownBlock2D or DownBlock2D)");
        }
    }
    for t in up {
        if !matches!(t.as_str(), "CrossAttnUpBlock2D" | "UpBlock2D") {
            bail!("up block type {t} is not supported (CrossAttnUpBlock2D or UpBlock2D)");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU, as OpenCLIP bigG uses.
    Gelu,
}

/// A CLIP text transformer (`CLIPTextModel` / `CLIPTextModelWithProjection`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (encoder 2 only).
    pub projection_dim: Option<usize>,
}

impl ClipConfig {
    pub fn from_transformers_json(path: &Path, with_projection: bool) -> Result<Self> {
        let v = read_json(path)?;
        // transformers nests the text config in `text_config` for full CLIP models.
        let v = v.get("text_config").cloned().unwrap_or(v);
        let act = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu")
        {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => bail!("{}: unsupported hidden_act {other}", path.display()),
        };
        let c = Self {
            vocab_size: usize_field(&v, "vocab_size", 49408)?,
            hidden_size: usize_field(&v, "hidden_size", 768)?,
            intermediate_size: usize_field(&v, "intermediate_size", 3072)?,
            num_hidden_layers: usize_field(&v, "num_hidden_layers", 12)?,
            num_attention_heads: usize_field(&v, "num_attention_heads", 12)?,
            max_position_embeddings: usize_field(&v, "max_position_embeddings", 77)?,
            activation: act,
            layer_norm_eps: f64_field(&v, "layer_norm_eps", 1e-5),
            projection_dim: if with_projection {
                Some(usize_field(&v, "projection_dim", 1280)?)
            } else {
                None
            },
        };
        c.validate()
            .with_context(|| format!("{}: unsupported text encoder config", path.display()))?;
        Ok(c)
    }

    /// Positive sizes, heads dividing the width, at least the two layers SDXL reads the
    /// penultimate of.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 || v > 1 << 20 {
                bail!("{what} = {v} is out of range");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "num_attention_heads = {} does not divide hidden_size = {}",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        if !(2..=256).contains(&self.num_hidden_layers) {
            bail!(
                "num_hidden_layers = {} (SDXL reads the penultimate layer: at least 2)",
                self.num_hidden_layers
            );
        }
        if self.max_position_embeddings < 77 {
            bail!(
                "max_position_embeddings = {} is below CLIP's 77 tokens",
                self.max_position_embeddings
            );
        }
        if self.projection_dim == Some(0) {
            bail!("projection_dim = 0");
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            bail!(
                "layer_norm_eps = {} is not a positive number",
                self.layer_norm_eps
            );
        }
        Ok(())
    }
}

/// The VAE (diffusers' `AutoencoderKL`); only the decoder is used for generation.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    /// Per-channel latent statistics (`latents_mean`, `latents_std`): when a VAE config
    /// has both, the SDXL pipeline decodes `latents · std / scaling_factor + mean`.
    pub latents_mean_std: Option<(Vec<f64>, Vec<f64>)>,
    /// `use_post_quant_conv` (true for every SDXL VAE).
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Decode in f32 even when the model runs in f16 (true for the SDXL VAE, which overflows
    /// in f16; false for `madebyollin/sdxl-vae-fp16-fix`), as diffusers' pipelines read it.
    pub force_upcast: bool,
}

impl VaeConfig {
    /// SDXL's latent scale. The SD 1.5 value 0.18215 is wrong for SDXL.
    pub const SDXL_SCALING_FACTOR: f64 = 0.13025;

    /// Pixels per latent along each axis.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let block_out_channels: Vec<usize> = serde_json::from_value(
            v.get("block_out_channels")
                .cloned()
                .with_context(|| format!("{}: missing block_out_channels", path.display()))?,
        )?;
        if block_out_channels.is_empty() {
            bail!("{}: empty block_out_channels", path.display());
        }
        let latent_channels = usize_field(&v, "latent_channels", 4)?;
        let stats = |key: &str| -> Result<Option<Vec<f64>>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => {
                    let list: Vec<f64> = serde_json::from_value(x.clone()).with_context(|| {
                        format!("{}: {key} is not a list of numbers", path.display())
                    })?;
                    if list.len() != latent_channels {
                        bail!(
                            "{}: {key} has {} entries for {latent_channels} latent channels",
                            path.display(),
                            list.len()
                        );
                    }
                    Ok(Some(list))
                }
            }
        };
        let latents_mean_std = match (stats("latents_mean")?, stats("latents_std")?) {
            (Some(mean), Some(std)) => Some((mean, std)),
            _ => None,
        };
        let c = Self {
            latent_channels,
            out_channels: usize_field(&v, "out_channels", 3)?,
            layers_per_block: usize_field(&v, "layers_per_block", 2)?,
            norm_num_groups: usize_field(&v, "norm_num_groups", 32)?,
            scaling_factor: f64_field(&v, "scaling_factor", Self::SDXL_SCALING_FACTOR),
            latents_mean_std,
            use_post_quant_conv: v
                .get("use_post_quant_conv")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            mid_block_add_attention: v
                .get("mid_block_add_attention")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            force_upcast: v
                .get("force_upcast")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            block_out_channels,
        };
        c.validate()
            .with_context(|| format!("{}: unsupported VAE config", path.display()))?;
        Ok(c)
    }

    /// Positive sizes, groups dividing the channels, a usable latent scale (a scaling factor
    /// of 0 would make every image black; a latent standard deviation of 0 likewise).
    pub fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > 8 {
            bail!(
                "block_out_channels has {} levels (1..=8)",
                self.block_out_channels.len()
            );
        }
        if self.norm_num_groups == 0 {
            bail!("norm_num_groups = 0");
        }
        for &c in &self.block_out_channels {
            if c == 0 || c > 1 << 16 || !c.is_multiple_of(self.norm_num_groups) {
                bail!(
                    "block_out_channels entry {c} is zero, too large, or not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                );
            }
        }
        for (what, v) in [
            ("latent_channels", self.latent_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if v == 0 || v > 1024 {
                bail!("{what} = {v} is out of range");
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!(
                "scaling_factor = {} is not a positive number",
                self.scaling_factor
            );
        }
        if let Some((mean, std)) = &self.latents_mean_std
            && (mean.iter().chain(std).any(|v| !v.is_finite()) || std.contains(&0.0))
        {
            bail!("latents_mean / latents_std hold a non-finite value or a zero deviation");
        }
        Ok(())
    }
}

/// The tiny VAE (diffusers' `AutoencoderTiny`, madebyollin's TAESD / TAESDXL): plain
/// 3×3 convolutions and ReLUs, no attention, no norms, latents used as they come
/// (`scaling_factor` 1 for TAESDXL).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub upsampling_scaling_factor: usize,
    pub scaling_factor: f64,
    /// `latent_magnitude` and `latent_shift` map latents to 8-bit values and back in TAESD's
    /// own round trip (`AutoencoderTiny.forward`); the pipelines' encode and decode never use
    /// them. Kept so a config reads back whole.
    pub latent_magnitude: f64,
    pub latent_shift: f64,
}

impl TinyVaeConfig {
    /// madebyollin/taesdxl's `config.json`.
    pub fn taesdxl() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            upsampling_scaling_factor: 2,
            scaling_factor: 1.0,
            latent_magnitude: 3.0,
            latent_shift: 0.5,
        }
    }

    /// Pixels per latent: each decoder level but the last upsamples.
    pub fn scale_factor(&self) -> usize {
        let levels = self.decoder_block_out_channels.len().saturating_sub(1) as u32;
        self.upsampling_scaling_factor.saturating_pow(levels)
    }

    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let d = Self::taesdxl();
        let list = |key: &str, default: &[usize]| -> Result<Vec<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default.to_vec()),
                Some(x) => serde_json::from_value(x.clone()).with_context(|| {
                    format!("{}: {key} is not a list of integers", path.display())
                }),
            }
        };
        for (key, only) in [("act_fn", "relu"), ("upsample_fn", "nearest")] {
            if let Some(x) = v.get(key).and_then(Value::as_str)
                && x != only
            {
                bail!(
                    "{}: {key} = {x:?} is not supported (the tiny VAE runs {only:?})",
                    path.display()
                );
            }
        }
        let field = |key: &str, default: usize| {
            usize_field(&v, key, default).with_context(|| path.display().to_string())
        };
        let c = Self {
            in_channels: field("in_channels", d.in_channels)?,
            out_channels: field("out_channels", d.out_channels)?,
            latent_channels: field("latent_channels", d.latent_channels)?,
            encoder_block_out_channels: list(
                "encoder_block_out_channels",
                &d.encoder_block_out_channels,
            )?,
            decoder_block_out_channels: list(
                "decoder_block_out_channels",
                &d.decoder_block_out_channels,
            )?,
            num_encoder_blocks: list("num_encoder_blocks", &d.num_encoder_blocks)?,
            num_decoder_blocks: list("num_decoder_blocks", &d.num_decoder_blocks)?,
            upsampling_scaling_factor: field(
                "upsampling_scaling_factor",
                d.upsampling_scaling_factor,
            )?,
            scaling_factor: f64_field(&v, "scaling_factor", d.scaling_factor),
            latent_magnitude: f64_field(&v, "latent_magnitude", d.latent_magnitude),
            latent_shift: f64_field(&v, "latent_shift", d.latent_shift),
        };
        c.validate()
            .with_context(|| format!("{}: unsupported tiny VAE config", path.display()))?;
        Ok(c)
    }

    /// Levels paired with their block counts, widths that a stranger's config cannot blow up,
    /// a usable latent scale.
    pub fn validate(&self) -> Result<()> {
        for (what, ch, blocks) in [
            (
                "encoder",
                &self.encoder_block_out_channels,
                &self.num_encoder_blocks,
            ),
            (
                "decoder",
                &self.decoder_block_out_channels,
                &self.num_decoder_blocks,
            ),
        ] {
            if ch.is_empty() || ch.len() > 8 || ch.len() != blocks.len() {
                bail!(
                    "{what}: {} levels of channels and {} of block counts (1..=8, the same)",
                    ch.len(),
                    blocks.len()
                );
            }
            if ch.iter().any(|&c| c == 0 || c > 1 << 14) || blocks.iter().any(|&b| b > 64) {
                bail!("{what}: a width or block count is out of range");
            }
            // Each level's first layer keeps the previous level's width.
            if ch.windows(2).any(|w| w[0] != w[1]) {
                bail!("{what}: levels of different widths ({ch:?}) do not chain");
            }
        }
        for (what, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            if v == 0 || v > 1024 {
                bail!("{what} = {v} is out of range");
            }
        }
        if !(1..=4).contains(&self.upsampling_scaling_factor) {
            bail!(
                "upsampling_scaling_factor = {} is out of range",
                self.upsampling_scaling_factor
            );
        }
        // The encoder halves the size per level (stride-2 convolutions).
        let encoder_scale = 1usize << (self.encoder_block_out_channels.len() - 1);
        if encoder_scale != self.scale_factor() {
            bail!(
                "the encoder scales by {encoder_scale}, the decoder by {}",
                self.scale_factor()
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!(
                "scaling_factor = {} is not a positive number",
                self.scaling_factor
            );
        }
        Ok(())
    }
}

/// Which autoencoder decodes (and, for img2img, encodes) the latents.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeArch {
    /// SDXL's own kind, `AutoencoderKL`.
    Kl(VaeConfig),
    /// `AutoencoderTiny` (TAESDXL).
    Tiny(TinyVaeConfig),
}

impl VaeArch {
    /// A VAE folder's `config.json`: `_class_name` picks the kind (`AutoencoderKL` when absent).
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        match v.get("_class_name").and_then(Value::as_str) {
            None | Some("AutoencoderKL") => Ok(Self::Kl(VaeConfig::from_diffusers_json(path)?)),
            Some("AutoencoderTiny") => Ok(Self::Tiny(TinyVaeConfig::from_diffusers_json(path)?)),
            Some(other) => bail!(
                "{}: a {other}, not a VAE dmd2 runs (AutoencoderKL or AutoencoderTiny)",
                path.display()
            ),
        }
    }

    /// The SDXL VAE's configuration, if this is one (the single-file writer, LoRA names and
    /// the model description need its blocks).
    pub fn kl(&self) -> Option<&VaeConfig> {
        match self {
            Self::Kl(c) => Some(c),
            Self::Tiny(_) => None,
        }
    }

    /// diffusers' class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }

    /// Pixels per latent along each axis (8 for SDXL's and TAESDXL).
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(c) => c.scale_factor(),
            Self::Tiny(c) => c.scale_factor(),
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.latent_channels,
            Self::Tiny(c) => c.latent_channels,
        }
    }

    /// Whether an f16 run decodes in f32 (`force_upcast`; always false for the tiny VAE,
    /// whose diffusers class registers it so).
    pub fn force_upcast(&self) -> bool {
        match self {
            Self::Kl(c) => c.force_upcast,
            Self::Tiny(_) => false,
        }
    }

    /// The widest feature map of a decode, in channels at full resolution (memory planning).
    pub fn full_resolution_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.block_out_channels.first().copied().unwrap_or(128),
            Self::Tiny(c) => c.decoder_block_out_channels.last().copied().unwrap_or(64),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Kl(c) => c.validate(),
            Self::Tiny(c) => c.validate(),
        }
    }
}

/// The noise schedule of a diffusers folder's `scheduler/scheduler_config.json`. DMD2's
/// sampler reproduces SDXL's: ε prediction on the scaled-linear betas from 0.00085 to 0.012
/// over 1000 steps. Other schedules (a v-prediction fine-tune, zero-terminal-SNR betas) would
/// give wrong images without a word, so they are refused by name; `timestep_spacing` is
/// honoured by the teacher samplers (DMD2 uses explicit timesteps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    pub timestep_spacing: Option<crate::scheduler::Spacing>,
}

impl SchedulerConfig {
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_value(&v).with_context(|| format!("{}: unsupported scheduler", path.display()))
    }

    pub fn from_value(v: &Value) -> Result<Self> {
        let text = |k: &str| v.get(k).and_then(Value::as_str);
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        match text("prediction_type") {
            None | Some("epsilon") => {}
            Some(other) => bail!(
                "prediction_type = {other:?}: dmd2 runs epsilon-prediction models only (SDXL base and its fine-tunes)"
            ),
        }
        match text("beta_schedule") {
            None | Some("scaled_linear") => {}
            Some(other) => bail!("beta_schedule = {other:?} (SDXL's is \"scaled_linear\")"),
        }
        for (key, want) in [
            ("beta_start", 0.00085),
            ("beta_end", 0.012),
            ("num_train_timesteps", 1000.0),
            ("steps_offset", 1.0),
        ] {
            if let Some(got) = num(key)
                && (got - want).abs() > 1e-9 * want.abs().max(1.0)
            {
                bail!("{key} = {got} (SDXL's is {want})");
            }
        }
        if let Some(Value::Array(_)) = v.get("trained_betas") {
            bail!("trained_betas: a custom beta list is not supported");
        }
        if v.get("rescale_betas_zero_snr").and_then(Value::as_bool) == Some(true) {
            bail!("rescale_betas_zero_snr = true is not supported");
        }
        let timestep_spacing = match text("timestep_spacing") {
            None => None,
            Some("leading") => Some(crate::scheduler::Spacing::Leading),
            Some("trailing") => Some(crate::scheduler::Spacing::Trailing),
            Some("linspace") => Some(crate::scheduler::Spacing::Linspace),
            Some(other) => bail!("timestep_spacing = {other:?} (leading, trailing or linspace)"),
        };
        Ok(Self { timestep_spacing })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::files::read_text(path, crate::files::limits::CONFIG)?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn usize_field(v: &Value, key: &str, default: usize) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("field {key} is not an integer")),
    }
}

fn f64_field(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// diffusers fields that are either one integer for all levels or one per level.
fn per_level(v: Option<&Value>, n: usize, default: usize) -> Result<Vec<usize>> {
    match v {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Number(x)) => Ok(vec![x.as_u64().context("not an integer")? as usize; n]),
        Some(Value::Array(a)) => {
            if a.len() != n {
                bail!("per-level list has {} entries, expected {n}", a.len());
            }
            a.iter().map(uniform_depth).collect()
        }
        Some(_) => bail!("per-level field has an unexpected type"),
    }
}

/// One level's entry of a per-level list: an integer, or (diffusers allows it for transformer
/// depths) one integer per layer of the level, which must then all be equal: the UNet here
/// has one depth per level, and silently taking the first of unequal depths would leave
/// weights unused.
fn uniform_depth(v: &Value) -> Result<usize> {
    match v {
        Value::Array(per_layer) => {
            let d: Vec<u64> = per_layer
                .iter()
                .map(|x| x.as_u64().context("per-level list holds non-integers"))
                .collect::<Result<_>>()?;
            match d.first() {
                Some(&first) if d.iter().all(|&x| x == first) => Ok(first as usize),
                Some(_) => bail!(
                    "transformer depths that differ between the layers of one level ({d:?}) \
                     are not supported"
                ),
                None => bail!("empty per-layer list"),
            }
        }
        other => other
            .as_u64()
            .map(|x| x as usize)
            .context("per-level list holds non-integers"),
    }
}

/// SDXL base 1.0's published configurations (stabilityai/stable-diffusion-xl-base-1.0),
/// used by the benchmarks to build full-size models with random weights. Loading never
/// relies on them: folders carry configs, single files are inferred from shapes.
pub mod sdxl_base {
    use super::*;

    pub fn unet() -> UNetConfig {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: 2,
            down_attention: vec![false, true, true],
            down_transformer_depth: vec![1, 2, 10],
            up_attention: vec![true, true, false],
            up_transformer_depth: vec![10, 2, 1],
            mid_transformer_depth: Some(10),
            heads: vec![5, 10, 20],
            cross_attention_dim: 2048,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection: true,
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 2816,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
        }
    }

    pub fn text_encoder() -> ClipConfig {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: None,
        }
    }

    pub fn text_encoder_2() -> ClipConfig {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
        }
    }

    pub fn vae() -> VaeConfig {
        VaeConfig {
            latent_channels: 4,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: VaeConfig::SDXL_SCALING_FACTOR,
            latents_mean_std: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vae_config(json: &str) -> Result<VaeConfig> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dmd2-vae-config-{}-{n}.json", std::process::id()));
        std::fs::write(&path, json)?;
        let c = VaeConfig::from_diffusers_json(&path);
        let _ = std::fs::remove_file(&path);
        c
    }

    #[test]
    fn unet_options_that_change_the_computation_are_refused_by_name() {
        let base = r#""block_out_channels": [32, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "addition_embed_type": "text_time""#;
        let parse = |extra: &str| {
            let v: Value = serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap();
            UNetConfig::from_diffusers_value(&v).map_err(|e| format!("{e:#}"))
        };
        // SDXL base's own values pass.
        parse(
            r#", "time_cond_proj_dim": null, "act_fn": "silu", "only_cross_attention": false,
            "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3, "mid_block_scale_factor": 1,
            "attention_type": "default", "dual_cross_attention": false"#,
        )
        .unwrap();
        for (extra, what) in [
            (r#", "time_cond_proj_dim": 256"#, "time_cond_proj_dim = 256"),
            (
                r#", "resnet_time_scale_shift": "scale_shift""#,
                "resnet_time_scale_shift",
            ),
            (
                r#", "only_cross_attention": [false, true]"#,
                "only_cross_attention",
            ),
            (r#", "act_fn": "gelu""#, "act_fn"),
            (
                r#", "mid_block_scale_factor": 1.5"#,
                "mid_block_scale_factor = 1.5",
            ),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(
                e.contains(what) && e.contains("not supported"),
                "{extra}: {e}"
            );
        }
        let v: Value = serde_json::from_str(&format!(
            "{{{}}}",
            base.replace("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"")
        ))
        .unwrap();
        let e = format!("{:#}", UNetConfig::from_diffusers_value(&v).unwrap_err());
        assert!(
            e.contains("SimpleCrossAttnDownBlock2D is not supported"),
            "{e}"
        );
    }

    #[test]
    fn transformer_depths_per_layer_must_be_uniform() {
        let unet = |depths: &str, reverse: &str| {
            let v: Value = serde_json::from_str(&format!(
                r#"{{"block_out_channels": [32, 64],
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                    "addition_embed_type": "text_time", "layers_per_block": 2,
                    "transformer_layers_per_block": {depths},
                    "reverse_transformer_layers_per_block": {reverse}}}"#
            ))
            .unwrap();
            UNetConfig::from_diffusers_value(&v)
        };
        let c = unet("[1, [3, 3]]", "null").unwrap();
        assert_eq!(c.down_transformer_depth, vec![1, 3]);
        assert_eq!(c.up_transformer_depth, vec![3, 1]);
        assert_eq!(c.mid_transformer_depth, Some(3));
        let c = unet("[1, 2]", "[[4, 4, 4], [1, 1, 1]]").unwrap();
        assert_eq!(c.up_transformer_depth, vec![4, 1]);
        for (depths, reverse) in [
            ("[1, [2, 3]]", "null"),
            ("[1, 2]", "[[4, 5, 4], [1, 1, 1]]"),
        ] {
            let e = format!("{:#}", unet(depths, reverse).unwrap_err());
            assert!(e.contains("differ between the layers of one level"), "{e}");
        }
    }

    #[test]
    fn vae_latent_statistics_need_both_lists_of_the_right_length() {
        let base = r#""block_out_channels": [32, 64], "latent_channels": 4"#;
        let c = vae_config(&format!("{{{base}}}")).unwrap();
        assert_eq!(c.latents_mean_std, None);
        assert!(c.use_post_quant_conv);
        assert_eq!(c.scaling_factor, VaeConfig::SDXL_SCALING_FACTOR);
        let c = vae_config(&format!(
            r#"{{{base}, "latents_mean": [0, 1, 2, 3], "latents_std": [1, 1, 1, 2], "use_post_quant_conv": false}}"#
        ))
        .unwrap();
        assert_eq!(
            c.latents_mean_std,
            Some((vec![0.0, 1.0, 2.0, 3.0], vec![1.0, 1.0, 1.0, 2.0]))
        );
        assert!(!c.use_post_quant_conv);
        // The pipeline uses the statistics only when both are present.
        let c = vae_config(&format!(
            r#"{{{base}, "latents_mean": [0, 1, 2, 3], "latents_std": null}}"#
        ))
        .unwrap();
        assert_eq!(c.latents_mean_std, None);
        let e = vae_config(&format!(
            r#"{{{base}, "latents_mean": [0, 1], "latents_std": [1, 1]}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("latents_mean has 2 entries for 4 latent channels"),
            "{e}"
        );
        let e = vae_config(&format!(
            r#"{{{base}, "latents_mean": "x", "latents_std": [1, 1, 1, 1]}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("latents_mean is not a list of numbers"), "{e}");
    }
}
