//! The autoencoders between latents and pixels: SDXL's own kind ([`kl`], diffusers'
//! `AutoencoderKL`) and the tiny one ([`tiny`], `AutoencoderTiny`: TAESDXL), behind one
//! [`Vae`] (decoding) and one [`Encoder`] (img2img), so the pipeline does not care which.

pub mod kl;
pub mod tiny;

pub use kl::{VaeDecoder, VaeEncoder, to_rgb8};
pub use tiny::{TinyDecoder, TinyEncoder};

use crate::config::VaeArch;
use crate::rng::TorchRng;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// A VAE's decoder, with its latent scaling.
pub enum Vae {
    Kl(Box<VaeDecoder>),
    Tiny(TinyDecoder),
}

impl Vae {
    /// `vb` points at the VAE's root.
    pub fn new(arch: &VaeArch, vb: VarBuilder) -> Result<Self> {
        Ok(match arch {
            VaeArch::Kl(c) => Self::Kl(Box::new(VaeDecoder::new(c, vb)?)),
            VaeArch::Tiny(c) => Self::Tiny(TinyDecoder::new(c, vb)?),
        })
    }

    /// Sampler latents to images in [-1, 1], `[B, 3, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Self::Kl(d) => d.decode(latents),
            Self::Tiny(d) => d.decode(latents),
        }
    }

    /// [`VaeDecoder::decode_tiled`] for SDXL's VAE. The tiny VAE decodes whole: a 1024²
    /// decode holds a few 64-channel maps (under 0.3 GB each), so tiles would save little.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize) -> Result<Tensor> {
        match self {
            Self::Kl(d) => d.decode_tiled(latents, tile),
            Self::Tiny(d) => d.decode(latents),
        }
    }

    /// Whether [`Vae::decode_tiled`] really tiles.
    pub fn tiles(&self) -> bool {
        matches!(self, Self::Kl(_))
    }

    /// Pixels per latent along each axis (8 for SDXL's VAE and TAESDXL).
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(d) => d.scale_factor(),
            Self::Tiny(d) => d.scale_factor(),
        }
    }
}

/// A VAE's encoder, for img2img and inpainting.
pub enum Encoder {
    Kl(Box<VaeEncoder>),
    Tiny(TinyEncoder),
}

impl Encoder {
    pub fn new(arch: &VaeArch, vb: VarBuilder) -> Result<Self> {
        Ok(match arch {
            VaeArch::Kl(c) => Self::Kl(Box::new(VaeEncoder::new(c, vb)?)),
            VaeArch::Tiny(c) => Self::Tiny(TinyEncoder::new(c, vb)?),
        })
    }

    /// Whether encoding draws from the generator (SDXL's VAE samples its latent
    /// distribution; the tiny VAE does not).
    pub fn samples(&self) -> bool {
        matches!(self, Self::Kl(_))
    }

    /// Images in [-1, 1] to sampler latents, as diffusers' `retrieve_latents` and the SDXL
    /// img2img pipeline's scaling: SDXL's VAE samples its latent distribution (one draw from
    /// each image's generator), the tiny VAE's latents are taken as they come (no draw).
    pub fn encode(&self, image: &Tensor, rngs: &mut [TorchRng]) -> Result<Tensor> {
        match self {
            Self::Kl(e) => {
                let (mean, std) = e.encode(image)?;
                let draw = crate::scheduler::noise_like(&mean, rngs)?;
                e.scale(&(mean + (std * draw)?)?)
            }
            Self::Tiny(e) => e.encode(image),
        }
    }
}
