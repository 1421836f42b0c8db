//! Lazily loaded model weights: memory-mapped safetensors files, a key map from the names the
//! models ask for to the names stored in the file (with a small transform for single-file
//! layouts), converted to the compute dtype one tensor at a time as the model is built.

use crate::checkpoint::single_file::{Mapped, Transform};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// One or more memory-mapped safetensors files read as one.
pub struct WeightFiles {
    pub paths: Vec<PathBuf>,
    st: MmapedSafetensors,
}

impl WeightFiles {
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        for p in paths {
            crate::checkpoint::check_safetensors_header(p)?;
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them
        // not being truncated while we run.
        let st = unsafe {
            if paths.len() == 1 {
                MmapedSafetensors::new(&paths[0])
            } else {
                MmapedSafetensors::multi(paths)
            }
        }
        .map_err(|e| anyhow::anyhow!("{}: {e}", display_paths(paths)))?;
        Ok(Self {
            paths: paths.to_vec(),
            st,
        })
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect()
    }

    pub fn dtype_of(&self, name: &str) -> Option<safetensors::Dtype> {
        self.st.get(name).ok().map(|v| v.dtype())
    }

    /// Load one stored tensor to the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        self.st.load(name, &Device::Cpu)
    }

    pub fn describe(&self) -> String {
        display_paths(&self.paths)
    }
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
        let raw = self.load_raw(name)?;
        let t = match self.patches.get(name) {
            // ΔW merged in f32 into a reused buffer, then cast (crate::lora::merge_patches).
            Some(patches) => crate::lora::merge_patches(&raw, patches, dtype)?,
            None => raw.to_dtype(dtype)?,
        };
        if t.dtype().is_float()
            && !t
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?
                .is_finite()
        {
            note_non_finite(name);
        }
        t.to_device(dev)
    }

    pub fn var_builder(self: &Arc<Self>, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
            Box::new(Backend(self.clone()));
        VarBuilder::from_backend(backend, dtype, dev.clone())
    }

    pub fn describe(&self) -> String {
        self.files.describe()
    }
}

/// Names of tensors found holding NaN or Inf while loading (checked once per tensor, as it is
/// converted). The caller decides: warn, or refuse with `--strict`.
static NON_FINITE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_non_finite(name: &str) {
    NON_FINITE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(name.to_string());
}

/// Take the list of tensors that held NaN/Inf since the last call.
pub fn take_non_finite() -> Vec<String> {
    std::mem::take(&mut *NON_FINITE.lock().unwrap_or_else(|e| e.into_inner()))
}

struct Backend(Arc<ComponentWeights>);

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(Error::Msg(format!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.load(name, dtype, dev).map_err(|e| match e {
            Error::CannotFindTensor { .. } => Error::Msg(format!("missing tensor {name}")),
            e => e,
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
