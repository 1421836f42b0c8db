//! Group norm over contiguous `[b, c, h, w]` f32, with optional fused SiLU.
//!
//! Each (batch, group) slab is contiguous; its mean and variance come from two passes with
//! f32 partial sums gathered into f64 (more accurate than torch's own f32 reduction), then
//! one pass writes `γ·(x−μ)·rstd + β`, optionally through SiLU.

use super::math;
use super::{Tier, dispatch_simd};
use rayon::prelude::*;

dispatch_simd! {
    fn sum_impl(x: &[f32], mean: f32, out: &mut [f64; 2]) {
        // Partial sums of 4096 elements in f32 lanes, then f64.
        let (mut s, mut s2) = (0f64, 0f64);
        for block in x.chunks(4096) {
            let mut a = [0f32; 16];
            let mut a2 = [0f32; 16];
            let mut ch = block.chunks_exact(16);
            for c in &mut ch {
                for i in 0..16 {
                    let d = c[i] - mean;
                    a[i] += d;
                    a2[i] += d * d;
                }
            }
            for &v in ch.remainder() {
                let d = v - mean;
                a[0] += d;
                a2[0] += d * d;
            }
            s += a.iter().map(|&v| v as f64).sum::<f64>();
            s2 += a2.iter().map(|&v| v as f64).sum::<f64>();
        }
        out[0] = s;
        out[1] = s2;
    }
}

dispatch_simd! {
    fn apply_impl(x: &[f32], out: &mut [f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = math::silu(v * scale + shift);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale + shift;
            }
        }
    }
}

/// Group norm of `x` (`[b, c, spatial]` contiguous, `c` divisible by `groups`), with
/// per-channel `gamma`/`beta`; SiLU applied to the result when `silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    tier: Tier,
    x: &[f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    assert!(groups > 0 && channels.is_multiple_of(groups));
    assert!(gamma.len() == channels && beta.len() == channels);
    let cpg = channels / groups;
    let slab = cpg * spatial;
    assert!(slab > 0 && x.len().is_multiple_of(slab) && x.len().is_multiple_of(channels * spatial));
    let mut out = super::par_zeroed::<f32>(x.len());
    out.par_chunks_mut(slab)
        .zip(x.par_chunks(slab))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let g = i % groups;
            // Pass 1: mean (shifted by the first element to keep the f32 lanes small).
            let mut acc = [0f64; 2];
            let pivot = xs[0];
            sum_impl(tier, xs, pivot, &mut acc);
            let n = slab as f64;
            let mean = pivot as f64 + acc[0] / n;
            // Pass 2: variance around the mean.
            sum_impl(tier, xs, mean as f32, &mut acc);
            let m32 = mean as f32;
            // Correct for the rounding of the mean to f32: E[(x-m')²] − (E[x-m'])².
            let var = (acc[1] / n - (acc[0] / n).powi(2)).max(0.0);
            let rstd = 1.0 / (var + eps).sqrt();
            for c in 0..cpg {
                let ch = g * cpg + c;
                let scale = gamma[ch] as f64 * rstd;
                let shift = beta[ch] as f64 - m32 as f64 * scale;
                let r = c * spatial..(c + 1) * spatial;
                apply_impl(
                    tier,
                    &xs[r.clone()],
                    &mut o[r],
                    scale as f32,
                    shift as f32,
                    silu,
                );
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group norm (with and without SiLU) against an f64 reference on every tier.
    #[test]
    fn matches_reference_on_every_tier() {
        let (b, c, spatial, groups) = (2, 12, 37, 3);
        let x: Vec<f32> = crate::kernels::test_values(b * c * spatial, 5)
            .iter()
            .map(|v| 3.0 + 2.0 * v)
            .collect();
        let gamma = crate::kernels::test_values(c, 6);
        let beta = crate::kernels::test_values(c, 7);
        let cpg = c / groups;
        for tier in Tier::runnable() {
            for silu in [false, true] {
                let got = group_norm(tier, &x, c, spatial, groups, &gamma, &beta, 1e-5, silu);
                for (slab, xs) in x.chunks(cpg * spatial).enumerate() {
                    let n = xs.len() as f64;
                    let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
                    let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                    for (i, &v) in xs.iter().enumerate() {
                        let ch = (slab % groups) * cpg + i / spatial;
                        let mut y = (v as f64 - mean) / (var + 1e-5).sqrt() * gamma[ch] as f64
                            + beta[ch] as f64;
                        if silu {
                            y /= 1.0 + (-y).exp();
                        }
                        let g = got[slab * cpg * spatial + i] as f64;
                        assert!((g - y).abs() < 1e-5, "{tier} silu {silu}: {g} vs {y}");
                    }
                }
            }
        }
    }
}
