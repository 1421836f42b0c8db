//! SDXL's noise schedule and the timestep and sigma tables the samplers share — DMD2's and
//! the teacher's (diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler` and
//! `DDIMScheduler` with η = 0) — with SDXL base's scheduler config: `scaled_linear` β from
//! 0.00085 to 0.012 over 1000 training steps, `steps_offset` 1, ε prediction, linear sigma
//! interpolation, no Karras sigmas, final sigma zero, DDIM without `set_alpha_to_one` or
//! sample clipping. `timestep_spacing` is the [`Spacing`] argument (SDXL's config: leading).
//!
//! Precision follows diffusers 0.42 step by step, so that the numbers match to the bit where
//! the arithmetic allows:
//! - ᾱ is torch float32 (`linspace(√β₀, √β₁)²`, `cumprod`), see [`alphas_cumprod`];
//! - the training sigmas `((1 − ᾱ)/ᾱ)^½` are torch float32 ops (one caveat: torch's CPU
//!   `sqrt`/`pow(·, 0.5)` goes through MKL's VML in "high accuracy" mode, which is not
//!   correctly rounded on every CPU; on the AMD EPYC the references were made on, ~19% of
//!   the 1000 training sigmas come out one ulp away from the correctly rounded root used
//!   here. Everything else is bit-exact);
//! - timesteps come from numpy (float64 arithmetic, numpy's `arange`/`linspace`/`round`
//!   rules), cast to float32 for the Euler kinds and to int64 for DDIM;
//! - the Euler sigmas are `np.interp` (float64) over the float32 training sigmas at those
//!   timesteps, then cast to float32;
//! - every per-step scalar (σ, σ_up, √ᾱ, …) is a 0-dim float32 torch tensor, so the step
//!   arithmetic is float32, one rounding per torch op, in diffusers' order.

use super::{Spacing, TRAIN_TIMESTEPS};
use anyhow::{Result, bail};
use candle_core::Tensor;

/// diffusers' `steps_offset` in SDXL base's scheduler config.
pub const STEPS_OFFSET: usize = 1;

fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    if steps > TRAIN_TIMESTEPS {
        bail!("--steps must be at most {TRAIN_TIMESTEPS} for the teacher samplers");
    }
    Ok(())
}

/// numpy's `np.linspace(0, stop, n)` in float64 (endpoint included).
fn np_linspace(stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        // div = 0: numpy multiplies by delta instead of the (undefined) step.
        return vec![0.0];
    }
    let step = stop / (n - 1) as f64;
    let mut y: Vec<f64> = (0..n).map(|i| i as f64 * step + 0.0).collect();
    y[n - 1] = stop;
    y
}

/// numpy's `np.arange(start, 0, -step)` for a float step: length `ceil((0 − start)/(−step))`,
/// values `start + i·Δ` with `Δ = (start − step) − start`, as numpy's `DOUBLE_fill` makes them.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    let second = start + -step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The timesteps of `set_timesteps(steps)` before the cast to the scheduler's dtype, as
/// exact float64 values: leading/trailing are whole numbers, Euler's linspace may be
/// fractional (DDIM rounds it, `round_linspace`).
pub fn spaced_timesteps(steps: usize, spacing: Spacing, round_linspace: bool) -> Result<Vec<f64>> {
    check_steps(steps)?;
    let n_train = TRAIN_TIMESTEPS;
    Ok(match spacing {
        Spacing::Leading => {
            // step_ratio = n_train // steps; (arange(steps) * ratio).round()[::-1] + offset
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + STEPS_OFFSET) as f64)
                .collect()
        }
        Spacing::Trailing => {
            // round(arange(n_train, 0, -n_train / steps)) - 1
            let ratio = n_train as f64 / steps as f64;
            np_arange_down(n_train as f64, ratio)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
        Spacing::Linspace => {
            let t = np_linspace((n_train - 1) as f64, steps);
            t.into_iter()
                .rev()
                .map(|v| {
                    if round_linspace {
                        v.round_ties_even()
                    } else {
                        // Euler: np.linspace(..., dtype=np.float32)
                        v as f32 as f64
                    }
                })
                .collect()
        }
    })
}

/// SDXL's ᾱ exactly as diffusers builds it with torch on the CPU:
/// `betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=float32) ** 2`,
/// `alphas_cumprod = torch.cumprod(1.0 - betas, 0)`.
///
/// torch's CPU `linspace` kernel (`RangeFactoriesKernel.cpp`) computes the float32 step
/// `(end − start)/(n − 1)`, fills the first half as `start + step·i` and the second half as
/// `end − step·(n − 1 − i)`, and the compiler fuses both into one multiply-add (the values
/// match `fma` bit for bit, not the separately rounded product and sum). `x ** 2` is `x·x`,
/// and `cumprod` accumulates the float32 factors in double, rounding each output to float32.
pub fn alphas_cumprod() -> Vec<f32> {
    let n = TRAIN_TIMESTEPS;
    let (start, end) = (0.00085f64.sqrt() as f32, 0.012f64.sqrt() as f32);
    let step = (end - start) / (n - 1) as f32;
    let mut acc = 1.0f64;
    (0..n)
        .map(|i| {
            let b = if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            };
            acc *= (1.0 - b * b) as f64;
            acc as f32
        })
        .collect()
}

/// The 1000 training sigmas `((1 − ᾱ)/ᾱ)^½`, float32, indexed by timestep.
pub fn training_sigmas() -> Vec<f32> {
    alphas_cumprod()
        .into_iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64 (numpy's formula, no fused multiply-add).
fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / ((j + 1) as f64 - j as f64);
    slope * (x - j as f64) + y0
}

/// Euler-type sigmas for the given timesteps: interpolated training sigmas, then a final
/// zero, as float32 (`final_sigmas_type = "zero"`).
pub fn euler_sigmas(timesteps: &[f64]) -> Vec<f32> {
    let train = training_sigmas();
    timesteps
        .iter()
        .map(|&t| np_interp(t, &train) as f32)
        .chain(std::iter::once(0.0))
        .collect()
}

/// Euler-type `init_noise_sigma` (diffusers 0.42): σ_max for linspace/trailing spacing,
/// `(σ_max² + 1)^½` for leading, in float32.
pub fn euler_init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// The Euler schedulers' shared tables: timesteps (float32, as the UNet sees them), sigmas
/// (one per step plus the final zero) and the initial noise scale.
pub struct EulerTable {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl EulerTable {
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

    /// `sample / (σ² + 1)^½` at step `i` (both Euler kinds' `scale_model_input`).
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[i];
        div_scalar(x, (s * s + 1.0).sqrt())
    }
}

/// A 0-dim float32 tensor on `like`'s device, for scalar-times-tensor ops that round like
/// torch's (one rounding per op; `Tensor * f64` would go through an f64 affine map).
pub(crate) fn scalar(v: f32, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(v, like.device())?.to_dtype(like.dtype())
}

/// `x / v` as torch divides by a float32 scalar tensor (a true division, not `x · (1/v)`).
pub(crate) fn div_scalar(x: &Tensor, v: f32) -> candle_core::Result<Tensor> {
    x.broadcast_div(&scalar(v, x)?)
}

/// `x * v` with a float32 scalar.
pub(crate) fn mul_scalar(x: &Tensor, v: f32) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&scalar(v, x)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{SamplerKind, SamplerSpec};

    fn build(kind: SamplerKind, steps: usize, spacing: Spacing) -> anyhow::Result<()> {
        SamplerSpec {
            kind,
            steps,
            timesteps: None,
            spacing,
        }
        .validate()
    }

    #[test]
    fn leading_timesteps() {
        let t = spaced_timesteps(12, Spacing::Leading, false).unwrap();
        assert_eq!(t.len(), 12);
        assert_eq!(t[0], 914.0);
        assert_eq!(t[1], 831.0);
        assert_eq!(t[10], 84.0);
        assert_eq!(t[11], 1.0);
        let t = spaced_timesteps(10, Spacing::Leading, true).unwrap();
        assert_eq!(t[0], 901.0);
    }

    #[test]
    fn trailing_timesteps() {
        let t = spaced_timesteps(4, Spacing::Trailing, false).unwrap();
        assert_eq!(t, vec![999.0, 749.0, 499.0, 249.0]);
        // 1000/16 = 62.5: numpy rounds half to even
        let t = spaced_timesteps(16, Spacing::Trailing, false).unwrap();
        assert_eq!(&t[..3], &[999.0, 937.0, 874.0]);
        // numpy's float arange gives one more value for some step counts, and diffusers
        // then runs one more step (e.g. 61 → 62 timesteps, the last one −1).
        for n in [1, 2, 3, 7, 10, 12, 30, 50, 60, 100, 1000] {
            let t = spaced_timesteps(n, Spacing::Trailing, false).unwrap();
            assert_eq!(t.len(), n, "{n}");
        }
        for n in [61, 103, 121, 998] {
            let t = spaced_timesteps(n, Spacing::Trailing, false).unwrap();
            assert_eq!(t.len(), n + 1, "{n}");
            assert_eq!(t[n], -1.0);
            // Euler's sigma there is the first training sigma (np.interp clamps)
            let s = euler_sigmas(&t);
            assert_eq!(s[n], training_sigmas()[0]);
            // DDIM refuses rather than index ᾱ at −1
            assert!(build(SamplerKind::Ddim, n, Spacing::Trailing).is_err());
            assert!(build(SamplerKind::Euler, n, Spacing::Trailing).is_ok());
        }
        assert!(build(SamplerKind::Ddim, 1000, Spacing::Leading).is_err());
        assert!(build(SamplerKind::Ddim, 999, Spacing::Leading).is_ok());
    }

    #[test]
    fn linspace_timesteps() {
        let t = spaced_timesteps(9, Spacing::Linspace, false).unwrap();
        assert_eq!(t[0], 999.0);
        assert_eq!(t[1], 874.125);
        assert_eq!(t[8], 0.0);
        assert_eq!(
            spaced_timesteps(1, Spacing::Linspace, false).unwrap(),
            vec![0.0]
        );
    }

    #[test]
    fn bad_steps() {
        assert!(build(SamplerKind::Euler, 0, Spacing::Leading).is_err());
        assert!(build(SamplerKind::Ddim, 1001, Spacing::Leading).is_err());
    }

    #[test]
    fn alphas_match_torch() {
        let a = alphas_cumprod();
        // torch: alphas_cumprod[0] = 0.99915 (float32 0.9991499781608582),
        // [999] = 0.00466009508818388
        assert_eq!(a[0] as f64, 0.999_149_978_160_858_2);
        assert_eq!(a[999] as f64, 0.004_660_095_088_183_88);
    }

    #[test]
    fn sigma_table() {
        let s = training_sigmas();
        // diffusers: sigmas[0] ≈ 0.029168, sigmas[999] ≈ 14.614647
        assert!((s[0] - 0.029_168).abs() < 1e-5, "{}", s[0]);
        assert_eq!(s[999], 14.614_647);
    }
}
