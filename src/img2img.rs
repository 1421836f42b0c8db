//! Starting from an image (diffusers' `StableDiffusionXLImg2ImgPipeline` and, for a
//! 4-channel UNet, `StableDiffusionXLInpaintPipeline`, with `LCMScheduler` at explicit
//! timesteps): which timesteps run for a strength, and noising latents to a timestep.

use anyhow::{Result, bail};
use candle_core::Tensor;

/// What an image starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// `[1, 3, H, W]` in [-1, 1] (f32, CPU), already the size of the image to make; or
    /// sampler latents `[1, 4, H/8, W/8]` (a latent upscale), which are not encoded again
    /// (diffusers' img2img given a 4-channel image).
    pub image: Tensor,
    /// `[1, 1, H, W]`, 1 where the image is repainted, 0 where it is kept (binarized).
    pub mask: Option<Tensor>,
    /// How much of the timestep list runs, in (0, 1].
    pub strength: f64,
    /// Inpainting's paste-back: `[1, 1, H, W]` in [0, 1], the share of the new image in each
    /// pixel (the rest is the init image's).
    pub paste_alpha: Option<Tensor>,
}

/// The hires fix: the image made again at `scale` times the size, from its upscaled self.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hires {
    pub scale: f64,
    pub upscaler: HiresUpscaler,
    /// img2img strength of the second pass.
    pub strength: f64,
    /// The second pass's timestep list before the strength cuts it (DMD2's for this many
    /// steps).
    pub steps: usize,
}

/// How the first image is enlarged: in pixels (PIL's Lanczos on the 8-bit image, as saving
/// it and resizing would), or its latents (A1111's "Latent" = bilinear, "Latent (nearest)").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum HiresUpscaler {
    Lanczos,
    Latent,
    LatentNearest,
}

impl HiresUpscaler {
    /// A1111's name, for the PNG's `Hires upscaler`.
    pub fn a1111_name(self) -> &'static str {
        match self {
            HiresUpscaler::Lanczos => "Lanczos",
            HiresUpscaler::Latent => "Latent",
            HiresUpscaler::LatentNearest => "Latent (nearest)",
        }
    }
}

impl Hires {
    /// DMD2 users' second pass: half strength (499, 249 of 4 steps).
    pub const DEFAULT_STRENGTH: f64 = 0.5;

    /// The second pass's size: each side × scale, down to a multiple of 8 (as A1111).
    pub fn size(&self, width: usize, height: usize) -> (usize, usize) {
        let f = |v: usize| ((v as f64 * self.scale) as usize) / 8 * 8;
        (f(width), f(height))
    }
}

/// torch's `F.interpolate` of latents `[B, C, h, w]` to `[B, C, H, W]`: `nearest` (source
/// index ⌊i·h/H⌋) or `bilinear` with `align_corners=False`.
pub fn upscale_latents(x: &Tensor, height: usize, width: usize, bilinear: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let v = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Per output coordinate: two source indices and the weight of the second.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        (0..n_out)
            .map(|i| {
                if !bilinear {
                    let s = (i * n_in) / n_out;
                    return (s, s, 0.0);
                }
                let src = ((i as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, (src - i0 as f64) as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, height), taps(w, width));
    let mut out = Vec::with_capacity(b * c * height * width);
    for plane in v.chunks_exact(h * w) {
        for &(y0, y1, ly) in &ty {
            for &(x0, x1, lx) in &tx {
                let p = |y: usize, x: usize| plane[y * w + x];
                let top = p(y0, x0) * (1.0 - lx) + p(y0, x1) * lx;
                let bottom = p(y1, x0) * (1.0 - lx) + p(y1, x1) * lx;
                out.push(top * (1.0 - ly) + bottom * ly);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, height, width), x.device())?)
}

/// diffusers' default strengths: img2img 0.3; inpainting 0.9999 (with 4 steps: 3 of them).
pub const DEFAULT_STRENGTH: f64 = 0.3;
pub const DEFAULT_INPAINT_STRENGTH: f64 = 0.9999;

/// The tail of `timesteps` a strength keeps, as the pipelines' `get_timesteps`:
/// `init = min(int(N · strength), N)`, run `timesteps[N − init:]`.
pub fn strength_timesteps(timesteps: &[usize], strength: f64) -> Result<Vec<usize>> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail!("strength must be in (0, 1], not {strength}");
    }
    let n = timesteps.len();
    let init = ((n as f64 * strength) as usize).min(n);
    if init == 0 {
        bail!(
            "strength {strength} runs none of the {n} timesteps {timesteps:?}: use at least {} (each 1/{n} of strength runs one more step)",
            1.0 / n as f64
        );
    }
    Ok(timesteps[n - init..].to_vec())
}

/// `LCMScheduler.add_noise`: `√ᾱₜ · x + √(1 − ᾱₜ) · noise`.
pub fn add_noise(x: &Tensor, noise: &Tensor, t: usize) -> candle_core::Result<Tensor> {
    let a = crate::scheduler::dmd2::sdxl_alphas_cumprod()[t];
    (x * a.sqrt() as f64)? + (noise * (1.0 - a).sqrt() as f64)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_cuts_the_list_from_the_front() {
        let ts = [999, 749, 499, 249];
        assert_eq!(strength_timesteps(&ts, 0.5).unwrap(), [499, 249]);
        assert_eq!(strength_timesteps(&ts, 0.75).unwrap(), [749, 499, 249]);
        assert_eq!(strength_timesteps(&ts, 1.0).unwrap(), ts);
        assert_eq!(strength_timesteps(&ts, 0.9999).unwrap(), [749, 499, 249]);
        assert_eq!(strength_timesteps(&ts, 0.3).unwrap(), [249]);
        let e = strength_timesteps(&ts, 0.2).unwrap_err().to_string();
        assert!(e.contains("at least 0.25"), "{e}");
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(strength_timesteps(&ts, bad).is_err());
        }
    }
}
