//! Scaled dot-product attention read straight from the projections' `[b, s, heads·d]`
//! layout (no head split/merge copies), without materialising the whole score matrix.
//!
//! Work is split into (batch, head, block of query rows) tasks over rayon; each computes its
//! `[rows, sk]` score block with one single-threaded GEMM, a fused scale+softmax per row,
//! and multiplies by V into a private `[rows, d]` buffer that is then scattered into place.

use super::gemm::gemm;
use super::math;
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query length.
    pub sq: usize,
    /// Key/value length.
    pub sk: usize,
}

/// Score block size per task, in f32 elements (1 MiB: it stays in L2 between the two
/// GEMMs and the softmax).
const SCORE_BLOCK: usize = 256 << 10;

impl AttnShape {
    /// Panics unless `q` is `[batch, sq, heads·d]` and `k`, `v` are `[batch, sk, heads·d]`.
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        let hd = self.heads * self.head_dim;
        assert_eq!(q.len(), self.batch * self.sq * hd);
        assert_eq!(k.len(), self.batch * self.sk * hd);
        assert_eq!(v.len(), self.batch * self.sk * hd);
    }

    /// Nothing to compute: the output is all zeros.
    fn is_empty(&self) -> bool {
        self.sq == 0 || self.head_dim == 0 || self.sk == 0
    }
}

/// Causal mask: keys after query position `qi` get −∞.
fn mask_future(row: &mut [f32], qi: usize) {
    if qi + 1 < row.len() {
        row[qi + 1..].fill(f32::NEG_INFINITY);
    }
}

/// The work split both kernels share: `block(b, h, r0, nr, scores)` computes the `[nr, d]`
/// output of query rows `r0..r0+nr` of head `h` of image `b`, given a `[rows, sk]` score
/// buffer reused per worker; every (image, head, block of `rows` query rows) is one rayon
/// task, so short sequences with many heads still keep every thread busy. The results are
/// placed into `[b, sq, heads·d]`.
fn run_query_blocks(
    s: AttnShape,
    rows: usize,
    block: impl Fn(usize, usize, usize, usize, &mut [f32]) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let AttnShape {
        batch,
        heads,
        head_dim: d,
        sq,
        sk,
    } = s;
    let hd = heads * d;
    let blocks = sq.div_ceil(rows);
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..heads).flat_map(move |h| (0..blocks).map(move |blk| (b, h, blk))))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || vec![0f32; rows * sk],
            |scores, &(b, h, blk)| {
                let r0 = blk * rows;
                block(b, h, r0, rows.min(sq - r0), scores)
            },
        )
        .collect();
    // Placed row by row in parallel, straight into fresh memory: each output row gathers its
    // heads' d values from the tasks' results.
    let mut out: Vec<f32> = Vec::with_capacity(batch * sq * hd);
    out.spare_capacity_mut()[..batch * sq * hd]
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, r) = (row / sq, row % sq);
            for (h, dst) in dst.chunks_exact_mut(d).enumerate() {
                let o = &results[(b * heads + h) * blocks + r / rows];
                let src = &o[(r % rows) * d..][..d];
                for (x, &v) in dst.iter_mut().zip(src) {
                    x.write(v);
                }
            }
        });
    // SAFETY: every (row, head) slot of every row was written above.
    unsafe { out.set_len(batch * sq * hd) };
    out
}

/// `out[b, i, h·d + e] = Σ_j softmax_j(scale · q_i·k_j) v[b, j, h·d + e]` for `q`
/// `[b, sq, heads·d]` and `k`, `v` `[b, sk, heads·d]`, all contiguous. `causal` masks keys
/// after the query position.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    s.check(q, k, v);
    let (d, sq, sk, hd) = (s.head_dim, s.sq, s.sk, s.heads * s.head_dim);
    if s.is_empty() {
        return vec![0f32; s.batch * sq * hd];
    }
    let rows = (SCORE_BLOCK / sk).clamp(48, 256).min(sq);
    run_query_blocks(s, rows, |b, h, r0, nr, scores| {
        let qb = &q[(b * sq + r0) * hd + h * d..];
        let kb = &k[b * sk * hd + h * d..];
        let vb = &v[b * sk * hd + h * d..];
        let sc = &mut scores[..nr * sk];
        // scores[nr×sk] = Q[nr×d] · Kᵀ[d×sk]  (Kᵀ: row stride 1, column stride hd)
        gemm([nr, sk, d], (sc, sk, 1), false, (qb, hd, 1), (kb, 1, hd), 1);
        for (i, row) in sc.chunks_exact_mut(sk).enumerate() {
            if causal {
                mask_future(row, r0 + i);
            }
            math::softmax_row(row, scale);
        }
        let mut o = vec![0f32; nr * d];
        gemm(
            [nr, d, sk],
            (&mut o, d, 1),
            false,
            (sc, sk, 1),
            (vb, hd, 1),
            1,
        );
        o
    })
}

/// [`attention`] with both products through the bf16 dot-product GEMM (the CPU bf16 path):
/// per (image, head) the keys are packed once as `Kᵀ` and the values as `V`, then all
/// (image, head, query block) tasks run in parallel, each with an f32 score block and an f32
/// softmax. Same layouts and result (to bf16 rounding of Q, K, V and the probabilities) as
/// [`attention`].
pub fn attention_bf16(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    use super::bf16::{Lhs, MR, Operand, PackedB, Rhs, Src, gemm as gemm16};
    s.check(q, k, v);
    let (heads, d, sq, sk, hd) = (s.heads, s.head_dim, s.sq, s.sk, s.heads * s.head_dim);
    if s.is_empty() {
        return vec![0f32; s.batch * sq * hd];
    }
    // Query rows per block: a multiple of the micro-kernel's rows; half the f32 path's score
    // block, so it stays in L2 next to the packed K and V.
    let rows = ((SCORE_BLOCK / 2 / sk).clamp(24, 256) / MR * MR).min(sq);
    fn op(data: Src, rs: usize, cs: usize) -> Operand {
        Operand { data, rs, cs }
    }
    // Kᵀ (element (e, j) = K[j][e]) and V packed once per (image, head), all heads at once.
    let packs: Vec<(PackedB, PackedB)> = (0..s.batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let kb = &k[b * sk * hd + h * d..];
            let vb = &v[b * sk * hd + h * d..];
            (
                PackedB::from_operand(op(Src::F32(kb), 1, hd), d, sk),
                PackedB::from_operand(op(Src::F32(vb), hd, 1), sk, d),
            )
        })
        .collect();
    run_query_blocks(s, rows, |b, h, r0, nr, scores| {
        let (kt, vp) = &packs[b * heads + h];
        let qb = &q[(b * sq + r0) * hd + h * d..];
        let sc = &mut scores[..nr * sk];
        gemm16(
            [nr, sk, d],
            (sc, sk),
            false,
            Lhs::Strided(op(Src::F32(qb), hd, 1)),
            Rhs::Packed(kt),
            1,
        );
        let mut inv = vec![0f32; nr];
        for (i, row) in sc.chunks_exact_mut(sk).enumerate() {
            if causal {
                mask_future(row, r0 + i);
            }
            let sum = math::softmax_unnormalized_bf16(row, scale);
            inv[i] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        }
        let mut o = vec![0f32; nr * d];
        gemm16(
            [nr, d, sk],
            (&mut o, d),
            false,
            Lhs::Strided(op(Src::F32(sc), sk, 1)),
            Rhs::Packed(vp),
            1,
        );
        // The softmax's division, on the [nr, d] product.
        for (row, &f) in o.chunks_exact_mut(d).zip(&inv) {
            row.iter_mut().for_each(|v| *v *= f);
        }
        o
    })
}
