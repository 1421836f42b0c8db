//! 2-D convolution (NCHW, OIHW weights, square kernel, symmetric zero padding) on f32.
//!
//! `out[b] = W · col(x[b]) + bias` with `W` the weight as a `[c_out, c_in·k·k]` matrix (its
//! natural OIHW layout, no repacking) and `col` the im2col matrix `[c_in·k·k, oh·ow]`. The
//! 1x1 stride-1 case multiplies by the input itself. Otherwise `col` is built for a band of
//! output rows at a time into one reused buffer, each of its rows a shifted copy of an input
//! row (cheap, contiguous), and the GEMM writes straight into the NCHW output, whose
//! accumulator starts at the bias.

use super::bf16::{Lhs, Operand, PackedA, Rhs, Src};
use rayon::prelude::*;

/// im2col band size, in f32 elements (16 MiB: stays in the last-level cache while the GEMM
/// streams it, yet wide enough for the GEMM to run at full speed).
const COL_BUDGET: usize = 4 << 20;

/// A convolution's weight as a `[c_out, c_in·k·k]` matrix: f32, or bf16 packed for the bf16
/// dot-product GEMM.
#[derive(Clone, Copy)]
pub enum ConvWeight<'a> {
    F32(&'a [f32]),
    Bf16(&'a PackedA),
}

/// Convolution shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |i: usize| (i + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.h), o(self.w))
    }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, all row-major with the given row strides; a bf16
/// `lhs` (the weight) goes through the bf16 dot-product GEMM.
#[allow(clippy::too_many_arguments)]
fn gemm_rowmajor(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: ConvWeight,
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    threads: usize,
) {
    let par = if threads > 1 && m * n * k >= 1 << 18 {
        threads
    } else {
        1
    };
    match lhs {
        ConvWeight::F32(lhs) => super::gemm::gemm(
            [m, n, k],
            (dst, dst_rs, 1),
            accumulate,
            (lhs, lhs_rs, 1),
            (rhs, rhs_rs, 1),
            par,
        ),
        ConvWeight::Bf16(lhs) => super::bf16::gemm(
            [m, n, k],
            (dst, dst_rs),
            accumulate,
            Lhs::Packed(lhs),
            Rhs::Strided(Operand {
                data: Src::F32(rhs),
                rs: rhs_rs,
                cs: 1,
            }),
            par,
        ),
    }
}

/// Convolution of `x` (`[batch, c_in, h, w]`) by `weight` (`[c_out, c_in, k, k]`) plus
/// `bias` (`[c_out]`), returning `[batch, c_out, oh, ow]`. The weight may be f32 or bf16.
pub fn conv2d(x: &[f32], weight: ConvWeight, bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    let ConvShape {
        batch,
        c_in,
        h,
        w,
        c_out,
        kernel: kk,
        stride,
        padding,
    } = s;
    assert!(kk >= 1 && stride >= 1 && h + 2 * padding >= kk && w + 2 * padding >= kk);
    assert_eq!(x.len(), batch * c_in * h * w);
    let kdim = c_in * kk * kk;
    match weight {
        ConvWeight::F32(w) => assert_eq!(w.len(), c_out * kdim),
        ConvWeight::Bf16(w) => assert_eq!((w.rows(), w.cols()), (c_out, kdim)),
    }
    let (oh, ow) = s.out_hw();
    let plane = oh * ow;
    let threads = super::num_threads();
    let mut out = vec![0f32; batch * c_out * plane];
    let accumulate = bias.is_some();
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out);
        for ob in out.chunks_mut(plane * c_out) {
            for (o, &bv) in ob.chunks_mut(plane).zip(b) {
                o.fill(bv);
            }
        }
    }
    if kk == 1 && stride == 1 && padding == 0 {
        for (ob, xb) in out.chunks_mut(c_out * plane).zip(x.chunks(c_in * plane)) {
            gemm_rowmajor(
                c_out, plane, c_in, ob, plane, accumulate, weight, c_in, xb, plane, threads,
            );
        }
        return out;
    }
    let rows = (COL_BUDGET / (kdim * ow).max(1)).clamp(1, oh);
    let mut col = vec![0f32; kdim * rows * ow];
    for (ob, xb) in out.chunks_mut(c_out * plane).zip(x.chunks(c_in * h * w)) {
        for oy0 in (0..oh).step_by(rows) {
            let nr = rows.min(oh - oy0);
            let n = nr * ow;
            let col = &mut col[..kdim * n];
            im2col_band(xb, col, s, oy0, nr, ow);
            gemm_rowmajor(
                c_out,
                n,
                kdim,
                &mut ob[oy0 * ow..],
                plane,
                accumulate,
                weight,
                kdim,
                col,
                n,
                threads,
            );
        }
    }
    out
}

/// Fills `col` (`[c_in·k·k, nr·ow]`) for output rows `oy0..oy0+nr` of one image.
fn im2col_band(x: &[f32], col: &mut [f32], s: ConvShape, oy0: usize, nr: usize, ow: usize) {
    let (h, w, kk, stride, pad) = (s.h, s.w, s.kernel, s.stride, s.padding);
    let n = nr * ow;
    col.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let ci = r / (kk * kk);
        let ky = (r / kk) % kk;
        let kx = r % kk;
        let src = &x[ci * h * w..(ci + 1) * h * w];
        // Output columns whose input column ox*stride + kx - pad falls inside [0, w).
        let lo = pad.saturating_sub(kx).div_ceil(stride).min(ow);
        let hi = if w + pad > kx {
            ((w + pad - kx - 1) / stride + 1).min(ow)
        } else {
            0
        }
        .max(lo);
        for (i, d) in dst.chunks_exact_mut(ow).enumerate() {
            let iy = (oy0 + i) * stride + ky;
            if iy < pad || iy - pad >= h {
                d.fill(0.0);
                continue;
            }
            let srow = &src[(iy - pad) * w..(iy - pad + 1) * w];
            d[..lo].fill(0.0);
            d[hi..].fill(0.0);
            if hi > lo {
                let ix0 = lo * stride + kx - pad;
                if stride == 1 {
                    d[lo..hi].copy_from_slice(&srow[ix0..ix0 + (hi - lo)]);
                } else {
                    for (j, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = srow[ix0 + j * stride];
                    }
                }
            }
        }
    });
}
