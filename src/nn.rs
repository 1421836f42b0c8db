//! Small building blocks shared by the UNet, the VAE and the text encoders.
//!
//! Kept here (rather than taken from candle-transformers' stable-diffusion module) because
//! the SDXL models need exact control over epsilons, activations and attention layout, and
//! because these are the hot paths the CPU kernels optimise.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear, VarBuilder};

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb)
}

/// Largest attention score block materialised at once (bytes). Longer query sequences are
/// processed in chunks of rows: softmax is per query row, so the result is the same, and peak
/// memory stays bounded (SDXL's VAE attends over 16384 positions at 1024², a 1 GiB matrix).
const ATTENTION_BLOCK_BYTES: usize = 256 << 20;

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    attention_blocked(q, k, v, scale, causal, ATTENTION_BLOCK_BYTES)
}

fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    block_bytes: usize,
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    // Softmax in f32 whatever the compute dtype (diffusers upcasts the same way).
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let (b, h, sq, _) = q.dims4()?;
    let sk = k.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let rows = (block_bytes / (b * h * sk * 4).max(1)).clamp(1, sq);
    let mut outs = Vec::with_capacity(sq.div_ceil(rows));
    for start in (0..sq).step_by(rows) {
        let len = rows.min(sq - start);
        let qc = if len == sq {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let mut scores = (qc.matmul(&kt)? * scale)?;
        if causal {
            let mask: Vec<f32> = (start..start + len)
                .flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (len, sk), scores.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.to_dtype(in_dtype)
}

/// `[b, s, heads*d]` → `[b, heads, s, d]`
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, c) = x.dims3()?;
    x.reshape((b, s, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, s, d]` → `[b, s, heads*d]`
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// diffusers' `get_timestep_embedding`: sinusoidal features of `t` (shape `[n]`), computed in f32.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let t = t.to_dtype(DType::F32)?;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            // torch: exp(-ln(10000) * arange(half) / (half - shift)), in float32
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - freq_shift as f32);
            exponent.exp()
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(x)
}

/// A `Module` that applies group norm then SiLU, the pattern every resnet uses.
pub fn group_norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    silu(&norm.forward(x)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev).unwrap();
        for causal in [false, true] {
            let whole = attention_blocked(&q, &k, &v, 0.3, causal, usize::MAX).unwrap();
            // 2*3*37*4 bytes per query row: 5 rows per block.
            let chunked = attention_blocked(&q, &k, &v, 0.3, causal, 2 * 3 * 37 * 4 * 5).unwrap();
            let d = (whole - chunked)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "causal={causal}: {d}");
        }
    }
}
