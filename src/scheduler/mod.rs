//! Samplers (diffusers calls them schedulers): DMD2's ([`dmd2`]), and the teacher's for
//! comparison ([`euler`]: Euler and Euler ancestral, [`ddim`]), over SDXL's noise schedule
//! ([`schedule`]). [`SamplerSpec::build`] makes one.
//!
//! A sampler owns the timestep list and turns the UNet's ε prediction into the next latents,
//! drawing any noise it needs from the image's torch-compatible generator in diffusers' order.

pub mod ddim;
pub mod dmd2;
pub mod euler;
pub mod schedule;

use crate::rng::TorchRng;
use candle_core::{Result, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use dmd2::{Dmd2Sampler, dmd2_timesteps, lcm_step, parse_timesteps, sdxl_alphas_cumprod};

/// Number of training timesteps of SDXL's noise schedule.
pub const TRAIN_TIMESTEPS: usize = 1000;

/// The diffusers scheduler interface the pipeline loop needs.
pub trait Sampler: Send {
    /// The timesteps passed to the UNet, in order.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial Gaussian noise (1 unless the sampler works in σ, like Euler).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// `scheduler.scale_model_input(x, t)` for step `i` (the identity, as diffusers'
    /// `SchedulerMixin` has it, unless the sampler works in σ).
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// `scheduler.step(eps, t, x, generator).prev_sample` for step `i`. `x` holds one image
    /// per generator in `rngs` (batch dimension first); noise comes from [`noise_like`].
    fn step(&mut self, eps: &Tensor, i: usize, x: &Tensor, rngs: &mut [TorchRng])
    -> Result<Tensor>;
    /// The last step's estimate of the clean latents (diffusers' `denoised` /
    /// `pred_original_sample`), what previews show.
    fn denoised(&self) -> Option<&Tensor> {
        None
    }
}

/// Standard normal noise shaped like `x`, image `b` drawn from `rngs[b]`: each image of a
/// batch gets exactly the numbers it would get if generated alone.
pub fn noise_like(x: &Tensor, rngs: &mut [TorchRng]) -> Result<Tensor> {
    let b = x.dim(0)?;
    if b != rngs.len() {
        candle_core::bail!("{b} images but {} generators", rngs.len());
    }
    let per = x.elem_count() / b.max(1);
    let mut data = Vec::with_capacity(x.elem_count());
    for r in rngs.iter_mut() {
        data.extend(r.randn(per));
    }
    Tensor::from_vec(data, x.shape(), x.device())
}

/// Which sampler: DMD2's, or one of the teacher's (diffusers' SDXL schedulers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// LCMScheduler with DMD2's timesteps: predict x0, re-noise.
    Dmd2,
    /// EulerDiscreteScheduler.
    Euler,
    /// EulerAncestralDiscreteScheduler.
    EulerA,
    /// DDIMScheduler (eta 0).
    Ddim,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Dmd2 => "dmd2",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler-a",
            SamplerKind::Ddim => "ddim",
        }
    }
}

/// diffusers' `timestep_spacing` for the teacher samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// Everything that picks a sampler and its timesteps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerSpec {
    pub kind: SamplerKind,
    pub steps: usize,
    /// Explicit timesteps (DMD2 only); otherwise derived from `steps`.
    pub timesteps: Option<Vec<usize>>,
    /// Teacher samplers only; SDXL's config says `leading`.
    pub spacing: Spacing,
}

impl SamplerSpec {
    /// The number of steps it runs: the explicit timesteps', else `steps`.
    pub fn step_count(&self) -> usize {
        self.timesteps.as_ref().map_or(self.steps, |t| t.len())
    }

    /// DMD2 over an explicit timestep list.
    pub fn dmd2(timesteps: Vec<usize>) -> Self {
        Self {
            kind: SamplerKind::Dmd2,
            steps: timesteps.len(),
            timesteps: Some(timesteps),
            spacing: Spacing::Leading,
        }
    }

    /// Check the settings without building anything (for validation before loading).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.build().map(|_| ())
    }

    pub fn build(&self) -> anyhow::Result<Box<dyn Sampler>> {
        match self.kind {
            SamplerKind::Dmd2 => {
                let ts = match &self.timesteps {
                    Some(t) => {
                        dmd2::check_timesteps(t)?;
                        t.clone()
                    }
                    None => dmd2_timesteps(self.steps)?,
                };
                Ok(Box::new(Dmd2Sampler::new(ts)))
            }
            kind => {
                if self.timesteps.is_some() {
                    anyhow::bail!("--timesteps applies to the dmd2 sampler only");
                }
                let (steps, spacing) = (self.steps, self.spacing);
                Ok(match kind {
                    SamplerKind::Euler => Box::new(euler::EulerSampler::new(steps, spacing)?),
                    SamplerKind::EulerA => {
                        Box::new(euler::EulerSampler::ancestral(steps, spacing)?)
                    }
                    SamplerKind::Ddim => Box::new(ddim::DdimSampler::new(steps, spacing)?),
                    SamplerKind::Dmd2 => unreachable!("matched above"),
                })
            }
        }
    }

    /// The timesteps the UNet will see.
    pub fn timesteps(&self) -> anyhow::Result<Vec<f64>> {
        Ok(self.build()?.timesteps().to_vec())
    }

    /// DMD2's timestep list (explicit, or from `steps`).
    pub fn dmd2_timesteps(&self) -> anyhow::Result<Vec<usize>> {
        match &self.timesteps {
            Some(t) => Ok(t.clone()),
            None => dmd2_timesteps(self.steps),
        }
    }
}
