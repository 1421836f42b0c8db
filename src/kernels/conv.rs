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
    let par = gemm_threads(threads, m, n, k);
    match lhs {
        ConvWeight::F32(lhs) => super::gemm::gemm(
            [m, n, k],
            (dst, dst_rs, 1),
            accumulate,
            (lhs, lhs_rs, 1),
            (rhs, rhs_rs, 1),
            par,
        ),
        ConvWeight::Winograd(_) => unreachable!("Winograd convolutions do not unfold"),
        ConvWeight::Bf16(_) => unreachable!("bf16 convolutions run in conv2d_bf16"),
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
/// ow]`, e.g. a residual), returning `[batch, c_out, oh, ow]`. Bias and residual are added
/// into the GEMM's accumulator, not in extra passes.
pub fn conv2d(
    x: &[f32],
    weight: ConvWeight,
    bias: Option<&[f32]>,
    s: ConvShape,
    init: Option<Vec<f32>>,
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
    let kdim = c_in * kk * kk;
    match weight {
        ConvWeight::F32(w) => assert_eq!(w.len(), c_out * kdim),
        ConvWeight::Bf16(w) => assert_eq!((w.rows(), w.cols()), (c_out, kdim)),
        ConvWeight::Winograd(w) => {
            assert_eq!((w.c_out(), w.c_in()), (c_out, c_in));
            assert!(kk == 3 && stride == 1 && padding == 1);
        }
    }
    if let ConvWeight::Bf16(w) = weight {
        return conv2d_bf16(x, w, bias, s, init);
    }
    let (oh, ow) = s.out_hw();
    let plane = oh * ow;
    let threads = super::num_threads();
    let has_init = init.is_some();
    let mut out = init.unwrap_or_else(|| vec![0f32; batch * c_out * plane]);
    assert_eq!(out.len(), batch * c_out * plane);
    let accumulate = bias.is_some() || has_init;
    if let Some(b) = bias {
        assert!(b.len() == c_out || b.len() == batch * c_out);
        for (bi, ob) in out.chunks_mut(plane * c_out).enumerate() {
            let bb = if b.len() == c_out {
                b
            } else {
                &b[bi * c_out..][..c_out]
            };
            for (o, &bv) in ob.chunks_mut(plane).zip(bb) {
                if has_init {
                    o.iter_mut().for_each(|v| *v += bv);
                } else {
                    o.fill(bv);
                }
            }
        }
    }
    if let ConvWeight::Winograd(wt) = weight {
        super::winograd::conv3x3(x, wt, batch, uh, uw, upsample, &mut out, accumulate);
        return out;
    }
    if kk == 1 && stride == 1 && padding == 0 && upsample == 1 {
        for (ob, xb) in out.chunks_mut(c_out * plane).zip(x.chunks(c_in * plane)) {
            gemm_rowmajor(
                c_out, plane, c_in, ob, plane, accumulate, weight, c_in, xb, plane, threads,
            );
        }
        return out;
    }
    for_each_band(x, s, |bi, oy0, n, col| {
        gemm_rowmajor(
            c_out,
            n,
            kdim,
            &mut out[bi * c_out * plane + oy0 * ow..],
            plane,
            accumulate,
            weight,
            kdim,
            col,
            n,
            threads,
        )
    });
    out
}

/// The output of [`conv2d_bf16`]: the caller's initial values (accumulated into) or fresh
/// memory (written only).
enum Out<'a> {
    Init(&'a mut [f32]),
    Fresh(&'a mut [std::mem::MaybeUninit<f32>]),
}

impl Out<'_> {
    /// `out[off..]` (row stride `ld`) (+)= w · rhs + epi.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        off: usize,
        ld: usize,
        [m, n, k]: [usize; 3],
        w: &PackedA,
        rhs: Operand,
        epi: super::bf16::Epilogue,
        threads: usize,
    ) {
        use super::bf16::{gemm_add, gemm_uninit};
        let (a, b) = (Lhs::Packed(w), Rhs::Strided(rhs));
        match self {
            Out::Init(d) => gemm_add([m, n, k], (&mut d[off..], ld), true, epi, a, b, threads),
            Out::Fresh(d) => gemm_uninit([m, n, k], (&mut d[off..], ld), epi, a, b, threads),
        }
    }
}

/// [`conv2d`] with a packed bf16 weight: the bias (per channel = per row of the GEMM) goes in
/// through the GEMM's epilogue and a fresh output is never zeroed, so nothing but the
/// unfolding and the GEMM touches the data.
fn conv2d_bf16(
    x: &[f32],
    w: &PackedA,
    bias: Option<&[f32]>,
    s: ConvShape,
    init: Option<Vec<f32>>,
) -> Vec<f32> {
    let (batch, c_in, c_out, kk) = (s.batch, s.c_in, s.c_out, s.kernel);
    let kdim = c_in * kk * kk;
    let (oh, ow) = s.out_hw();
    let plane = oh * ow;
    let total = batch * c_out * plane;
    let threads = super::num_threads();
    if let Some(b) = bias {
        assert!(b.len() == c_out || b.len() == batch * c_out);
    }
    let bias_of = |bi: usize| {
        bias.map(|b| {
            if b.len() == c_out {
                b
            } else {
                &b[bi * c_out..][..c_out]
            }
        })
    };
    let epi = |bi: usize| super::bf16::Epilogue {
        row_bias: bias_of(bi),
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
    let par = |m, n, k| gemm_threads(threads, m, n, k);
    if kk == 1 && s.stride == 1 && s.padding == 0 && s.upsample == 1 {
        for (bi, xb) in x.chunks(c_in * plane).enumerate() {
            let rhs = Operand {
                data: Src::F32(xb),
                rs: plane,
                cs: 1,
            };
            let dims = [c_out, plane, c_in];
            out.gemm(
                bi * c_out * plane,
                plane,
                dims,
                w,
                rhs,
                epi(bi),
                par(c_out, plane, c_in),
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
                off,
                plane,
                [c_out, n, kdim],
                w,
                rhs,
                epi(bi),
                par(c_out, n, kdim),
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
