//! Lazily loaded model weights: safetensors files read tensor by tensor, a key map from the names the
//! models ask for to the names stored in the file (with a small transform for single-file
//! layouts), converted to the compute dtype one tensor at a time as the model is built.

mod merge;
mod read;

pub use merge::{MergeScratch, merge_patches};

use crate::keymap::{Mapped, Transform};
use crate::precision::Precision;
use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// One or more safetensors files read as one. Tensors are read with positioned reads, one at
/// a time as the model asks for them, rather than memory-mapped: a mapped file's pages count
/// in the process's resident memory for as long as the mapping lives, which would add the
/// whole file (7 GB for SDXL in f16) to the peak on top of the converted weights.
pub struct WeightFiles {
    pub paths: Vec<PathBuf>,
    files: Vec<std::fs::File>,
    entries: BTreeMap<String, Entry>,
    metadata: Vec<BTreeMap<String, String>>,
}

struct Entry {
    file: usize,
    tensor: crate::safetensors_file::TensorEntry,
}

impl WeightFiles {
    /// Opens the files, each header validated by [`SafetensorsFile::open`] before any tensor
    /// is read.
    ///
    /// [`SafetensorsFile::open`]: crate::safetensors_file::SafetensorsFile::open
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        let mut metadata = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            let header = crate::safetensors_file::SafetensorsFile::open(p)?;
            let f =
                std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?;
            for (name, tensor) in header.tensors {
                // As with sharded diffusers weights, a later file wins for a repeated name.
                entries.insert(name, Entry { file: i, tensor });
            }
            metadata.push(header.metadata);
            files.push(f);
        }
        Ok(Self {
            paths: paths.to_vec(),
            files,
            entries,
            metadata,
        })
    }

    /// The `__metadata__` strings of file `i`.
    pub fn metadata(&self, i: usize) -> Option<&BTreeMap<String, String>> {
        self.metadata.get(i)
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.tensor.shape.clone()))
            .collect()
    }

    pub fn dtype_of(&self, name: &str) -> Option<safetensors::Dtype> {
        self.entries.get(name).map(|e| e.tensor.dtype)
    }

    /// Load one stored tensor to the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let t = &e.tensor;
        let dtype = crate::safetensors_file::candle_dtype(t.dtype).ok_or_else(|| {
            Error::Msg(format!(
                "tensor {name} has dtype {:?}, which dmd2 does not read",
                t.dtype
            ))
        })?;
        let f = &self.files[e.file];
        let read_err = |err: std::io::Error| {
            Error::Msg(format!(
                "{}: cannot read tensor {name}: {err}",
                self.paths[e.file].display()
            ))
        };
        // Read straight into the tensor's own storage: one allocation, no extra copy.
        match dtype {
            DType::F32 => read_typed::<f32>(f, t, read_err),
            DType::F16 => read_typed::<half::f16>(f, t, read_err),
            DType::BF16 => read_typed::<half::bf16>(f, t, read_err),
            _ => {
                let mut buf = vec![0u8; t.len as usize];
                crate::safetensors_file::read_exact_at(f, &mut buf, t.start).map_err(read_err)?;
                Tensor::from_raw_buffer(&buf, dtype, &t.shape, &Device::Cpu)
            }
        }
    }

    /// A stored tensor (or rows `rows` of it) converted to `dtype` in one pass on all cores
    /// (see [`read`]), with whether all its values are finite.
    pub fn load_as(
        &self,
        name: &str,
        rows: Option<(usize, usize)>,
        dtype: DType,
    ) -> Result<(Tensor, bool)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let describe = || format!("{}: tensor {name}", self.paths[e.file].display());
        if let Some(r) = read::read_as_dtype(&self.files[e.file], &e.tensor, rows, dtype, describe)
        {
            return r;
        }
        let t = self.load(name)?;
        let t = match rows {
            Some((start, len)) => t.narrow(0, start, len)?,
            None => t,
        };
        let t = t.to_dtype(dtype)?;
        let finite = !t.dtype().is_float() || read::all_finite(&t)?;
        Ok((t, finite))
    }

    /// The stored shape of a tensor.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.tensor.shape.as_slice())
    }

    pub fn describe(&self) -> String {
        display_paths(&self.paths)
    }
}

/// Read a tensor's bytes into a `Vec<T>` and wrap it as a tensor without copying.
fn read_typed<T: candle_core::WithDType + crate::memory::Plain>(
    f: &std::fs::File,
    e: &crate::safetensors_file::TensorEntry,
    read_err: impl Fn(std::io::Error) -> Error,
) -> Result<Tensor> {
    let size = std::mem::size_of::<T>();
    // The header reader checked shape × size against the byte length with overflow checks.
    let numel = e.numel() as usize;
    if numel * size != e.len as usize {
        return Err(Error::Msg(format!(
            "tensor of shape {:?} has {} bytes",
            e.shape, e.len
        )));
    }
    let mut v: Vec<T> = crate::memory::zeroed_vec(numel);
    // SAFETY: T is plain data (every bit pattern valid, no padding); the byte view covers
    // exactly the vector's initialised elements.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, numel * size) };
    crate::safetensors_file::read_exact_at(f, bytes, e.start).map_err(read_err)?;
    // safetensors stores little-endian data, as every platform dmd2 runs on.
    Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu)
}

fn display_paths(paths: &[PathBuf]) -> String {
    match paths {
        [one] => one.display().to_string(),
        many => format!("{} (+{} shards)", many[0].display(), many.len() - 1),
    }
}

/// The weights of one model component (UNet, a text encoder, the VAE).
pub struct ComponentWeights {
    pub files: Arc<WeightFiles>,
    /// model name → stored name + transform
    pub map: BTreeMap<String, Mapped>,
    /// Additions merged into tensors as they load (LoRA), keyed by model name.
    pub patches: HashMap<String, Vec<Patch>>,
    /// Tensors found holding NaN or Inf as they loaded, each with the file to blame.
    pub non_finite: std::sync::Mutex<Vec<String>>,
    /// The merge buffers for `patches`, shared by the components one LoRA plan patched.
    pub merge_scratch: Arc<std::sync::Mutex<MergeScratch>>,
}

/// A weight update computed on demand, in f32 on the CPU, so that merging never holds more
/// than one full-size delta at a time.
pub trait Delta: Send + Sync {
    /// ΔW for a target of this shape (already scaled by the adapter's own alpha/rank).
    fn delta(&self, target_shape: &[usize]) -> Result<Tensor>;
}

/// `W += multiplier · ΔW`
#[derive(Clone)]
pub struct Patch {
    pub delta: Arc<dyn Delta>,
    pub multiplier: f32,
    /// The adapter file it comes from (for messages).
    pub file: PathBuf,
}

impl ComponentWeights {
    /// A component whose stored names are the model names, after `rename`.
    pub fn identity(
        files: Arc<WeightFiles>,
        rename: impl Fn(&str) -> Option<(String, Transform)>,
    ) -> Self {
        let map = files
            .shapes()
            .into_keys()
            .filter_map(|k| {
                rename(&k).map(|(name, transform)| {
                    (
                        name,
                        Mapped {
                            source: k,
                            transform,
                        },
                    )
                })
            })
            .collect();
        Self {
            files,
            map,
            patches: HashMap::new(),
            non_finite: Default::default(),
            merge_scratch: Default::default(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Load a tensor by model name, transformed, in its stored dtype, on the CPU.
    pub fn load_raw(&self, name: &str) -> Result<Tensor> {
        let m = self.map.get(name).ok_or_else(|| Error::CannotFindTensor {
            path: name.to_string(),
        })?;
        let t = self.files.load(&m.source)?;
        match &m.transform {
            Transform::Identity => Ok(t),
            Transform::Rows { start, len } => t.narrow(0, *start, *len),
            Transform::Transpose => t.t()?.contiguous(),
            Transform::Squeeze1x1 => {
                let (o, i, _, _) = t.dims4()?;
                t.reshape((o, i))
            }
        }
    }

    /// Load a tensor as the model uses it: patches merged in f32, then cast.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (t, finite) = match self.patches.get(name) {
            // ΔW merged in f32 into a reused buffer, then cast ([`merge_patches`]).
            Some(patches) => {
                let raw = self.load_raw(name)?;
                let mut scratch = self.merge_scratch.lock().unwrap_or_else(|e| e.into_inner());
                let t = merge_patches(&raw, patches, dtype, &mut scratch)?;
                drop(scratch);
                let finite = !t.dtype().is_float() || read::all_finite(&t)?;
                if !finite && read::all_finite(&raw)? {
                    // Finite weights made non-finite by the merge: blame the LoRAs.
                    let files: Vec<String> = patches
                        .iter()
                        .map(|p| p.file.display().to_string())
                        .collect();
                    self.report_non_finite(&files.join(", "), name);
                    return t.to_device(dev);
                }
                (t, finite)
            }
            None => self.load_converted(name, dtype)?,
        };
        if !finite {
            self.report_non_finite(&self.files.describe(), name);
        }
        t.to_device(dev)
    }

    /// A tensor by model name in `dtype`, read and converted in one pass
    /// ([`WeightFiles::load_as`]), transformed, with whether all its values are finite.
    fn load_converted(&self, name: &str, dtype: DType) -> Result<(Tensor, bool)> {
        let m = self.map.get(name).ok_or_else(|| Error::CannotFindTensor {
            path: name.to_string(),
        })?;
        let rows = match m.transform {
            Transform::Rows { start, len } => Some((start, len)),
            _ => None,
        };
        let (t, finite) = self.files.load_as(&m.source, rows, dtype)?;
        let t = match &m.transform {
            Transform::Identity | Transform::Rows { .. } => t,
            Transform::Transpose => t.t()?.contiguous()?,
            Transform::Squeeze1x1 => {
                let (o, i, _, _) = t.dims4()?;
                t.reshape((o, i))?
            }
        };
        Ok((t, finite))
    }

    fn report_non_finite(&self, culprit: &str, name: &str) {
        self.non_finite
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{culprit}: {name}"));
    }

    /// The tensors found holding NaN or Inf while loading so far, as `FILE: tensor`.
    pub fn non_finite(&self) -> Vec<String> {
        self.non_finite
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A VarBuilder that loads each tensor in the dtype `precision` keeps tensors of its rank.
    pub fn var_builder(
        self: &Arc<Self>,
        precision: Precision,
        dev: &Device,
    ) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
            Box::new(Backend(self.clone(), precision));
        VarBuilder::from_backend(backend, precision.matrices, dev.clone())
    }

    /// Whether `precision` keeps tensor `name` (of `rank` as the model sees it) in f16 as
    /// stored instead of its rank's dtype: an f32 run's matrices stored in f16 and not
    /// patched (every rank-2 tensor of the models is a linear layer's weight, or a CLIP
    /// embedding table the model widens itself).
    pub fn kept_in_f16(&self, name: &str, rank: usize, precision: Precision) -> bool {
        self.stored_dtype(name) == Some(safetensors::Dtype::F16)
            && precision.keeps_stored_f16(rank, DType::F16)
            && !self.patches.contains_key(name)
    }

    /// The dtype a tensor is stored in, by model name.
    pub fn stored_dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        self.files.dtype_of(&self.map.get(name)?.source)
    }

    /// Rank of a tensor as the model sees it (after its transform).
    pub fn rank_of(&self, name: &str) -> Option<usize> {
        let m = self.map.get(name)?;
        let rank = self.files.shape_of(&m.source)?.len();
        Some(match m.transform {
            Transform::Squeeze1x1 => 2,
            _ => rank,
        })
    }

    /// Number of parameters (each stored tensor counted once).
    pub fn numel(&self) -> u64 {
        let shapes = self.files.shapes();
        let sources: std::collections::BTreeSet<&str> =
            self.map.values().map(|m| m.source.as_str()).collect();
        sources
            .iter()
            .filter_map(|k| shapes.get(*k))
            .map(|s| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// Bytes the weights take in memory under `precision`: each stored tensor once, at its
    /// rank's width, f16-kept matrices at two bytes (an upper bound otherwise, as
    /// [`Precision::weight_bytes`]).
    pub fn bytes_in(&self, precision: Precision) -> u64 {
        let shapes = self.files.shapes();
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0u64;
        for (name, m) in &self.map {
            if !seen.insert(m.source.as_str()) {
                continue;
            }
            let Some(shape) = shapes.get(&m.source) else {
                continue;
            };
            let numel = shape.iter().product::<usize>() as u64;
            let rank = self.rank_of(name).unwrap_or(shape.len());
            let width = if self.kept_in_f16(name, rank, precision) {
                2
            } else {
                precision.weight_bytes() as u64
            };
            total += numel * width;
        }
        total
    }

    pub fn describe(&self) -> String {
        self.files.describe()
    }
}

struct Backend(Arc<ComponentWeights>, Precision);

impl Backend {
    /// The dtype `name` loads in: its rank's ([`Precision::dtype_for_rank`]), or f16 as
    /// stored ([`ComponentWeights::kept_in_f16`]: an f32 run's linear weights, widened
    /// exactly by the GEMM).
    fn dtype_of(&self, name: &str, rank: usize) -> DType {
        if self.0.kept_in_f16(name, rank, self.1) {
            DType::F16
        } else {
            self.1.dtype_for_rank(rank)
        }
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.load(name, dtype, dev).map_err(|e| match e {
            Error::CannotFindTensor { .. } => Error::Msg(format!("missing tensor {name}")),
            e => e,
        })
    }
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.load(name, self.dtype_of(name, s.rank()), dev)?;
        if t.shape() != &s {
            return Err(Error::Msg(format!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, dev: &Device) -> Result<Tensor> {
        let rank = self.0.rank_of(name).unwrap_or(2);
        self.load(name, self.dtype_of(name, rank), dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit patterns that exercise every conversion: zeros, subnormals, values that overflow
    /// f16, NaN/Inf only where asked.
    fn values(n: usize, seed: u32, special: bool) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = (x >> 8) as f32 / (1 << 24) as f32 - 0.5;
                match i % 97 {
                    0 => 0.0,
                    1 => 1e-7,         // an f16 subnormal
                    2 => 70_000.0 * v, // beyond f16 for |v| > 0.94
                    3 => v * 3.0e38,   // beyond f16, within bf16
                    4 if special => f32::NAN,
                    _ => v * 4.0,
                }
            })
            .collect()
    }

    #[test]
    fn fused_read_equals_load_then_to_dtype() {
        let n = (1 << 20) * 2 + 12_345; // three chunks, the last ragged
        let (rows, cols) = (n / 5, 5);
        let dir = std::env::temp_dir().join(format!("dmd2-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut tensors = Vec::new();
        for (name, dtype, special) in [
            ("f16", DType::F16, false),
            ("bf16", DType::BF16, false),
            ("f32", DType::F32, false),
            ("f32_nan", DType::F32, true),
        ] {
            let v = values(rows * cols, name.len() as u32, special);
            let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            tensors.push((name.to_string(), t));
        }
        candle_core::safetensors::save(&tensors.iter().cloned().collect(), &path).unwrap();
        let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
        for (name, _) in &tensors {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for rows in [None, Some((0, 1)), Some((rows / 3, rows / 3 + 7))] {
                    let (got, finite) = files.load_as(name, rows, dtype).unwrap();
                    let want = files.load(name).unwrap();
                    let want = match rows {
                        Some((a, l)) => want.narrow(0, a, l).unwrap(),
                        None => want,
                    };
                    let want = want.to_dtype(dtype).unwrap();
                    assert_eq!(got.dims(), want.dims(), "{name} {dtype:?} {rows:?}");
                    let bits = |t: &Tensor| -> Vec<u32> {
                        match dtype {
                            DType::F32 => t
                                .flatten_all()
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap()
                                .iter()
                                .map(|x| x.to_bits())
                                .collect(),
                            _ => t
                                .to_dtype(DType::F32)
                                .unwrap()
                                .flatten_all()
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap()
                                .iter()
                                .map(|x| x.to_bits())
                                .collect(),
                        }
                    };
                    assert!(bits(&got) == bits(&want), "{name} {dtype:?} {rows:?}");
                    let want_finite = want
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .all(|x| x.is_finite());
                    assert_eq!(finite, want_finite, "{name} {dtype:?} {rows:?}");
                }
            }
        }
        // Some cases must be non-finite, or the check proves nothing.
        assert!(!files.load_as("f32_nan", None, DType::F32).unwrap().1);
        assert!(!files.load_as("f32", None, DType::F16).unwrap().1);
        assert!(files.load_as("bf16", None, DType::F32).unwrap().1);
        assert!(files.load_as("f32", Some((rows, 1)), DType::F32).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
