//! diffusers' `DDIMScheduler` with SDXL's config and η = 0 (deterministic): integer
//! timesteps, `set_alpha_to_one = False` (the step after the last uses ᾱ₀), no clipping.

use super::schedule::{alphas_cumprod, mul_scalar, spaced_timesteps};
use super::{Sampler, Spacing, TRAIN_TIMESTEPS};
use crate::rng::TorchRng;
use anyhow::Result;
use candle_core::Tensor;

pub struct DdimSampler {
    timesteps: Vec<usize>,
    timesteps_f: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`, whatever the spacing.
    step_ratio: usize,
    denoised: Option<Tensor>,
}

impl DdimSampler {
    pub fn new(steps: usize, spacing: Spacing) -> Result<Self> {
        let timesteps_f = spaced_timesteps(steps, spacing, true)?;
        if let Some(t) = timesteps_f
            .iter()
            .find(|&&t| t < 0.0 || t >= TRAIN_TIMESTEPS as f64)
        {
            // diffusers indexes ᾱ out of range here: past the end it raises IndexError; at
            // −1 (trailing spacing, where numpy's float arange yields one value too many for
            // some step counts, e.g. 61) torch's negative indexing silently takes ᾱ₉₉₉ and the
            // last step blows the image up. Neither is worth reproducing.
            anyhow::bail!(
                "the ddim sampler cannot run {steps} steps with {} spacing: diffusers' schedule \
                 would use timestep {t}, outside 0..{TRAIN_TIMESTEPS}; pick another step count",
                format!("{spacing:?}").to_lowercase()
            );
        }
        let timesteps: Vec<usize> = timesteps_f.iter().map(|&t| t as usize).collect();
        Ok(Self {
            timesteps,
            timesteps_f,
            alphas_cumprod: alphas_cumprod(),
            step_ratio: TRAIN_TIMESTEPS / steps,
            denoised: None,
        })
    }

    /// (ᾱ_t, ᾱ_prev) of step `i`: prev = t − 1000 // steps, or ᾱ₀ below zero.
    fn alphas(&self, i: usize) -> (f32, f32) {
        let t = self.timesteps[i];
        let a_t = self.alphas_cumprod[t];
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p],
            None => self.alphas_cumprod[0],
        };
        (a_t, a_prev)
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> candle_core::Result<Tensor> {
        let (a_t, a_prev) = self.alphas(i);
        let beta_t = 1.0 - a_t;
        // x0 = (x − β_t^½ ε) / ᾱ_t^½
        let x0 = (x - mul_scalar(eps, beta_t.sqrt())?)?
            .broadcast_div(&super::schedule::scalar(a_t.sqrt(), x)?)?;
        // η = 0: std_dev_t = 0·variance^½ = 0, direction = (1 − ᾱ_prev − 0)^½ ε
        let direction = mul_scalar(eps, (1.0 - a_prev - 0.0).sqrt())?;
        let prev = (mul_scalar(&x0, a_prev.sqrt())? + direction)?;
        self.denoised = Some(x0);
        Ok(prev)
    }
}
