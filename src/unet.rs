//! The SDXL UNet: diffusers' `UNet2DConditionModel` with `addition_embed_type = "text_time"`.
//!
//! Weight names follow diffusers' state dict. The added conditioning (pooled text embedding
//! plus the six size/crop ids) is what candle-transformers' UNet lacks.

use crate::config::UNetConfig;
use crate::nn;
use crate::nn::Linear;
use crate::nn::{Conv2d, GroupNorm};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// Transformer2DModel's own group norm epsilon (fixed in diffusers).
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb` is the time-embedding width, `None` for the VAE's blocks.
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(nn::conv2d(c_in, c_out, 1, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: nn::group_norm(groups, c_in, eps, vb.pp("norm1"))?,
            conv1: nn::conv2d(c_in, c_out, 3, 1, vb.pp("conv1"))?,
            time_emb_proj: match temb {
                Some(t) => Some(nn::linear(t, c_out, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: nn::group_norm(groups, c_out, eps, vb.pp("norm2"))?,
            conv2: nn::conv2d(c_out, c_out, 3, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// `emb_silu` is `silu(temb)`, computed once per forward by the caller.
    /// Winograd convolutions for both 3×3 convolutions (see [`Conv2d::use_winograd`]).
    pub fn use_winograd(&mut self) -> Result<()> {
        self.conv1.use_winograd()?;
        self.conv2.use_winograd()
    }

    /// The time embedding and the residual are added inside the convolutions (see
    /// [`Conv2d::forward_add`]).
    pub fn forward(&self, x: &Tensor, emb_silu: Option<&Tensor>) -> Result<Tensor> {
        let temb = match (&self.time_emb_proj, emb_silu) {
            (Some(proj), Some(e)) => Some(proj.forward(e)?),
            _ => None,
        };
        let h =
            self.conv1
                .forward_add(&nn::group_norm_silu(&self.norm1, x)?, temb.as_ref(), None)?;
        let shortcut = match &self.conv_shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(
            &nn::group_norm_silu(&self.norm2, &h)?,
            None,
            Some(&shortcut),
        )
    }
}

struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: nn::linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: nn::linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: nn::linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: nn::linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
        })
    }

    /// Attention of `x` over `context` (itself when `None`), plus `residual`.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let bf16 = self.to_q.is_packed_bf16();
        let o = nn::attention_tokens(&q, &k, &v, self.heads, self.scale, false, bf16)?;
        self.to_out.forward_add(&o, residual)
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, vb.pp("attn2"))?,
            norm3: nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: nn::linear(dim, inner * 2, vb.pp("ff.net.0.proj"))?,
            ff_out: nn::linear(inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), &x)?;
        // GEGLU: hidden, gate = proj(x).chunk(2); hidden * gelu(gate) (exact GELU)
        let h = self.ff_proj.forward_geglu(&self.norm3.forward(&x)?)?;
        self.ff_out.forward_add(&h, &x)
    }
}

enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(c: &UNetConfig, ch: usize, heads: usize, depth: usize, vb: VarBuilder) -> Result<Self> {
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(nn::linear(ch, ch, vb.pp("proj_in"))?),
                Proj::Linear(nn::linear(ch, ch, vb.pp("proj_out"))?),
            )
        } else {
            (
                Proj::Conv(nn::conv2d(ch, ch, 1, 1, vb.pp("proj_in"))?),
                Proj::Conv(nn::conv2d(ch, ch, 1, 1, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..depth)
            .map(|k| {
                BasicTransformerBlock::new(
                    ch,
                    c.cross_attention_dim,
                    heads,
                    vb.pp(format!("transformer_blocks.{k}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: nn::group_norm(c.norm_num_groups, ch, TRANSFORMER_NORM_EPS, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, ch, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_tokens =
            |t: Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch)) };
        let mut t = match &self.proj_in {
            Proj::Linear(l) => l.forward(&to_tokens(x)?)?,
            Proj::Conv(cv) => to_tokens(cv.forward(&x)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Proj::Linear(l) => to_image(l.forward(&t)?)?,
            Proj::Conv(cv) => cv.forward(&to_image(t)?)?,
        };
        out + residual
    }
}

struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    /// Downsampler (down path) or upsampler (up path).
    resample: Option<Conv2d>,
}

pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_linear_1: Linear,
    add_linear_2: Linear,
    down: Vec<Level>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Option<Transformer2D>,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    pub fn new(c: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = c.time_embed_dim();
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let c_in = if j == 0 {
                    if i == 0 { ch[0] } else { ch[i - 1] }
                } else {
                    ch[i]
                };
                resnets.push(ResnetBlock::new(
                    c_in,
                    ch[i],
                    Some(temb),
                    groups,
                    eps,
                    vb.pp(format!("resnets.{j}")),
                )?);
                if c.down_attention[i] {
                    attentions.push(Transformer2D::new(
                        c,
                        ch[i],
                        c.heads[i],
                        c.down_transformer_depth[i],
                        vb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(nn::conv2d(
                    ch[i],
                    ch[i],
                    3,
                    2,
                    vb.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down.push(Level {
                resnets,
                attentions,
                resample,
            });
        }
        let mid_vb = vb.pp("mid_block");
        // diffusers' UNetMidBlock2D (no attention, as in SSD-1B) has a single resnet.
        let mid_count = if c.mid_transformer_depth.is_some() {
            2
        } else {
            1
        };
        let mid_resnets = (0..mid_count)
            .map(|j| {
                ResnetBlock::new(
                    ch[n - 1],
                    ch[n - 1],
                    Some(temb),
                    groups,
                    eps,
                    mid_vb.pp(format!("resnets.{j}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_attention = match c.mid_transformer_depth {
            Some(d) => Some(Transformer2D::new(
                c,
                ch[n - 1],
                c.heads[n - 1],
                d,
                mid_vb.pp("attentions.0"),
            )?),
            None => None,
        };
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = n - 1 - i;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_out = if i == 0 { ch[n - 1] } else { ch[level + 1] };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=c.layers_per_block {
                // Skip connections come back in reverse: the last one of a level is the
                // output of the level below (or the downsampler input).
                let skip = if j == c.layers_per_block {
                    if level == 0 { ch[0] } else { ch[level - 1] }
                } else {
                    ch[level]
                };
                let res_in = if j == 0 { prev_out } else { ch[level] };
                resnets.push(ResnetBlock::new(
                    res_in + skip,
                    ch[level],
                    Some(temb),
                    groups,
                    eps,
                    vb.pp(format!("resnets.{j}")),
                )?);
                if c.up_attention[i] {
                    attentions.push(Transformer2D::new(
                        c,
                        ch[level],
                        c.heads[level],
                        c.up_transformer_depth[i],
                        vb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(nn::conv2d(
                    ch[level],
                    ch[level],
                    3,
                    1,
                    vb.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up.push(Level {
                resnets,
                attentions,
                resample,
            });
        }
        Ok(Self {
            conv_in: nn::conv2d(c.in_channels, ch[0], 3, 1, vb.pp("conv_in"))?,
            time_linear_1: nn::linear(ch[0], temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: nn::linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            add_linear_1: nn::linear(
                c.projection_class_embeddings_input_dim,
                temb,
                vb.pp("add_embedding.linear_1"),
            )?,
            add_linear_2: nn::linear(temb, temb, vb.pp("add_embedding.linear_2"))?,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: nn::group_norm(groups, ch[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(ch[0], c.out_channels, 3, 1, vb.pp("conv_out"))?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predict ε. `sample` `[b, 4, h, w]`; `timestep` the same for the whole batch;
    /// `context` `[b, 77, cross]`; `text_embeds` `[b, pooled]`; `time_ids` `[b, 6]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        crate::kernels::in_pool(|| {
            self.forward_impl(sample, timestep, context, text_embeds, time_ids)
        })
    }

    fn forward_impl(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let b = sample.dim(0)?;
        let dtype = sample.dtype();
        let dev = sample.device();
        // Embeddings in f32 whatever the model dtype, as diffusers does.
        let t = Tensor::full(timestep as f32, b, dev)?;
        let t_emb =
            nn::timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
                .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&nn::silu(&self.time_linear_1.forward(&t_emb)?)?)?;
        let ids = time_ids.to_dtype(DType::F32)?.flatten_all()?;
        let time_embeds = nn::timestep_embedding(
            &ids,
            c.addition_time_embed_dim,
            c.flip_sin_to_cos,
            c.freq_shift,
        )?
        .reshape((b, 6 * c.addition_time_embed_dim))?
        .to_dtype(dtype)?;
        let add = Tensor::cat(&[text_embeds.to_dtype(dtype)?, time_embeds], 1)?;
        let aug = self
            .add_linear_2
            .forward(&nn::silu(&self.add_linear_1.forward(&add)?)?)?;
        let emb = (emb + aug)?;
        let emb_silu = nn::silu(&emb)?;
        let context = context.to_dtype(dtype)?;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, res) in level.resnets.iter().enumerate() {
                x = res.forward(&x, Some(&emb_silu))?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &level.resample {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, Some(&emb_silu))?;
        if let Some(attn) = &self.mid_attention {
            x = attn.forward(&x, &context)?;
        }
        for res in &self.mid_resnets[1..] {
            x = res.forward(&x, Some(&emb_silu))?;
        }
        for level in &self.up {
            for (j, res) in level.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                x = res.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb_silu))?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
            }
            if let Some(up) = &level.resample {
                // Upsample to the size of the skip it meets next (diffusers'
                // `forward_upsample_size`), which differs from 2x for odd latent sizes.
                let (h, w) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = if (h, w) == (x.dim(2)? * 2, x.dim(3)? * 2) {
                    up.forward_upsample2x(&x)?
                } else {
                    up.forward(&x.upsample_nearest2d(h, w)?)?
                };
            }
        }
        self.conv_out
            .forward(&nn::group_norm_silu(&self.conv_norm_out, &x)?)
    }
}
