//! diffusers' `EulerDiscreteScheduler` with SDXL's config (`s_churn` 0: deterministic, no
//! generator draws beyond the initial latents).

use super::Sampler;
use super::Spacing;
use super::teacher::{
    div_scalar, euler_init_noise_sigma, euler_sigmas, mul_scalar, spaced_timesteps,
};
use crate::rng::TorchRng;
use anyhow::Result;
use candle_core::Tensor;

pub struct EulerSampler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

impl EulerSampler {
    pub fn new(steps: usize, spacing: Spacing) -> Result<Self> {
        // np.float32 timesteps; the UNet sees them as floats (fractional for linspace).
        let timesteps = spaced_timesteps(steps, spacing, false)?;
        let sigmas = euler_sigmas(&timesteps);
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// `scheduler.sigmas`: one per step plus the final zero.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    /// `sample / (σ² + 1)^½`
    fn scale_model_input(&self, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[i];
        div_scalar(x, (s * s + 1.0).sqrt())
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> candle_core::Result<Tensor> {
        // gamma = 0 (s_churn 0): σ̂ = σ·(0 + 1) = σ, and no noise is drawn.
        let sigma_hat = self.sigmas[i];
        let pred_original = (x - mul_scalar(eps, sigma_hat)?)?;
        let derivative = div_scalar(&(x - pred_original)?, sigma_hat)?;
        let dt = self.sigmas[i + 1] - sigma_hat;
        x + mul_scalar(&derivative, dt)?
    }
}
