//! `W + Σ multiplierᵢ · ΔWᵢ` for one weight, in f32, cast to the compute dtype: what
//! `ComponentWeights::load` does for a patched weight, in fewer passes over the tensor and on
//! every core (candle's element-wise CPU ops run on one thread and allocate per step).

use super::Patch;
use candle_core::{CpuStorage, DType, Device, Error, Result, Storage, Tensor};
use std::sync::OnceLock;

/// Elements per thread below which splitting the work is not worth it.
const MIN_CHUNK: usize = 1 << 18;

fn threads(n: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    (n / MIN_CHUNK).clamp(1, cores)
}

/// `f(dst_chunk, offset)` over `dst` split into contiguous chunks, one per thread.
fn par_chunks<T: Send>(dst: &mut [T], f: impl Fn(&mut [T], usize) + Sync) {
    let n = dst.len();
    let t = threads(n);
    if t <= 1 {
        f(dst, 0);
        return;
    }
    let chunk = n.div_ceil(t);
    std::thread::scope(|s| {
        for (i, c) in dst.chunks_mut(chunk).enumerate() {
            let f = &f;
            s.spawn(move || f(c, i * chunk));
        }
    });
}

/// f16 bits → f32, all 65536 of them (exact; made by candle's own conversion).
fn f16_table() -> Result<&'static [f32]> {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    if let Some(t) = TABLE.get() {
        return Ok(t);
    }
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
    let t = Tensor::from_raw_buffer(&bytes, DType::F16, &[1 << 16], &Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(TABLE.get_or_init(|| t))
}

/// f32 → f16 bits, rounded to nearest even (IEEE 754; what `half` and candle compute).
fn f16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    let sign = (x >> 16) & 0x8000;
    let exp = (x >> 23) & 0xFF;
    let man = x & 0x007F_FFFF;
    if exp == 0xFF {
        // Infinity, or NaN with its top mantissa bit set
        let nan = if man == 0 { 0 } else { 0x0200 };
        return (sign | 0x7C00 | nan | (man >> 13)) as u16;
    }
    let e = exp as i32 - 127 + 15;
    if e >= 0x1F {
        return (sign | 0x7C00) as u16;
    }
    if e <= 0 {
        // Subnormal (or zero) in f16.
        let shift = 14 - e;
        if shift > 24 {
            return sign as u16;
        }
        let man = man | 0x0080_0000;
        let mut h = man >> shift;
        let round = 1u32 << (shift - 1);
        if man & round != 0 && man & (3 * round - 1) != 0 {
            h += 1;
        }
        return (sign | h) as u16;
    }
    let h = sign | ((e as u32) << 10) | (man >> 13);
    if man & 0x1000 != 0 && man & 0x2FFF != 0 {
        (h + 1) as u16
    } else {
        h as u16
    }
}

/// f32 → bf16 bits, rounded to nearest even.
fn bf16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    let h = (x >> 16) as u16;
    if x & 0x8000 != 0 && x & 0x17FFF != 0 {
        h.wrapping_add(1)
    } else {
        h
    }
}

/// A CPU tensor's elements as f32, into `out` (of the tensor's length).
fn widen_into(t: &Tensor, out: &mut [f32]) -> Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("not contiguous".into()))?;
    if end - start != out.len() {
        return Err(Error::Msg("size mismatch".into()));
    }
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => out.copy_from_slice(&v[start..end]),
        Storage::Cpu(CpuStorage::F16(v)) => {
            let (v, table) = (&v[start..end], f16_table()?);
            par_chunks(out, |c, off| {
                for (o, s) in c.iter_mut().zip(&v[off..]) {
                    *o = table[s.to_bits() as usize];
                }
            });
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            let v = &v[start..end];
            par_chunks(out, |c, off| {
                for (o, s) in c.iter_mut().zip(&v[off..]) {
                    *o = f32::from_bits((s.to_bits() as u32) << 16);
                }
            });
        }
        _ => {
            drop(storage);
            let f = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            return widen_into(&f, out);
        }
    }
    Ok(())
}

/// f32 values as a tensor of a 16-bit float dtype, converted on all cores through the
/// reusable byte buffer `buf`.
fn narrow16(
    acc: &[f32],
    buf: &mut Vec<[u8; 2]>,
    dtype: DType,
    shape: &[usize],
    bits: impl Fn(f32) -> u16 + Sync,
) -> Result<Tensor> {
    if buf.len() < acc.len() {
        buf.resize(acc.len(), [0; 2]);
    }
    let out = &mut buf[..acc.len()];
    par_chunks(out, |c, off| {
        for (o, s) in c.iter_mut().zip(&acc[off..]) {
            *o = bits(*s).to_le_bytes();
        }
    });
    Tensor::from_raw_buffer(out.as_flattened(), dtype, shape, &Device::Cpu)
}

/// Buffers kept between merges: freshly allocated memory costs a page fault per 4 KiB, more
/// than the arithmetic. At most the largest merged weight in f32 plus in 16 bits (~180 MB for
/// SDXL). The components a LoRA patches share one (see `lora::apply_loras`), so it goes away
/// with them once the model is loaded.
#[derive(Default)]
pub struct MergeScratch {
    acc: Vec<f32>,
    bytes: Vec<[u8; 2]>,
}

/// `acc += m · d` on all cores.
fn axpy(acc: &mut [f32], d: &Tensor, m: f32) -> Result<()> {
    let d = d.contiguous()?;
    let (storage, layout) = d.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("not contiguous".into()))?;
    let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        return Err(Error::Msg("LoRA update is not f32 on the CPU".into()));
    };
    let d = &v[start..end];
    if d.len() != acc.len() {
        return Err(Error::Msg(format!(
            "LoRA update has {} elements, the weight {}",
            d.len(),
            acc.len()
        )));
    }
    par_chunks(acc, |c, off| {
        for (a, x) in c.iter_mut().zip(&d[off..]) {
            *a += m * *x;
        }
    });
    Ok(())
}

/// `W + Σ multiplier · ΔW` computed in f32 (the same numbers as `(W.f32 + ΔW · m)` step by
/// step, then the cast), returned in `dtype` on the CPU.
pub fn merge_patches(
    w: &Tensor,
    patches: &[Patch],
    dtype: DType,
    scratch: &mut MergeScratch,
) -> Result<Tensor> {
    let shape = w.dims().to_vec();
    let n = w.elem_count();
    let MergeScratch { acc, bytes } = scratch;
    if acc.len() < n {
        acc.resize(n, 0.0);
    }
    let acc = &mut acc[..n];
    widen_into(w, acc)?;
    for p in patches {
        let d = p.delta.delta(&shape)?;
        if d.dims() != shape.as_slice() {
            return Err(Error::Msg(format!(
                "LoRA update has shape {:?}, the weight has {shape:?}",
                d.dims()
            )));
        }
        axpy(acc, &d, p.multiplier)?;
    }
    match dtype {
        DType::F16 => narrow16(acc, bytes, dtype, &shape, f16_bits),
        DType::BF16 => narrow16(acc, bytes, dtype, &shape, bf16_bits),
        _ => Tensor::from_slice(acc, shape, &Device::Cpu)?.to_dtype(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bit conversions equal candle's (half's) on every f16 value, on their midpoints and
    /// neighbours, and on many random f32 bit patterns (NaN, infinities, subnormals included).
    #[test]
    fn conversions_match_candle() {
        let mut xs: Vec<f32> = f16_table().unwrap().to_vec();
        let mut r = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000_000 {
            r ^= r >> 12;
            r ^= r << 25;
            r ^= r >> 27;
            xs.push(f32::from_bits(
                (r.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32,
            ));
        }
        let n = xs.len();
        for i in 0..n.min(1 << 16) {
            let b = xs[i].to_bits();
            for d in [
                1u32 << 12,
                (1 << 12) + 1,
                (1 << 12) - 1,
                1 << 15,
                (1 << 15) + 1,
            ] {
                xs.push(f32::from_bits(b.wrapping_add(d)));
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            65504.0,
            65520.0,
            1e-8,
            -6e-8,
        ]);
        let t = Tensor::from_slice(&xs, xs.len(), &Device::Cpu).unwrap();
        for (dtype, bits) in [
            (DType::F16, f16_bits as fn(f32) -> u16),
            (DType::BF16, bf16_bits),
        ] {
            let want = t.to_dtype(dtype).unwrap();
            let got = narrow16(&xs, &mut Vec::new(), dtype, &[xs.len()], bits).unwrap();
            let (a, b) = (
                want.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            );
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{dtype:?} {:e} ({:#x}): candle {x:e}, ours {y:e}",
                    xs[i],
                    xs[i].to_bits()
                );
            }
        }
    }
}
