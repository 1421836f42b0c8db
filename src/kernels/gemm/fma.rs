//! f32 FMA micro-kernels for the `avx2` (6 × 16 tiles, 12 ymm accumulators) and `avx512`
//! (6 × 64 tiles, 24 zmm accumulators) tiers. bf16 products round the operands while they
//! are packed, so the kernels themselves only ever see f32.

// The kernels are unsafe functions from top to bottom (raw pointers and intrinsics that need
// the target features), so their bodies are not wrapped in further `unsafe` blocks.
#![allow(unsafe_op_in_unsafe_fn)]

use super::engine::{Kernel, TileEpilogue};
use super::portable::{f32_a_in_place, pack_a_f32, pack_b_f32};
use super::{Lhs, Rhs};
use std::arch::x86_64::*;

/// AVX2 + FMA.
pub(super) struct Fma8 {
    pub round: bool,
}

/// AVX-512F.
pub(super) struct Fma16 {
    pub round: bool,
}

/// The packing routines compiled for each tier's features, so their loops vectorise.
macro_rules! packers {
    ($feat:literal, $pa:ident, $pb:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $pa(
            a: Lhs,
            round: bool,
            mr: usize,
            rows: (usize, usize),
            units: (usize, usize),
            out: &mut [f32],
        ) {
            pack_a_f32(a, round, mr, rows, units, out)
        }

        #[target_feature(enable = $feat)]
        unsafe fn $pb(
            b: Rhs,
            round: bool,
            nr: usize,
            units: (usize, usize),
            cols: (usize, usize),
            out: &mut [f32],
        ) {
            pack_b_f32(b, round, nr, units, cols, out)
        }
    };
}

packers!("avx2,fma", pack_a8, pack_b8);
packers!("avx512f,avx512vl,avx2,fma", pack_a16, pack_b16);

// SAFETY: run only on the `avx2` tier or above (gemm_raw's dispatch).
unsafe impl Kernel for Fma8 {
    type E = f32;
    const MR: usize = 6;
    const NR: usize = 16;
    const KC: usize = 256;
    const NC: usize = 512;
    const KU: usize = 1;

    unsafe fn pack_a(
        &self,
        a: Lhs,
        _k: usize,
        rows: (usize, usize),
        units: (usize, usize),
        out: &mut [f32],
    ) {
        pack_a8(a, self.round, Self::MR, rows, units, out)
    }

    unsafe fn pack_b(
        &self,
        b: Rhs,
        _k: usize,
        units: (usize, usize),
        cols: (usize, usize),
        out: &mut [f32],
    ) {
        pack_b8(b, self.round, Self::NR, units, cols, out)
    }

    fn a_in_place(&self, a: Lhs, m: usize, r0: usize) -> Option<(*const f32, usize)> {
        f32_a_in_place(a, self.round, Self::MR, m, r0)
    }

    unsafe fn micro(
        &self,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
        epi: &TileEpilogue,
    ) {
        micro8(kc, a, lda, b, c, ldc, rows, cols, load, epi)
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro8(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
    epi: &TileEpilogue,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    for p in 0..kc {
        let bp = b.add(p * 16);
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * lda + p));
            acc_i[0] = _mm256_fmadd_ps(av, b0, acc_i[0]);
            acc_i[1] = _mm256_fmadd_ps(av, b1, acc_i[1]);
        }
    }
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (i, acc_i) in acc.iter().enumerate().take(rows) {
        let row = c.add(i * ldc);
        for (h, &v) in acc_i.iter().enumerate() {
            let c0 = h * 8;
            if c0 >= cols {
                break;
            }
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((cols - c0) as i32), lane);
            let ld = |p: *const f32| _mm256_maskload_ps(p, mask);
            let mut v = v;
            if load {
                v = _mm256_add_ps(v, ld(row.add(c0)));
            }
            if !epi.is_none() {
                if !epi.col.is_null() {
                    v = _mm256_add_ps(v, ld(epi.col.add(c0)));
                }
                if !epi.row.is_null() {
                    v = _mm256_add_ps(v, _mm256_set1_ps(*epi.row.add(i)));
                }
                if !epi.res.is_null() {
                    v = _mm256_add_ps(v, ld(epi.res.add(i * epi.ld_res + c0)));
                }
            }
            _mm256_maskstore_ps(row.add(c0), mask, v);
        }
    }
}

// A packed f32 weight is read in place only by a kernel whose panels are as wide.
const _: () = assert!(<Fma16 as Kernel>::NR == super::NR);

// SAFETY: run only on the `avx512` tier or above (gemm_raw's dispatch).
unsafe impl Kernel for Fma16 {
    type E = f32;
    const MR: usize = 6;
    const NR: usize = 64;
    const KC: usize = 256;
    const NC: usize = 512;
    const KU: usize = 1;

    unsafe fn pack_a(
        &self,
        a: Lhs,
        _k: usize,
        rows: (usize, usize),
        units: (usize, usize),
        out: &mut [f32],
    ) {
        pack_a16(a, self.round, Self::MR, rows, units, out)
    }

    unsafe fn pack_b(
        &self,
        b: Rhs,
        _k: usize,
        units: (usize, usize),
        cols: (usize, usize),
        out: &mut [f32],
    ) {
        pack_b16(b, self.round, Self::NR, units, cols, out)
    }

    fn a_in_place(&self, a: Lhs, m: usize, r0: usize) -> Option<(*const f32, usize)> {
        f32_a_in_place(a, self.round, Self::MR, m, r0)
    }

    fn b_in_place(&self, b: Rhs, j0: usize) -> Option<*const f32> {
        // A packed f32 weight's panels are this kernel's (NR = gemm::NR = 64 columns).
        match b {
            Rhs::PackedF32(pb) if !self.round => Some(pb.panel_row(j0, 0).as_ptr()),
            _ => None,
        }
    }

    unsafe fn micro(
        &self,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
        epi: &TileEpilogue,
    ) {
        micro16(kc, a, lda, b, c, ldc, rows, cols, load, epi)
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn micro16(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
    epi: &TileEpilogue,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; 6];
    for p in 0..kc {
        let bp = b.add(p * 64);
        let bv = [
            _mm512_loadu_ps(bp),
            _mm512_loadu_ps(bp.add(16)),
            _mm512_loadu_ps(bp.add(32)),
            _mm512_loadu_ps(bp.add(48)),
        ];
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(i * lda + p));
            for (x, &bj) in acc_i.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, bj, *x);
            }
        }
    }
    store_tile16(&acc, c, ldc, rows, cols, load, epi);
}

/// Writes a 6 × 64 accumulator tile to C (`rows × cols` of it), adding C's values when
/// `load` and the tile's epilogue terms.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(super) unsafe fn store_tile16(
    acc: &[[__m512; 4]; 6],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
    epi: &TileEpilogue,
) {
    for (i, acc_i) in acc.iter().enumerate().take(rows) {
        let row = c.add(i * ldc);
        for (j, &v) in acc_i.iter().enumerate() {
            let c0 = j * 16;
            if c0 >= cols {
                break;
            }
            let mask: __mmask16 = if cols - c0 >= 16 {
                0xffff
            } else {
                ((1u32 << (cols - c0)) - 1) as u16
            };
            let ptr = row.add(c0);
            let mut v = if load {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ptr))
            } else {
                v
            };
            if !epi.is_none() {
                if !epi.col.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, epi.col.add(c0)));
                }
                if !epi.row.is_null() {
                    v = _mm512_add_ps(v, _mm512_set1_ps(*epi.row.add(i)));
                }
                if !epi.res.is_null() {
                    let r = epi.res.add(i * epi.ld_res + c0);
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, r));
                }
            }
            _mm512_mask_storeu_ps(ptr, mask, v);
        }
    }
}
