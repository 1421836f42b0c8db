//! The `avx512bf16` tier's bf16 product: `vdpbf16ps` multiplies pairs of bf16 along k and
//! adds both products into one f32 lane, so both operands are packed as pairs
//! `(x[2p], x[2p+1])` in one 32-bit word:
//! - A in panels of [`MR`] rows: `apack[i][p]` (each row's pairs contiguous, so f32 rows
//!   convert with plain vector stores), one word broadcast to all lanes per row and pair;
//!   a [`super::PackedA`] is read in place;
//! - B in panels of [`NR`] columns: `bpack[p][j]`, four zmm registers per pair; a
//!   [`super::PackedB`] is read in place.
//!
//! The micro-kernel keeps an `MR × NR` block of C in 24 registers.

// The kernels are unsafe functions from top to bottom (raw pointers and intrinsics that need
// the target features), so their bodies are not wrapped in further `unsafe` blocks.
#![allow(unsafe_op_in_unsafe_fn)]

use super::engine::{Kernel, TileEpilogue};
use super::{Lhs, MR, NR, Operand, Rhs, Src, bf16_bits, bits_of, pair};
use std::arch::x86_64::*;

/// The `vdpbf16ps` kernel.
pub(super) struct Dot;

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[inline(always)]
fn si(v: __m512bh) -> __m512i {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
}

// SAFETY: run only on the `avx512bf16` tier (gemm_raw's dispatch).
unsafe impl Kernel for Dot {
    type E = u32;
    const MR: usize = MR;
    const NR: usize = NR;
    /// A B micro-panel is `KC · NR · 4` bytes = 32 KiB.
    const KC: usize = 128;
    /// A B block is `KC · NC · 4` bytes = 512 KiB (L2).
    const NC: usize = 1024;
    const KU: usize = 2;

    unsafe fn pack_a(
        &self,
        a: Lhs,
        k: usize,
        (m, r0): (usize, usize),
        (p0, kc): (usize, usize),
        out: &mut [u32],
    ) {
        match a {
            Lhs::Strided(o) => pack_a_pairs(o, k, (m, r0), (p0, kc), out),
            // Read in place by the driver; packed here only if asked.
            Lhs::Packed(pa) => {
                for i in 0..MR {
                    let dst = &mut out[i * kc..(i + 1) * kc];
                    if r0 + i < m {
                        dst.copy_from_slice(&pa.row_pairs(r0 + i)[p0..p0 + kc]);
                    } else {
                        dst.fill(0);
                    }
                }
            }
        }
    }

    unsafe fn pack_b(
        &self,
        b: Rhs,
        k: usize,
        (p0, kc): (usize, usize),
        (j0, cols): (usize, usize),
        out: &mut [u32],
    ) {
        match b {
            Rhs::Strided(o) => pack_b_pairs(o, k, (p0, kc), (j0, cols), out),
            Rhs::Packed(pb) => {
                for p in 0..kc {
                    out[p * NR..(p + 1) * NR].copy_from_slice(pb.pair_row(j0, p0 + p));
                }
            }
            Rhs::PackedF16(pb) => {
                // As below, through f32 (f16 → f32 is exact, then rounded to bf16).
                for p in 0..kc {
                    let e = 2 * (p0 + p);
                    let dst = &mut out[p * NR..(p + 1) * NR];
                    for (j, d) in dst.iter_mut().enumerate() {
                        let lo = bf16_bits(pb.get(e, j0 + j)) as u32;
                        let hi = if e + 1 < k {
                            bf16_bits(pb.get(e + 1, j0 + j)) as u32
                        } else {
                            0
                        };
                        *d = lo | hi << 16;
                    }
                }
            }
            Rhs::PackedF32(pb) => {
                // Rows 2p and 2p + 1 of the panel, rounded and paired (zero past k).
                for p in 0..kc {
                    let e = 2 * (p0 + p);
                    let lo = pb.panel_row(j0, e);
                    let dst = &mut out[p * NR..(p + 1) * NR];
                    if e + 1 < k {
                        let hi = pb.panel_row(j0, e + 1);
                        for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                            *d = bf16_bits(l) as u32 | (bf16_bits(h) as u32) << 16;
                        }
                    } else {
                        for (d, &l) in dst.iter_mut().zip(lo) {
                            *d = bf16_bits(l) as u32;
                        }
                    }
                }
            }
        }
    }

    fn a_in_place(&self, a: Lhs, _m: usize, r0: usize) -> Option<(*const u32, usize)> {
        match a {
            Lhs::Packed(pa) => {
                let kp = pa.k.div_ceil(2);
                Some((pa.data[(r0 / MR) * kp * MR..].as_ptr(), kp))
            }
            Lhs::Strided(_) => None,
        }
    }

    fn b_in_place(&self, b: Rhs, j0: usize) -> Option<*const u32> {
        match b {
            Rhs::Packed(pb) => Some(pb.data[(j0 / NR) * pb.k.div_ceil(2) * NR..].as_ptr()),
            Rhs::Strided(_) | Rhs::PackedF32(_) | Rhs::PackedF16(_) => None,
        }
    }

    unsafe fn micro(
        &self,
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
        epi: &TileEpilogue,
    ) {
        micro(kc, a, lda, b, c, ldc, rows, cols, load, epi)
    }
}

/// Packs rows `r0..r0+MR` of A (zero past `m`), pairs `p0..p0 + kc`, as `out[i * kc + p]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_a_pairs(
    a: Operand,
    k: usize,
    (m, r0): (usize, usize),
    (p0, kc): (usize, usize),
    out: &mut [u32],
) {
    for i in 0..MR {
        let r = r0 + i;
        let dst = &mut out[i * kc..(i + 1) * kc];
        if r >= m {
            dst.fill(0);
            continue;
        }
        match a.data {
            Src::Bf16(s) if a.cs == 1 => {
                let row = &s[r * a.rs..r * a.rs + k];
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = pair(row, 2 * (p0 + p), k);
                }
            }
            Src::F32(s) if a.cs == 1 => {
                let row = &s[r * a.rs..r * a.rs + k];
                let mut p = 0;
                let dp = dst.as_mut_ptr();
                while p < kc {
                    // 16 pairs = 32 floats per step, masked at the end of the row.
                    let e0 = 2 * (p0 + p);
                    let n_el = (k - e0).min(32);
                    let lo = n_el.min(16);
                    let hi = n_el - lo;
                    let mlo: __mmask16 = ((1u32 << lo) - 1) as u16;
                    let mhi: __mmask16 = ((1u32 << hi) - 1) as u16;
                    let x0 = _mm512_maskz_loadu_ps(mlo, row.as_ptr().add(e0));
                    let x1 = if hi > 0 {
                        _mm512_maskz_loadu_ps(mhi, row.as_ptr().add(e0 + 16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let v = _mm512_cvtne2ps_pbh(x1, x0);
                    let np = (kc - p).min(16);
                    let m: __mmask16 = ((1u32 << np) - 1) as u16;
                    _mm512_mask_storeu_epi32(dp.add(p).cast(), m, si(v));
                    p += 16;
                }
            }
            _ => {
                for (p, d) in dst.iter_mut().enumerate() {
                    let e = 2 * (p0 + p);
                    let lo = bits_of(a, r, e);
                    let hi = if e + 1 < k { bits_of(a, r, e + 1) } else { 0 };
                    *d = lo as u32 | (hi as u32) << 16;
                }
            }
        }
    }
}

/// Packs pairs `p0..p0+kc` of B's columns `j0..j0+cols` (zero past `cols` and past `k`)
/// as `out[p * NR + j]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn pack_b_pairs(
    b: Operand,
    k: usize,
    (p0, kc): (usize, usize),
    (j0, cols): (usize, usize),
    out: &mut [u32],
) {
    let out = &mut out[..kc * NR];
    match b.data {
        Src::F32(s) if b.cs == 1 => {
            // Interleave rows 2p and 2p+1: [x0_0, x1_0, x0_1, x1_1, ...] as bf16.
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for p in 0..kc {
                let r0 = 2 * (p0 + p);
                let r1 = r0 + 1;
                let row0 = s.as_ptr().add(r0 * b.rs + j0);
                let has1 = r1 < k;
                let row1 = if has1 {
                    s.as_ptr().add(r1 * b.rs + j0)
                } else {
                    row0
                };
                for g in 0..NR / 16 {
                    let c0 = g * 16;
                    let dst = out.as_mut_ptr().add(p * NR + c0);
                    if c0 >= cols {
                        _mm512_storeu_si512(dst.cast(), _mm512_setzero_si512());
                        continue;
                    }
                    let mask: __mmask16 = if cols - c0 >= 16 {
                        0xffff
                    } else {
                        ((1u32 << (cols - c0)) - 1) as u16
                    };
                    let x0 = _mm512_maskz_loadu_ps(mask, row0.add(c0));
                    let x1 = if has1 {
                        _mm512_maskz_loadu_ps(mask, row1.add(c0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let v = si(_mm512_cvtne2ps_pbh(x1, x0));
                    _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi16(idx, v));
                }
            }
        }
        Src::F32(s) if b.rs == 1 => {
            // B = Xᵀ of a row-major f32 X (attention keys): column j is a contiguous row
            // of X; 16 pairs converted at a time.
            out.fill(0);
            let mut tmp = [0u32; 16];
            for jj in 0..cols {
                let col = s.as_ptr().add((j0 + jj) * b.cs);
                let mut p = 0;
                while p < kc {
                    let e0 = 2 * (p0 + p);
                    let n_el = (k - e0).min(32);
                    let lo = n_el.min(16);
                    let hi = n_el - lo;
                    let mlo: __mmask16 = ((1u32 << lo) - 1) as u16;
                    let mhi: __mmask16 = ((1u32 << hi) - 1) as u16;
                    let x0 = _mm512_maskz_loadu_ps(mlo, col.add(e0));
                    let x1 = if hi > 0 {
                        _mm512_maskz_loadu_ps(mhi, col.add(e0 + 16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    _mm512_storeu_si512(tmp.as_mut_ptr().cast(), si(_mm512_cvtne2ps_pbh(x1, x0)));
                    for (t, &w) in tmp[..(kc - p).min(16)].iter().enumerate() {
                        out[(p + t) * NR + jj] = w;
                    }
                    p += 16;
                }
            }
        }
        Src::Bf16(s) if b.rs == 1 => {
            // B = Wᵀ of a row-major W: column j is a contiguous row of W.
            out.fill(0);
            for jj in 0..cols {
                let col = &s[(j0 + jj) * b.cs..];
                for p in 0..kc {
                    let e = 2 * (p0 + p);
                    let lo = col[e].to_bits() as u32;
                    let hi = if e + 1 < k {
                        col[e + 1].to_bits() as u32
                    } else {
                        0
                    };
                    out[p * NR + jj] = lo | hi << 16;
                }
            }
        }
        _ => {
            out.fill(0);
            for p in 0..kc {
                let e = 2 * (p0 + p);
                for jj in 0..cols {
                    let lo = bits_of(b, e, j0 + jj) as u32;
                    let hi = if e + 1 < k {
                        bits_of(b, e + 1, j0 + jj) as u32
                    } else {
                        0
                    };
                    out[p * NR + jj] = lo | hi << 16;
                }
            }
        }
    }
}

/// `C[rows×cols] (+)= A-panel · B-panel` over `kc` pairs, C row stride `ldc`, plus the
/// tile's epilogue terms.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn micro(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
    epi: &TileEpilogue,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    for p in 0..kc {
        let bp = b.add(p * NR);
        let bv: [__m512bh; 4] = [
            bh(_mm512_loadu_si512(bp.cast())),
            bh(_mm512_loadu_si512(bp.add(16).cast())),
            bh(_mm512_loadu_si512(bp.add(32).cast())),
            bh(_mm512_loadu_si512(bp.add(48).cast())),
        ];
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = bh(_mm512_set1_epi32(*a.add(i * lda + p) as i32));
            for (j, acc_ij) in acc_i.iter_mut().enumerate() {
                *acc_ij = _mm512_dpbf16_ps(*acc_ij, av, bv[j]);
            }
        }
    }
    super::fma::store_tile16(&acc, c, ldc, rows, cols, load, epi);
}
