//! The VAE decoder (diffusers' `AutoencoderKL.decode`), with SDXL's latent scale.

use crate::config::VaeConfig;
use crate::nn;
use crate::nn::Linear;
use crate::nn::{Conv2d, GroupNorm};
use crate::unet::ResnetBlock;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// diffusers builds the VAE's resnets, attention and output norm with eps 1e-6.
const VAE_EPS: f64 = 1e-6;

/// Mid-block self-attention: one head as wide as the channels, with a residual.
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: nn::group_norm(groups, ch, VAE_EPS, vb.pp("group_norm"))?,
            to_q: nn::linear(ch, ch, vb.pp("to_q"))?,
            to_k: nn::linear(ch, ch, vb.pp("to_k"))?,
            to_v: nn::linear(ch, ch, vb.pp("to_v"))?,
            to_out: nn::linear(ch, ch, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let o = nn::attention_tokens(&q, &k, &v, 1, (c as f64).powf(-0.5), false)?;
        let o = self
            .to_out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        o + x
    }
}

struct UpLevel {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Option<SpatialAttention>,
    up: Vec<UpLevel>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// `vb` points at the VAE's root (names `post_quant_conv.*`, `decoder.*`).
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let d = vb.pp("decoder");
        let top = ch[n - 1];
        let mid_resnets = (0..2)
            .map(|j| {
                ResnetBlock::new(
                    top,
                    top,
                    None,
                    g,
                    VAE_EPS,
                    d.pp(format!("mid_block.resnets.{j}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_attention = if c.mid_block_add_attention {
            Some(SpatialAttention::new(
                top,
                g,
                d.pp("mid_block.attentions.0"),
            )?)
        } else {
            None
        };
        let mut up = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let out = ch[n - 1 - i];
            let vb = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        if j == 0 { prev } else { out },
                        out,
                        None,
                        g,
                        VAE_EPS,
                        vb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(nn::conv2d(out, out, 3, 1, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push(UpLevel { resnets, upsampler });
            prev = out;
        }
        Ok(Self {
            post_quant_conv: nn::conv2d(
                c.latent_channels,
                c.latent_channels,
                1,
                1,
                vb.pp("post_quant_conv"),
            )?,
            conv_in: nn::conv2d(c.latent_channels, top, 3, 1, d.pp("conv_in"))?,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: nn::group_norm(g, ch[0], VAE_EPS, d.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(ch[0], c.out_channels, 3, 1, d.pp("conv_out"))?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decode sampler latents (not yet divided by the scaling factor) to images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        // The SDXL pipeline divides by the scaling factor only (no shift_factor).
        let z = (latents / self.config.scaling_factor)?;
        let z = self.post_quant_conv.forward(&z)?;
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        if let Some(attn) = &self.mid_attention {
            x = attn.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, None)?;
        for level in &self.up {
            for res in &level.resnets {
                x = res.forward(&x, None)?;
            }
            if let Some(conv) = &level.upsampler {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(h * 2, w * 2)?)?;
            }
        }
        self.conv_out
            .forward(&nn::group_norm_silu(&self.conv_norm_out, &x)?)
    }
}

/// diffusers' post-processing: `(x / 2 + 0.5).clamp(0, 1)`, ×255, rounded, to 8-bit RGB.
/// Input `[3, h, w]` f32; output row-major RGB bytes.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let x = ((image.to_dtype(candle_core::DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // numpy rounds half to even; so does f32::round_ties_even.
    Ok(x.into_iter().map(|v| v.round_ties_even() as u8).collect())
}
