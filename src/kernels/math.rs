//! Element-wise math written so LLVM vectorises it (no libm calls in the loops), compiled
//! for AVX-512 / AVX2 through [`super::dispatch_simd`]: every tier computes the same
//! formulas, so the results agree to rounding whatever the tier.

use super::{Tier, dispatch_simd};

/// `exp(x)` in f32, Cephes' `expf` polynomial after a base-2 range reduction: relative error
/// ≤ 2e-7 over the whole range; 0 below −87.3 (including −∞), +∞ above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.722_84);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 128]: 2^n built from its exponent bits (n = 128 handled by splitting).
    // n as an integer without a (scalar, saturating) float→int cast: n + 1.5·2²³ holds n in
    // its low mantissa bits, which keeps the whole function vectorisable.
    let ni = ((n + 12_582_912.0).to_bits() as i32) - 0x4B40_0000;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_84 {
        f32::INFINITY
    } else {
        v
    }
}

/// Exact (erf-based) GELU, `0.5·x·(1 + erf(x/√2))`, with Abramowitz–Stegun 7.1.26 for
/// erfc (absolute error ≤ 1.5e-7 in erf), computed as erfc on the negative side so small
/// outputs keep their relative accuracy.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erfc = poly * exp(-z * z);
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

dispatch_simd! {
    fn silu_inplace_impl(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = silu(*v);
        }
    }
}

/// `x ← silu(x)`.
pub fn silu_inplace(tier: Tier, x: &mut [f32]) {
    silu_inplace_impl(tier, x)
}

dispatch_simd! {
    fn geglu_impl(hidden: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu_erf(g);
        }
    }
}

/// `out = hidden · gelu_erf(gate)` element-wise (diffusers' GEGLU); all three the same length.
pub fn geglu(tier: Tier, hidden: &[f32], gate: &[f32], out: &mut [f32]) {
    assert!(hidden.len() == out.len() && gate.len() == out.len());
    geglu_impl(tier, hidden, gate, out)
}

dispatch_simd! {
    fn gelu_erf_slice_impl(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu_erf(v);
        }
    }
}

/// `out = gelu_erf(x)` element-wise.
pub fn gelu_erf_slice(tier: Tier, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    gelu_erf_slice_impl(tier, x, out)
}

/// The largest value of `row` (−∞ when empty): sixteen partial maxima, compared with `>`
/// (not f32::max and its NaN rules) so the loop vectorises inside the SIMD bodies.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut maxes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(&maxes) {
        max = if v > max { v } else { max };
    }
    max
}

dispatch_simd! {
    fn softmax_row_impl(row: &mut [f32], scale: f32) {
        let max = row_max(row);
        if max == f32::NEG_INFINITY {
            // A fully masked row: torch gives NaN; keep it finite and uniform-free (zeros).
            row.fill(0.0);
            return;
        }
        let m = max * scale;
        // Sixteen partial sums so the reduction vectorises.
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                let e = exp(*v * scale - m);
                *v = e;
                *a += e;
            }
        }
        let mut sum: f32 = 0.0;
        for v in chunks.into_remainder() {
            let e = exp(*v * scale - m);
            *v = e;
            sum += e;
        }
        sum += acc.iter().sum::<f32>();
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `2^t` to about 1e-4 relative error (degree-3 polynomial on the fraction, exponent built
/// from bits), 0 below −126: plenty where the result is rounded to bf16 (8 mantissa bits)
/// next, as attention probabilities are on the bf16 path.
#[inline(always)]
pub fn exp2_bf16(t: f32) -> f32 {
    let tc = t.max(-126.0);
    let n = tc.floor();
    let f = tc - n;
    let p = 1.0 + f * (0.695_976_1 + f * (0.224_940_2 + f * 0.079_083_7));
    let ni = ((n + 12_582_912.0).to_bits() as i32) - 0x4B40_0000;
    let v = p * f32::from_bits(((ni + 127) as u32) << 23);
    if t < -126.0 { 0.0 } else { v }
}

dispatch_simd! {
    fn softmax_unnormalized_impl(row: &mut [f32], scale: f32, sum_out: &mut f32) {
        let max = row_max(row);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            *sum_out = 0.0;
            return;
        }
        // exp(scale·(v − max)) = 2^(scale·log2e·(v − max))
        let k = scale * std::f32::consts::LOG2_E;
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                let e = exp2_bf16((*v - max) * k);
                *v = e;
                *a += e;
            }
        }
        let mut sum: f32 = 0.0;
        for v in chunks.into_remainder() {
            let e = exp2_bf16((*v - max) * k);
            *v = e;
            sum += e;
        }
        *sum_out = sum + acc.iter().sum::<f32>();
    }
}

/// `row ← exp(scale · (row − max row))`, returning the sum (0 for an all −∞ row, which is
/// zeroed): softmax without the final division, which the caller applies to the (much
/// smaller) product with V. Uses [`exp2_bf16`]: for the bf16 path only.
pub fn softmax_unnormalized_bf16(tier: Tier, row: &mut [f32], scale: f32) -> f32 {
    let mut sum = 0.0;
    softmax_unnormalized_impl(tier, row, scale, &mut sum);
    sum
}

/// In-place `softmax(scale · row)` (scale > 0).
pub fn softmax_row(tier: Tier, row: &mut [f32], scale: f32) {
    softmax_row_impl(tier, row, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        let mut v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0025).collect();
        v.extend((-2000..=2000).map(|i| i as f32 * 0.05));
        v.extend([-1e30, -200.0, -88.0, -87.0, 88.0, 0.0, -0.0, 1e-8, -1e-8]);
        v
    }

    #[test]
    fn exp_matches_std() {
        for x in grid() {
            let (a, b) = (exp(x), x.exp());
            if a == b {
                continue;
            }
            let err = (a - b).abs() / b.max(f32::MIN_POSITIVE);
            assert!(
                err <= 3e-7 || (a - b).abs() < 1e-37,
                "exp({x}) = {a} vs {b}"
            );
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
    }

    #[test]
    fn gelu_matches_libm_erf() {
        let xs = grid();
        for tier in Tier::runnable() {
            let mut out = vec![0f32; xs.len()];
            gelu_erf_slice(tier, &xs, &mut out);
            for (&x, &g) in xs.iter().zip(&out) {
                let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
                let err = (g as f64 - want).abs();
                assert!(
                    err <= 1e-6 * (x.abs() as f64).max(1.0),
                    "{tier}: gelu({x}) = {g} vs {want}"
                );
            }
            // GEGLU is the hidden half times this.
            let hidden: Vec<f32> = xs.iter().map(|v| 0.5 - v).collect();
            let mut gg = vec![0f32; xs.len()];
            geglu(tier, &hidden, &xs, &mut gg);
            for ((&h, &g), &o) in hidden.iter().zip(&out).zip(&gg) {
                assert!((h * g - o).abs() <= 1e-6 * (h * g).abs().max(1.0), "{tier}");
            }
        }
    }

    /// erf in f64 (W. J. Cody's rational approximations via erfc), reference only.
    fn erf64(x: f64) -> f64 {
        // High-accuracy series / continued fraction, enough for a reference at 1e-12.
        if x.abs() < 2.5 {
            let mut sum = x;
            let mut term = x;
            let x2 = x * x;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -x2 / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), converges fast for |x| ≥ 2.5.
            let z = x.abs();
            let mut f = z;
            let mut c = z;
            let mut d = 0.0;
            for k in 1..200 {
                let a = k as f64 / 2.0;
                d = z + a * d;
                d = 1.0 / d;
                c = z + a / c;
                let delta = c * d;
                f *= delta;
                if (delta - 1.0).abs() < 1e-16 {
                    break;
                }
            }
            let erfc = (-z * z).exp() / f / std::f64::consts::PI.sqrt();
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn exp2_bf16_accuracy() {
        for i in -130_000..10_000 {
            let t = i as f32 * 1e-3;
            let (a, b) = (exp2_bf16(t), (t as f64).exp2());
            if t < -126.0 {
                assert_eq!(a, 0.0);
            } else {
                assert!(((a as f64 - b) / b).abs() < 2e-4, "2^{t}: {a} vs {b}");
            }
        }
        for tier in Tier::runnable() {
            let vals: Vec<f32> = (0..40)
                .map(|i| (i % 7) as f32 * 0.4 - 1.0)
                .chain([f32::NEG_INFINITY, 2.0])
                .collect();
            let mut row = vals.clone();
            let s = softmax_unnormalized_bf16(tier, &mut row, 0.5);
            let want: Vec<f64> = vals
                .iter()
                .map(|&v| ((v as f64 - 2.0) * 0.5).exp())
                .collect();
            let total: f64 = want.iter().sum();
            assert!((s as f64 - total).abs() < 1e-3 * total, "{tier}");
            for (a, b) in row.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-3, "{tier}");
            }
        }
    }

    #[test]
    fn softmax_rows() {
        for tier in Tier::runnable() {
            softmax_rows_on(tier);
        }
    }

    fn softmax_rows_on(tier: Tier) {
        for len in [1usize, 5, 16, 17, 77, 300] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32) - 4.0).collect();
            let scale = 0.37f32;
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) * scale;
            let want: Vec<f64> = row
                .iter()
                .map(|&v| ((v * scale - m) as f64).exp())
                .collect();
            let s: f64 = want.iter().sum();
            softmax_row(tier, &mut row, scale);
            for (a, w) in row.iter().zip(&want) {
                assert!((*a as f64 - w / s).abs() < 1e-6, "{tier} {len}");
            }
        }
        let mut row = vec![0.0, f32::NEG_INFINITY, 1.0];
        softmax_row(tier, &mut row, 1.0);
        assert_eq!(row[1], 0.0);
    }

    #[test]
    fn silu_matches() {
        let grid = grid();
        let want: Vec<f32> = grid.iter().map(|&x| x / (1.0 + (-x).exp())).collect();
        for tier in Tier::runnable() {
            let mut xs = grid.clone();
            silu_inplace(tier, &mut xs);
            for (a, b) in xs.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{tier}: {a} vs {b}"
                );
            }
        }
    }
}
