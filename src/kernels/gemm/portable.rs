//! The `generic` tier's kernel: portable Rust with no intrinsics, written so the compiler
//! vectorises it for the target's baseline (SSE2 on x86-64, NEON on aarch64).

use super::engine::{Kernel, TileEpilogue};
use super::{Lhs, Operand, Rhs, Src, maybe_round};
use half::slice::HalfFloatSliceExt;

/// f32 micro-tiles of 4 × 16 (bf16 products: operands rounded while packed).
pub(super) struct Portable {
    pub round: bool,
}

const MR: usize = 4;
const NR: usize = 16;

/// `a · b + c`: one fused instruction where the baseline has it (aarch64), a multiply and an
/// add elsewhere (a fused `mul_add` is a library call without FMA).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_arch = "aarch64")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        a * b + c
    }
}

/// An f32 A panel read in place: row-major f32 rows, no rounding, all `mr` rows inside A.
pub(super) fn f32_a_in_place(
    a: Lhs,
    round: bool,
    mr: usize,
    m: usize,
    r0: usize,
) -> Option<(*const f32, usize)> {
    match a {
        Lhs::Strided(Operand {
            data: Src::F32(s),
            rs,
            cs: 1,
        }) if !round && r0 + mr <= m => Some((s[r0 * rs..].as_ptr(), rs)),
        _ => None,
    }
}

/// Packs rows `r0..r0 + mr` of `a` (zero past `m`), elements `p0..p0 + kc`, as
/// `out[i * kc + p]`: the f32 kernels' A layout (the rows of A, cut to the block).
#[inline(always)]
pub(super) fn pack_a_f32(
    a: Lhs,
    round: bool,
    mr: usize,
    (m, r0): (usize, usize),
    (p0, kc): (usize, usize),
    out: &mut [f32],
) {
    for i in 0..mr {
        let dst = &mut out[i * kc..(i + 1) * kc];
        let r = r0 + i;
        if r >= m {
            dst.fill(0.0);
            continue;
        }
        match a {
            Lhs::Strided(Operand {
                data: Src::F32(s),
                rs,
                cs: 1,
            }) => {
                let src = &s[r * rs + p0..][..kc];
                if round {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = super::round_bf16(v);
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            }
            Lhs::Strided(Operand {
                data: Src::Bf16(s),
                rs,
                cs: 1,
            }) => {
                for (d, &v) in dst.iter_mut().zip(&s[r * rs + p0..][..kc]) {
                    *d = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            Lhs::Packed(pa) => {
                // Pairs covering elements p0..p0 + kc of row r.
                let pairs = pa.row_pairs(r);
                for (p, d) in dst.iter_mut().enumerate() {
                    let e = p0 + p;
                    *d = super::half_of(pairs[e / 2], e % 2);
                }
            }
            Lhs::Strided(_) => {
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = a.at(r, p0 + p, round);
                }
            }
        }
    }
}

/// Packs rows `p0..p0 + kc` of B's columns `j0..j0 + cols` (zero past `cols`) as
/// `out[p * nr + j]`: the f32 kernels' B layout.
#[inline(always)]
pub(super) fn pack_b_f32(
    b: Rhs,
    round: bool,
    nr: usize,
    (p0, kc): (usize, usize),
    (j0, cols): (usize, usize),
    out: &mut [f32],
) {
    let out = &mut out[..kc * nr];
    if cols < nr {
        out.fill(0.0);
    }
    match b {
        Rhs::Strided(Operand {
            data: Src::F32(s),
            rs,
            cs: 1,
        }) => {
            // Row-major B: each row's columns are contiguous.
            for (p, dst) in out.chunks_exact_mut(nr).enumerate() {
                let src = &s[(p0 + p) * rs + j0..][..cols];
                if round {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = super::round_bf16(v);
                    }
                } else {
                    dst[..cols].copy_from_slice(src);
                }
            }
        }
        Rhs::Strided(Operand { data, rs: 1, cs }) => {
            // Bᵀ of a row-major matrix (a linear layer's weight, attention keys): each
            // column is contiguous.
            for j in 0..cols {
                let col = (j0 + j) * cs + p0;
                match data {
                    Src::F32(s) => {
                        for (p, &v) in s[col..][..kc].iter().enumerate() {
                            out[p * nr + j] = maybe_round(v, round);
                        }
                    }
                    Src::Bf16(s) => {
                        for (p, &v) in s[col..][..kc].iter().enumerate() {
                            out[p * nr + j] = f32::from_bits((v.to_bits() as u32) << 16);
                        }
                    }
                }
            }
        }
        Rhs::Packed(pb) => {
            // Columns j0..j0 + cols lie in one panel of the packed layout (nr divides its
            // width and j0 is a multiple of nr).
            let panel = j0 / super::NR * super::NR;
            let off = j0 - panel;
            for (p, dst) in out.chunks_exact_mut(nr).enumerate() {
                let e = p0 + p;
                let words = &pb.pair_row(panel, e / 2)[off..off + cols];
                let shift = 16 * (e % 2);
                for (d, &w) in dst.iter_mut().zip(words) {
                    *d = f32::from_bits(((w >> shift) & 0xffff) << 16);
                }
            }
        }
        Rhs::PackedF32(pb) => {
            // As above: a contiguous run of each packed row.
            let panel = j0 / super::NR * super::NR;
            let off = j0 - panel;
            for (p, dst) in out.chunks_exact_mut(nr).enumerate() {
                let src = &pb.panel_row(panel, p0 + p)[off..off + cols];
                if round {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = super::round_bf16(v);
                    }
                } else {
                    dst[..cols].copy_from_slice(src);
                }
            }
        }
        Rhs::PackedF16(pb) => {
            // As above, widened exactly (F16C or the like where the CPU has it).
            let panel = j0 / super::NR * super::NR;
            let off = j0 - panel;
            for (p, dst) in out.chunks_exact_mut(nr).enumerate() {
                let src = &pb.panel_row(panel, p0 + p)[off..off + cols];
                let dst = &mut dst[..cols];
                src.convert_to_f32_slice(dst);
                if round {
                    for d in dst.iter_mut() {
                        *d = super::round_bf16(*d);
                    }
                }
            }
        }
        Rhs::Strided(_) => {
            for (p, dst) in out.chunks_exact_mut(nr).enumerate() {
                for (j, d) in dst[..cols].iter_mut().enumerate() {
                    *d = b.at(p0 + p, j0 + j, round);
                }
            }
        }
    }
}

// SAFETY: portable code only; every access is bounds-checked or inside the contract.
unsafe impl Kernel for Portable {
    type E = f32;
    const MR: usize = MR;
    const NR: usize = NR;
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
        pack_a_f32(a, self.round, MR, rows, units, out)
    }

    unsafe fn pack_b(
        &self,
        b: Rhs,
        _k: usize,
        units: (usize, usize),
        cols: (usize, usize),
        out: &mut [f32],
    ) {
        pack_b_f32(b, self.round, NR, units, cols, out)
    }

    fn a_in_place(&self, a: Lhs, m: usize, r0: usize) -> Option<(*const f32, usize)> {
        f32_a_in_place(a, self.round, MR, m, r0)
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
        let mut acc = [[0f32; NR]; MR];
        // SAFETY: the caller's contract bounds a (MR rows × kc) and b (kc × NR).
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, (MR - 1) * lda + kc),
                std::slice::from_raw_parts(b, kc * NR),
            )
        };
        for (p, bp) in b.chunks_exact(NR).enumerate() {
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let av = a[i * lda + p];
                for (x, &bv) in acc_i.iter_mut().zip(bp) {
                    *x = madd(av, bv, *x);
                }
            }
        }
        let terms = !epi.is_none();
        for (i, acc_i) in acc.iter().enumerate().take(rows) {
            for (j, &v) in acc_i.iter().enumerate().take(cols) {
                // SAFETY: (i, j) inside the tile.
                unsafe {
                    let dst = c.add(i * ldc + j);
                    let mut v = v;
                    if terms {
                        v += epi.at_ij(i, j);
                    }
                    if load {
                        v += *dst;
                    }
                    dst.write(v);
                }
            }
        }
    }
}
