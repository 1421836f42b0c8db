//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` with SDXL's config:
//! one sigma table ([`EulerTable`]), two steps. Euler (`s_churn` 0) is deterministic, with no
//! generator draws beyond the initial latents; Euler ancestral draws one Gaussian of the
//! latent shape per step, the last step included (where it is multiplied by σ_up = 0).

use super::schedule::{EulerTable, div_scalar, mul_scalar};
use super::{Sampler, Spacing};
use crate::rng::TorchRng;
use anyhow::Result;
use candle_core::Tensor;

pub struct EulerSampler {
    table: EulerTable,
    ancestral: bool,
    denoised: Option<Tensor>,
}

impl EulerSampler {
    /// `EulerDiscreteScheduler`.
    pub fn new(steps: usize, spacing: Spacing) -> Result<Self> {
        Ok(Self {
            table: EulerTable::new(steps, spacing)?,
            ancestral: false,
            denoised: None,
        })
    }

    /// `EulerAncestralDiscreteScheduler`.
    pub fn ancestral(steps: usize, spacing: Spacing) -> Result<Self> {
        Ok(Self {
            table: EulerTable::new(steps, spacing)?,
            ancestral: true,
            denoised: None,
        })
    }

    /// `scheduler.sigmas`: one per step plus the final zero.
    pub fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }

    /// The ancestral step's (σ_up, σ_down) at step `i`, float32 as diffusers computes them.
    pub fn up_down(&self, i: usize) -> (f32, f32) {
        let (from, to) = (self.table.sigmas[i], self.table.sigmas[i + 1]);
        let up = ((to * to) * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        (up, down)
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

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        rngs: &mut [TorchRng],
    ) -> candle_core::Result<Tensor> {
        // Euler: gamma = 0 (s_churn 0), so σ̂ = σ·(0 + 1) = σ and no noise is drawn.
        let sigma = self.table.sigmas[i];
        let pred_original = (x - mul_scalar(eps, sigma)?)?;
        let derivative = div_scalar(&(x - &pred_original)?, sigma)?;
        self.denoised = Some(pred_original);
        if !self.ancestral {
            let dt = self.table.sigmas[i + 1] - sigma;
            return x + mul_scalar(&derivative, dt)?;
        }
        let (up, down) = self.up_down(i);
        let prev = (x + mul_scalar(&derivative, down - sigma)?)?;
        // randn_tensor(model_output.shape, generator=generator): drawn on every step, one
        // draw per image from its own generator.
        let noise = super::noise_like(eps, rngs)?.to_dtype(eps.dtype())?;
        prev + mul_scalar(&noise, up)?
    }
}
