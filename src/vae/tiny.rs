//! The tiny VAE: diffusers' `AutoencoderTiny` (madebyollin's TAESD; TAESDXL for SDXL's
//! latents), about a hundredth of the SDXL VAE's work.
//!
//! Both halves are `nn.Sequential` stacks, so their weights are numbered by position
//! (`decoder.layers.N.*`, `encoder.layers.N.*`), counting the layers without weights (ReLU,
//! Upsample) too; the numbering below follows diffusers' `DecoderTiny` and `EncoderTiny`:
//! - decoder: `tanh(z / 3) · 3`, conv latent→C, ReLU, then per level its blocks, a ×2
//!   nearest upsample and a bias-free conv (the last level: its blocks and the output conv,
//!   with bias); the output `x · 2 − 1` is in [-1, 1] like the SDXL VAE's.
//! - encoder: `(x + 1) / 2`, conv in→C, its blocks, then per further level a bias-free
//!   stride-2 conv and its blocks; conv C→latent.
//! - a block: `relu(conv(relu(conv(relu(conv(x))))) + x)`.

use crate::config::TinyVaeConfig;
use crate::nn::{self, Conv2d};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `AutoencoderTinyBlock` with equal input and output widths (no skip convolution).
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |i: usize| nn::conv2d(c, c, 3, 1, vb.pp(format!("conv.{i}")));
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward_relu(x, None)?;
        let h = self.convs[1].forward_relu(&h, None)?;
        // The residual sum runs in the convolution's accumulator.
        self.convs[2].forward_relu(&h, Some(x))
    }

    fn use_winograd(&mut self) -> Result<()> {
        self.convs.iter_mut().try_for_each(Conv2d::use_winograd)
    }
}

enum Layer {
    /// A convolution, then a ReLU when `relu`.
    Conv {
        conv: Conv2d,
        relu: bool,
    },
    Block(Block),
    /// Nearest-neighbour upsampling by `factor`, then the (bias-free) convolution.
    UpsampleConv {
        factor: usize,
        conv: Conv2d,
    },
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv { conv, relu: true } => conv.forward_relu(x, None),
            Layer::Conv { conv, relu: false } => conv.forward(x),
            Layer::Block(b) => b.forward(x),
            Layer::UpsampleConv { factor: 2, conv } => conv.forward_upsample2x(x),
            Layer::UpsampleConv { factor, conv } => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(h * factor, w * factor)?)
            }
        }
    }

    fn use_winograd(&mut self) -> Result<()> {
        match self {
            Layer::Conv { conv, .. } => conv.use_winograd(),
            Layer::Block(b) => b.use_winograd(),
            // Winograd reads the small map in place for a ×2 upsampling too.
            Layer::UpsampleConv { conv, .. } => conv.use_winograd(),
        }
    }
}

fn run(layers: &[Layer], mut x: Tensor) -> Result<Tensor> {
    for l in layers {
        crate::cancel::check().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        x = l.forward(&x)?;
    }
    Ok(x)
}

/// One layer of a tiny VAE half, at its `nn.Sequential` index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    Conv {
        c_in: usize,
        c_out: usize,
        stride: usize,
        bias: bool,
        relu: bool,
    },
    Block {
        c: usize,
    },
    UpsampleConv {
        c: usize,
        factor: usize,
    },
}

/// `DecoderTiny`'s layers with their indices (ReLU and Upsample take an index each).
fn decoder_layout(c: &TinyVaeConfig) -> Vec<(usize, Spec)> {
    let ch = &c.decoder_block_out_channels;
    let mut out = vec![(
        0,
        Spec::Conv {
            c_in: c.latent_channels,
            c_out: ch[0],
            stride: 1,
            bias: true,
            relu: true,
        },
    )];
    // Index 1 is that ReLU.
    let mut idx = 2;
    let levels = c.num_decoder_blocks.len();
    for (i, &blocks) in c.num_decoder_blocks.iter().enumerate() {
        let width = ch[i];
        for _ in 0..blocks {
            out.push((idx, Spec::Block { c: width }));
            idx += 1;
        }
        if i + 1 < levels {
            // The Upsample at idx has no weights.
            idx += 1;
            out.push((
                idx,
                Spec::UpsampleConv {
                    c: width,
                    factor: c.upsampling_scaling_factor,
                },
            ));
        } else {
            out.push((
                idx,
                Spec::Conv {
                    c_in: width,
                    c_out: c.out_channels,
                    stride: 1,
                    bias: true,
                    relu: false,
                },
            ));
        }
        idx += 1;
    }
    out
}

/// `EncoderTiny`'s layers with their indices.
fn encoder_layout(c: &TinyVaeConfig) -> Vec<(usize, Spec)> {
    let ch = &c.encoder_block_out_channels;
    let mut out = Vec::new();
    let mut idx = 0;
    for (i, &blocks) in c.num_encoder_blocks.iter().enumerate() {
        let width = ch[i];
        let (c_in, stride, bias) = if i == 0 {
            (c.in_channels, 1, true)
        } else {
            (width, 2, false)
        };
        out.push((
            idx,
            Spec::Conv {
                c_in,
                c_out: width,
                stride,
                bias,
                relu: false,
            },
        ));
        idx += 1;
        for _ in 0..blocks {
            out.push((idx, Spec::Block { c: width }));
            idx += 1;
        }
    }
    out.push((
        idx,
        Spec::Conv {
            c_in: ch[ch.len() - 1],
            c_out: c.latent_channels,
            stride: 1,
            bias: true,
            relu: false,
        },
    ));
    out
}

fn build(layout: &[(usize, Spec)], vb: VarBuilder) -> Result<Vec<Layer>> {
    let mut layers = layout
        .iter()
        .map(|&(idx, spec)| {
            let vb = vb.pp(idx);
            Ok(match spec {
                Spec::Conv {
                    c_in,
                    c_out,
                    stride,
                    bias,
                    relu,
                } => Layer::Conv {
                    conv: if bias {
                        nn::conv2d(c_in, c_out, 3, stride, vb)?
                    } else {
                        nn::conv2d_no_bias(c_in, c_out, 3, stride, vb)?
                    },
                    relu,
                },
                Spec::Block { c } => Layer::Block(Block::new(c, vb)?),
                Spec::UpsampleConv { c, factor } => Layer::UpsampleConv {
                    factor,
                    conv: nn::conv2d_no_bias(c, c, 3, 1, vb)?,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    layers.iter_mut().try_for_each(Layer::use_winograd)?;
    Ok(layers)
}

/// Every tensor of a tiny VAE of this configuration, with its shape (diffusers names).
pub fn tensor_shapes(c: &TinyVaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (half, layout) in [
        ("decoder", decoder_layout(c)),
        ("encoder", encoder_layout(c)),
    ] {
        for (idx, spec) in layout {
            let p = format!("{half}.layers.{idx}");
            let conv = |out: &mut Vec<_>, name: String, c_in, c_out, bias| {
                out.push((format!("{name}.weight"), vec![c_out, c_in, 3, 3]));
                if bias {
                    out.push((format!("{name}.bias"), vec![c_out]));
                }
            };
            match spec {
                Spec::Conv {
                    c_in, c_out, bias, ..
                } => conv(&mut out, p, c_in, c_out, bias),
                Spec::Block { c } => {
                    for i in [0, 2, 4] {
                        conv(&mut out, format!("{p}.conv.{i}"), c, c, true);
                    }
                }
                Spec::UpsampleConv { c, .. } => conv(&mut out, p, c, c, false),
            }
        }
    }
    out
}

/// `DecoderTiny`, with the latent scale of its `AutoencoderTiny`.
pub struct TinyDecoder {
    config: TinyVaeConfig,
    layers: Vec<Layer>,
}

impl TinyDecoder {
    /// `vb` points at the VAE's root (names `decoder.layers.N.*`).
    pub fn new(c: &TinyVaeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            config: c.clone(),
            layers: build(&decoder_layout(c), vb.pp("decoder.layers"))?,
        })
    }

    pub fn config(&self) -> &TinyVaeConfig {
        &self.config
    }

    /// Sampler latents to images in [-1, 1] `[B, 3, H, W]`: `latents / scaling_factor` (the
    /// SDXL pipeline's step before `vae.decode`), then `DecoderTiny.forward`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.config.scaling_factor)?;
        // Soft clamp of the latents to (-3, 3).
        let z = ((z / 3.0)?.tanh()? * 3.0)?;
        let x = run(&self.layers, z)?;
        (x * 2.0)? - 1.0
    }

    /// Pixels per latent along each axis.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }
}

/// `EncoderTiny`: images straight to latents (no distribution to sample, so img2img makes no
/// draw from the generator for it, as diffusers' `retrieve_latents` takes `.latents`).
pub struct TinyEncoder {
    config: TinyVaeConfig,
    layers: Vec<Layer>,
}

impl TinyEncoder {
    /// `vb` points at the VAE's root (names `encoder.layers.N.*`).
    pub fn new(c: &TinyVaeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            config: c.clone(),
            layers: build(&encoder_layout(c), vb.pp("encoder.layers"))?,
        })
    }

    /// Images in [-1, 1] `[B, 3, H, W]` to sampler latents: `EncoderTiny.forward` times
    /// `scaling_factor` (the img2img pipeline's scaling).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let x = ((image + 1.0)? / 2.0)?;
        run(&self.layers, x)? * self.config.scaling_factor
    }
}
