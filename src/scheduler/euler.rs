//! diffusers' `EulerDiscreteScheduler` with SDXL's config (`s_churn` 0: deterministic, no
//! generator draws beyond the initial latents).

use super::schedule::{EulerTable, div_scalar, mul_scalar};
use super::{Sampler, Spacing};
use crate::rng::TorchRng;
use anyhow::Result;
use candle_core::Tensor;

pub struct EulerSampler {
    table: EulerTable,
}

impl EulerSampler {
    pub fn new(steps: usize, spacing: Spacing) -> Result<Self> {
        Ok(Self {
            table: EulerTable::new(steps, spacing)?,
        })
    }

    /// `scheduler.sigmas`: one per step plus the final zero.
    pub fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[f64] {
        &self.table.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.table.init_noise_sigma as f64
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        self.table.scale_model_input(x, i)
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> candle_core::Result<Tensor> {
        // gamma = 0 (s_churn 0): σ̂ = σ·(0 + 1) = σ, and no noise is drawn.
        let sigmas = &self.table.sigmas;
        let sigma_hat = sigmas[i];
        let pred_original = (x - mul_scalar(eps, sigma_hat)?)?;
        let derivative = div_scalar(&(x - pred_original)?, sigma_hat)?;
        let dt = sigmas[i + 1] - sigma_hat;
        x + mul_scalar(&derivative, dt)?
    }
}
