//! DMD2's sampler = diffusers' `LCMScheduler` with explicit timesteps: predict x0, then
//! re-noise it to the next timestep with fresh Gaussian noise.

use super::{Sampler, TRAIN_TIMESTEPS};
use crate::rng::TorchRng;
use anyhow::{Result, bail};
use candle_core::Tensor;

/// SDXL's "scaled_linear" schedule: β = linspace(√0.00085, √0.012, 1000)², ᾱ = cumprod(1 − β),
/// bit for bit as torch builds it (see [`super::schedule::alphas_cumprod`]).
pub fn sdxl_alphas_cumprod() -> Vec<f32> {
    super::schedule::alphas_cumprod()
}

/// DMD2's timesteps for `steps` sampling steps.
///
/// 1 step → [399] (the one-step generator's conditioning timestep); otherwise trailing
/// spacing, `round(arange(1000, 0, -1000/N)) − 1`: 4 → [999, 749, 499, 249] as DMD2 was
/// trained (LCMScheduler's own default would give [999, 759, 499, 259]).
pub fn dmd2_timesteps(steps: usize) -> Result<Vec<usize>> {
    match steps {
        0 => bail!("--steps must be at least 1"),
        1 => Ok(vec![399]),
        n if n > TRAIN_TIMESTEPS => bail!("--steps must be at most {TRAIN_TIMESTEPS}"),
        n => {
            let ratio = TRAIN_TIMESTEPS as f64 / n as f64;
            Ok((0..n)
                .map(|i| {
                    ((TRAIN_TIMESTEPS as f64 - i as f64 * ratio).round_ties_even() as usize) - 1
                })
                .collect())
        }
    }
}

/// Parse and check `--timesteps 999,499`: strictly decreasing, each below 1000.
pub fn parse_timesteps(s: &str) -> Result<Vec<usize>> {
    let ts = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("--timesteps: '{p}' is not a whole number"))
        })
        .collect::<Result<Vec<_>>>()?;
    check_timesteps(&ts)?;
    Ok(ts)
}

/// An explicit DMD2 timestep list, from any source (flags, presets, PNG settings): not
/// empty, each below 1000, strictly decreasing.
pub fn check_timesteps(ts: &[usize]) -> Result<()> {
    if ts.is_empty() {
        bail!("timesteps: the list is empty");
    }
    if let Some(t) = ts.iter().find(|&&t| t >= TRAIN_TIMESTEPS) {
        bail!("timesteps: {t} is not below {TRAIN_TIMESTEPS}");
    }
    if ts.windows(2).any(|w| w[1] >= w[0]) {
        bail!("timesteps: {ts:?} is not strictly decreasing");
    }
    Ok(())
}

/// One step of diffusers' `LCMScheduler.step` for ε-prediction.
pub struct LcmStep {
    /// Coefficient of the model input `x` in the denoised estimate.
    pub x_coef: f64,
    /// Coefficient of ε in the denoised estimate.
    pub eps_coef: f64,
    /// Re-noising to the next timestep: `√ᾱ_prev · x0 + √(1−ᾱ_prev) · noise`; `None` on the last step.
    pub renoise: Option<(f64, f64)>,
}

/// LCMScheduler.step (diffusers): x0 = (x − √(1−ᾱₜ)·ε)/√ᾱₜ; c_skip = σ²/(s²+σ²),
/// c_out = s/√(s²+σ²) with s = 10·t, σ = 0.5; denoised = c_out·x0 + c_skip·x;
/// prev = √ᾱₚ·denoised + √(1−ᾱₚ)·noise, except on the last step.
pub fn lcm_step(alphas_cumprod: &[f32], timesteps: &[usize], index: usize) -> LcmStep {
    const SIGMA_DATA: f64 = 0.5;
    const TIMESTEP_SCALING: f64 = 10.0;
    let t = timesteps[index];
    let a_t = alphas_cumprod[t] as f64;
    let s = t as f64 * TIMESTEP_SCALING;
    let c_skip = SIGMA_DATA * SIGMA_DATA / (s * s + SIGMA_DATA * SIGMA_DATA);
    let c_out = s / (s * s + SIGMA_DATA * SIGMA_DATA).sqrt();
    let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
    let renoise = timesteps.get(index + 1).map(|&tp| {
        let a_p = alphas_cumprod[tp] as f64;
        (a_p.sqrt(), (1.0 - a_p).sqrt())
    });
    LcmStep {
        x_coef: c_out / sa + c_skip,
        eps_coef: -c_out * sb / sa,
        renoise,
    }
}

/// The DMD2 sampler over a fixed list of timesteps.
pub struct Dmd2Sampler {
    timesteps: Vec<usize>,
    timesteps_f: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    denoised: Option<Tensor>,
}

impl Dmd2Sampler {
    pub fn new(timesteps: Vec<usize>) -> Self {
        let timesteps_f = timesteps.iter().map(|&t| t as f64).collect();
        Self {
            timesteps,
            timesteps_f,
            alphas_cumprod: sdxl_alphas_cumprod(),
            denoised: None,
        }
    }
}

impl Sampler for Dmd2Sampler {
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
        rngs: &mut [TorchRng],
    ) -> candle_core::Result<Tensor> {
        let st = lcm_step(&self.alphas_cumprod, &self.timesteps, i);
        let denoised = ((x * st.x_coef)? + (eps * st.eps_coef)?)?;
        self.denoised = Some(denoised.clone());
        match st.renoise {
            Some((a, b)) => {
                let noise = super::noise_like(x, rngs)?;
                (denoised * a)? + (noise * b)?
            }
            None => Ok(denoised),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmd2_schedules() {
        assert_eq!(dmd2_timesteps(4).unwrap(), vec![999, 749, 499, 249]);
        assert_eq!(
            dmd2_timesteps(8).unwrap(),
            vec![999, 874, 749, 624, 499, 374, 249, 124]
        );
        assert_eq!(dmd2_timesteps(1).unwrap(), vec![399]);
        assert_eq!(dmd2_timesteps(2).unwrap(), vec![999, 499]);
        // numpy's round(arange(1000, 0, -1000/N)) - 1, which rounds halves to even.
        assert_eq!(dmd2_timesteps(3).unwrap(), vec![999, 666, 332]);
        assert_eq!(
            dmd2_timesteps(6).unwrap(),
            vec![999, 832, 666, 499, 332, 166]
        );
        assert_eq!(
            dmd2_timesteps(7).unwrap(),
            vec![999, 856, 713, 570, 428, 285, 142]
        );
        assert_eq!(
            dmd2_timesteps(16).unwrap(),
            vec![
                999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61
            ]
        );
        assert!(dmd2_timesteps(0).is_err());
    }

    #[test]
    fn timesteps_flag() {
        assert_eq!(parse_timesteps("999, 499").unwrap(), vec![999, 499]);
        assert!(parse_timesteps("499,999").is_err());
        assert!(parse_timesteps("1000").is_err());
        assert!(parse_timesteps("a").is_err());
    }

    #[test]
    fn alphas_match_diffusers() {
        let a = sdxl_alphas_cumprod();
        // diffusers 0.42 LCMScheduler (float32): alphas_cumprod[0], [999]
        assert_eq!(a[0], 0.999_15_f32);
        assert_eq!(a[999], 0.004_660_095_f32);
    }

    #[test]
    fn last_step_has_no_noise() {
        let a = sdxl_alphas_cumprod();
        let ts = [999, 499];
        assert!(lcm_step(&a, &ts, 0).renoise.is_some());
        assert!(lcm_step(&a, &ts, 1).renoise.is_none());
    }
}
