//! A stored tensor read and converted to the compute dtype in one pass: the file read in
//! chunks with positioned reads on all cores, each chunk converted straight into the
//! tensor's own buffer (allocated once, on huge pages: [`crate::memory`]) while it is still
//! in cache, and checked for NaN and Inf on the way. The values are exactly those of
//! `Tensor::to_dtype` (half's conversions, round to nearest even).

use crate::memory::{Plain, zeroed_vec};
use crate::safetensors_file::{TensorEntry, read_exact_at};
use candle_core::{DType, Device, Error, Result, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per chunk: enough chunks for every core on the large tensors, and a chunk's
/// source and an f32 copy (4 MiB) stay in cache while it is converted.
const CHUNK: usize = 1 << 20;

/// The element types a tensor is stored in and converted to.
pub(super) trait Elem: Plain + WithDType {
    /// Converts `src` into `dst`; `tmp` is scratch for going through f32.
    fn convert(src: Stored, dst: &mut [Self], tmp: &mut Vec<f32>);
    /// Whether every value is finite.
    fn all_finite(v: &[Self]) -> bool;
}

/// One chunk's source values, as read.
#[derive(Clone, Copy)]
pub(super) enum Stored<'a> {
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
}

impl<'a> Stored<'a> {
    fn widen(self, tmp: &'a mut Vec<f32>) -> &'a [f32] {
        let n = match self {
            Stored::F16(v) => v.len(),
            Stored::Bf16(v) => v.len(),
            Stored::F32(v) => return v,
        };
        tmp.resize(n, 0.0);
        match self {
            Stored::F16(v) => v.convert_to_f32_slice(tmp),
            Stored::Bf16(v) => v.convert_to_f32_slice(tmp),
            Stored::F32(_) => {}
        }
        tmp
    }
}

/// Counting instead of `all` keeps the loop free of early exits, so it vectorises.
fn count_non_finite<T: Copy>(v: &[T], bits: impl Fn(T) -> u32, exponent: u32) -> usize {
    v.iter()
        .filter(|&&x| bits(x) & exponent == exponent)
        .count()
}

impl Elem for f32 {
    fn convert(src: Stored, dst: &mut [f32], _: &mut Vec<f32>) {
        match src {
            Stored::F16(v) => v.convert_to_f32_slice(dst),
            Stored::Bf16(v) => v.convert_to_f32_slice(dst),
            Stored::F32(v) => dst.copy_from_slice(v),
        }
    }
    fn all_finite(v: &[f32]) -> bool {
        count_non_finite(v, f32::to_bits, 0x7f80_0000) == 0
    }
}

impl Elem for bf16 {
    fn convert(src: Stored, dst: &mut [bf16], tmp: &mut Vec<f32>) {
        match src {
            Stored::Bf16(v) => dst.copy_from_slice(v),
            _ => dst.convert_from_f32_slice(src.widen(tmp)),
        }
    }
    fn all_finite(v: &[bf16]) -> bool {
        count_non_finite(v, |x| x.to_bits() as u32, 0x7f80) == 0
    }
}

impl Elem for f16 {
    fn convert(src: Stored, dst: &mut [f16], tmp: &mut Vec<f32>) {
        match src {
            Stored::F16(v) => dst.copy_from_slice(v),
            _ => dst.convert_from_f32_slice(src.widen(tmp)),
        }
    }
    fn all_finite(v: &[f16]) -> bool {
        count_non_finite(v, |x| x.to_bits() as u32, 0x7c00) == 0
    }
}

/// Reads `len` elements from element `first` of a stored f16, bf16 or f32 tensor into
/// `raw` (reused from chunk to chunk: fresh buffers would fault their pages every time).
fn read_chunk<'a>(
    file: &std::fs::File,
    e: &TensorEntry,
    first: usize,
    len: usize,
    raw: &'a mut Vec<u32>,
) -> std::io::Result<Stored<'a>> {
    let size = match e.dtype {
        safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
        _ => 4,
    };
    let bytes = len * size;
    raw.resize(bytes.div_ceil(4), 0);
    // SAFETY: u32s viewed as bytes (no padding, any bit pattern valid), within the vector.
    let buf = unsafe { std::slice::from_raw_parts_mut(raw.as_mut_ptr() as *mut u8, bytes) };
    read_exact_at(file, buf, e.start + (first * size) as u64)?;
    let p = raw.as_ptr();
    // SAFETY: the first `bytes` bytes were just written; f16, bf16 (u16 wrappers) and f32
    // are plain data whose alignment the u32 buffer satisfies; the views borrow `raw`.
    Ok(unsafe {
        match e.dtype {
            safetensors::Dtype::F16 => {
                Stored::F16(std::slice::from_raw_parts(p as *const f16, len))
            }
            safetensors::Dtype::BF16 => {
                Stored::Bf16(std::slice::from_raw_parts(p as *const bf16, len))
            }
            _ => Stored::F32(std::slice::from_raw_parts(p as *const f32, len)),
        }
    })
}

/// Whether [`read_as`] reads this stored dtype.
pub(super) fn reads(e: &TensorEntry) -> bool {
    matches!(
        e.dtype,
        safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F32
    )
}

/// Rows `rows` (all when `None`) of the stored tensor `e`, converted to `T`, with whether
/// every value is finite. `describe` names the file and tensor for errors.
pub(super) fn read_as<T: Elem>(
    file: &std::fs::File,
    e: &TensorEntry,
    rows: Option<(usize, usize)>,
    describe: impl Fn() -> String + Sync,
) -> Result<(Tensor, bool)> {
    let numel = e.numel() as usize;
    let (first_row, n_rows, row) = match (rows, e.shape.first()) {
        (Some((start, len)), Some(&all))
            if start.checked_add(len).is_some_and(|end| end <= all) =>
        {
            (start, len, numel / all.max(1))
        }
        (Some(_), _) => return Err(Error::Msg(format!("{}: rows out of range", describe()))),
        (None, _) => (0, 1, numel),
    };
    let mut shape = e.shape.clone();
    if rows.is_some() {
        shape[0] = n_rows;
    }
    let n = n_rows * row;
    let offset = first_row * row;
    let mut out: Vec<T> = zeroed_vec(n);
    let finite = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(raw, tmp), (i, dst)| -> Result<bool> {
                let src = read_chunk(file, e, offset + i * CHUNK, dst.len(), raw)
                    .map_err(|err| Error::Msg(format!("{}: {err}", describe())))?;
                T::convert(src, dst, tmp);
                Ok(T::all_finite(dst))
            },
        )
        .try_reduce(|| true, |a, b| Ok(a && b))?;
    Ok((Tensor::from_vec(out, shape, &Device::Cpu)?, finite))
}

/// [`read_as`] with the target dtype chosen at run time.
pub(super) fn read_as_dtype(
    file: &std::fs::File,
    e: &TensorEntry,
    rows: Option<(usize, usize)>,
    dtype: DType,
    describe: impl Fn() -> String + Sync,
) -> Option<Result<(Tensor, bool)>> {
    if !reads(e) {
        return None;
    }
    Some(match dtype {
        DType::F32 => read_as::<f32>(file, e, rows, describe),
        DType::BF16 => read_as::<bf16>(file, e, rows, describe),
        DType::F16 => read_as::<f16>(file, e, rows, describe),
        _ => return None,
    })
}

/// Whether every value of a float tensor is finite (all cores for CPU f32, bf16 and f16).
pub(super) fn all_finite(t: &Tensor) -> Result<bool> {
    use candle_core::{CpuStorage, Storage};
    fn chunks<T: Elem>(v: &[T]) -> bool {
        v.par_chunks(CHUNK).all(T::all_finite)
    }
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
        match s {
            CpuStorage::F32(v) => return Ok(chunks(&v[a..b])),
            CpuStorage::BF16(v) => return Ok(chunks(&v[a..b])),
            CpuStorage::F16(v) => return Ok(chunks(&v[a..b])),
            _ => {}
        }
    }
    drop(storage);
    Ok(t.to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite())
}
