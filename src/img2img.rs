//! Starting from an image (diffusers' `StableDiffusionXLImg2ImgPipeline` and, for a
//! 4-channel UNet, `StableDiffusionXLInpaintPipeline`, with `LCMScheduler` at explicit
//! timesteps): which timesteps run for a strength, and noising latents to a timestep.

use anyhow::{Result, bail};
use candle_core::Tensor;

/// What an image starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// `[1, 3, H, W]` in [-1, 1] (f32, CPU), already the size of the image to make.
    pub image: Tensor,
    /// `[1, 1, H, W]`, 1 where the image is repainted, 0 where it is kept (binarized).
    pub mask: Option<Tensor>,
    /// How much of the timestep list runs, in (0, 1].
    pub strength: f64,
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
