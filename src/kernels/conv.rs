//! 2-D convolution (NCHW, OIHW weights, square kernel, symmetric zero padding) on f32.
//!
//! `out[b] = W · col(x[b]) + bias` with `W` the weight as a `[c_out, c_in·k·k]` matrix (its
//! natural OIHW layout, no repacking) and `col` the im2col matrix `[c_in·k·k, oh·ow]`. The
//! 1x1 stride-1 case multiplies by the input itself. Otherwise `col` is built for a band of
//! output rows at a time into one reused buffer, each of its rows a shifted copy of an input
//! row (cheap, contiguous), and the GEMM writes straight into the NCHW output, adding the
//! bias (per channel: per row of the product) in its epilogue. An f32 weight multiplies in
//! f32, a packed bf16 weight as a bf16 product; 3×3 kernels prepared for Winograd go to
//! [`super::winograd`].

use super::Tier;
use super::gemm::{Epilogue, Exec, Lhs, Operand, PackedA, Product, Rhs, Src};
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
    /// A 3×3 kernel transformed for Winograd's F(2×2, 3×3) (stride 1, padding 1 only).
    Winograd(&'a super::winograd::WinogradWeight),
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
    /// Nearest-neighbour upsampling factor applied to `x` before the convolution (1 or 2):
    /// the unfolding reads the small input directly, so the upsampled map is never built.
    pub upsample: usize,
}

impl ConvShape {
    /// Input size as the convolution sees it (after upsampling).
    pub fn in_hw(&self) -> (usize, usize) {
        (self.h * self.upsample, self.w * self.upsample)
    }

    pub fn out_hw(&self) -> (usize, usize) {
        let o = |i: usize| (i + 2 * self.padding - self.kernel) / self.stride + 1;
        let (h, w) = self.in_hw();
        (o(h), o(w))
    }
}

/// An im2col buffer at least `len` long, lent to `f`. Buffers are kept for the next call: the
/// unfolding writes every element it hands to the GEMM, so they are never cleared (allocating
/// and zeroing up to 16 MiB per convolution was a serial pass of its own). A shared stack,
/// not a thread-local: rayon may start another convolution on this thread while it waits.
fn with_col<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
    let spare = || SPARE.lock().unwrap_or_else(|e| e.into_inner());
    let mut col = spare().pop().unwrap_or_default();
    if col.len() < len {
        col.resize(len, 0.0);
    }
    let r = f(&mut col[..len]);
    let mut kept = spare();
    if kept.len() < 2 {
        kept.push(col);
    }
    r
}

/// Threads for one convolution GEMM: all of them unless it is too small to split.
fn gemm_threads(threads: usize, m: usize, n: usize, k: usize) -> usize {
    if threads > 1 && m * n * k >= 1 << 18 {
        threads
    } else {
        1
    }
}

/// Unfolds each image of `x` a band of output rows at a time and calls
/// `f(image, first output row, band columns n, col)` with the band's `[c_in·k·k, n]` im2col
/// matrix (`n` = rows × output width).
fn for_each_band(x: &[f32], s: ConvShape, mut f: impl FnMut(usize, usize, usize, &[f32])) {
    let kdim = s.c_in * s.kernel * s.kernel;
    let (oh, ow) = s.out_hw();
    let rows = (COL_BUDGET / (kdim * ow).max(1)).clamp(1, oh);
    with_col(kdim * rows * ow, |col| {
        for (bi, xb) in x.chunks(s.c_in * s.h * s.w).enumerate() {
            for oy0 in (0..oh).step_by(rows) {
                let nr = rows.min(oh - oy0);
                let n = nr * ow;
                let col = &mut col[..kdim * n];
                im2col_band(xb, col, s, oy0, nr, ow);
                f(bi, oy0, n, col);
            }
        }
    });
}

/// Convolution of `x` (`[batch, c_in, h, w]`) by `weight` (`[c_out, c_in, k, k]`) plus
/// `bias` (`[c_out]`, or `[batch, c_out]`: one per image) plus `init` (`[batch, c_out, oh,
/// ow]`, e.g. a residual), then a ReLU when `relu`, returning `[batch, c_out, oh, ow]`. Bias
/// and residual are added into the GEMM's accumulator, not in extra passes (and the ReLU too
/// on the Winograd path).
pub fn conv2d(
    tier: Tier,
    x: &[f32],
    weight: ConvWeight,
    bias: Option<&[f32]>,
    s: ConvShape,
    init: Option<Vec<f32>>,
    relu: bool,
) -> Vec<f32> {
    let ConvShape {
        batch,
        c_in,
        h,
        w,
        c_out,
        kernel: kk,
        stride,
        padding,
        upsample,
    } = s;
    let (uh, uw) = s.in_hw();
    assert!(kk >= 1 && stride >= 1 && uh + 2 * padding >= kk && uw + 2 * padding >= kk);
    assert!(upsample == 1 || upsample == 2);
    assert_eq!(x.len(), batch * c_in * h * w);
    if let Some(b) = bias {
        assert!(b.len() == c_out || b.len() == batch * c_out);
    }
    let kdim = c_in * kk * kk;
    let (lhs, product) = match weight {
        ConvWeight::F32(w) => {
            assert_eq!(w.len(), c_out * kdim);
            let op = Operand {
                data: Src::F32(w),
                rs: kdim,
                cs: 1,
            };
            (Lhs::Strided(op), Product::F32)
        }
        ConvWeight::Bf16(w) => {
            assert_eq!((w.rows(), w.cols()), (c_out, kdim));
            (Lhs::Packed(w), Product::Bf16)
        }
        ConvWeight::Winograd(wt) => {
            assert_eq!((wt.c_out(), wt.c_in()), (c_out, c_in));
            assert!(kk == 3 && stride == 1 && padding == 1);
            return conv_winograd(tier, x, wt, bias, s, init, relu);
        }
    };
    let mut out = conv_gemm(tier, x, lhs, product, bias, s, init);
    if relu {
        out.par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
    }
    out
}

/// `bias` for image `bi`: `[c_out]` shared, or row `bi` of `[batch, c_out]`.
fn bias_of(bias: Option<&[f32]>, c_out: usize, bi: usize) -> Option<&[f32]> {
    bias.map(|b| {
        if b.len() == c_out {
            b
        } else {
            &b[bi * c_out..][..c_out]
        }
    })
}

/// [`conv2d`] through Winograd's F(2×2, 3×3): the output starts at the bias (and `init`).
fn conv_winograd(
    tier: Tier,
    x: &[f32],
    wt: &super::winograd::WinogradWeight,
    bias: Option<&[f32]>,
    s: ConvShape,
    init: Option<Vec<f32>>,
    relu: bool,
) -> Vec<f32> {
    let (oh, ow) = s.out_hw();
    let (plane, c_out) = (oh * ow, s.c_out);
    let has_init = init.is_some();
    let mut out = init.unwrap_or_else(|| vec![0f32; s.batch * c_out * plane]);
    assert_eq!(out.len(), s.batch * c_out * plane);
    let (uh, uw) = s.in_hw();
    super::winograd::conv3x3(
        tier, x, wt, s.batch, uh, uw, s.upsample, &mut out, has_init, bias, relu,
    );
    out
}

/// The output of [`conv_gemm`]: the caller's initial values (accumulated into) or fresh
/// memory (written only).
enum Out<'a> {
    Init(&'a mut [f32]),
    Fresh(&'a mut [std::mem::MaybeUninit<f32>]),
}

impl Out<'_> {
    /// `out[off..]` (row stride `ld`) (+)= w · rhs + epi.
    fn gemm(
        &mut self,
        x: Exec,
        (off, ld): (usize, usize),
        dims: [usize; 3],
        w: Lhs,
        rhs: Operand,
        epi: Epilogue,
    ) {
        use super::gemm::{gemm_add, gemm_uninit};
        let b = Rhs::Strided(rhs);
        match self {
            Out::Init(d) => gemm_add(x, dims, (&mut d[off..], ld), true, epi, w, b),
            Out::Fresh(d) => gemm_uninit(x, dims, (&mut d[off..], ld), epi, w, b),
        }
    }
}

/// [`conv2d`] as products of the weight (`[c_out, c_in·k·k]`) by the input or its unfolding:
/// the bias (per channel = per row of the product) goes in through the epilogue and a fresh
/// output is never zeroed, so nothing but the unfolding and the product touches the data.
fn conv_gemm(
    tier: Tier,
    x: &[f32],
    w: Lhs,
    product: Product,
    bias: Option<&[f32]>,
    s: ConvShape,
    init: Option<Vec<f32>>,
) -> Vec<f32> {
    let (c_in, c_out, kk) = (s.c_in, s.c_out, s.kernel);
    let kdim = c_in * kk * kk;
    let (oh, ow) = s.out_hw();
    let plane = oh * ow;
    let total = s.batch * c_out * plane;
    let threads = super::num_threads();
    let epi = |bi: usize| Epilogue {
        row_bias: bias_of(bias, c_out, bi),
        ..Default::default()
    };
    let mut fresh: Vec<f32> = Vec::new();
    let mut init = init;
    let mut out = match &mut init {
        Some(v) => {
            assert_eq!(v.len(), total);
            Out::Init(v)
        }
        None => {
            fresh.reserve_exact(total);
            Out::Fresh(&mut fresh.spare_capacity_mut()[..total])
        }
    };
    let exec = |m, n, k| Exec {
        tier,
        product,
        threads: gemm_threads(threads, m, n, k),
    };
    if kk == 1 && s.stride == 1 && s.padding == 0 && s.upsample == 1 {
        for (bi, xb) in x.chunks(c_in * plane).enumerate() {
            let rhs = Operand {
                data: Src::F32(xb),
                rs: plane,
                cs: 1,
            };
            let dims = [c_out, plane, c_in];
            out.gemm(
                exec(c_out, plane, c_in),
                (bi * c_out * plane, plane),
                dims,
                w,
                rhs,
                epi(bi),
            );
        }
    } else {
        for_each_band(x, s, |bi, oy0, n, col| {
            let rhs = Operand {
                data: Src::F32(col),
                rs: n,
                cs: 1,
            };
            let off = bi * c_out * plane + oy0 * ow;
            out.gemm(
                exec(c_out, n, kdim),
                (off, plane),
                [c_out, n, kdim],
                w,
                rhs,
                epi(bi),
            );
        });
    }
    match init {
        Some(v) => v,
        None => {
            // SAFETY: the GEMMs above wrote every element: each image's c_out × plane block,
            // band by band (the bands cover all oh rows).
            unsafe { fresh.set_len(total) };
            fresh
        }
    }
}

/// `d[j] = src[(ix0 + j) / 2]`: each source value written twice, in a loop that vectorises.
fn upsample2_row(d: &mut [f32], src: &[f32], ix0: usize) {
    let (mut j, mut ix) = (0, ix0);
    if ix % 2 == 1 && !d.is_empty() {
        d[0] = src[ix / 2];
        j = 1;
        ix += 1;
    }
    let rest = &mut d[j..];
    let pairs = rest.len() / 2;
    for (pair, &v) in rest.chunks_exact_mut(2).zip(&src[ix / 2..ix / 2 + pairs]) {
        pair[0] = v;
        pair[1] = v;
    }
    if rest.len() % 2 == 1 {
        rest[rest.len() - 1] = src[(ix + rest.len() - 1) / 2];
    }
}

/// Fills `col` (`[c_in·k·k, nr·ow]`) for output rows `oy0..oy0+nr` of one image.
fn im2col_band(x: &[f32], col: &mut [f32], s: ConvShape, oy0: usize, nr: usize, ow: usize) {
    let (kk, stride, pad, u) = (s.kernel, s.stride, s.padding, s.upsample);
    // (h, w): the input as the convolution sees it; rows and columns of the stored input
    // are those divided by the upsampling factor.
    let (h, w) = s.in_hw();
    let (sh, sw) = (s.h, s.w);
    let n = nr * ow;
    col.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let ci = r / (kk * kk);
        let ky = (r / kk) % kk;
        let kx = r % kk;
        let src = &x[ci * sh * sw..(ci + 1) * sh * sw];
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
            let sy = (iy - pad) / u;
            let srow = &src[sy * sw..(sy + 1) * sw];
            d[..lo].fill(0.0);
            d[hi..].fill(0.0);
            if hi > lo {
                let ix0 = lo * stride + kx - pad;
                if u == 2 && stride == 1 {
                    upsample2_row(&mut d[lo..hi], srow, ix0);
                } else if u > 1 {
                    for (j, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = srow[(ix0 + j * stride) / u];
                    }
                } else if stride == 1 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::round_bf16;
    use crate::kernels::test_values;

    /// Direct convolution in f64 (upsampling by index), plus per-image bias and `init`.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], s: ConvShape, init: &[f32]) -> Vec<f64> {
        let (oh, ow) = s.out_hw();
        let (uh, uw) = s.in_hw();
        let k = s.kernel;
        let mut out = vec![0f64; s.batch * s.c_out * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[b * s.c_out + co] as f64;
                        for ci in 0..s.c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= uh as isize || ix >= uw as isize {
                                        continue;
                                    }
                                    let (sy, sx) =
                                        (iy as usize / s.upsample, ix as usize / s.upsample);
                                    let xv = x[((b * s.c_in + ci) * s.h + sy) * s.w + sx];
                                    let wv = w[((co * s.c_in + ci) * k + ky) * k + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        let i = ((b * s.c_out + co) * oh + oy) * ow + ox;
                        out[i] = acc + init[i] as f64;
                    }
                }
            }
        }
        out
    }

    /// f32 and packed bf16 weights, 1x1 and 3x3, strides 1 and 2, upsampling, per-image bias
    /// and an initial residual: the same numbers (bf16: of the rounded operands) on every
    /// tier this CPU runs.
    #[test]
    fn matches_direct_convolution_on_every_tier() {
        let shapes = [
            (2, 5, 7, 9, 11, 3, 1, 1),
            (1, 4, 6, 8, 8, 3, 2, 1),
            (2, 6, 5, 5, 3, 1, 1, 1),
            (1, 3, 4, 5, 4, 3, 1, 2),
            (1, 40, 70, 12, 10, 3, 1, 1),
        ];
        for (seed, &(batch, c_in, c_out, h, w, kernel, stride, upsample)) in
            shapes.iter().enumerate()
        {
            let s = ConvShape {
                batch,
                c_in,
                h,
                w,
                c_out,
                kernel,
                stride,
                padding: kernel / 2,
                upsample,
            };
            let (oh, ow) = s.out_hw();
            let seed = seed as u64 * 10;
            let x = test_values(batch * c_in * h * w, seed + 1);
            let wt = test_values(c_out * c_in * kernel * kernel, seed + 2);
            let bias = test_values(batch * c_out, seed + 3);
            let init = test_values(batch * c_out * oh * ow, seed + 4);
            let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let wr: Vec<f32> = wt.iter().map(|&v| round_bf16(v)).collect();
            let w16: Vec<half::bf16> = wr.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let packed = PackedA::new(&w16, c_out, c_in * kernel * kernel);
            let want32 = reference(&x, &wt, &bias, s, &init);
            let want16 = reference(&xr, &wr, &bias, s, &init);
            for tier in Tier::runnable() {
                for (weight, want) in [
                    (ConvWeight::F32(&wt), &want32),
                    (ConvWeight::Bf16(&packed), &want16),
                ] {
                    let got = conv2d(tier, &x, weight, Some(&bias), s, Some(init.clone()), false);
                    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{tier} {s:?} at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
