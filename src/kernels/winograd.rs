//! 3×3 stride-1 convolutions (padding 1) by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): each 2×2 block
//! of outputs is `Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A` for the 4×4 input patch `d` around it,
//! which turns the convolution into 16 GEMMs of `[c_out × c_in] · [c_in × tiles]` with
//! 2.25× fewer multiplications than direct convolution. Used in f32 (the transforms only add
//! and subtract; errors stay at f32 rounding level), for the VAE decoder, whose
//! full-resolution convolutions dominate its time.
//!
//! The filter transform `U = G g Gᵀ` is computed once, at load ([`WinogradWeight`]); the
//! input is transformed in bands of tile rows into a reused buffer, so memory stays bounded.

use super::Tier;
use super::gemm::{Exec, Lhs, Operand, Product, Rhs, Src};
use rayon::prelude::*;

/// Elements of the transformed-input and product buffers per band (each ~16 MiB).
const BAND_BUDGET: usize = 4 << 20;

/// `U[ξ][co][ci]` for the 16 positions ξ of the 4×4 transformed tile.
pub struct WinogradWeight {
    u: Vec<f32>,
    c_out: usize,
    c_in: usize,
}

impl std::fmt::Debug for WinogradWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WinogradWeight({}x{}x3x3)", self.c_out, self.c_in)
    }
}

impl WinogradWeight {
    /// From an OIHW 3×3 kernel.
    pub fn new(w: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(w.len(), c_out * c_in * 9);
        let mut u = vec![0f32; 16 * c_out * c_in];
        for co in 0..c_out {
            for ci in 0..c_in {
                let g = &w[(co * c_in + ci) * 9..][..9];
                // G g: 4×3, G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]].
                let mut gg = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = g0;
                    gg[1][c] = 0.5 * (g0 + g1 + g2);
                    gg[2][c] = 0.5 * (g0 - g1 + g2);
                    gg[3][c] = g2;
                }
                // (G g) Gᵀ: 4×4.
                for (r, row) in gg.iter().enumerate() {
                    let (a, b, c) = (row[0], row[1], row[2]);
                    let t = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (j, &v) in t.iter().enumerate() {
                        u[((r * 4 + j) * c_out + co) * c_in + ci] = v;
                    }
                }
            }
        }
        Self { u, c_out, c_in }
    }

    pub fn c_out(&self) -> usize {
        self.c_out
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }
}

/// `out[b] = act((out[b] if accumulate) + bias + conv3x3(up(x[b])))` for `x`
/// `[batch, c_in, h/u, w/u]` and `up` the nearest-neighbour upsampling by `u` (1 or 2);
/// `out` `[batch, c_out, h, w]` holds a residual to add to when `accumulate`; `bias` is
/// `[c_out]` or one row per image `[batch, c_out]`; `act` is a ReLU when `relu`. Bias and
/// ReLU are applied as each output tile is written (no passes of their own).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    tier: Tier,
    x: &[f32],
    wt: &WinogradWeight,
    batch: usize,
    h: usize,
    w: usize,
    u: usize,
    out: &mut [f32],
    accumulate: bool,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let (c_in, c_out) = (wt.c_in, wt.c_out);
    if let Some(b) = bias {
        assert!(b.len() == c_out || b.len() == batch * c_out);
    }
    assert!((u == 1 || u == 2) && h.is_multiple_of(u) && w.is_multiple_of(u));
    let (sh, sw) = (h / u, w / u);
    assert_eq!(x.len(), batch * c_in * sh * sw);
    assert_eq!(out.len(), batch * c_out * h * w);
    if h == 0 || w == 0 {
        return;
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let band_rows = (BAND_BUDGET / (16 * c_in.max(c_out) * tw).max(1)).clamp(1, th);
    let max_t = band_rows * tw;
    let mut v = vec![0f32; c_in * 16 * max_t];
    let mut m = vec![0f32; c_out * 16 * max_t];
    let threads = super::num_threads();
    for b in 0..batch {
        let xb = &x[b * c_in * sh * sw..][..c_in * sh * sw];
        let ob = &mut out[b * c_out * h * w..][..c_out * h * w];
        for ty0 in (0..th).step_by(band_rows) {
            let nty = band_rows.min(th - ty0);
            let t = nty * tw;
            // V[ci][ξ][tile]
            v[..c_in * 16 * t]
                .par_chunks_mut(16 * t)
                .enumerate()
                .for_each(|(ci, vc)| {
                    input_transform(&xb[ci * sh * sw..][..sh * sw], h, w, u, ty0, nty, vc)
                });
            // M[co][ξ][tile] = U[ξ] · V[ξ]
            for xi in 0..16 {
                let op = |s, rs| Operand {
                    data: Src::F32(s),
                    rs,
                    cs: 1,
                };
                super::gemm::gemm(
                    Exec {
                        tier,
                        product: Product::F32,
                        threads,
                    },
                    [c_out, t, c_in],
                    (&mut m[xi * t..], 16 * t),
                    false,
                    Lhs::Strided(op(&wt.u[xi * c_out * c_in..][..c_out * c_in], c_in)),
                    Rhs::Strided(op(&v[xi * t..], 16 * t)),
                );
            }
            let bias_b = bias.map(|bb| {
                if bb.len() == c_out {
                    bb
                } else {
                    &bb[b * c_out..][..c_out]
                }
            });
            ob.par_chunks_mut(h * w)
                .zip(m[..c_out * 16 * t].par_chunks(16 * t))
                .enumerate()
                .for_each(|(co, (oc, mc))| {
                    let bv = bias_b.map_or(0.0, |bb| bb[co]);
                    output_transform(mc, h, w, ty0, nty, oc, accumulate, bv, relu)
                });
        }
    }
}

/// `Bᵀ d B` for every tile of tile rows `ty0..ty0+nty` of one channel (`x` of size
/// `h/u × w/u`, seen upsampled to `h × w`), into `vc[ξ][tile]`.
fn input_transform(
    x: &[f32],
    h: usize,
    w: usize,
    u: usize,
    ty0: usize,
    nty: usize,
    vc: &mut [f32],
) {
    let sw = w / u;
    let tw = w.div_ceil(2);
    let t = nty * tw;
    // Padded width: one zero column left, enough on the right for the last tile.
    let pw = 2 * tw + 2;
    let mut rows = vec![0f32; 4 * pw];
    let mut bt = vec![0f32; 4 * pw];
    for i in 0..nty {
        let ty = ty0 + i;
        // Input rows 2ty−1 .. 2ty+2, zero outside.
        for r in 0..4 {
            let dst = &mut rows[r * pw..(r + 1) * pw];
            dst.fill(0.0);
            let iy = (2 * ty + r) as isize - 1;
            if iy >= 0 && (iy as usize) < h {
                let sy = iy as usize / u;
                let src = &x[sy * sw..(sy + 1) * sw];
                if u == 1 {
                    dst[1..1 + w].copy_from_slice(src);
                } else {
                    for (pair, &v) in dst[1..1 + w].chunks_exact_mut(2).zip(src) {
                        pair[0] = v;
                        pair[1] = v;
                    }
                }
            }
        }
        // Bᵀ d along rows: [d0 − d2, d1 + d2, d2 − d1, d1 − d3].
        {
            let (r0, rest) = rows.split_at(pw);
            let (r1, rest) = rest.split_at(pw);
            let (r2, r3) = rest.split_at(pw);
            let (b0, rest) = bt.split_at_mut(pw);
            let (b1, rest) = rest.split_at_mut(pw);
            let (b2, b3) = rest.split_at_mut(pw);
            for c in 0..pw {
                b0[c] = r0[c] - r2[c];
                b1[c] = r1[c] + r2[c];
                b2[c] = r2[c] - r1[c];
                b3[c] = r1[c] - r3[c];
            }
        }
        // (Bᵀ d) B along columns of each tile, written per ξ = 4·row + column.
        for r in 0..4 {
            let br = &bt[r * pw..(r + 1) * pw];
            let base = i * tw;
            let (v0, rest) = vc.split_at_mut((r * 4 + 1) * t);
            let v0 = &mut v0[(r * 4) * t + base..][..tw];
            let (v1, rest) = rest.split_at_mut(t);
            let v1 = &mut v1[base..base + tw];
            let (v2, v3) = rest.split_at_mut(t);
            let v2 = &mut v2[base..base + tw];
            let v3 = &mut v3[base..base + tw];
            for tx in 0..tw {
                let c = 2 * tx;
                let (d0, d1, d2, d3) = (br[c], br[c + 1], br[c + 2], br[c + 3]);
                v0[tx] = d0 - d2;
                v1[tx] = d1 + d2;
                v2[tx] = d2 - d1;
                v3[tx] = d1 - d3;
            }
        }
    }
}

/// `Aᵀ M A` for every tile of the band of one output channel, added into (or written to)
/// its rows of `oc`.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    mc: &[f32],
    h: usize,
    w: usize,
    ty0: usize,
    nty: usize,
    oc: &mut [f32],
    accumulate: bool,
    bias: f32,
    relu: bool,
) {
    let tw = w.div_ceil(2);
    let t = nty * tw;
    let mx = |xi: usize, tile: usize| mc[xi * t + tile];
    for i in 0..nty {
        let ty = ty0 + i;
        for tx in 0..tw {
            let tile = i * tw + tx;
            // Aᵀ M: rows [m0 + m1 + m2, m1 − m2 − m3], then the same along columns.
            let mut s0 = [0f32; 4];
            let mut s1 = [0f32; 4];
            for j in 0..4 {
                let (m0, m1, m2, m3) = (
                    mx(j, tile),
                    mx(4 + j, tile),
                    mx(8 + j, tile),
                    mx(12 + j, tile),
                );
                s0[j] = m0 + m1 + m2;
                s1[j] = m1 - m2 - m3;
            }
            let y = [
                [s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]],
                [s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]],
            ];
            for (dy, yr) in y.iter().enumerate() {
                let oy = 2 * ty + dy;
                if oy >= h {
                    break;
                }
                for (dx, &val) in yr.iter().enumerate() {
                    let ox = 2 * tx + dx;
                    if ox >= w {
                        break;
                    }
                    let o = &mut oc[oy * w + ox];
                    // (residual + bias) + conv, the order the unfused passes had.
                    let v = if accumulate { *o + bias } else { bias } + val;
                    *o = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::{ConvShape, ConvWeight, conv2d};

    /// On every tier, against the unfolded convolution of the portable tier.
    #[test]
    fn matches_direct_convolution() {
        for tier in Tier::runnable() {
            matches_direct_on(tier);
        }
    }

    fn matches_direct_on(tier: Tier) {
        let generic = Tier::GENERIC;
        let mut seed = 0;
        let mut rnd = |n: usize| {
            seed += 1;
            crate::kernels::test_values(n, seed)
        };
        for (b, ci, co, h, w) in [
            (1, 3, 5, 6, 8),
            (2, 4, 3, 7, 5),
            (1, 16, 8, 1, 1),
            (1, 8, 8, 33, 20),
        ] {
            let x = rnd(b * ci * h * w);
            let wt = rnd(co * ci * 9);
            let bias = rnd(co);
            let shape = ConvShape {
                batch: b,
                c_in: ci,
                h,
                w,
                c_out: co,
                kernel: 3,
                stride: 1,
                padding: 1,
                upsample: 1,
            };
            let want = conv2d(
                generic,
                &x,
                ConvWeight::F32(&wt),
                Some(&bias),
                shape,
                None,
                false,
            );
            let ww = WinogradWeight::new(&wt, co, ci);
            let mut got = vec![0f32; b * co * h * w];
            conv3x3(
                tier,
                &x,
                &ww,
                b,
                h,
                w,
                1,
                &mut got,
                false,
                Some(&bias),
                false,
            );
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{tier} {:?}: {err}",
                (b, ci, co, h, w)
            );
            // Upsampled input: the same convolution of the 2x nearest-neighbour image.
            let (h2, w2) = (2 * h, 2 * w);
            let want = conv2d(
                generic,
                &x,
                ConvWeight::F32(&wt),
                None,
                ConvShape {
                    upsample: 2,
                    ..shape
                },
                None,
                false,
            );
            let mut got = vec![0f32; b * co * h2 * w2];
            conv3x3(tier, &x, &ww, b, h2, w2, 2, &mut got, false, None, false);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "upsampled {:?}: {err}",
                (b, ci, co, h, w)
            );
        }
    }
}
