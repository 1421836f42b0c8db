//! ΔW of one adapter module: its shape from the factor shapes alone (checked against the
//! target before anything is merged) and its value, computed in f32 from the factors, read
//! from the file when the model loads the weight.
//!
//! The maths follows ComfyUI (`comfy/weight_adapter/{lora,loha,lokr}.py`) and LyCORIS
//! (`lycoris/modules/{locon,loha,lokr}.py`, `lycoris/functional/general.py`):
//!
//! - LoRA / LoCon: ΔW = (up.flatten(1) · down.flatten(1)).reshape(W) · alpha / rank, rank =
//!   down.shape\[0\]; a Tucker core `lora_mid` \[r, r, k, l\] with down \[r, in, 1, 1\] gives the
//!   effective down\[a, i, k, l\] = Σⱼ mid\[a, j, k, l\] · down\[j, i\].
//! - LoHa: ΔW = (w1a · w1b) ⊙ (w2a · w2b) · alpha / w1b.shape\[0\]; with Tucker cores each
//!   product is einsum('ijkl,jr,ip->prkl', t, wb, wa) (wa \[R, out\], wb \[R, in\]).
//! - LoKr: ΔW = w1 ⊗ w2 (w1 as \[a, b, 1, 1\] when w2 is 4-D), w = wa · wb where decomposed,
//!   w2 from a Tucker core like LoHa's; scale alpha / dim, dim = w2_b.shape\[0\] when w2 is
//!   decomposed, else w1_b.shape\[0\] when w1 is; no decomposition (or no alpha): scale 1.
//! - `.diff`: ΔW as stored.
//! - no alpha: scale 1 (alpha = rank).

use super::file::{Adapter, Factor, LoraFile};
use crate::weights::{Delta, WeightFiles};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// The natural shape of ΔW before it is reshaped onto the weight: `[rows, cols]` flattened,
/// plus the full shape when the factors give one (for messages).
pub struct DeltaShape {
    pub rows: usize,
    pub cols: usize,
    pub dims: Vec<usize>,
}

fn prod(s: &[usize]) -> Option<usize> {
    s.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

fn dims_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `[a, b, …]` → (a, product of the rest)
fn split(s: &[usize]) -> Option<(usize, usize)> {
    let (&a, rest) = s.split_first()?;
    Some((a, prod(rest)?))
}

fn shapes_of(f: &LoraFile, keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("{k} {}", dims_str(f.shape(k))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ΔW's shape from the factor shapes, or why the factors do not fit together.
pub fn delta_shape(f: &LoraFile, a: &Adapter) -> std::result::Result<DeltaShape, String> {
    let bad = |why: &str| format!("{why} ({})", shapes_of(f, &a.keys()));
    match a {
        Adapter::Lora { down, up, mid } => {
            let (d, u) = (f.shape(down), f.shape(up));
            let (rank, rest) = split(d).ok_or_else(|| bad("down factor has no dimensions"))?;
            let (out, up_rank) = split(u).ok_or_else(|| bad("up factor has no dimensions"))?;
            if d.len() < 2 || u.len() < 2 {
                return Err(bad("LoRA factors must have 2 or more dimensions"));
            }
            match mid {
                None => {
                    if up_rank != rank {
                        return Err(bad("the up and down factors disagree on the rank"));
                    }
                    let mut dims = vec![out];
                    dims.extend_from_slice(&d[1..]);
                    Ok(DeltaShape {
                        rows: out,
                        cols: rest,
                        dims,
                    })
                }
                Some(mid) => {
                    let m = f.shape(mid);
                    if m.len() != 4 || (d.len() > 2 && prod(&d[2..]) != Some(1)) {
                        return Err(bad(
                            "a Tucker LoCon needs lora_mid [r, r, k, l] and a 1x1 lora_down",
                        ));
                    }
                    if m[1] != rank || m[0] != up_rank {
                        return Err(bad("lora_mid does not fit between lora_down and lora_up"));
                    }
                    let cols = prod(&[d[1], m[2], m[3]]).ok_or_else(|| bad("too large"))?;
                    Ok(DeltaShape {
                        rows: out,
                        cols,
                        dims: vec![out, d[1], m[2], m[3]],
                    })
                }
            }
        }
        Adapter::Loha {
            w1a,
            w1b,
            w2a,
            w2b,
            t,
        } => {
            let s = [f.shape(w1a), f.shape(w1b), f.shape(w2a), f.shape(w2b)];
            if s.iter().any(|x| x.len() != 2) {
                return Err(bad("LoHa factors must be matrices"));
            }
            let product = |wa: &[usize], wb: &[usize], t: Option<&str>| -> Option<Vec<usize>> {
                match t {
                    None => (wa[1] == wb[0]).then(|| vec![wa[0], wb[1]]),
                    Some(t) => {
                        let t = f.shape(t);
                        (t.len() == 4 && t[0] == wa[0] && t[1] == wb[0])
                            .then(|| vec![wa[1], wb[1], t[2], t[3]])
                    }
                }
            };
            let (t1, t2) = match t {
                Some((a, b)) => (Some(a.as_str()), Some(b.as_str())),
                None => (None, None),
            };
            let m1 = product(s[0], s[1], t1).ok_or_else(|| bad("w1a and w1b do not multiply"))?;
            let m2 = product(s[2], s[3], t2).ok_or_else(|| bad("w2a and w2b do not multiply"))?;
            if m1 != m2 {
                return Err(bad("the two Hadamard factors have different shapes"));
            }
            let (rows, cols) = split(&m1).ok_or_else(|| bad("too large"))?;
            Ok(DeltaShape {
                rows,
                cols,
                dims: m1,
            })
        }
        Adapter::Lokr { w1, w2, t2 } => {
            let w1s = match w1 {
                Factor::Full(k) => {
                    let s = f.shape(k);
                    if s.len() != 2 {
                        return Err(bad("lokr_w1 must be a matrix"));
                    }
                    s.to_vec()
                }
                Factor::Product(a, b) => {
                    let (a, b) = (f.shape(a), f.shape(b));
                    if a.len() != 2 || b.len() != 2 || a[1] != b[0] {
                        return Err(bad("lokr_w1_a and lokr_w1_b do not multiply"));
                    }
                    vec![a[0], b[1]]
                }
            };
            let w2s = match (w2, t2) {
                (Factor::Full(k), _) => {
                    let s = f.shape(k);
                    if !matches!(s.len(), 2 | 4) {
                        return Err(bad("lokr_w2 must have 2 or 4 dimensions"));
                    }
                    s.to_vec()
                }
                (Factor::Product(a, b), None) => {
                    let (a, b) = (f.shape(a), f.shape(b));
                    if a.len() != 2 || b.len() != 2 || a[1] != b[0] {
                        return Err(bad("lokr_w2_a and lokr_w2_b do not multiply"));
                    }
                    vec![a[0], b[1]]
                }
                (Factor::Product(a, b), Some(t)) => {
                    let (a, b, t) = (f.shape(a), f.shape(b), f.shape(t));
                    if a.len() != 2 || b.len() != 2 || t.len() != 4 || t[0] != a[0] || t[1] != b[0]
                    {
                        return Err(bad("lokr_t2, lokr_w2_a and lokr_w2_b do not fit together"));
                    }
                    vec![a[1], b[1], t[2], t[3]]
                }
            };
            let rows = w1s[0].checked_mul(w2s[0]).ok_or_else(|| bad("too large"))?;
            let mut dims = vec![
                rows,
                w1s[1].checked_mul(w2s[1]).ok_or_else(|| bad("too large"))?,
            ];
            dims.extend_from_slice(&w2s[2..]);
            let (rows, cols) = split(&dims).ok_or_else(|| bad("too large"))?;
            Ok(DeltaShape { rows, cols, dims })
        }
        Adapter::Diff { diff } => {
            let s = f.shape(diff);
            let (rows, cols) = split(s).ok_or_else(|| bad("diff has no dimensions"))?;
            Ok(DeltaShape {
                rows,
                cols,
                dims: s.to_vec(),
            })
        }
    }
}

/// Whether a ΔW of this natural shape goes onto a weight of `target` shape:
/// same output rows and the same number of elements per row (a linear LoRA on a 1x1
/// convolution and the like reshape; ComfyUI and diffusers do the same).
pub fn fits(d: &DeltaShape, target: &[usize]) -> bool {
    split(target) == Some((d.rows, d.cols))
}

pub fn describe_shape(d: &DeltaShape) -> String {
    dims_str(&d.dims)
}

/// The scale an adapter applies on top of the user's weight (alpha / rank and friends).
pub fn adapter_scale(f: &LoraFile, a: &Adapter, alpha: Option<f32>, rslora: bool) -> f32 {
    let rank = match a {
        Adapter::Lora { down, .. } => f.shape(down).first().copied(),
        Adapter::Loha { w1b, .. } => f.shape(w1b).first().copied(),
        Adapter::Lokr { w1, w2, .. } => match (w2, w1) {
            (Factor::Product(_, b), _) | (Factor::Full(_), Factor::Product(_, b)) => {
                f.shape(b).first().copied()
            }
            (Factor::Full(_), Factor::Full(_)) => None,
        },
        Adapter::Diff { .. } => None,
    };
    match (alpha, rank) {
        (Some(alpha), Some(r)) if r > 0 => {
            let r = r as f32;
            alpha / if rslora { r.sqrt() } else { r }
        }
        _ => 1.0,
    }
}

/// A lazily computed ΔW (already multiplied by the adapter's own scale).
pub struct AdapterDelta {
    pub files: Arc<WeightFiles>,
    pub adapter: Adapter,
    pub scale: f32,
}

fn load(files: &WeightFiles, key: &str) -> Result<Tensor> {
    files.load(key)?.to_dtype(DType::F32)
}

/// einsum('ijkl,jr,ip->prkl', t, wb, wa): t [R, R', k, l], wa [R, p], wb [R', r] → [p, r, k, l]
fn rebuild_tucker(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (r0, r1, k, l) = t.dims4()?;
    let cols = wb.dim(1)?;
    let p = wa.dim(1)?;
    // tmp[i, k, l, r] = Σⱼ t[i, j, k, l] wb[j, r]
    let tmp = t
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((r0 * k * l, r1))?
        .matmul(wb)?;
    // out[p, k, l, r] = Σᵢ wa[i, p] tmp[i, k, l, r]
    wa.t()?
        .contiguous()?
        .matmul(&tmp.reshape((r0, k * l * cols))?)?
        .reshape((p, k, l, cols))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `t · s`, skipped for s = 1.
fn scaled(t: Tensor, s: f32) -> Result<Tensor> {
    if s == 1.0 {
        Ok(t)
    } else {
        t.affine(s as f64, 0.0)
    }
}

impl AdapterDelta {
    /// ΔW · scale, the scale folded into the smallest factor so that no extra pass over a
    /// full-size tensor is made.
    fn compute(&self) -> Result<Tensor> {
        let f = &self.files;
        let s = self.scale;
        match &self.adapter {
            Adapter::Lora { down, up, mid } => {
                let up = scaled(load(f, up)?.flatten_from(1)?, s)?;
                let down = load(f, down)?;
                let down = match mid {
                    None => down.flatten_from(1)?,
                    Some(mid) => {
                        // down'[a, i, k, l] = Σⱼ mid[a, j, k, l] down[j, i]
                        let mid = load(f, mid)?;
                        let (a, j, k, l) = mid.dims4()?;
                        let down = down.flatten_from(1)?;
                        let cin = down.dim(1)?;
                        mid.permute((0, 2, 3, 1))?
                            .contiguous()?
                            .reshape((a * k * l, j))?
                            .matmul(&down)?
                            .reshape((a, k, l, cin))?
                            .permute((0, 3, 1, 2))?
                            .contiguous()?
                            .reshape((a, cin * k * l))?
                    }
                };
                up.matmul(&down)
            }
            Adapter::Loha {
                w1a,
                w1b,
                w2a,
                w2b,
                t,
            } => {
                let (w1a, w1b, w2a, w2b) = (
                    scaled(load(f, w1a)?, s)?,
                    load(f, w1b)?,
                    load(f, w2a)?,
                    load(f, w2b)?,
                );
                let (m1, m2) = match t {
                    None => (w1a.matmul(&w1b)?, w2a.matmul(&w2b)?),
                    Some((t1, t2)) => (
                        rebuild_tucker(&load(f, t1)?, &w1a, &w1b)?,
                        rebuild_tucker(&load(f, t2)?, &w2a, &w2b)?,
                    ),
                };
                m1 * m2
            }
            Adapter::Lokr { w1, w2, t2 } => {
                let product = |factor: &Factor, t: Option<&String>| -> Result<Tensor> {
                    match (factor, t) {
                        (Factor::Full(k), _) => load(f, k),
                        (Factor::Product(a, b), None) => load(f, a)?.matmul(&load(f, b)?),
                        (Factor::Product(a, b), Some(t)) => {
                            rebuild_tucker(&load(f, t)?, &load(f, a)?, &load(f, b)?)
                        }
                    }
                };
                let w1 = scaled(product(w1, None)?, s)?;
                let w2 = product(w2, t2.as_ref())?;
                let (a, b) = w1.dims2()?;
                let dims = w2.dims().to_vec();
                let (c, d) = (dims[0], dims[1]);
                let kl: usize = dims[2..].iter().product();
                // kron: out[i·c + j, (m·d + n)·kl + q] = w1[i, m] · w2[j, n, q]
                let k = w1
                    .reshape((a, 1, b, 1, 1))?
                    .broadcast_mul(&w2.reshape((1, c, 1, d, kl))?)?;
                k.reshape((a * c, b * d * kl))
            }
            Adapter::Diff { diff } => scaled(load(f, diff)?, s),
        }
    }
}

impl Delta for AdapterDelta {
    fn delta(&self, target_shape: &[usize]) -> Result<Tensor> {
        let d = self.compute()?;
        let d = if d.is_contiguous() {
            d
        } else {
            d.contiguous()?
        };
        let numel: usize = target_shape.iter().product();
        if d.elem_count() != numel {
            return Err(candle_core::Error::Msg(format!(
                "LoRA update {} has shape {:?}, the weight has {target_shape:?}",
                self.adapter.main_key(),
                d.dims()
            )));
        }
        d.reshape(target_shape)
    }
}
