//! Matrix products on the CPU: `C (+)= A · B + epilogue`, C f32, each operand f32 or bf16
//! (a right operand also f16), strided or packed once at load, computed by the micro-kernel
//! of a [`Tier`].
//!
//! Two products, whatever the tier (the contract the tests check on every tier the machine
//! can run):
//! - [`Product::F32`]: the operands as they are (bf16 and f16 operands widened exactly), f32
//!   multiply-adds;
//! - [`Product::Bf16`]: both operands rounded to bf16 (round to nearest even) first, products
//!   accumulated in f32 — what AVX-512 BF16's `vdpbf16ps` computes, and what the other tiers
//!   compute by widening the rounded operands to f32.
//!
//! Kernels ([`engine::Kernel`]): `vdpbf16ps` on bf16 pairs (`avx512bf16`, bf16 products),
//! f32 FMA with 16 lanes (`avx512`) or 8 (`avx2`), and portable Rust (`generic`, and every
//! CPU that is not x86-64). One blocked driver ([`engine`]) runs them all: BLIS-style
//! blocking (Van Zee & van de Geijn 2015) with k blocks that keep a B block in L2, C blocks
//! that stay in cache across the k blocks, operands packed per task, and bias / residual
//! terms added in the first k block while C's tile is in registers.

#[cfg(target_arch = "x86_64")]
mod bf16dot;
mod engine;
#[cfg(target_arch = "x86_64")]
mod fma;
mod portable;

#[cfg(target_arch = "x86_64")]
use super::tier::Level;
use super::tier::Tier;
use half::{bf16, f16};
use rayon::prelude::*;

/// Rows per panel of a [`PackedA`] (the bf16 dot-product kernel's micro-tile height).
pub const MR: usize = 6;
/// Columns per panel of a [`PackedB`]: four 16-lane registers of the bf16 kernel.
pub const NR: usize = 64;

/// How the operands are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// f32 operands as they are, f32 multiply-adds.
    F32,
    /// Operands rounded to bf16, f32 accumulation.
    Bf16,
}

/// How one product runs: the tier's kernels, the product's precision, the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exec {
    pub tier: Tier,
    pub product: Product,
    /// Rayon threads to split the work over (1: the calling thread only).
    pub threads: usize,
}

impl Exec {
    /// This process's tier ([`Tier::current`]).
    pub fn new(product: Product, threads: usize) -> Self {
        Self {
            tier: Tier::current(),
            product,
            threads,
        }
    }

    pub fn with_tier(self, tier: Tier) -> Self {
        Self { tier, ..self }
    }
}

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

impl Operand<'_> {
    /// Element (r, c) as f32 (rounded to bf16 first when `round`).
    #[inline(always)]
    fn at(&self, r: usize, c: usize, round: bool) -> f32 {
        let i = r * self.rs + c * self.cs;
        match self.data {
            Src::F32(s) => maybe_round(s[i], round),
            Src::Bf16(s) => s[i].to_f32(),
        }
    }
}

/// A left operand (`[m × k]`, row-major bf16, e.g. a convolution kernel) packed once, at load,
/// as bf16 pairs along k in panels of [`MR`] rows: `data[panel][i][p]`, the layout the bf16
/// kernel reads in place and the others widen from.
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

    /// Row `r` as its `k.div_ceil(2)` pairs.
    fn row_pairs(&self, r: usize) -> &[u32] {
        let kp = self.k.div_ceil(2);
        &self.data[(r / MR) * kp * MR + (r % MR) * kp..][..kp]
    }

    /// Element (r, c) as f32.
    fn get(&self, r: usize, c: usize) -> f32 {
        half_of(self.row_pairs(r)[c / 2], c % 2)
    }
}

/// A right operand (`[k × n]`) packed once as bf16 pairs along k in panels of [`NR`]
/// columns: `data[panel][p][j]`.
#[derive(Clone)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// `Wᵀ` of a row-major bf16 `W` (`[n × k]`, a linear layer's weight).
    pub fn from_transposed(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedB: {n}x{k} needs {} values", n * k);
        let wt = Operand {
            data: Src::Bf16(w),
            rs: 1,
            cs: k,
        };
        Self::from_operand(Tier::GENERIC, wt, k, n)
    }

    /// Packs any `[k × n]` operand (f32 operands are rounded to bf16), e.g. the keys of one
    /// attention head as `Kᵀ`, to be multiplied many times; `tier` picks the conversion code.
    pub fn from_operand(tier: Tier, b: Operand, k: usize, n: usize) -> Self {
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
                if tier.has(Level::Avx512Bf16) {
                    // SAFETY: the tier proves the CPU features; the assert above bounds every
                    // read.
                    unsafe { bf16dot::pack_b_pairs(b, k, (0, kp), (j0, cols), out) };
                    return;
                }
                let _ = tier;
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

    /// Pairs `p` of columns `j0..j0 + NR` (`j0` a multiple of [`NR`]).
    fn pair_row(&self, j0: usize, p: usize) -> &[u32] {
        &self.data[(j0 / NR) * self.k.div_ceil(2) * NR + p * NR..][..NR]
    }

    fn get(&self, r: usize, c: usize) -> f32 {
        half_of(self.pair_row(c / NR * NR, r / 2)[c % NR], r % 2)
    }
}

/// A value a [`Panels`] operand holds: f32, or f16 widened exactly to f32 when packed.
pub trait PanelValue: crate::memory::Plain {
    fn widen(self) -> f32;
}

impl PanelValue for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl PanelValue for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// A right operand (`[k × n]`) packed once in panels of [`NR`] columns: `data[panel][p][j]`
/// — a linear layer's `Wᵀ`, transposed once at load instead of by every product (the
/// transposing pack was an eighth of a step's time). In f32 ([`PackedF32`]) the kernel whose
/// tile is [`NR`] wide reads it in place; in f16 ([`PackedF16`], a weight stored in f16 in
/// the file, half the memory) each product widens the rows of a block exactly while packing
/// it, so the f32 product's results are the same bits.
#[derive(Clone)]
pub struct Panels<T> {
    data: Vec<T>,
    k: usize,
    n: usize,
}

/// f32 panels, read in place by the AVX-512 kernel.
pub type PackedF32 = Panels<f32>;
/// f16 panels, widened to f32 as each product packs its blocks.
pub type PackedF16 = Panels<f16>;

impl<T: PanelValue> Panels<T> {
    /// `Wᵀ` of a row-major `W` (`[n × k]`, a linear layer's weight).
    pub fn from_transposed(w: &[T], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Panels: {n}x{k} needs {} values", n * k);
        let mut data = crate::memory::zeroed_vec::<T>(n.div_ceil(NR) * k * NR);
        // Panels in parallel; within one, blocks of 16 k values: each of the panel's rows of W
        // is read a cache line at a time, the 16 × NR block written stays in L1.
        const PB: usize = 16;
        data.par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                let (j0, cols) = (panel * NR, NR.min(n - panel * NR));
                for p0 in (0..k).step_by(PB) {
                    let pb = PB.min(k - p0);
                    for j in 0..cols {
                        let src = &w[(j0 + j) * k + p0..][..pb];
                        for (q, &v) in src.iter().enumerate() {
                            out[(p0 + q) * NR + j] = v;
                        }
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

    /// Row `p` of the panel holding columns `j0..j0 + NR` (`j0` a multiple of [`NR`]).
    fn panel_row(&self, j0: usize, p: usize) -> &[T] {
        &self.data[(j0 / NR) * self.k * NR + p * NR..][..NR]
    }

    fn get(&self, r: usize, c: usize) -> f32 {
        self.panel_row(c / NR * NR, r)[c % NR].widen()
    }
}

/// Half `h` (0: low, 1: high) of a bf16 pair as f32.
#[inline(always)]
fn half_of(w: u32, h: usize) -> f32 {
    f32::from_bits(((w >> (16 * h)) & 0xffff) << 16)
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

/// The left operand of a product.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Strided(Operand<'a>),
    Packed(&'a PackedA),
}

impl Lhs<'_> {
    /// Element (r, c) as f32 (f32 sources rounded to bf16 when `round`).
    fn at(&self, r: usize, c: usize, round: bool) -> f32 {
        match self {
            Lhs::Strided(o) => o.at(r, c, round),
            Lhs::Packed(p) => p.get(r, c),
        }
    }
}

/// The right operand of a product.
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Strided(Operand<'a>),
    Packed(&'a PackedB),
    PackedF32(&'a PackedF32),
    PackedF16(&'a PackedF16),
}

impl Rhs<'_> {
    /// Element (r, c) as f32 (f32 sources rounded to bf16 when `round`).
    fn at(&self, r: usize, c: usize, round: bool) -> f32 {
        match self {
            Rhs::Strided(o) => o.at(r, c, round),
            Rhs::Packed(p) => p.get(r, c),
            Rhs::PackedF32(p) => maybe_round(p.get(r, c), round),
            Rhs::PackedF16(p) => maybe_round(p.get(r, c), round),
        }
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

/// `x` rounded to the nearest bf16 value (as f32).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

#[inline(always)]
fn maybe_round(x: f32, round: bool) -> f32 {
    if round { round_bf16(x) } else { x }
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
            assert!(b.len() >= m, "gemm: row bias too short");
        }
        if let Some(b) = self.col_bias {
            assert!(b.len() >= n, "gemm: column bias too short");
        }
        if let Some((r, rs)) = self.residual {
            assert!(r.len() >= extent(m, n, rs, 1), "gemm: residual too short");
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.row_bias.map_or(0.0, |b| b[i])
            + self.col_bias.map_or(0.0, |b| b[j])
            + self.residual.map_or(0.0, |(r, rs)| r[i * rs + j])
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + a[m×k] · b[k×n]`, `dst` row-major with row stride
/// `dst_rs`.
///
/// Panics if an operand's slice is too short for its shape and strides.
pub fn gemm(x: Exec, dims: [usize; 3], dst: (&mut [f32], usize), accumulate: bool, a: Lhs, b: Rhs) {
    gemm_add(x, dims, dst, accumulate, Epilogue::default(), a, b)
}

/// [`gemm`] plus the [`Epilogue`]'s terms: `dst = (accumulate ? dst : 0) + a · b + epi`.
pub fn gemm_add(
    x: Exec,
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
) {
    // SAFETY: dst is a valid, initialised slice of the length passed (gemm_raw checks that
    // it holds the m × n block).
    unsafe {
        gemm_raw(
            x,
            [m, n, k],
            (dst.as_mut_ptr(), dst.len()),
            dst_rs,
            accumulate,
            epi,
            a,
            b,
        )
    }
}

/// `dst = a · b + epi` into memory that need not be initialised (C is only written): every
/// element of the `m × n` block (row stride `dst_rs`) is initialised when it returns. Saves
/// the caller zeroing a fresh output buffer.
pub fn gemm_uninit(
    x: Exec,
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (&mut [std::mem::MaybeUninit<f32>], usize),
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
) {
    // SAFETY: a valid slice of the length passed (gemm_raw checks that it holds the m × n
    // block); with accumulate = false C is written before it is read, so uninitialised memory
    // is fine.
    unsafe {
        gemm_raw(
            x,
            [m, n, k],
            (dst.as_mut_ptr().cast(), dst.len()),
            dst_rs,
            false,
            epi,
            a,
            b,
        )
    }
}

/// # Safety
/// `dst` (pointer, length) must be valid for writes of that many elements, and initialised
/// where the `m × n` block (row stride `dst_rs`) lies when `accumulate`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    x: Exec,
    [m, n, k]: [usize; 3],
    (dst, dst_len): (*mut f32, usize),
    dst_rs: usize,
    accumulate: bool,
    epi: Epilogue,
    a: Lhs,
    b: Rhs,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_len >= extent(m, n, dst_rs, 1), "gemm: dst too short");
    match a {
        Lhs::Strided(a) => assert!(
            a.data.len() >= extent(m, k, a.rs, a.cs),
            "gemm: a too short"
        ),
        Lhs::Packed(a) => assert!(
            a.m == m && a.k == k,
            "gemm: packed a is {}x{}, not {m}x{k}",
            a.m,
            a.k
        ),
    }
    match b {
        Rhs::Strided(b) => assert!(
            b.data.len() >= extent(k, n, b.rs, b.cs),
            "gemm: b too short"
        ),
        Rhs::Packed(b) => assert!(
            b.k == k && b.n == n,
            "gemm: packed b is {}x{}, not {k}x{n}",
            b.k,
            b.n
        ),
        Rhs::PackedF32(b) => assert!(
            b.k == k && b.n == n,
            "gemm: packed f32 b is {}x{}, not {k}x{n}",
            b.k,
            b.n
        ),
        Rhs::PackedF16(b) => assert!(
            b.k == k && b.n == n,
            "gemm: packed f16 b is {}x{}, not {k}x{n}",
            b.k,
            b.n
        ),
    }
    epi.check(m, n);
    let job = engine::Job {
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        epi,
        a,
        b,
        threads: x.threads,
    };
    let round = x.product == Product::Bf16;
    // SAFETY (every arm): the asserts above bound every element the kernels read and write,
    // and each kernel runs only on a tier that proves its CPU features.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if round && x.tier.has(Level::Avx512Bf16) {
            return engine::run(&bf16dot::Dot, job);
        }
        if x.tier.has(Level::Avx512) {
            return engine::run(&fma::Fma16 { round }, job);
        }
        if x.tier.has(Level::Avx2) {
            return engine::run(&fma::Fma8 { round }, job);
        }
    }
    unsafe { engine::run(&portable::Portable { round }, job) }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_values as rand_vec;

    /// Every (tier, product) this CPU runs.
    fn execs(threads: usize) -> Vec<Exec> {
        Tier::runnable()
            .into_iter()
            .flat_map(|tier| {
                [Product::F32, Product::Bf16].map(|product| Exec {
                    tier,
                    product,
                    threads,
                })
            })
            .collect()
    }

    fn name(x: &Exec) -> String {
        format!("{} {:?} t{}", x.tier, x.product, x.threads)
    }

    /// Checks `gemm` against an f64 reference (on bf16-rounded operands for the bf16
    /// product), for operands given as f32 or bf16, row- or column-major, strided or packed,
    /// with and without accumulation, on every tier and product this CPU runs.
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
        let bt: Vec<f32> = (0..k * n).map(|i| bv[(i % k) * n + i / k]).collect();
        let pf = PackedF32::from_transposed(&bt, n, k);
        // B stored in f16 (an f16 checkpoint's weight), and the same values in f32.
        let bt_h: Vec<f16> = bt.iter().map(|&x| f16::from_f32(x)).collect();
        let ph = PackedF16::from_transposed(&bt_h, n, k);
        for x in execs(threads) {
            let round = x.product == Product::Bf16;
            // Packed from f32 operands in both layouts (as attention packs K and V).
            let pb_t = PackedB::from_operand(x.tier, op(Src::F32(&bt), 1, k), k, n);
            let pb_r = PackedB::from_operand(x.tier, op(Src::F32(&bv), n, 1), k, n);
            for (variant, accumulate) in [
                (0, false),
                (1, true),
                (2, false),
                (3, true),
                (4, true),
                (5, false),
                (6, true),
                (7, false),
                (8, false),
                (9, true),
                (10, false),
                (11, true),
            ] {
                // Which operands are bf16 (stored rounded): those the reference rounds even
                // in an f32 product.
                let (a, a_bf16) = match variant {
                    0 | 3 | 5..=11 => (Lhs::Strided(op(Src::F32(&av), k, 1)), false),
                    1 => (Lhs::Strided(op(Src::Bf16(&a16), k, 1)), true),
                    4 => (Lhs::Packed(&pa), true),
                    _ => (Lhs::Strided(op(Src::F32(&at), 1, m)), false),
                };
                let (b, b_bf16) = match variant {
                    0 | 4 => (Rhs::Strided(op(Src::F32(&bv), n, 1)), false),
                    1 => (Rhs::Strided(op(Src::Bf16(&bt16), 1, k)), true),
                    2 => (Rhs::Strided(op(Src::Bf16(&b16), n, 1)), true),
                    5 => (Rhs::Packed(&pb), true),
                    6 => (Rhs::Packed(&pb_t), true),
                    7 => (Rhs::Packed(&pb_r), true),
                    8 | 9 => (Rhs::PackedF32(&pf), false),
                    10 | 11 => (Rhs::PackedF16(&ph), false),
                    _ => (Rhs::Strided(op(Src::F32(&bt), 1, k)), false),
                };
                let b_f16 = variant >= 10;
                let ld = n + 3;
                let mut dst = vec![f32::NAN; m * ld];
                for i in 0..m {
                    dst[i * ld..i * ld + n].copy_from_slice(&init[i * n..(i + 1) * n]);
                }
                gemm(x, [m, n, k], (&mut dst, ld), accumulate, a, b);
                let ra = |v: f32| (if round || a_bf16 { round_bf16(v) } else { v }) as f64;
                let rb = |v: f32| {
                    let v = if b_f16 { f16::from_f32(v).to_f32() } else { v };
                    (if round || b_bf16 { round_bf16(v) } else { v }) as f64
                };
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let t = ra(av[i * k + p]) * rb(bv[p * n + j]);
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
                            "m{m} n{n} k{k} {} variant {variant}: ({i},{j}) {got} vs {want}",
                            name(&x)
                        );
                    }
                    assert!(
                        dst[i * ld + n..i * ld + ld].iter().all(|x| x.is_nan()),
                        "wrote past n"
                    );
                }
            }
        }
    }

    /// Bias, per-row bias and residual terms, into initialised and uninitialised outputs,
    /// match the product plus the terms added afterwards, on every tier.
    #[test]
    fn epilogue_terms_are_added_once() {
        for &(m, n, k, threads) in &[
            (1, 1, 1, 1),
            (7, 65, 3, 2),
            (13, 130, 600, 2),
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
            for x in execs(threads) {
                let packed = PackedB::from_operand(x.tier, strided, k, n);
                let mut product = vec![0f32; m * n];
                gemm(
                    x,
                    [m, n, k],
                    (&mut product, n),
                    false,
                    a,
                    Rhs::Strided(strided),
                );
                for (mask, b) in (1..8u32)
                    .flat_map(|mask| [(mask, Rhs::Strided(strided)), (mask, Rhs::Packed(&packed))])
                {
                    // A packed B is bf16: compare with the product of the same operands.
                    let mut product = product.clone();
                    if matches!(b, Rhs::Packed(_)) {
                        gemm(x, [m, n, k], (&mut product, n), false, a, b);
                    }
                    let epi = Epilogue {
                        row_bias: (mask & 1 != 0).then_some(&row_bias[..]),
                        col_bias: (mask & 2 != 0).then_some(&col_bias[..]),
                        residual: (mask & 4 != 0).then_some((&res[..], ldr)),
                    };
                    let want = |i: usize, j: usize, acc: bool| {
                        product[i * n + j] + epi.at(i, j) + if acc { init[i * n + j] } else { 0.0 }
                    };
                    let close =
                        |got: f32, want: f32| (got - want).abs() <= 1e-5 * (1.0 + want.abs());
                    for acc in [false, true] {
                        let mut c = init.clone();
                        gemm_add(x, [m, n, k], (&mut c, n), acc, epi, a, b);
                        for i in 0..m {
                            for j in 0..n {
                                assert!(
                                    close(c[i * n + j], want(i, j, acc)),
                                    "m{m} n{n} k{k} {} mask {mask} acc {acc}: ({i},{j})",
                                    name(&x)
                                );
                            }
                        }
                    }
                    let mut c: Vec<f32> = Vec::with_capacity(m * n);
                    gemm_uninit(x, [m, n, k], (c.spare_capacity_mut(), n), epi, a, b);
                    // SAFETY: gemm_uninit initialised all m × n elements.
                    unsafe { c.set_len(m * n) };
                    for i in 0..m {
                        for j in 0..n {
                            assert!(
                                close(c[i * n + j], want(i, j, false)),
                                "uninit m{m} n{n} k{k} {} mask {mask}: ({i},{j})",
                                name(&x)
                            );
                        }
                    }
                }
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
        // k over two k blocks of every kernel, n over a column block, m over several
        // panels; both split directions.
        check(20, 1100, 1029, 2);
        check(200, 70, 517, 2);
        // Tall: more row panels than one task takes.
        check(800, 40, 20, 2);
    }

    /// f16 panels widened while packing give the bits of f32 panels of the same values, on
    /// every tier and thread count: an f16-stored weight changes no result of an f32 run.
    #[test]
    fn f16_panels_give_the_f32_panels_bits() {
        // The last is tall enough for tasks of row blocks (more than MC_PANELS row panels).
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 65, 3),
            (13, 130, 257),
            (300, 200, 600),
            (900, 130, 300),
        ] {
            let av = rand_vec(m * k, 5);
            let w_h: Vec<f16> = rand_vec(n * k, 6)
                .iter()
                .map(|&x| f16::from_f32(x))
                .collect();
            let w: Vec<f32> = w_h.iter().map(|x| x.to_f32()).collect();
            let pf = PackedF32::from_transposed(&w, n, k);
            let ph = PackedF16::from_transposed(&w_h, n, k);
            let bias = rand_vec(n, 8);
            let a = Lhs::Strided(Operand {
                data: Src::F32(&av),
                rs: k,
                cs: 1,
            });
            for threads in [1, 2] {
                for tier in Tier::runnable() {
                    let x = Exec {
                        tier,
                        product: Product::F32,
                        threads,
                    };
                    let epi = Epilogue {
                        col_bias: Some(&bias),
                        ..Default::default()
                    };
                    let run = |b: Rhs| {
                        let mut c = vec![0f32; m * n];
                        gemm_add(x, [m, n, k], (&mut c, n), false, epi, a, b);
                        c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    assert!(
                        run(Rhs::PackedF32(&pf)) == run(Rhs::PackedF16(&ph)),
                        "m{m} n{n} k{k} {}",
                        name(&x)
                    );
                }
            }
        }
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
        // The AVX-512 BF16 packer (when this CPU runs it) and the portable one agree.
        let f: Vec<f32> = rand_vec(9 * 70, 4);
        let o = Operand {
            data: Src::F32(&f),
            rs: 70,
            cs: 1,
        };
        let generic = PackedB::from_operand(Tier::GENERIC, o, 9, 70);
        for tier in Tier::runnable() {
            assert!(
                PackedB::from_operand(tier, o, 9, 70).data == generic.data,
                "{tier}"
            );
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
