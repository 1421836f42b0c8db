//! Scaled dot-product attention read straight from the projections' `[b, s, heads·d]`
//! layout (no head split/merge copies), without materialising the whole score matrix.
//!
//! Work is split into (batch, head, block of query rows) tasks over rayon; each computes its
//! `[rows, sk]` score block with one single-threaded GEMM, a fused scale+softmax per row,
//! and multiplies by V into a private `[rows, d]` buffer that is then scattered into place.

use super::Tier;
use super::gemm::{Exec, Lhs, MR, Operand, PackedB, Product, Rhs, Src, gemm};
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
    tier: Tier,
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
        let x = Exec {
            tier,
            product: Product::F32,
            threads: 1,
        };
        // scores[nr×sk] = Q[nr×d] · Kᵀ[d×sk]  (Kᵀ: row stride 1, column stride hd)
        gemm(
            x,
            [nr, sk, d],
            (sc, sk),
            false,
            Lhs::Strided(op(Src::F32(qb), hd, 1)),
            Rhs::Strided(op(Src::F32(kb), 1, hd)),
        );
        for (i, row) in sc.chunks_exact_mut(sk).enumerate() {
            if causal {
                mask_future(row, r0 + i);
            }
            math::softmax_row(tier, row, scale);
        }
        let mut o = vec![0f32; nr * d];
        gemm(
            x,
            [nr, d, sk],
            (&mut o, d),
            false,
            Lhs::Strided(op(Src::F32(sc), sk, 1)),
            Rhs::Strided(op(Src::F32(vb), hd, 1)),
        );
        o
    })
}

fn op(data: Src, rs: usize, cs: usize) -> Operand {
    Operand { data, rs, cs }
}

/// [`attention`] with both products through the bf16 dot-product GEMM (the CPU bf16 path):
/// per (image, head) the keys are packed once as `Kᵀ` and the values as `V`, then all
/// (image, head, query block) tasks run in parallel, each with an f32 score block and an f32
/// softmax. Same layouts and result (to bf16 rounding of Q, K, V and the probabilities) as
/// [`attention`].
pub fn attention_bf16(
    tier: Tier,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    s.check(q, k, v);
    let (heads, d, sq, sk, hd) = (s.heads, s.head_dim, s.sq, s.sk, s.heads * s.head_dim);
    if s.is_empty() {
        return vec![0f32; s.batch * sq * hd];
    }
    // Query rows per block: a multiple of the micro-kernel's rows; half the f32 path's score
    // block, so it stays in L2 next to the packed K and V.
    let rows = ((SCORE_BLOCK / 2 / sk).clamp(24, 256) / MR * MR).min(sq);
    // Kᵀ (element (e, j) = K[j][e]) and V packed once per (image, head), all heads at once.
    let packs: Vec<(PackedB, PackedB)> = (0..s.batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let kb = &k[b * sk * hd + h * d..];
            let vb = &v[b * sk * hd + h * d..];
            (
                PackedB::from_operand(tier, op(Src::F32(kb), 1, hd), d, sk),
                PackedB::from_operand(tier, op(Src::F32(vb), hd, 1), sk, d),
            )
        })
        .collect();
    run_query_blocks(s, rows, |b, h, r0, nr, scores| {
        let (kt, vp) = &packs[b * heads + h];
        let qb = &q[(b * sq + r0) * hd + h * d..];
        let sc = &mut scores[..nr * sk];
        let x = Exec {
            tier,
            product: Product::Bf16,
            threads: 1,
        };
        gemm(
            x,
            [nr, sk, d],
            (sc, sk),
            false,
            Lhs::Strided(op(Src::F32(qb), hd, 1)),
            Rhs::Packed(kt),
        );
        let mut inv = vec![0f32; nr];
        for (i, row) in sc.chunks_exact_mut(sk).enumerate() {
            if causal {
                mask_future(row, r0 + i);
            }
            let sum = math::softmax_unnormalized_bf16(tier, row, scale);
            inv[i] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        }
        let mut o = vec![0f32; nr * d];
        gemm(
            x,
            [nr, d, sk],
            (&mut o, d),
            false,
            Lhs::Strided(op(Src::F32(sc), sk, 1)),
            Rhs::Packed(vp),
        );
        // The softmax's division, on the [nr, d] product.
        for (row, &f) in o.chunks_exact_mut(d).zip(&inv) {
            row.iter_mut().for_each(|v| *v *= f);
        }
        o
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::round_bf16;
    use crate::kernels::test_values;

    /// Softmax attention in f64 from `[b, s, heads·d]` inputs.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
        scale: f32,
        causal: bool,
    ) -> Vec<f64> {
        let (d, hd) = (s.head_dim, s.heads * s.head_dim);
        let mut out = vec![0f64; s.batch * s.sq * hd];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.sq {
                    let keys = if causal { (i + 1).min(s.sk) } else { s.sk };
                    let scores: Vec<f64> = (0..keys)
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    q[(b * s.sq + i) * hd + h * d + e] as f64
                                        * k[(b * s.sk + j) * hd + h * d + e] as f64
                                })
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for e in 0..d {
                        out[(b * s.sq + i) * hd + h * d + e] = (0..keys)
                            .map(|j| w[j] * v[(b * s.sk + j) * hd + h * d + e] as f64)
                            .sum::<f64>()
                            / total;
                    }
                }
            }
        }
        out
    }

    /// Both kernels on every tier: f32 to 1e-5; bf16 against the reference on bf16-rounded
    /// inputs, within what rounding the probabilities to bf16 allows.
    #[test]
    fn matches_reference_on_every_tier() {
        for (batch, heads, head_dim, sq, sk, causal) in [
            (1, 2, 8, 5, 5, true),
            (2, 3, 16, 77, 77, false),
            (1, 2, 40, 300, 77, false),
        ] {
            let s = AttnShape {
                batch,
                heads,
                head_dim,
                sq,
                sk,
            };
            let hd = heads * head_dim;
            let q = test_values(batch * sq * hd, 1);
            let k = test_values(batch * sk * hd, 2);
            let v = test_values(batch * sk * hd, 3);
            let scale = (head_dim as f32).powf(-0.5);
            let want = reference(&q, &k, &v, s, scale, causal);
            let r = |x: &[f32]| x.iter().map(|&v| round_bf16(v)).collect::<Vec<f32>>();
            let want16 = reference(&r(&q), &r(&k), &r(&v), s, scale, causal);
            for tier in Tier::runnable() {
                let got = attention(tier, &q, &k, &v, s, scale, causal);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{tier} {s:?}: {g} vs {w}");
                }
                let got = attention_bf16(tier, &q, &k, &v, s, scale, causal);
                for (g, w) in got.iter().zip(&want16) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-2,
                        "bf16 {tier} {s:?}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
