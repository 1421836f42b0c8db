//! Previews while an image is made: after every step (or every `every`-th) the sampler's
//! current estimate of the clean latents — DMD2 predicts x0 at each step, so a preview costs
//! only a decode — becomes a small RGB image handed to a sink (the CLI rewrites a PNG).
//!
//! Two decoders: a tiny VAE (TAESDXL; the whole image at full size, a few hundred
//! milliseconds on a CPU at 1024²), or with none a fixed linear map of the four latent
//! channels to RGB at latent size (1/8 of each side), free.

use crate::vae::Vae;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// SDXL latents to RGB in [-1, 1], one row per latent channel (R, G, B), plus a bias: the
/// factors ComfyUI fitted for its latent previews (`comfy/latent_formats.py`, class `SDXL`,
/// `latent_rgb_factors` and `latent_rgb_factors_bias`), applied to the sampler's latents.
pub const SDXL_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
pub const SDXL_LATENT_RGB_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// How previews are decoded.
pub enum PreviewDecoder {
    /// [`SDXL_LATENT_RGB`] at latent resolution.
    Linear,
    /// A VAE (usually the tiny one) at full resolution.
    Vae(Box<Vae>),
}

/// One preview: the batch's images side by side, 8-bit RGB.
pub struct PreviewImage<'a> {
    /// Steps done (1-based) and the total of this pass.
    pub step: usize,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub rgb: &'a [u8],
}

pub type PreviewSink = Box<dyn FnMut(&PreviewImage) -> Result<()> + Send>;

/// Decoder, cadence and sink of a run's previews.
pub struct Preview {
    pub decoder: PreviewDecoder,
    /// A preview after every `every`-th step, and after the last.
    pub every: usize,
    pub sink: PreviewSink,
}

impl Preview {
    /// Called after step `step` of `steps` with the sampler's x0 estimate `[B, 4, h, w]`.
    pub fn show(&mut self, step: usize, steps: usize, x0: &Tensor) -> Result<()> {
        if !(step.is_multiple_of(self.every.max(1)) || step == steps) {
            return Ok(());
        }
        let (width, height, rgb) = match &self.decoder {
            PreviewDecoder::Linear => linear_rgb(x0)?,
            PreviewDecoder::Vae(vae) => {
                let x = vae.decode(&x0.to_dtype(DType::F32)?)?;
                side_by_side(&x)?
            }
        };
        (self.sink)(&PreviewImage {
            step,
            steps,
            width,
            height,
            rgb: &rgb,
        })
    }
}

/// The batch `[B, 3, H, W]` in [-1, 1] as one 8-bit RGB image `B·W` wide, with diffusers'
/// post-processing.
fn side_by_side(x: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (b, _, h, w) = x.dims4()?;
    let images: Vec<Tensor> = (0..b)
        .map(|i| x.get(i))
        .collect::<candle_core::Result<_>>()?;
    let strip = Tensor::cat(&images, 2)?.to_device(&Device::Cpu)?;
    Ok((w * b, h, crate::vae::to_rgb8(&strip)?))
}

/// [`SDXL_LATENT_RGB`] on latents `[B, 4, h, w]`, then ComfyUI's `preview_to_image`:
/// `((rgb + 1) / 2).clamp(0, 1) · 255`, truncated to 8 bits. Images side by side.
pub fn linear_rgb(x0: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (b, c, h, w) = x0.dims4()?;
    if c != SDXL_LATENT_RGB.len() {
        anyhow::bail!("a linear preview needs 4 latent channels, not {c}");
    }
    let v = x0
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let width = w * b;
    let mut rgb = vec![0u8; width * h * 3];
    for img in 0..b {
        for y in 0..h {
            for x in 0..w {
                let px = (y * width + img * w + x) * 3;
                for (k, bias) in SDXL_LATENT_RGB_BIAS.iter().enumerate() {
                    let mut s = *bias;
                    for (ch, row) in SDXL_LATENT_RGB.iter().enumerate() {
                        s += row[k] * v[((img * c + ch) * h + y) * w + x];
                    }
                    rgb[px + k] = (((s + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8;
                }
            }
        }
    }
    Ok((width, h, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero latents show the bias; one channel at a time shows its row of factors.
    #[test]
    fn linear_preview_applies_the_factors() {
        let mut v = vec![0f32; 2 * 4 * 2 * 3];
        // Image 1, channel 0, pixel (1, 2) = 1.
        v[((4) * 2 + 1) * 3 + 2] = 1.0;
        let x = Tensor::from_vec(v, (2, 4, 2, 3), &Device::Cpu).unwrap();
        let (w, h, rgb) = linear_rgb(&x).unwrap();
        assert_eq!((w, h), (6, 2));
        let byte = |s: f32| (((s + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8;
        for k in 0..3 {
            assert_eq!(rgb[k], byte(SDXL_LATENT_RGB_BIAS[k]));
            let px = (w + 3 + 2) * 3;
            assert_eq!(
                rgb[px + k],
                byte(SDXL_LATENT_RGB_BIAS[k] + SDXL_LATENT_RGB[0][k])
            );
        }
    }
}
