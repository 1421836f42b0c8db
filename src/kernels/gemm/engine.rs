//! The blocked driver every micro-kernel runs under.
//!
//! C is cut into tasks (blocks of row panels × column ranges) spread over rayon; each task
//! walks its columns in blocks narrow enough that its C block stays in cache, and k in blocks
//! of about [`Kernel::KC`] units so a packed B block stays in L2 and an A micro-panel in L1.
//! Per (column block, k block) it packs the B block (unless B was packed at load in the
//! kernel's own layout) and the A panels that cannot be read in place, then runs the
//! micro-kernel over every (row panel, column panel) tile. The epilogue's terms are added in
//! the first k block.

use super::{Epilogue, Lhs, Rhs};
use rayon::prelude::*;

/// Bytes of C one task keeps hot across the k blocks (in the last-level cache).
const C_BLOCK_BYTES: usize = 4 << 20;
/// Row panels per task when B is read in place (≈ 384 rows: each task streams the packed
/// weight once, so fewer, taller tasks read it fewer times).
const MC_PANELS: usize = 64;
/// A task keeps its packed A for all k blocks (packed once, reused by every column block)
/// when it takes at most this many bytes; otherwise A is packed again per column block.
const A_KEEP_BYTES: usize = 8 << 20;

/// One product, its operands checked by the caller.
#[derive(Clone, Copy)]
pub(super) struct Job<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// C, row-major with row stride `dst_rs`; valid for the `m × n` block, initialised there
    /// when `accumulate`.
    pub dst: *mut f32,
    pub dst_rs: usize,
    pub accumulate: bool,
    pub epi: Epilogue<'a>,
    pub a: Lhs<'a>,
    pub b: Rhs<'a>,
    pub threads: usize,
}

// SAFETY: the tasks that share a job write disjoint tiles of `dst` and only read the rest.
unsafe impl Send for Job<'_> {}
unsafe impl Sync for Job<'_> {}

/// A micro-kernel and the packing of its operands. k is counted in packed units of
/// [`Kernel::KU`] elements (bf16 pairs: 2).
///
/// # Safety
/// Implementations may use CPU features: the caller of [`run`] guarantees them. Every method
/// must stay inside the memory its arguments describe.
pub(super) unsafe trait Kernel: Sync {
    type E: Copy + Default + Send + Sync;
    /// Rows and columns of C per micro-tile.
    const MR: usize;
    const NR: usize;
    /// Packed k units per k block, and columns per column block at most.
    const KC: usize;
    const NC: usize;
    /// Elements of k per packed unit.
    const KU: usize;

    /// Packs rows `r0..r0 + MR` of A (zero past `m`; `rows` = (m, r0)), units `p0..p0 + kc`
    /// (`units` = (p0, kc)), as `out[i * kc + p]`.
    ///
    /// # Safety
    /// The CPU features of the kernel; `a` holds an `m × k` matrix; `out.len() ≥ MR · kc`.
    unsafe fn pack_a(
        &self,
        a: Lhs,
        k: usize,
        rows: (usize, usize),
        units: (usize, usize),
        out: &mut [Self::E],
    );

    /// Packs units `p0..p0 + kc` of B's columns `j0..j0 + cols` (`cols` = (j0, cols); zero
    /// past `cols` and past k) as `out[p * NR + j]`.
    ///
    /// # Safety
    /// The CPU features of the kernel; `b` holds a `k × n` matrix with `j0 + cols ≤ n`;
    /// `out.len() ≥ kc · NR`.
    unsafe fn pack_b(
        &self,
        b: Rhs,
        k: usize,
        units: (usize, usize),
        cols: (usize, usize),
        out: &mut [Self::E],
    );

    /// The A panel at row `r0` read in place, when its layout is the packed one: a pointer to
    /// unit 0 of row `r0` and the row stride in units. Only for panels of `MR` rows inside A.
    fn a_in_place(&self, _a: Lhs, _m: usize, _r0: usize) -> Option<(*const Self::E, usize)> {
        None
    }

    /// The B panel at column `j0` (a multiple of `NR`) read in place: a pointer to its unit 0,
    /// unit `p` at `+ p · NR`.
    fn b_in_place(&self, _b: Rhs, _j0: usize) -> Option<*const Self::E> {
        None
    }

    /// `C[rows × cols] (+)= A-panel · B-panel` over `kc` units, C row stride `ldc`, plus the
    /// tile's epilogue terms. `load`: add C's current values.
    ///
    /// # Safety
    /// The CPU features of the kernel; `a` readable for `MR` rows of stride `lda` and `kc`
    /// units, `b` for `kc · NR` units, `c` writable for `rows × cols` with stride `ldc`
    /// (initialised when `load`), `epi` pointing at this tile's terms.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        &self,
        kc: usize,
        a: *const Self::E,
        lda: usize,
        b: *const Self::E,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
        epi: &TileEpilogue,
    );
}

/// The epilogue's terms for one micro-tile: pointers at its (row, column) origin, null where a
/// term is absent.
#[derive(Clone, Copy)]
pub(super) struct TileEpilogue {
    pub row: *const f32,
    pub col: *const f32,
    pub res: *const f32,
    pub ld_res: usize,
}

impl TileEpilogue {
    const NONE: Self = Self {
        row: std::ptr::null(),
        col: std::ptr::null(),
        res: std::ptr::null(),
        ld_res: 0,
    };

    /// # Safety
    /// (i0, j0) must lie inside the matrices `epi` was checked for.
    unsafe fn at(epi: &Epilogue, i0: usize, j0: usize) -> Self {
        // SAFETY: (i0, j0) is inside every term (caller's contract).
        let ptr = |s: Option<&[f32]>, off: usize| {
            s.map_or(std::ptr::null(), |s| unsafe { s.as_ptr().add(off) })
        };
        let (res, ld_res) = match epi.residual {
            Some((r, rs)) => (unsafe { r.as_ptr().add(i0 * rs + j0) }, rs),
            None => (std::ptr::null(), 0),
        };
        Self {
            row: ptr(epi.row_bias, i0),
            col: ptr(epi.col_bias, j0),
            res,
            ld_res,
        }
    }

    pub fn is_none(&self) -> bool {
        self.row.is_null() && self.col.is_null() && self.res.is_null()
    }

    /// The sum of the terms at (i, j) of the tile.
    ///
    /// # Safety
    /// (i, j) inside the tile.
    #[inline(always)]
    pub unsafe fn at_ij(&self, i: usize, j: usize) -> f32 {
        let mut v = 0.0;
        unsafe {
            if !self.row.is_null() {
                v += *self.row.add(i);
            }
            if !self.col.is_null() {
                v += *self.col.add(j);
            }
            if !self.res.is_null() {
                v += *self.res.add(i * self.ld_res + j);
            }
        }
        v
    }
}

/// Runs `job` on kernel `kern`.
///
/// # Safety
/// The CPU supports `kern`'s features; the job's operands hold the shapes they claim (the
/// caller checked them) and `dst` is valid for the `m × n` block.
pub(super) unsafe fn run<K: Kernel>(kern: &K, job: Job) {
    let Job {
        m, n, k, threads, ..
    } = job;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // No product: C = (accumulate ? C : 0) + epi.
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside the block; a plain write when C may be
                // uninitialised.
                unsafe {
                    let c = job.dst.add(i * job.dst_rs + j);
                    let base = if job.accumulate { *c } else { 0.0 };
                    c.write(base + job.epi.at(i, j));
                }
            }
        }
        return;
    }
    let m_panels = m.div_ceil(K::MR);
    let n_panels = n.div_ceil(K::NR);
    // B read in place, or packed from panels at the cost of a copy (f16 panels widened): the
    // tasks can be cut by rows too, each packing only the B blocks it multiplies.
    let b_direct = kern.b_in_place(job.b, 0).is_some() || matches!(job.b, Rhs::PackedF16(_));
    // Split the work over the threads unless it is too small to pay for it.
    let work = if threads > 1 && (m as u128) * (n as u128) * (k as u128) >= 1 << 20 {
        threads
    } else {
        1
    };
    let task = |(mp0, mp1, n0, n1): (usize, usize, usize, usize)| {
        // SAFETY: tasks cover disjoint (row, column) ranges of C, all inside `dst`.
        unsafe { block(kern, &job, job.dst, (mp0, mp1), (n0, n1)) }
    };
    if work == 1 && !(b_direct && m_panels > MC_PANELS) {
        task((0, m_panels, 0, n));
        return;
    }
    let tasks: Vec<(usize, usize, usize, usize)> = if b_direct && m_panels > MC_PANELS {
        // B read in place: nothing to pack per task, so cut C into blocks of MC_PANELS row
        // panels (a block's C stays in L2 across the k blocks) and let the threads take them
        // in turn; columns are split too when there are few row blocks, so that every
        // thread gets several tasks and none waits on an unlucky last one. Row chunks of
        // (nearly) equal height.
        let m_chunks = m_panels.div_ceil(MC_PANELS);
        let m_per = m_panels.div_ceil(m_chunks);
        let n_chunks = (4 * work).div_ceil(m_chunks).clamp(1, n_panels);
        let n_per = n_panels.div_ceil(n_chunks) * K::NR;
        let mut tasks = Vec::with_capacity(m_chunks * n_chunks);
        for p in (0..m_panels).step_by(m_per) {
            for j in (0..n).step_by(n_per) {
                tasks.push((p, (p + m_per).min(m_panels), j, (j + n_per).min(n)));
            }
        }
        tasks
    } else if n_panels >= 2 * work || n_panels >= m_panels {
        // One task per thread, each packing its own B: split n unless it is too narrow.
        let per = n_panels.div_ceil(work);
        (0..work)
            .map(|t| {
                (
                    0,
                    m_panels,
                    (t * per * K::NR).min(n),
                    ((t + 1) * per * K::NR).min(n),
                )
            })
            .filter(|t| t.2 < t.3)
            .collect()
    } else {
        let per = m_panels.div_ceil(work);
        (0..work)
            .map(|t| ((t * per).min(m_panels), ((t + 1) * per).min(m_panels), 0, n))
            .filter(|t| t.0 < t.1)
            .collect()
    };
    tasks.into_par_iter().for_each(task);
}

/// C rows of A panels `mp0..mp1`, columns `n0..n1` (`n0` a multiple of `NR`).
///
/// # Safety
/// As [`run`]; the task's block of C is written by this call alone.
unsafe fn block<K: Kernel>(
    kern: &K,
    job: &Job,
    c: *mut f32,
    (mp0, mp1): (usize, usize),
    (n0, n1): (usize, usize),
) {
    let (m, k, ldc) = (job.m, job.k, job.dst_rs);
    let kp = k.div_ceil(K::KU);
    let panels = mp1 - mp0;
    // Column blocks narrow enough that this task's C block (rows × nc) stays in cache while
    // the k blocks pass over it.
    let rows = panels * K::MR;
    let nc_max = ((C_BLOCK_BYTES / 4 / rows.max(1)) / K::NR * K::NR).clamp(2 * K::NR, K::NC);
    let b_direct = kern.b_in_place(job.b, 0).is_some();
    let mut bpack = if b_direct {
        Vec::new()
    } else {
        vec![K::E::default(); K::KC * nc_max.min((n1 - n0).div_ceil(K::NR) * K::NR)]
    };
    // k blocks of equal size (≤ KC units).
    let kc_even = kp.div_ceil(kp.div_ceil(K::KC));
    let a_packed: Vec<bool> = (mp0..mp1)
        .map(|mp| kern.a_in_place(job.a, m, mp * K::MR).is_none())
        .collect();
    let pack_any = a_packed.iter().any(|&p| p);
    // Keep the packed A across column blocks when it fits.
    let a_keep = panels * K::MR * kp * std::mem::size_of::<K::E>() <= A_KEEP_BYTES;
    let a_block = panels * K::MR * kc_even;
    let mut apack = match (pack_any, a_keep) {
        (false, _) => Vec::new(),
        (true, true) => vec![K::E::default(); panels * K::MR * kp],
        (true, false) => vec![K::E::default(); a_block],
    };
    let mut jc = n0;
    while jc < n1 {
        let nc = nc_max.min(n1 - jc);
        let ncp = nc.div_ceil(K::NR);
        let mut pc = 0;
        while pc < kp {
            let kc = kc_even.min(kp - pc);
            if !b_direct {
                for jp in 0..ncp {
                    let j0 = jc + jp * K::NR;
                    let cols = K::NR.min(jc + nc - j0);
                    unsafe {
                        kern.pack_b(
                            job.b,
                            k,
                            (pc, kc),
                            (j0, cols),
                            &mut bpack[jp * kc * K::NR..],
                        )
                    };
                }
            }
            // This k block's packed A panels: at block offset pc·rows when kept whole.
            let a_off = if a_keep { pc * panels * K::MR } else { 0 };
            if pack_any && (!a_keep || jc == n0) {
                for mp in mp0..mp1 {
                    if a_packed[mp - mp0] {
                        let out = &mut apack[a_off + (mp - mp0) * K::MR * kc..][..K::MR * kc];
                        unsafe { kern.pack_a(job.a, k, (m, mp * K::MR), (pc, kc), out) };
                    }
                }
            }
            let load = job.accumulate || pc > 0;
            let first = pc == 0 && !job.epi.is_empty();
            for mp in mp0..mp1 {
                let rows = (m - mp * K::MR).min(K::MR);
                let (ap, lda) = match kern.a_in_place(job.a, m, mp * K::MR) {
                    Some((p, lda)) => (unsafe { p.add(pc) }, lda),
                    None => (
                        unsafe { apack.as_ptr().add(a_off + (mp - mp0) * K::MR * kc) },
                        kc,
                    ),
                };
                for jp in 0..ncp {
                    let j0 = jc + jp * K::NR;
                    let cols = K::NR.min(jc + nc - j0);
                    let bp = match kern.b_in_place(job.b, j0) {
                        Some(p) => unsafe { p.add(pc * K::NR) },
                        None => unsafe { bpack.as_ptr().add(jp * kc * K::NR) },
                    };
                    let tile_epi = if first {
                        unsafe { TileEpilogue::at(&job.epi, mp * K::MR, j0) }
                    } else {
                        TileEpilogue::NONE
                    };
                    unsafe {
                        kern.micro(
                            kc,
                            ap,
                            lda,
                            bp,
                            c.add(mp * K::MR * ldc + j0),
                            ldc,
                            rows,
                            cols,
                            load,
                            &tile_epi,
                        )
                    };
                }
            }
            pc += kc;
        }
        jc += nc;
    }
}
