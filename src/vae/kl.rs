//! diffusers' `AutoencoderKL`, SDXL's own VAE: the decoder with SDXL's latent scale, and the
//! encoder that img2img and inpainting start from.

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
        let bf16 = self.to_q.is_packed_bf16();
        let o = nn::attention_tokens(&q, &k, &v, 1, (c as f64).powf(-0.5), false, bf16)?;
        let o = self
            .to_out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        o + x
    }
}

/// The mid block of both halves: resnet, self-attention (unless the config leaves it out),
/// resnet.
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn new(ch: usize, groups: usize, attention: bool, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| ResnetBlock::new(ch, ch, None, groups, VAE_EPS, vb.pp(format!("resnets.{j}"))))
            .collect::<Result<Vec<_>>>()?;
        let attention = if attention {
            Some(SpatialAttention::new(ch, groups, vb.pp("attentions.0"))?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    fn use_winograd(&mut self) -> Result<()> {
        for r in &mut self.resnets {
            r.use_winograd()?;
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

struct UpLevel {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
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
        let mid = MidBlock::new(top, g, c.mid_block_add_attention, d.pp("mid_block"))?;
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
        let mut vae = Self {
            post_quant_conv: if c.use_post_quant_conv {
                Some(nn::conv2d(
                    c.latent_channels,
                    c.latent_channels,
                    1,
                    1,
                    vb.pp("post_quant_conv"),
                )?)
            } else {
                None
            },
            conv_in: nn::conv2d(c.latent_channels, top, 3, 1, d.pp("conv_in"))?,
            mid,
            up,
            conv_norm_out: nn::group_norm(g, ch[0], VAE_EPS, d.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(ch[0], c.out_channels, 3, 1, d.pp("conv_out"))?,
            config: c.clone(),
        };
        // The decoder's full-resolution 3×3 convolutions dominate its time: on the CPU in
        // f32 they run as Winograd F(2×2, 3×3) (no-op for other dtypes and devices).
        vae.conv_in.use_winograd()?;
        vae.conv_out.use_winograd()?;
        vae.mid.use_winograd()?;
        for level in &mut vae.up {
            for r in &mut level.resnets {
                r.use_winograd()?;
            }
            if let Some(u) = &mut level.upsampler {
                u.use_winograd()?;
            }
        }
        Ok(vae)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decode sampler latents (not yet divided by the scaling factor) to images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_scaled(&self.unscale(latents)?)
    }

    /// Sampler latents to the VAE's latent space, as StableDiffusionXLPipeline does before
    /// `vae.decode`: `latents · std / scaling_factor + mean` when the VAE config has
    /// `latents_mean` and `latents_std`, else `latents / scaling_factor` (it ignores
    /// `shift_factor`).
    fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.config.latents_mean_std {
            None => Ok((latents / self.config.scaling_factor)?),
            Some((mean, std)) => {
                let per_channel = |v: &[f64]| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (1, mean.len(), 1, 1), latents.device())?
                        .to_dtype(latents.dtype())
                };
                let scaled =
                    (latents.broadcast_mul(&per_channel(std)?)? / self.config.scaling_factor)?;
                Ok(scaled.broadcast_add(&per_channel(mean)?)?)
            }
        }
    }

    /// Pixels per latent (2 per upsampling level: 8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << self.up.iter().filter(|l| l.upsampler.is_some()).count()
    }

    /// Decode in overlapping tiles of `tile` latents (square), as diffusers'
    /// `AutoencoderKL.tiled_decode`: tiles start every `⌊0.75·tile⌋` latents, each is decoded
    /// on its own, and the quarter-tile overlaps are blended linearly, top then left, into
    /// the tiles already placed. Peak memory is that of one tile's decode. Latents no larger
    /// than a tile are decoded whole.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        if tile == 0 || (h <= tile && w <= tile) {
            return self.decode(latents);
        }
        let z = self.unscale(latents)?;
        let f = self.scale_factor();
        let stride = (tile * 3 / 4).max(1);
        let tile_px = tile * f;
        let blend = tile_px / 4;
        let row_limit = tile_px - blend;
        // rows[i][j]: decoded tile (i, j) as [b, 3, th, tw] data, blended in place.
        let mut rows: Vec<Vec<Tile>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row = Vec::new();
            for j in (0..w).step_by(stride) {
                cancelled()?;
                let t = z
                    .narrow(2, i, tile.min(h - i))?
                    .narrow(3, j, tile.min(w - j))?;
                row.push(Tile::from_tensor(&self.decode_scaled(&t)?)?);
            }
            rows.push(row);
        }
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                if i > 0 {
                    let (above, cur) = rows.split_at_mut(i);
                    blend_v(&above[i - 1][j], &mut cur[0][j], blend);
                }
                if j > 0 {
                    let (left, cur) = rows[i].split_at_mut(j);
                    blend_h(&left[j - 1], &mut cur[0], blend);
                }
            }
        }
        // Crop each tile to row_limit and stitch.
        let (b, c) = (rows[0][0].b, rows[0][0].c);
        let out_h: usize = rows.iter().map(|r| r[0].h.min(row_limit)).sum();
        let out_w: usize = rows[0].iter().map(|t| t.w.min(row_limit)).sum();
        let mut out = vec![0f32; b * c * out_h * out_w];
        let mut y0 = 0;
        for row in &rows {
            let mut x0 = 0;
            for t in row {
                let (th, tw) = (t.h.min(row_limit), t.w.min(row_limit));
                for bc in 0..b * c {
                    for y in 0..th {
                        let src = &t.data[(bc * t.h + y) * t.w..][..tw];
                        out[(bc * out_h + y0 + y) * out_w + x0..][..tw].copy_from_slice(src);
                    }
                }
                x0 += tw;
            }
            y0 += row[0].h.min(row_limit);
        }
        Tensor::from_vec(out, (b, c, out_h, out_w), latents.device())
    }

    /// post_quant_conv + decoder on latents already divided by the scaling factor.
    fn decode_scaled(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.forward(&x)?;
        for level in &self.up {
            // A full-size decode takes many seconds on a CPU: stop between blocks when asked.
            cancelled()?;
            for res in &level.resnets {
                x = res.forward(&x, None)?;
            }
            if let Some(conv) = &level.upsampler {
                x = conv.forward_upsample2x(&x)?;
            }
        }
        self.conv_out
            .forward(&nn::group_norm_silu(&self.conv_norm_out, &x)?)
    }
}

struct DownLevel {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Conv2d>,
}

/// The VAE encoder (diffusers' `AutoencoderKL.encode` → `DiagonalGaussianDistribution`).
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv2d,
    down: Vec<DownLevel>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// `vb` points at the VAE's root (names `encoder.*`, `quant_conv.*`).
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let e = vb.pp("encoder");
        let mut down = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let vb = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
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
            let downsampler = if i + 1 < n {
                Some(nn::conv2d(out, out, 3, 2, vb.pp("downsamplers.0.conv"))?.without_padding())
            } else {
                None
            };
            down.push(DownLevel {
                resnets,
                downsampler,
            });
            prev = out;
        }
        let top = ch[n - 1];
        let mid = MidBlock::new(top, g, c.mid_block_add_attention, e.pp("mid_block"))?;
        let z = 2 * c.latent_channels;
        // diffusers' `use_quant_conv` goes with the file: present or not.
        let quant_conv = if vb.contains_tensor("quant_conv.weight") {
            Some(nn::conv2d(z, z, 1, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let mut enc = Self {
            conv_in: nn::conv2d(c.out_channels, ch[0], 3, 1, e.pp("conv_in"))?,
            down,
            mid,
            conv_norm_out: nn::group_norm(g, top, VAE_EPS, e.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(top, z, 3, 1, e.pp("conv_out"))?,
            quant_conv,
            config: c.clone(),
        };
        // As the decoder: the full-resolution 3×3 convolutions run as Winograd on the CPU
        // in f32 (the stride-2 downsamplers cannot).
        enc.conv_in.use_winograd()?;
        enc.conv_out.use_winograd()?;
        enc.mid.use_winograd()?;
        for r in enc.down.iter_mut().flat_map(|l| l.resnets.iter_mut()) {
            r.use_winograd()?;
        }
        Ok(enc)
    }

    /// The latent distribution of images in [-1, 1] `[B, 3, H, W]`: its mean and standard
    /// deviation, `[B, latent, H/8, W/8]` each (`logvar` clamped to [-30, 20], as diffusers).
    pub fn encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.conv_in.forward(image)?;
        for level in &self.down {
            cancelled()?;
            for res in &level.resnets {
                x = res.forward(&x, None)?;
            }
            if let Some(conv) = &level.downsampler {
                // Downsample2D(padding=0): one zero row and column at the bottom and right.
                x = conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        x = self.mid.forward(&x)?;
        let mut moments = self
            .conv_out
            .forward(&nn::group_norm_silu(&self.conv_norm_out, &x)?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }

    /// VAE latents to sampler latents, as the SDXL img2img and inpaint pipelines scale
    /// them: `(z − mean) · scaling_factor / std` with per-channel statistics, else
    /// `z · scaling_factor`.
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        match &self.config.latents_mean_std {
            None => z * self.config.scaling_factor,
            Some((mean, std)) => {
                let per_channel = |v: &[f64]| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (1, mean.len(), 1, 1), z.device())?.to_dtype(z.dtype())
                };
                (z.broadcast_sub(&per_channel(mean)?)? * self.config.scaling_factor)?
                    .broadcast_div(&per_channel(std)?)
            }
        }
    }
}

/// One decoded tile, `[b, c, h, w]` in f32 on the CPU.
struct Tile {
    data: Vec<f32>,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl Tile {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (b, c, h, w) = t.dims4()?;
        let data = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { data, b, c, h, w })
    }
}

/// diffusers' `blend_v`: the first rows of `b` fade in from the last rows of `a`.
fn blend_v(a: &Tile, b: &mut Tile, extent: usize) {
    let e = extent.min(a.h).min(b.h);
    for bc in 0..b.b * b.c {
        for y in 0..e {
            let t = y as f32 / e as f32;
            let ar = (bc * a.h + a.h - e + y) * a.w;
            let br = (bc * b.h + y) * b.w;
            for x in 0..b.w.min(a.w) {
                b.data[br + x] = a.data[ar + x] * (1.0 - t) + b.data[br + x] * t;
            }
        }
    }
}

/// diffusers' `blend_h`: the first columns of `b` fade in from the last columns of `a`.
fn blend_h(a: &Tile, b: &mut Tile, extent: usize) {
    let e = extent.min(a.w).min(b.w);
    for bc in 0..b.b * b.c {
        for y in 0..b.h.min(a.h) {
            let ar = (bc * a.h + y) * a.w + a.w - e;
            let br = (bc * b.h + y) * b.w;
            for x in 0..e {
                let t = x as f32 / e as f32;
                b.data[br + x] = a.data[ar + x] * (1.0 - t) + b.data[br + x] * t;
            }
        }
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

/// A stop request ([`crate::cancel`]) as a candle error (read back by
/// [`crate::cancel::interrupted`]).
fn cancelled() -> Result<()> {
    crate::cancel::check().map_err(|e| candle_core::Error::Msg(e.to_string()))
}
