//! Small building blocks shared by the UNet, the VAE and the text encoders.
//!
//! Kept here (rather than taken from candle-transformers' stable-diffusion module) because
//! the SDXL models need exact control over epsilons, activations and attention layout, and
//! because these are the hot paths the CPU kernels optimise.

use crate::kernels::gemm::{
    Epilogue, Exec, Lhs, Operand, PackedA, PackedB, PanelValue, Panels, Product, Rhs, Src,
    gemm_add, gemm_uninit,
};
use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};
use std::sync::Arc;

/// Runs `f` on the contiguous f32 data of CPU f32 tensors; `None` when any of them lives on
/// another device or has another dtype, or when `DMD2_KERNELS=candle` (the caller then takes
/// candle's path). Non-contiguous tensors are copied first.
fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<Option<R>> {
    if !crate::kernels::own()
        || ts
            .iter()
            .any(|t| !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
                slices.push(&data[start..end])
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(f(&slices)))
}

/// Packs a CPU bf16 weight (`[rows, ...]` → `[rows × rest]`) for the own GEMM's bf16
/// product (every CPU tier runs it); `None` otherwise (the layer then keeps its tensor).
fn pack_bf16<T>(
    w: &Tensor,
    pack: impl FnOnce(&[half::bf16], usize, usize) -> T,
) -> Result<Option<T>> {
    if w.dtype() != DType::BF16
        || !matches!(w.device(), Device::Cpu)
        || !crate::kernels::own()
        || w.rank() < 2
    {
        return Ok(None);
    }
    let rows = w.dim(0)?;
    let cols = w.elem_count() / rows.max(1);
    let flat = w.flatten_all()?.to_vec1::<half::bf16>()?;
    Ok(Some(pack(&flat, rows, cols)))
}

/// Packs a CPU linear weight (`[n, k]`) of element type `T` (f32, or f16 as stored in the
/// file) into the own GEMM's panels; `None` for other weights or under `DMD2_KERNELS=candle`
/// (the layer then keeps its tensor).
fn pack_panels<T: PanelValue + candle_core::WithDType>(w: &Tensor) -> Result<Option<Panels<T>>> {
    if w.dtype() != T::DTYPE
        || !matches!(w.device(), Device::Cpu)
        || !crate::kernels::own()
        || w.rank() != 2
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Ok(data) = T::cpu_storage_as_slice(cpu) else {
        return Ok(None);
    };
    Ok(Some(Panels::from_transposed(&data[a..b], n, k)))
}

/// A layer's weight: a tensor, or (own CPU kernels) packed once for the GEMM, in which case
/// the tensor is dropped so the weight is held only once.
#[derive(Clone)]
enum Weight<P> {
    Tensor(Tensor),
    Packed { packed: Arc<P>, dims: Vec<usize> },
}

impl<P> std::fmt::Debug for Weight<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Weight::Tensor(t) => write!(f, "Weight({:?}, {:?})", t.dims(), t.dtype()),
            Weight::Packed { dims, .. } => write!(f, "Weight(packed {dims:?})"),
        }
    }
}

/// A 2-D convolution with a fast CPU path for f32 activations and an f32 weight or a packed
/// bf16 weight ([`crate::kernels::conv`]); candle's conv2d on other devices and dtypes.
/// Weight names as `candle_nn::Conv2d`'s.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Weight<PackedA>,
    /// The kernel transformed for Winograd's F(2×2, 3×3), when enabled (CPU f32, 3×3).
    winograd: Option<Arc<crate::kernels::winograd::WinogradWeight>>,
    bias: Option<Tensor>,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn new(weight: Tensor, bias: Option<Tensor>, kernel: usize, stride: usize) -> Result<Self> {
        let dims = weight.dims().to_vec();
        let weight = match pack_bf16(&weight, PackedA::new)? {
            Some(p) => Weight::Packed {
                packed: Arc::new(p),
                dims,
            },
            None => Weight::Tensor(weight),
        };
        Ok(Self {
            weight,
            winograd: None,
            bias,
            kernel,
            stride,
            padding: kernel / 2,
        })
    }

    /// This convolution without padding (diffusers' `Downsample2D` with `padding=0`, which
    /// pads only the right and bottom edges itself).
    pub fn without_padding(mut self) -> Self {
        self.padding = 0;
        self
    }

    /// Run this convolution through Winograd's F(2×2, 3×3) on the CPU from now on, when it is
    /// a 3×3, stride-1 convolution with an f32 weight (2.25× fewer multiplications; the
    /// transformed kernel takes 16/9 of the weight's memory). A no-op otherwise.
    pub fn use_winograd(&mut self) -> Result<()> {
        if let Weight::Tensor(w) = &self.weight
            && w.dtype() == DType::F32
            && matches!(w.device(), Device::Cpu)
            && crate::kernels::own()
            && self.kernel == 3
            && self.stride == 1
            && self.padding == 1
        {
            let (c_out, c_in, _, _) = w.dims4()?;
            let data = w.flatten_all()?.to_vec1::<f32>()?;
            self.winograd = Some(Arc::new(crate::kernels::winograd::WinogradWeight::new(
                &data, c_out, c_in,
            )));
        }
        Ok(())
    }

    fn dims(&self) -> &[usize] {
        match &self.weight {
            Weight::Tensor(t) => t.dims(),
            Weight::Packed { dims, .. } => dims,
        }
    }

    /// `conv(x) + extra_bias[b, c] + residual`, with both additions done in the GEMM's
    /// accumulator on the CPU path. `extra_bias` is `[batch, c_out]` (e.g. the time
    /// embedding), `residual` has the output's shape.
    pub fn forward_add(
        &self,
        x: &Tensor,
        extra_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, extra_bias, residual, 1, false)? {
            return Ok(y);
        }
        let mut y = self.forward_candle(x)?;
        if let Some(e) = extra_bias {
            y = y.broadcast_add(&e.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// `conv(upsample_nearest2d(x, 2h, 2w))` (diffusers' Upsample2D); on the CPU path the
    /// upsampled map is never built.
    pub fn forward_upsample2x(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, None, None, 2, false)? {
            return Ok(y);
        }
        let (_, _, h, w) = x.dims4()?;
        self.forward_candle(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// `relu(conv(x) + residual)`: on the CPU path the ReLU runs in place on the fresh
    /// output (no second map allocated and faulted in, as TAESD's many ReLUs would).
    pub fn forward_relu(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, None, residual, 1, true)? {
            return Ok(y);
        }
        self.forward_add(x, None, residual)?.relu()
    }

    fn forward_cpu(
        &self,
        x: &Tensor,
        extra_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        upsample: usize,
        relu: bool,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::conv::{ConvShape, ConvWeight, conv2d};
        let (batch, c_in, h, w) = x.dims4()?;
        let &[c_out, wc_in, kh, kw] = self.dims() else {
            return Ok(None);
        };
        if wc_in != c_in || kh != self.kernel || kw != self.kernel {
            return Ok(None);
        }
        if h * upsample + 2 * self.padding < self.kernel
            || w * upsample + 2 * self.padding < self.kernel
        {
            return Ok(None);
        }
        let shape = ConvShape {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            upsample,
        };
        if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
            return Ok(None);
        }
        // Per-image bias when an extra [batch, c_out] term is added.
        let bias = match (&self.bias, extra_bias) {
            (Some(b), Some(e)) => Some(e.to_dtype(DType::F32)?.broadcast_add(&b.unsqueeze(0)?)?),
            (None, Some(e)) => Some(e.to_dtype(DType::F32)?),
            (b, None) => b.clone(),
        };
        let (oh, ow) = shape.out_hw();
        let init = match residual {
            Some(r) if r.dims() == [batch, c_out, oh, ow] => {
                Some(r.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            }
            Some(_) => return Ok(None),
            None => None,
        };
        let mut ts = vec![x];
        if let Some(b) = &bias {
            ts.push(b);
        }
        if let Weight::Tensor(t) = &self.weight {
            ts.push(t);
        }
        let out = with_cpu_f32(&ts, |d| {
            let bias = bias.as_ref().map(|_| d[1]);
            let weight = match (&self.weight, &self.winograd) {
                (Weight::Packed { packed, .. }, _) => ConvWeight::Bf16(packed),
                (_, Some(wg)) => ConvWeight::Winograd(wg),
                (Weight::Tensor(_), _) => ConvWeight::F32(d[d.len() - 1]),
            };
            conv2d(
                crate::kernels::Tier::current(),
                d[0],
                weight,
                bias,
                shape,
                init,
                relu,
            )
        })?;
        let Some(out) = out else {
            return Ok(None);
        };
        Ok(Some(Tensor::from_vec(
            out,
            (batch, c_out, oh, ow),
            &Device::Cpu,
        )?))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None, None)
    }
}

impl Conv2d {
    /// candle's conv2d (other devices and dtypes; the reference in tests).
    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let Weight::Tensor(w) = &self.weight else {
            candle_core::bail!("packed bf16 convolution needs f32 input on the CPU")
        };
        // A weight kept in another dtype than the activations is cast for the call.
        let w = w.to_dtype(x.dtype())?;
        let b = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        let cfg = Conv2dConfig {
            padding: self.padding,
            stride: self.stride,
            ..Default::default()
        };
        candle_nn::Conv2d::new(w, b, cfg).forward(x)
    }
}

/// A linear layer `y = x·Wᵀ + b`. On the CPU the product runs through the own GEMM
/// ([`crate::kernels::gemm`]), bias and residual added in its accumulator, the weight packed
/// once at load: an f32 weight transposed into the f32 kernels' panels (no product transposes
/// it again), a bf16 weight (the CPU bf16 path) into bf16 pairs for the bf16 product.
/// Everything else is candle's matmul (as `candle_nn::Linear`).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight<LinearPack>,
    bias: Option<Tensor>,
}

/// A linear layer's weight packed for the own GEMM.
#[derive(Clone)]
enum LinearPack {
    Bf16(PackedB),
    F32(Panels<f32>),
    /// A weight stored in f16 (an f32 run of an fp16 checkpoint): half the memory of f32,
    /// widened exactly in every product, so the results are those of the f32 weight.
    F16(Panels<half::f16>),
}

impl LinearPack {
    fn widths(&self) -> (usize, usize) {
        match self {
            LinearPack::Bf16(p) => (p.rows(), p.cols()),
            LinearPack::F32(p) => (p.rows(), p.cols()),
            LinearPack::F16(p) => (p.rows(), p.cols()),
        }
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let dims = weight.dims().to_vec();
        let packed = match pack_bf16(&weight, PackedB::from_transposed)? {
            Some(p) => Some(LinearPack::Bf16(p)),
            None => match pack_panels(&weight)? {
                Some(p) => Some(LinearPack::F32(p)),
                None => pack_panels(&weight)?.map(LinearPack::F16),
            },
        };
        let weight = match packed {
            Some(p) => Weight::Packed {
                packed: Arc::new(p),
                dims,
            },
            None => Weight::Tensor(weight),
        };
        Ok(Self { weight, bias })
    }

    /// Whether this layer runs on the CPU bf16 path (its weight is packed for the bf16 GEMM).
    pub fn is_packed_bf16(&self) -> bool {
        matches!(
            &self.weight,
            Weight::Packed { packed, .. } if matches!(**packed, LinearPack::Bf16(_))
        )
    }

    /// (input width, output width).
    fn widths(&self) -> Option<(usize, usize)> {
        match &self.weight {
            Weight::Packed { packed, .. } => Some(packed.widths()),
            Weight::Tensor(w) => match w.dims() {
                &[out, inp] => Some((inp, out)),
                _ => None,
            },
        }
    }

    /// `x·Wᵀ + b + residual`; on the CPU the bias and the residual start the GEMM's
    /// accumulator instead of costing passes of their own.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, Some(residual))? {
            return Ok(y);
        }
        self.forward(x)? + residual
    }

    /// Rows of `x` (`[.., in]`) for the own GEMM; `None` unless `x` is a CPU f32 tensor whose
    /// last dimension is the weight's input width and the weight is packed or CPU f32.
    fn cpu_rows(&self, x: &Tensor) -> Option<usize> {
        let (in_dim, _) = self.widths()?;
        let dims = x.dims();
        let weight_ok = match &self.weight {
            Weight::Packed { .. } => true,
            Weight::Tensor(w) => w.dtype() == DType::F32 && w.device().is_cpu(),
        };
        (weight_ok
            && x.dtype() == DType::F32
            && x.device().is_cpu()
            && crate::kernels::own()
            && dims.last() == Some(&in_dim))
        .then(|| dims[..dims.len() - 1].iter().product())
    }

    /// Calls `f` with the contiguous f32 data of `inputs` and the weight as the GEMM's right
    /// operand (`Wᵀ`) and its product; `None` when a tensor is not CPU f32.
    fn with_rhs<R>(
        &self,
        inputs: &[&Tensor],
        f: impl FnOnce(&[&[f32]], Rhs, Product) -> R,
    ) -> Result<Option<R>> {
        match &self.weight {
            Weight::Packed { packed, .. } => with_cpu_f32(inputs, |d| match &**packed {
                LinearPack::Bf16(p) => f(d, Rhs::Packed(p), Product::Bf16),
                LinearPack::F32(p) => f(d, Rhs::PackedF32(p), Product::F32),
                LinearPack::F16(p) => f(d, Rhs::PackedF16(p), Product::F32),
            }),
            Weight::Tensor(w) => {
                let in_dim = w.dim(1)?;
                let mut all = inputs.to_vec();
                all.push(w);
                with_cpu_f32(&all, |d| {
                    let (w, d) = d.split_last().expect("the weight was pushed");
                    let wt = Operand {
                        data: Src::F32(w),
                        rs: 1,
                        cs: in_dim,
                    };
                    f(d, Rhs::Strided(wt), Product::F32)
                })
            }
        }
    }

    /// `x[.., in] → [.., out]` (+ `residual`) through the own GEMM: `None` unless on the CPU
    /// with f32 `x` (and an f32 or packed weight).
    fn forward_cpu(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        let (Some(rows), Some((in_dim, out_dim))) = (self.cpu_rows(x), self.widths()) else {
            return Ok(None);
        };
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("rank checked above") = out_dim;
        let mut inputs = vec![x];
        if let Some(r) = residual {
            if r.dims() != out_dims.as_slice() {
                return Ok(None);
            }
            inputs.push(r);
        }
        let bias = self.bias_f32()?;
        let total = rows * out_dim;
        let mut y: Vec<f32> = Vec::with_capacity(total);
        let done = self.with_rhs(&inputs, |d, rhs, product| {
            gemm_uninit(
                Exec::new(product, crate::kernels::num_threads()),
                [rows, out_dim, in_dim],
                (&mut y.spare_capacity_mut()[..total], out_dim),
                Epilogue {
                    row_bias: None,
                    col_bias: bias.as_deref(),
                    residual: d.get(1).map(|r| (*r, out_dim)),
                },
                Lhs::Strided(Operand {
                    data: Src::F32(d[0]),
                    rs: in_dim,
                    cs: 1,
                }),
                rhs,
            );
        })?;
        if done.is_none() {
            return Ok(None);
        }
        // SAFETY: gemm_uninit wrote all rows × out_dim elements.
        unsafe { y.set_len(total) };
        Ok(Some(Tensor::from_vec(y, out_dims, &Device::Cpu)?))
    }

    fn bias_f32(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()
    }

    /// [`geglu`] of this projection, `geglu(x·Wᵀ + b)`. On the CPU a band of rows at a time:
    /// the `[rows, 2·inner]` projection (80 MB per SDXL block at 1024²) is never held whole,
    /// each band goes through one reused buffer that is still in cache when GEGLU reads it,
    /// and no tensor large enough for its own memory mapping is made each block.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.geglu_cpu(x, GEGLU_BAND_BYTES)? {
            return Ok(y);
        }
        geglu(&self.forward(x)?)
    }

    /// Bands of at least 48 rows and about `band_bytes` of projection output.
    fn geglu_cpu(&self, x: &Tensor, band_bytes: usize) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (rows, (in_dim, out_dim)) = match (self.cpu_rows(x), self.widths()) {
            (Some(rows), Some((i, o))) if o % 2 == 0 => (rows, (i, o)),
            _ => return Ok(None),
        };
        let half = out_dim / 2;
        let band = (band_bytes / 4 / out_dim.max(1)).max(48).min(rows.max(1));
        let bias = self.bias_f32()?;
        let tier = crate::kernels::Tier::current();
        let mut out = crate::kernels::par_zeroed::<f32>(rows * half);
        let mut proj = crate::kernels::par_zeroed::<f32>(band * out_dim);
        let done = self.with_rhs(&[x], |d, rhs, product| {
            for r0 in (0..rows).step_by(band) {
                let nr = band.min(rows - r0);
                gemm_add(
                    Exec::new(product, crate::kernels::num_threads()),
                    [nr, out_dim, in_dim],
                    (&mut proj, out_dim),
                    false,
                    Epilogue {
                        col_bias: bias.as_deref(),
                        ..Default::default()
                    },
                    Lhs::Strided(Operand {
                        data: Src::F32(&d[0][r0 * in_dim..]),
                        rs: in_dim,
                        cs: 1,
                    }),
                    rhs,
                );
                out[r0 * half..(r0 + nr) * half]
                    .par_chunks_mut(half)
                    .zip(proj.par_chunks(out_dim))
                    .for_each(|(o, row)| {
                        crate::kernels::math::geglu(tier, &row[..half], &row[half..], o)
                    });
            }
        })?;
        if done.is_none() {
            return Ok(None);
        }
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("rank checked above") = half;
        Ok(Some(Tensor::from_vec(out, out_dims, &Device::Cpu)?))
    }
}

/// Projection output per band in [`Linear::forward_geglu`]: well under glibc's 32 MiB mmap
/// ceiling, so the band buffer comes from the heap.
const GEGLU_BAND_BYTES: usize = 16 << 20;

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, None)? {
            return Ok(y);
        }
        let Weight::Tensor(w) = &self.weight else {
            candle_core::bail!("a packed linear layer needs f32 input on the CPU")
        };
        let (w, b) = if w.dtype() != x.dtype() {
            (
                w.to_dtype(x.dtype())?,
                self.bias
                    .as_ref()
                    .map(|b| b.to_dtype(x.dtype()))
                    .transpose()?,
            )
        } else {
            (w.clone(), self.bias.clone())
        };
        candle_nn::Linear::new(w, b).forward(x)
    }
}

/// Group norm over `[b, c, ...]` with a fused CPU f32 path ([`crate::kernels::norm`]),
/// optionally followed by SiLU. Weight names as `candle_nn::GroupNorm`'s.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `norm(x)`, then SiLU when `silu`.
    pub fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() >= 2 && dims[1] == self.weight.dim(0)? && dims[1].is_multiple_of(self.groups)
        {
            let channels = dims[1];
            let spatial: usize = dims[2..].iter().product();
            if spatial > 0 {
                let res = with_cpu_f32(&[x, &self.weight, &self.bias], |d| {
                    crate::kernels::norm::group_norm(
                        crate::kernels::Tier::current(),
                        d[0],
                        channels,
                        spatial,
                        self.groups,
                        d[1],
                        d[2],
                        self.eps,
                        silu,
                    )
                })?;
                if let Some(out) = res {
                    return Tensor::from_vec(out, dims, &Device::Cpu);
                }
            }
        }
        let y = self.inner.forward(x)?;
        if silu { self::silu(&y) } else { Ok(y) }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Linear::new(weight, None)
}

pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv2d_with_bias(c_in, c_out, kernel, stride, true, vb)
}

/// A convolution without bias (TAESD's strided and upsampling convolutions).
pub fn conv2d_no_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv2d_with_bias(c_in, c_out, kernel, stride, false, vb)
}

fn conv2d_with_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
    let bias = bias.then(|| vb.get(c_out, "bias")).transpose()?;
    Conv2d::new(weight, bias, kernel, stride)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
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

/// Group norm then SiLU, the pattern every resnet uses (fused on CPU f32).
pub fn group_norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    norm.forward_act(x, true)
}

/// diffusers' GEGLU on the last dimension: `h[..., :n] * gelu_erf(h[..., n:])`, `n` half
/// the last dimension; fused on CPU f32.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let dims = h.dims().to_vec();
    let last = *dims.last().unwrap_or(&0);
    let half = last / 2;
    if last > 0 && last.is_multiple_of(2) {
        let res = with_cpu_f32(&[h], |d| {
            use rayon::prelude::*;
            let tier = crate::kernels::Tier::current();
            let hd = d[0];
            let mut out = crate::kernels::par_zeroed::<f32>(hd.len() / 2);
            let rows_per_task = (1 << 16) / half.max(1) + 1;
            out.par_chunks_mut(half * rows_per_task)
                .zip(hd.par_chunks(last * rows_per_task))
                .for_each(|(o, rows)| {
                    for (o, row) in o.chunks_mut(half).zip(rows.chunks(last)) {
                        crate::kernels::math::geglu(tier, &row[..half], &row[half..], o);
                    }
                });
            out
        })?;
        if let Some(out) = res {
            let mut od = dims.clone();
            *od.last_mut().unwrap_or(&mut 0) = half;
            return Tensor::from_vec(out, od, &Device::Cpu);
        }
    }
    let d = candle_core::D::Minus1;
    let hidden = h.narrow(d, 0, half)?;
    let gate = h.narrow(d, half, half)?.gelu_erf()?;
    hidden * gate
}

/// Multi-head attention on projections in token layout: `q` `[b, sq, heads·d]`, `k` and `v`
/// `[b, sk, heads·d]`; returns `[b, sq, heads·d]`. The CPU f32 path
/// ([`crate::kernels::attention`]) reads the heads in place and never holds the full score
/// matrix; elsewhere heads are split and [`attention`] runs.
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
    bf16: bool,
) -> Result<Tensor> {
    let (b, sq, hd) = q.dims3()?;
    let (bk, sk, hdk) = k.dims3()?;
    if v.dims3()? == (bk, sk, hdk) && b == bk && hd == hdk && heads > 0 && hd % heads == 0 {
        let shape = crate::kernels::attention::AttnShape {
            batch: b,
            heads,
            head_dim: hd / heads,
            sq,
            sk,
        };
        use crate::kernels::attention::{attention, attention_bf16};
        let tier = crate::kernels::Tier::current();
        let res = with_cpu_f32(&[q, k, v], |d| {
            if bf16 {
                attention_bf16(tier, d[0], d[1], d[2], shape, scale as f32, causal)
            } else {
                attention(tier, d[0], d[1], d[2], shape, scale as f32, causal)
            }
        })?;
        if let Some(out) = res {
            return Tensor::from_vec(out, (b, sq, hd), &Device::Cpu);
        }
    }
    let o = attention(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        scale,
        causal,
    )?;
    merge_heads(&o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d.to_scalar::<f32>().unwrap() / m.max(1e-6)
    }

    fn vb_random(dev: &Device) -> VarBuilder<'static> {
        crate::random_weights::var_builder(DType::F32, dev)
    }

    #[test]
    fn conv_matches_candle() {
        let dev = Device::Cpu;
        // (batch, c_in, c_out, h, w, kernel, stride)
        let cases = [
            (1, 4, 8, 9, 7, 3, 1),
            (2, 5, 3, 8, 8, 3, 2),
            (2, 7, 6, 9, 11, 3, 2),
            (1, 3, 5, 1, 1, 3, 1),
            (2, 6, 4, 5, 3, 1, 1),
            (1, 16, 12, 13, 17, 1, 2),
            (2, 32, 40, 31, 29, 3, 1),
            (1, 3, 2, 2, 3, 3, 2),
        ];
        for (b, ci, co, h, w, k, s) in cases {
            let conv = conv2d(ci, co, k, s, vb_random(&dev)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let got = conv.forward(&x).unwrap();
            let want = conv.forward_candle(&x).unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "{:?}: {e}", (b, ci, co, h, w, k, s));
            // Non-contiguous input goes through the same path.
            let xt = Tensor::randn(0f32, 1.0, (b, ci, w, h), &dev)
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            let e = max_rel(
                &conv.forward(&xt).unwrap(),
                &conv.forward_candle(&xt).unwrap(),
            );
            assert!(e < 1e-5, "transposed {:?}: {e}", (b, ci, co, h, w, k, s));
        }
    }

    /// The CPU bf16 path (packed bf16 weights, f32 activations rounded to bf16 inside the
    /// GEMM) against candle in f32 on the same bf16-rounded weights and inputs (this
    /// process's tier; the kernels' own tests cover every tier).
    #[test]
    fn bf16_conv_and_linear_match_rounded_f32() {
        let dev = Device::Cpu;
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for (b, ci, co, h, w, k, s) in [
            (1, 4, 8, 9, 7, 3, 1),
            (2, 7, 6, 9, 11, 3, 2),
            (2, 6, 4, 5, 3, 1, 1),
        ] {
            let wt = round(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev).unwrap());
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let fast =
                Conv2d::new(wt.to_dtype(DType::BF16).unwrap(), Some(bias.clone()), k, s).unwrap();
            assert!(matches!(fast.weight, Weight::Packed { .. }));
            let reference = Conv2d::new(wt, Some(bias), k, s).unwrap();
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let e = max_rel(
                &fast.forward(&x).unwrap(),
                &reference.forward_candle(&round(&x)).unwrap(),
            );
            assert!(e < 1e-5, "conv {:?}: {e}", (b, ci, co, h, w, k, s));
        }
        for (rows, i, o) in [(1, 3, 5), (7, 64, 130), (2 * 77, 33, 70)] {
            let wt = round(&Tensor::randn(0f32, 0.3, (o, i), &dev).unwrap());
            let bias = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
            let fast = Linear::new(wt.to_dtype(DType::BF16).unwrap(), Some(bias.clone())).unwrap();
            assert!(matches!(fast.weight, Weight::Packed { .. }));
            let x = Tensor::randn(0f32, 1.0, (2, rows / 2 + 1, i), &dev).unwrap();
            let want = candle_nn::Linear::new(wt, Some(bias))
                .forward(&round(&x))
                .unwrap();
            let e = max_rel(&fast.forward(&x).unwrap(), &want);
            assert!(e < 1e-5, "linear {:?}: {e}", (rows, i, o));
        }
    }

    #[test]
    fn banded_geglu_equals_projection_then_geglu() {
        let dev = Device::Cpu;
        let (i, o) = (40, 2 * 70);
        let wt = Tensor::randn(0f32, 0.3, (o, i), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
        // Packed bf16 and f32 weights alike.
        for lin in [
            Linear::new(wt.to_dtype(DType::BF16).unwrap(), Some(bias.clone())).unwrap(),
            Linear::new(wt.clone(), Some(bias.clone())).unwrap(),
        ] {
            // 2 × 55 rows in bands of 48: 48, 48, 14.
            let x = Tensor::randn(0f32, 1.0, (2, 55, i), &dev).unwrap();
            let want = geglu(&lin.forward(&x).unwrap()).unwrap();
            let got = lin.geglu_cpu(&x, 1).unwrap().unwrap();
            assert_eq!(got.dims(), &[2, 55, 70]);
            assert_eq!(max_rel(&got, &want), 0.0);
            let whole = lin.forward_geglu(&x).unwrap();
            assert_eq!(max_rel(&whole, &want), 0.0);
        }
    }

    #[test]
    fn bf16_attention_close_to_f32() {
        let dev = Device::Cpu;
        for (b, sq, sk, h, d, causal) in [
            (1, 70, 77, 2, 64, false),
            (2, 300, 300, 3, 40, false),
            (1, 77, 77, 2, 8, true),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, sq, h * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, sk, h * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, sk, h * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let want = attention_tokens(&q, &k, &v, h, scale, causal, false).unwrap();
            let got = attention_tokens(&q, &k, &v, h, scale, causal, true).unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 2e-2, "{:?}: {e}", (b, sq, sk, h, d, causal));
            assert!(e > 0.0, "bf16 path not taken");
        }
    }

    #[test]
    fn upsampling_conv_matches_candle() {
        let dev = Device::Cpu;
        for (b, ci, co, h, w) in [(1, 4, 8, 5, 7), (2, 6, 3, 1, 2), (1, 16, 16, 8, 8)] {
            let conv = conv2d(ci, co, 3, 1, vb_random(&dev)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let want = conv
                .forward_candle(&x.upsample_nearest2d(2 * h, 2 * w).unwrap())
                .unwrap();
            let e = max_rel(&conv.forward_upsample2x(&x).unwrap(), &want);
            assert!(e < 1e-5, "{:?}: {e}", (b, ci, co, h, w));
        }
    }

    #[test]
    fn conv_adds_bias_per_image_and_residual() {
        let dev = Device::Cpu;
        let conv = conv2d(5, 6, 3, 1, vb_random(&dev)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 9), &dev).unwrap();
        let extra = Tensor::randn(0f32, 1.0, (2, 6), &dev).unwrap();
        let res = Tensor::randn(0f32, 1.0, (2, 6, 7, 9), &dev).unwrap();
        let want = ((conv.forward_candle(&x).unwrap()
            + extra
                .unsqueeze(2)
                .unwrap()
                .unsqueeze(3)
                .unwrap()
                .broadcast_as((2, 6, 7, 9))
                .unwrap())
        .unwrap()
            + &res)
            .unwrap();
        let got = conv.forward_add(&x, Some(&extra), Some(&res)).unwrap();
        assert!(max_rel(&got, &want) < 1e-5);
    }

    #[test]
    fn group_norm_matches_candle() {
        let dev = Device::Cpu;
        for (b, c, h, w, g) in [
            (1, 8, 5, 7, 4),
            (2, 32, 9, 9, 32),
            (2, 64, 16, 3, 32),
            (1, 6, 1, 1, 3),
        ] {
            let gn = group_norm(g, c, 1e-5, vb_random(&dev)).unwrap();
            // Offset data to check the variance is taken around the mean accurately.
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 3.0).unwrap();
            let want = gn.inner.forward(&x).unwrap();
            let e = max_rel(&gn.forward(&x).unwrap(), &want);
            assert!(e < 1e-5, "{:?}: {e}", (b, c, h, w, g));
            let want = silu(&want).unwrap();
            let e = max_rel(&group_norm_silu(&gn, &x).unwrap(), &want);
            assert!(e < 1e-5, "silu {:?}: {e}", (b, c, h, w, g));
            // 3-D input `[b, c, l]`.
            let x3 = x.reshape((b, c, h * w)).unwrap();
            let e = max_rel(&gn.forward(&x3).unwrap(), &gn.inner.forward(&x3).unwrap());
            assert!(e < 1e-5, "3d {:?}: {e}", (b, c, h, w, g));
        }
    }

    #[test]
    fn geglu_matches_candle() {
        let dev = Device::Cpu;
        for shape in [
            (1usize, 3usize, 10usize),
            (2, 77, 64),
            (1, 1, 2),
            (2, 5, 2562),
        ] {
            let h = Tensor::randn(0f32, 3.0, shape, &dev).unwrap();
            let half = shape.2 / 2;
            let want = (h.narrow(2, 0, half).unwrap()
                * h.narrow(2, half, half).unwrap().gelu_erf().unwrap())
            .unwrap();
            let got = geglu(&h).unwrap();
            let d = got
                .sub(&want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{shape:?}: {d}");
        }
    }

    #[test]
    fn token_attention_matches_reference() {
        let dev = Device::Cpu;
        // (batch, heads, head_dim, sq, sk)
        for (b, h, d, sq, sk, causal) in [
            (1, 2, 8, 5, 5, true),
            (2, 3, 16, 77, 77, true),
            (2, 4, 8, 300, 77, false),
            (1, 1, 40, 257, 257, false),
            (2, 2, 4, 1, 3, false),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, sq, h * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, sk, h * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, sk, h * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let got = attention_tokens(&q, &k, &v, h, scale, causal, false).unwrap();
            let want = merge_heads(
                &attention(
                    &split_heads(&q, h).unwrap(),
                    &split_heads(&k, h).unwrap(),
                    &split_heads(&v, h).unwrap(),
                    scale,
                    causal,
                )
                .unwrap(),
            )
            .unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "{:?}: {e}", (b, h, d, sq, sk, causal));
        }
    }

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
