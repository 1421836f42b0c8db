//! GEMM through the CPU's bf16 dot-product instruction (AVX-512 BF16 `vdpbf16ps`):
//! `C (f32) (+)= A · B`, each operand f32 or bf16, rounded to bf16 (round to nearest even)
//! while it is packed, products accumulated in f32.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k and adds both products into one f32 lane, so
//! both operands are packed as pairs `(x[2p], x[2p+1])` in one 32-bit word:
//! - A in panels of [`MR`] rows: `apack[panel][i][p]` (each row's pairs contiguous, so f32 rows
//!   convert with plain vector stores), one word broadcast to all lanes per row and pair;
//! - B in panels of [`NR`] columns: `bpack[panel][p][j]`, four zmm registers per pair.
//!
//! The micro-kernel keeps an `MR × NR` block of C in 24 registers. Blocking as in BLIS
//! (Van Zee & van de Geijn 2015): k in blocks of [`KC`] pairs so a B block stays in L2 and an
//! A micro-panel in L1; A is packed once per call (shared by the threads), B per thread.
//! Without AVX-512 BF16 the same call converts the operands to f32 and runs the f32 GEMM.

use half::bf16;
use rayon::prelude::*;

/// Rows of A (and C) per micro-kernel.
pub const MR: usize = 6;
/// Columns of B (and C) per micro-kernel: four 16-lane registers.
pub const NR: usize = 64;
/// k pairs per block: a B micro-panel is `KC · NR · 4` bytes = 32 KiB.
const KC: usize = 128;
/// Columns of B packed at once per thread: a B block is `KC · NC · 4` bytes = 512 KiB (L2).
const NC: usize = 1024;
/// Bytes of C one task keeps hot across the k blocks (in the last-level cache).
const C_BLOCK_BYTES: usize = 4 << 20;
/// Row panels per task when B is packed at load (384 rows: each task streams the packed
/// weight once, so fewer, taller tasks read it fewer times).
const MC_PANELS: usize = 64;

/// The data of an operand.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::Bf16(s) => s.len(),
        }
    }
}

/// A strided matrix operand: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: Src<'a>,
    pub rs: usize,
    pub cs: usize,
}

/// A left operand (`[m × k]`, row-major bf16, e.g. a convolution kernel) packed once, at load,
/// in the layout the kernels read: `data[panel][i][p]`.
#[derive(Clone)]
pub struct PackedA {
    data: Vec<u32>,
    m: usize,
    k: usize,
}

impl PackedA {
    pub fn new(w: &[bf16], m: usize, k: usize) -> Self {
        assert_eq!(w.len(), m * k, "PackedA: {m}x{k} needs {} values", m * k);
        let kp = k.div_ceil(2);
        let mut data = vec![0u32; m.div_ceil(MR) * kp * MR];
        // Panels in parallel: packing every weight at load is a pass over the whole model.
        data.par_chunks_mut((kp * MR).max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                for i in 0..MR.min(m - panel * MR) {
                    let row = &w[(panel * MR + i) * k..][..k];
                    for p in 0..kp {
                        out[i * kp + p] = pair(row, 2 * p, k);
                    }
                }
            });
        Self { data, m, k }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Element (r, c) as f32.
    fn get(&self, r: usize, c: usize) -> f32 {
        let kp = self.k.div_ceil(2);
        let w = self.data[(r / MR) * kp * MR + (r % MR) * kp + c / 2];
        f32::from_bits(((w >> (16 * (c % 2))) & 0xffff) << 16)
    }
}

/// A right operand given as `Wᵀ` of a row-major bf16 `W` (`[n × k]`, a linear layer's weight),
/// packed once, at load: `data[panel][p][j]`.
#[derive(Clone)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    pub fn from_transposed(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedB: {n}x{k} needs {} values", n * k);
        let wt = Operand {
            data: Src::Bf16(w),
            rs: 1,
            cs: k,
        };
        Self::from_operand(wt, k, n)
    }

    /// Packs any `[k × n]` operand (e.g. the keys of one attention head as `Kᵀ`), to be
    /// multiplied many times.
    pub fn from_operand(b: Operand, k: usize, n: usize) -> Self {
        assert!(
            b.data.len() >= extent(k, n, b.rs, b.cs),
            "PackedB: operand too short"
        );
        let kp = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * kp * NR];
        // Panels in parallel: packing every weight at load is a pass over the whole model.
        data.par_chunks_mut((kp * NR).max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                let (j0, cols) = (panel * NR, NR.min(n - panel * NR));
                #[cfg(target_arch = "x86_64")]
                if available() {
                    // SAFETY: features checked; the assert above bounds every read.
                    unsafe { x86::pack_b(b, k, 0, kp, j0, cols, out) };
                    return;
                }
                for p in 0..kp {
                    for j in 0..cols {
                        let e = 2 * p;
                        let lo = bits_of(b, e, j0 + j) as u32;
                        let hi = if e + 1 < k {
                            bits_of(b, e + 1, j0 + j) as u32
                        } else {
                            0
                        };
                        out[p * NR + j] = lo | hi << 16;
                    }
                }
            });
        Self { data, k, n }
    }

    /// `k` (the input width of the layer).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// `n` (the output width of the layer).
    pub fn cols(&self) -> usize {
        self.n
    }

    fn get(&self, r: usize, c: usize) -> f32 {
        let w = self.data[(c / NR) * self.k.div_ceil(2) * NR + (r / 2) * NR + c % NR];
        f32::from_bits(((w >> (16 * (r % 2))) & 0xffff) << 16)
    }
}

/// Element (r, c) of an operand as bf16 bits.
#[inline(always)]
fn bits_of(o: Operand, r: usize, c: usize) -> u16 {
    match o.data {
        Src::F32(s) => bf16_bits(s[r * o.rs + c * o.cs]),
        Src::Bf16(s) => s[r * o.rs + c * o.cs].to_bits(),
    }
}

/// `(row[e], row[e+1])` as one word, zero past `k`.
#[inline(always)]
fn pair(row: &[bf16], e: usize, k: usize) -> u32 {
    let lo = row[e].to_bits() as u32;
    let hi = if e + 1 < k {
        row[e + 1].to_bits() as u32
    } else {
        0
    };
    lo | hi << 16
}

/// The left operand of [`gemm`].
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Strided(Operand<'a>),
    Packed(&'a PackedA),
}

/// The right operand of [`gemm`].
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Strided(Operand<'a>),
    Packed(&'a PackedB),
}

/// Whether this CPU runs the bf16 dot-product kernels (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, rounding to nearest even; NaN stays NaN (what `vcvtne2ps2bf16` does).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn extent(r: usize, c: usize, rs: usize, cs: usize) -> usize {
    if r == 0 || c == 0 {
        0
    } else {
        (r - 1) * rs + (c - 1) * cs + 1
    }
}

/// Terms added to the product once, in the first k block while C's tile is in registers, so
/// a bias or a residual costs no pass over C of its own.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `row_bias[i]` added to row i (a convolution's per-channel bias), `len ≥ m`.
    pub row_bias: Option<&'a [f32]>,
    /// `col_bias[j]` added to column j (a linear layer's bias), `len ≥ n`.
    pub col_bias: Option<&'a [f32]>,
    /// A row-major `[m × n]` matrix with the given row stride, added element-wise.
    pub residual: Option<(&'a [f32], usize)>,
}

impl Epilogue<'_> {
    fn is_empty(&self) -> bool {
        self.row_bias.is_none() && self.col_bias.is_none() && self.residual.is_none()
    }

    fn check(&self, m: usize, n: usize) {
        if let Some(b) = self.row_bias {
            assert!(b.len() >= m, "bf16 gemm: row bias too short");
        }
        if let Some(b) = self.col_bias {
            assert!(b.len() >= n, "bf16 gemm: column bias too short");
        }
        if let Some((r, rs)) = self.residual {
            assert!(
                r.len() >= extent(m, n, rs, 1),
                "bf16 gemm: residual too short"
            );
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.row_bias.map_or(0.0, |b| b[i])
            + self.col_bias.map_or(0.0, |b| b[j])
            + self.residual.map_or(0.0, |(r, rs)| r[i * rs + j])
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + a[m×k] · b[k×n]`, `dst` row-major with row stride
/// `dst_rs`, on `threads` rayon threads.
///
/// Panics if an operand's slice is too short for its shape and strides.
pub fn gemm(
    dims: [usize; 3],
    dst: (&mut [f32], usize),
    accumulate: bool,
    a: Lhs,
    b: Rhs,
    threads: usize,
) {
    gemm_add(dims, dst, accumulate, Epilogue::default(), a, b, threads)
}

/// [`gemm`] plus the [`Epilogue`]'s terms: `dst = (accumulate ? dst : 0) + a · b + epi`.
pub fn gemm_add(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
    threads: usize,
) {
    // SAFETY: dst is a valid, initialised slice of the length passed (gemm_raw checks that
    // it holds the m × n block).
    unsafe {
        gemm_raw(
            [m, n, k],
            (dst.as_mut_ptr(), dst.len()),
            dst_rs,
            accumulate,
            epi,
            a,
            b,
            threads,
        )
    }
}

/// `dst = a · b + epi` into memory that need not be initialised (C is only written): every
/// element of the `m × n` block (row stride `dst_rs`) is initialised when it returns. Saves
/// the caller zeroing a fresh output buffer.
pub fn gemm_uninit(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (&mut [std::mem::MaybeUninit<f32>], usize),
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
    threads: usize,
) {
    // SAFETY: a valid slice of the length passed (gemm_raw checks that it holds the m × n
    // block); with accumulate = false C is written before it is read, so uninitialised memory
    // is fine.
    unsafe {
        gemm_raw(
            [m, n, k],
            (dst.as_mut_ptr().cast(), dst.len()),
            dst_rs,
            false,
            epi,
            a,
            b,
            threads,
        )
    }
}

/// # Safety
/// `dst` (pointer, length) must be valid for writes of that many elements, and initialised
/// where the `m × n` block (row stride `dst_rs`) lies when `accumulate`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    [m, n, k]: [usize; 3],
    (dst, dst_len): (*mut f32, usize),
    dst_rs: usize,
    accumulate: bool,
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_len >= extent(m, n, dst_rs, 1),
        "bf16 gemm: dst too short"
    );
    match a {
        Lhs::Strided(a) => assert!(
            a.data.len() >= extent(m, k, a.rs, a.cs),
            "bf16 gemm: a too short"
        ),
        Lhs::Packed(a) => assert!(
            a.m == m && a.k == k,
            "bf16 gemm: packed a is {}x{}, not {m}x{k}",
            a.m,
            a.k
        ),
    }
    match b {
        Rhs::Strided(b) => assert!(
            b.data.len() >= extent(k, n, b.rs, b.cs),
            "bf16 gemm: b too short"
        ),
        Rhs::Packed(b) => assert!(
            b.k == k && b.n == n,
            "bf16 gemm: packed b is {}x{}, not {k}x{n}",
            b.k,
            b.n
        ),
    }
    epi.check(m, n);
    #[cfg(target_arch = "x86_64")]
    if k > 0 && available() {
        // SAFETY: `available()` checked every CPU feature the kernels are compiled with; the
        // asserts above bound every element the packing routines read and the epilogue's.
        unsafe { x86::gemm(m, n, k, dst, dst_rs, accumulate, epi, a, b, threads) };
        return;
    }
    // k = 0 or no AVX-512 BF16: C = (accumulate ? C : 0) [+ a · b through f32] + epi.
    if !accumulate {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside the block (caller's contract); a plain write, as
                // the memory may be uninitialised.
                unsafe { dst.add(i * dst_rs + j).write(0.0) };
            }
        }
    }
    // SAFETY: every element of the block is initialised now.
    let c = unsafe { std::slice::from_raw_parts_mut(dst, extent(m, n, dst_rs, 1)) };
    if k > 0 {
        fallback(m, n, k, c, dst_rs, a, b, threads);
    }
    if !epi.is_empty() {
        for i in 0..m {
            for j in 0..n {
                c[i * dst_rs + j] += epi.at(i, j);
            }
        }
    }
}

/// `dst += a · b` with both operands converted to dense f32 and the f32 GEMM: correct
/// everywhere, used on CPUs without AVX-512 BF16 (the caller zeroes `dst` first when it
/// does not accumulate).
#[allow(clippy::too_many_arguments)]
fn fallback(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Lhs,
    b: Rhs,
    threads: usize,
) {
    let dense = |get: &dyn Fn(usize, usize) -> f32, r: usize, c: usize| -> Vec<f32> {
        (0..r * c).map(|x| get(x / c, x % c)).collect()
    };
    let strided = |o: Operand, i: usize, j: usize| match o.data {
        Src::F32(s) => s[i * o.rs + j * o.cs],
        Src::Bf16(s) => s[i * o.rs + j * o.cs].to_f32(),
    };
    let ad = match a {
        Lhs::Strided(o) => dense(&|i, j| strided(o, i, j), m, k),
        Lhs::Packed(p) => dense(&|i, j| p.get(i, j), m, k),
    };
    let bd = match b {
        Rhs::Strided(o) => dense(&|i, j| strided(o, i, j), k, n),
        Rhs::Packed(p) => dense(&|i, j| p.get(i, j), k, n),
    };
    #[cfg(target_arch = "x86_64")]
    super::gemm::gemm(
        [m, n, k],
        (dst, dst_rs, 1),
        true,
        (&ad, k, 1),
        (&bd, n, 1),
        threads,
    );
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        for i in 0..m {
            for j in 0..n {
                let s: f32 = (0..k).map(|p| ad[i * k + p] * bd[p * n + j]).sum();
                dst[i * dst_rs + j] += s;
            }
        }
    }
}

// The kernels below are unsafe functions from top to bottom (raw pointers and intrinsics that
// need the target features), so their bodies are not wrapped in further `unsafe` blocks.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Raw pointer that may cross threads: each task writes a disjoint set of C's tiles.
    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    impl SendPtr {
        /// Through a method, so closures capture the whole (Send) wrapper.
        fn get(self) -> *mut f32 {
            self.0
        }
    }

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

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        epi: Epilogue,
        a: Lhs,
        b: Rhs,
        threads: usize,
    ) {
        let kp = k.div_ceil(2);
        let m_panels = m.div_ceil(MR);
        let n_panels = n.div_ceil(NR);
        let owned;
        let apack: &[u32] = match a {
            Lhs::Packed(p) => &p.data,
            Lhs::Strided(a) => {
                let mut apack = crate::kernels::par_zeroed::<u32>(m_panels * kp * MR);
                let pack_panel = |(panel, out): (usize, &mut [u32])| {
                    // SAFETY: the caller checked the CPU features; `pack_a` stays inside `a`.
                    unsafe { pack_a(a, m, k, panel * MR, out) }
                };
                if threads > 1 && m * k >= 1 << 16 {
                    apack
                        .par_chunks_mut(kp * MR)
                        .enumerate()
                        .for_each(pack_panel);
                } else {
                    apack.chunks_mut(kp * MR).enumerate().for_each(pack_panel);
                }
                owned = apack;
                &owned
            }
        };

        // Split the work over n (each thread packs its own B) unless n is too narrow.
        let work = if threads > 1 && (m as u128) * (n as u128) * (k as u128) >= 1 << 20 {
            threads
        } else {
            1
        };
        let c = SendPtr(dst);
        let run = |(m0, m1, n0, n1): (usize, usize, usize, usize)| {
            // SAFETY: tasks cover disjoint (row, column) ranges of C, all inside `dst`.
            unsafe {
                block(
                    m,
                    m0,
                    m1,
                    n0,
                    n1,
                    k,
                    kp,
                    apack,
                    b,
                    c.get(),
                    dst_rs,
                    accumulate,
                    epi,
                )
            }
        };
        if work == 1 && !(matches!(b, Rhs::Packed(_)) && m_panels > MC_PANELS) {
            run((0, m_panels, 0, n));
            return;
        }
        let tasks: Vec<(usize, usize, usize, usize)> = match b {
            // Weights packed at load: nothing to pack per task, so cut C into blocks of
            // MC_PANELS row panels (a block's C stays in L2 across the k blocks) and let the
            // threads take them in turn.
            // Columns are split too when there are few row blocks, so that every thread gets
            // several tasks and none waits on an unlucky last one.
            Rhs::Packed(_) if m_panels > MC_PANELS => {
                // Row chunks of (nearly) equal height, at most MC_PANELS panels each.
                let m_chunks = m_panels.div_ceil(MC_PANELS);
                let m_per = m_panels.div_ceil(m_chunks);
                let n_chunks = (4 * work).div_ceil(m_chunks).clamp(1, n_panels);
                let n_per = n_panels.div_ceil(n_chunks) * NR;
                let mut tasks = Vec::with_capacity(m_chunks * n_chunks);
                for p in (0..m_panels).step_by(m_per) {
                    for j in (0..n).step_by(n_per) {
                        tasks.push((p, (p + m_per).min(m_panels), j, (j + n_per).min(n)));
                    }
                }
                tasks
            }
            // Otherwise one task per thread, each packing its own B: split n unless n is too
            // narrow.
            _ if n_panels >= 2 * work || n_panels >= m_panels => {
                let per = n_panels.div_ceil(work);
                (0..work)
                    .map(|t| {
                        (
                            0,
                            m_panels,
                            (t * per * NR).min(n),
                            ((t + 1) * per * NR).min(n),
                        )
                    })
                    .filter(|t| t.2 < t.3)
                    .collect()
            }
            _ => {
                let per = m_panels.div_ceil(work);
                (0..work)
                    .map(|t| ((t * per).min(m_panels), ((t + 1) * per).min(m_panels), 0, n))
                    .filter(|t| t.0 < t.1)
                    .collect()
            }
        };
        tasks.into_par_iter().for_each(run);
    }

    /// C rows of A panels `mp0..mp1`, columns `n0..n1`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn block(
        m: usize,
        mp0: usize,
        mp1: usize,
        n0: usize,
        n1: usize,
        k: usize,
        kp: usize,
        apack: &[u32],
        b: Rhs,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        epi: Epilogue,
    ) {
        // Column blocks narrow enough that this task's C block (rows × nc) stays in cache
        // while the k blocks pass over it.
        let rows = (mp1 - mp0) * MR;
        let nc_max = ((C_BLOCK_BYTES / 4 / rows.max(1)) / NR * NR).clamp(2 * NR, NC);
        let mut bpack = match b {
            Rhs::Strided(_) => vec![0u32; KC * nc_max.min((n1 - n0).div_ceil(NR) * NR)],
            Rhs::Packed(_) => Vec::new(),
        };
        // k blocks of equal size (≤ KC pairs).
        let kc_even = kp.div_ceil(kp.div_ceil(KC));
        let mut jc = n0;
        while jc < n1 {
            let nc = nc_max.min(n1 - jc);
            let ncp = nc.div_ceil(NR);
            let mut pc = 0;
            while pc < kp {
                let kc = kc_even.min(kp - pc);
                if let Rhs::Strided(b) = b {
                    for jp in 0..ncp {
                        let j0 = jc + jp * NR;
                        let cols = NR.min(jc + nc - j0);
                        unsafe { pack_b(b, k, pc, kc, j0, cols, &mut bpack[jp * kc * NR..]) };
                    }
                }
                let load = accumulate || pc > 0;
                let first = pc == 0 && !epi.is_empty();
                for mp in mp0..mp1 {
                    let rows = (m - mp * MR).min(MR);
                    let ap = apack.as_ptr().add(mp * kp * MR + pc);
                    for jp in 0..ncp {
                        let j0 = jc + jp * NR;
                        let cols = NR.min(jc + nc - j0);
                        let bp = match b {
                            Rhs::Strided(_) => bpack.as_ptr().add(jp * kc * NR),
                            // Panels start at multiples of NR (jc and the thread splits are).
                            Rhs::Packed(pb) => pb.data.as_ptr().add((j0 / NR) * kp * NR + pc * NR),
                        };
                        let tile_epi = if first {
                            TileEpilogue::at(&epi, mp * MR, j0)
                        } else {
                            TileEpilogue::NONE
                        };
                        unsafe {
                            micro(
                                kc,
                                ap,
                                kp,
                                bp,
                                c.add(mp * MR * ldc + j0),
                                ldc,
                                rows,
                                cols,
                                load,
                                tile_epi,
                            )
                        };
                    }
                }
                pc += kc;
            }
            jc += nc;
        }
    }

    /// Packs rows `r0..r0+MR` of A (zero past `m`) as `out[i * kp + p]` = pair p of row i.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_a(a: Operand, m: usize, k: usize, r0: usize, out: &mut [u32]) {
        let kp = k.div_ceil(2);
        for i in 0..MR {
            let r = r0 + i;
            if r >= m {
                out[i * kp..(i + 1) * kp].fill(0);
                continue;
            }
            match a.data {
                Src::Bf16(s) if a.cs == 1 => {
                    let row = &s[r * a.rs..r * a.rs + k];
                    for p in 0..kp {
                        out[i * kp + p] = pair(row, 2 * p, k);
                    }
                }
                Src::F32(s) if a.cs == 1 => {
                    let row = &s[r * a.rs..r * a.rs + k];
                    let mut p = 0;
                    let dst = out[i * kp..(i + 1) * kp].as_mut_ptr();
                    while p < kp {
                        // 16 pairs = 32 floats per step, masked at the end of the row.
                        let e0 = 2 * p;
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
                        let np = (kp - p).min(16);
                        let m: __mmask16 = ((1u32 << np) - 1) as u16;
                        _mm512_mask_storeu_epi32(dst.add(p).cast(), m, si(v));
                        p += 16;
                    }
                }
                _ => {
                    for p in 0..kp {
                        let lo = bits_of(a, r, 2 * p);
                        let hi = if 2 * p + 1 < k {
                            bits_of(a, r, 2 * p + 1)
                        } else {
                            0
                        };
                        out[i * kp + p] = lo as u32 | (hi as u32) << 16;
                    }
                }
            }
        }
    }

    /// Packs pairs `p0..p0+kc` of B's columns `j0..j0+cols` (zero past `cols` and past `k`)
    /// as `out[p * NR + j]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_b(
        b: Operand,
        k: usize,
        p0: usize,
        kc: usize,
        j0: usize,
        cols: usize,
        out: &mut [u32],
    ) {
        let out = &mut out[..kc * NR];
        match b.data {
            Src::F32(s) if b.cs == 1 => {
                // Interleave rows 2p and 2p+1: [x0_0, x1_0, x0_1, x1_1, ...] as bf16.
                let idx = _mm512_set_epi16(
                    31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                    5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
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
                        _mm512_storeu_si512(
                            tmp.as_mut_ptr().cast(),
                            si(_mm512_cvtne2ps_pbh(x1, x0)),
                        );
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

    /// The epilogue's terms for one micro-tile: pointers at its (row, column) origin, null
    /// where a term is absent.
    #[derive(Clone, Copy)]
    struct TileEpilogue {
        row: *const f32,
        col: *const f32,
        res: *const f32,
        ld_res: usize,
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
            let ptr =
                |s: Option<&[f32]>, off: usize| s.map_or(std::ptr::null(), |s| s.as_ptr().add(off));
            let (res, ld_res) = match epi.residual {
                Some((r, rs)) => (r.as_ptr().add(i0 * rs + j0), rs),
                None => (std::ptr::null(), 0),
            };
            Self {
                row: ptr(epi.row_bias, i0),
                col: ptr(epi.col_bias, j0),
                res,
                ld_res,
            }
        }

        fn is_none(&self) -> bool {
            self.row.is_null() && self.col.is_null() && self.res.is_null()
        }
    }

    /// `C[rows×cols] (+)= A-panel · B-panel` over `kc` pairs, C row stride `ldc`, plus the
    /// tile's epilogue terms.
    #[allow(clippy::too_many_arguments)]
    #[inline]
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
        epi: TileEpilogue,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_values as rand_vec;

    fn round(x: f32) -> f64 {
        f32::from_bits((bf16_bits(x) as u32) << 16) as f64
    }

    /// Checks `gemm` against an f64 reference on bf16-rounded inputs, for operands given as
    /// f32 or bf16, row- or column-major, with and without accumulation.
    fn check(m: usize, n: usize, k: usize, threads: usize) {
        let av = rand_vec(m * k, (m * 31 + k) as u64);
        let bv = rand_vec(k * n, (n * 17 + k) as u64);
        let a16: Vec<bf16> = av.iter().map(|&x| bf16::from_bits(bf16_bits(x))).collect();
        let b16: Vec<bf16> = bv.iter().map(|&x| bf16::from_bits(bf16_bits(x))).collect();
        // Column-major copies (element (r, c) at c * rows + r).
        let at: Vec<f32> = (0..m * k).map(|i| av[(i % m) * k + i / m]).collect();
        let bt16: Vec<bf16> = (0..k * n).map(|i| b16[(i % k) * n + i / k]).collect();
        let init = rand_vec(m * n, 7);
        let pa = PackedA::new(&a16, m, k);
        let pb = PackedB::from_transposed(&bt16, n, k);
        let op = |data, rs, cs| Operand { data, rs, cs };
        // Packed from f32 operands in both layouts (as attention packs K and V).
        let bt: Vec<f32> = (0..k * n).map(|i| bv[(i % k) * n + i / k]).collect();
        let pb_t = PackedB::from_operand(op(Src::F32(&bt), 1, k), k, n);
        let pb_r = PackedB::from_operand(op(Src::F32(&bv), n, 1), k, n);
        for (variant, accumulate) in [
            (0, false),
            (1, true),
            (2, false),
            (3, true),
            (4, true),
            (5, false),
        ] {
            let a = match variant {
                0 | 3 | 5 | 6 | 7 => Lhs::Strided(op(Src::F32(&av), k, 1)),
                1 => Lhs::Strided(op(Src::Bf16(&a16), k, 1)),
                4 => Lhs::Packed(&pa),
                _ => Lhs::Strided(op(Src::F32(&at), 1, m)),
            };
            let b = match variant {
                0 | 4 => Rhs::Strided(op(Src::F32(&bv), n, 1)),
                1 => Rhs::Strided(op(Src::Bf16(&bt16), 1, k)),
                2 => Rhs::Strided(op(Src::Bf16(&b16), n, 1)),
                5 => Rhs::Packed(&pb),
                6 => Rhs::Packed(&pb_t),
                7 => Rhs::Packed(&pb_r),
                _ => Rhs::Strided(op(Src::F32(&bv), n, 1)),
            };
            let ld = n + 3;
            let mut dst = vec![f32::NAN; m * ld];
            for i in 0..m {
                dst[i * ld..i * ld + n].copy_from_slice(&init[i * n..(i + 1) * n]);
            }
            gemm([m, n, k], (&mut dst, ld), accumulate, a, b, threads);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for p in 0..k {
                        let t = round(av[i * k + p]) * round(bv[p * n + j]);
                        want += t;
                        mag += t.abs();
                    }
                    if accumulate {
                        want += init[i * n + j] as f64;
                        mag += (init[i * n + j] as f64).abs();
                    }
                    let got = dst[i * ld + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-6,
                        "m{m} n{n} k{k} t{threads} variant {variant}: ({i},{j}) {got} vs {want}"
                    );
                }
                assert!(
                    dst[i * ld + n..i * ld + ld].iter().all(|x| x.is_nan()),
                    "wrote past n"
                );
            }
        }
    }

    /// Bias, per-row bias and residual terms, into initialised and uninitialised outputs,
    /// match the product plus the terms added afterwards.
    #[test]
    fn epilogue_terms_are_added_once() {
        for &(m, n, k, threads) in &[
            (1, 1, 1, 1),
            (7, 65, 3, 2),
            (13, 130, 2 * KC * 2 + 5, 2),
            (400, 70, 33, 2),
            (5, 9, 0, 1),
        ] {
            let av = rand_vec(m * k, 11);
            let bv = rand_vec(k * n, 12);
            let row_bias = rand_vec(m, 13);
            let col_bias = rand_vec(n, 14);
            let ldr = n + 5;
            let res = rand_vec(m * ldr, 15);
            let init = rand_vec(m * n, 16);
            let a = Lhs::Strided(Operand {
                data: Src::F32(&av),
                rs: k,
                cs: 1,
            });
            let strided = Operand {
                data: Src::F32(&bv),
                rs: n,
                cs: 1,
            };
            let packed = PackedB::from_operand(strided, k, n);
            let mut product = vec![0f32; m * n];
            gemm(
                [m, n, k],
                (&mut product, n),
                false,
                a,
                Rhs::Strided(strided),
                threads,
            );
            for (mask, b) in (1..8u32)
                .flat_map(|mask| [(mask, Rhs::Strided(strided)), (mask, Rhs::Packed(&packed))])
            {
                let epi = Epilogue {
                    row_bias: (mask & 1 != 0).then_some(&row_bias[..]),
                    col_bias: (mask & 2 != 0).then_some(&col_bias[..]),
                    residual: (mask & 4 != 0).then_some((&res[..], ldr)),
                };
                let want = |i: usize, j: usize, acc: bool| {
                    product[i * n + j] + epi.at(i, j) + if acc { init[i * n + j] } else { 0.0 }
                };
                let close = |got: f32, want: f32| (got - want).abs() <= 1e-5 * (1.0 + want.abs());
                for acc in [false, true] {
                    let mut c = init.clone();
                    gemm_add([m, n, k], (&mut c, n), acc, epi, a, b, threads);
                    for i in 0..m {
                        for j in 0..n {
                            assert!(
                                close(c[i * n + j], want(i, j, acc)),
                                "m{m} n{n} k{k} mask {mask} acc {acc}: ({i},{j})"
                            );
                        }
                    }
                }
                let mut c: Vec<f32> = Vec::with_capacity(m * n);
                gemm_uninit([m, n, k], (c.spare_capacity_mut(), n), epi, a, b, threads);
                // SAFETY: gemm_uninit initialised all m × n elements.
                unsafe { c.set_len(m * n) };
                for i in 0..m {
                    for j in 0..n {
                        assert!(
                            close(c[i * n + j], want(i, j, false)),
                            "uninit m{m} n{n} k{k} mask {mask}: ({i},{j})"
                        );
                    }
                }
            }
        }
    }

    /// The path CPUs without AVX-512 BF16 take adds the same product (to f32 rounding).
    #[test]
    fn fallback_adds_the_product() {
        let (m, n, k) = (7, 65, 33);
        let av = rand_vec(m * k, 21);
        let bv = rand_vec(k * n, 22);
        let a16: Vec<bf16> = av.iter().map(|&x| bf16::from_bits(bf16_bits(x))).collect();
        let a = Lhs::Strided(Operand {
            data: Src::Bf16(&a16),
            rs: k,
            cs: 1,
        });
        let b = Rhs::Strided(Operand {
            data: Src::F32(&bv),
            rs: n,
            cs: 1,
        });
        let init = rand_vec(m * n, 23);
        let mut got = init.clone();
        fallback(m, n, k, &mut got, n, a, b, 2);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = init[i * n + j] as f64
                    + (0..k)
                        .map(|p| round(av[i * k + p]) * bv[p * n + j] as f64)
                        .sum::<f64>();
                assert!((got[i * n + j] as f64 - want).abs() <= 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 64, 2),
            (7, 65, 3),
            (13, 130, 257),
            (5, 200, 300),
            (50, 17, 33),
        ] {
            check(m, n, k, 1);
            check(m, n, k, 2);
        }
    }

    #[test]
    fn matches_reference_across_blocks() {
        // k over two KC blocks, n over NC, m over several panels; both split directions.
        check(20, 1100, 2 * KC * 2 + 5, 2);
        check(200, 70, 2 * KC + 1, 2);
    }

    #[test]
    fn packed_operands_read_back() {
        let (m, k) = (7, 5);
        let w: Vec<bf16> = rand_vec(m * k, 9)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let pa = PackedA::new(&w, m, k);
        let pb = PackedB::from_transposed(&w, m, k);
        for i in 0..m {
            for j in 0..k {
                assert_eq!(pa.get(i, j), w[i * k + j].to_f32());
                assert_eq!(pb.get(j, i), w[i * k + j].to_f32());
            }
        }
    }

    #[test]
    fn rounding_matches_half() {
        for x in rand_vec(10_000, 3)
            .into_iter()
            .chain([0.0, -0.0, 1e-40, f32::INFINITY, 65504.0])
        {
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{x}");
        }
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
    }
}
