//! `--unet FILE`: replace a model's UNet weights with a diffusers-layout UNet state dict, as
//! DMD2 publishes its distilled UNets (`dmd2_sdxl_{1,4}step_unet_fp16.bin`, and safetensors).
//!
//! The model keeps its own UNet config; every tensor its UNet needs must be in the file with
//! the same shape. Formats:
//! - safetensors with diffusers names (`conv_in.weight`, `down_blocks.0.resnets.0…`);
//! - a PyTorch zip checkpoint (`torch.save(unet.state_dict(), f)`, torch ≥ 1.6), read with
//!   candle's pickle reader (`candle_core::pickle`). That reader is a small interpreter of
//!   the pickle opcodes that builds inert values: `GLOBAL`, `REDUCE`, `NEWOBJ` and `BUILD`
//!   only record class names and arguments (no module is imported, nothing is called;
//!   `collections.OrderedDict` becomes an empty dict), unknown opcodes are errors, and
//!   tensors are recognised by the `torch._utils._rebuild_tensor_v2` pattern and read as raw
//!   bytes from the archive's storage entries. Loading an untrusted `.bin` therefore runs no
//!   code.
//!
//! The weight store reads safetensors files, so a `.bin` is first rewritten, one tensor at a
//! time, by the safetensors writer ([`super::writer::write_streaming`]) into a private
//! temporary directory (created exclusively, mode 0700, under the system temp dir `TMPDIR`),
//! opened, and removed: the open file stays readable on Unix, and nothing is left behind.

use super::ModelParts;
use crate::keymap::{Mapped, Transform};
use crate::weights::{ComponentWeights, WeightFiles};
use anyhow::{Context, Result, bail};
use candle_core::pickle::PthTensors;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a weight file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetFormat {
    Safetensors,
    /// A zip archive: PyTorch's `torch.save` format since 1.6.
    TorchZip,
    /// The pre-1.6 pickle stream (starts with a pickle protocol byte), not supported.
    TorchLegacy,
}

pub fn detect_format(path: &Path) -> Result<UnetFormat> {
    crate::files::require_regular_file(path)?;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut head = [0u8; 9];
    let n = f
        .read(&mut head)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        return Ok(UnetFormat::TorchZip);
    }
    if n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(UnetFormat::TorchLegacy);
    }
    if n == 9 && head[8] == b'{' {
        return Ok(UnetFormat::Safetensors);
    }
    bail!(
        "{}: neither a safetensors file nor a PyTorch checkpoint",
        path.display()
    )
}

/// Replace `parts`' UNet weights by those in `path` (diffusers names), keeping the model's
/// UNet config and any LoRA patches already attached to the UNet.
pub fn replace_unet(parts: &mut ModelParts, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let files = match detect_format(path)? {
        UnetFormat::Safetensors => WeightFiles::open(&[path.to_path_buf()])?,
        UnetFormat::TorchZip => open_torch_zip(path)?,
        UnetFormat::TorchLegacy => bail!(
            "{}: a PyTorch checkpoint in the legacy (pre-1.6, non-zip) format; re-save it with \
             torch.save in a current PyTorch, or convert it to safetensors",
            path.display()
        ),
    };
    let files = Arc::new(files);
    let new = ComponentWeights::identity(files.clone(), unet_name);
    check_compatible(&parts.unet, &new, path)?;
    let patches = parts.unet.patches.clone();
    parts.unet = Arc::new(ComponentWeights { patches, ..new });
    Ok(())
}

/// diffusers names, optionally under a `unet.` prefix (a pipeline state dict).
fn unet_name(k: &str) -> Option<(String, Transform)> {
    Some((
        k.strip_prefix("unet.").unwrap_or(k).to_string(),
        Transform::Identity,
    ))
}

/// Shapes of a component's tensors as the model sees them (after the key map's transform).
pub fn model_shapes(c: &ComponentWeights) -> Result<BTreeMap<String, Vec<usize>>> {
    let stored = c.files.shapes();
    c.map
        .iter()
        .map(|(name, Mapped { source, transform })| {
            let s = stored
                .get(source)
                .with_context(|| format!("{}: no tensor {source}", c.describe()))?;
            let shape = match transform {
                Transform::Identity => s.clone(),
                Transform::Rows { len, .. } => {
                    let mut s = s.clone();
                    if let Some(d) = s.first_mut() {
                        *d = *len;
                    }
                    s
                }
                Transform::Transpose => s.iter().rev().copied().collect(),
                Transform::Squeeze1x1 => s.iter().take(2).copied().collect(),
            };
            Ok((name.clone(), shape))
        })
        .collect()
}

/// Every tensor of the model's UNet must exist in the replacement with the same shape.
fn check_compatible(old: &ComponentWeights, new: &ComponentWeights, path: &Path) -> Result<()> {
    let want = model_shapes(old)?;
    let have = model_shapes(new)?;
    if have.keys().any(|k| k.starts_with("model.diffusion_model.")) {
        bail!(
            "{}: this is an original-layout (LDM) UNet (model.diffusion_model.*); --unet expects \
             a diffusers-layout UNet state dict",
            path.display()
        );
    }
    let mut problems = Vec::new();
    for (name, shape) in &want {
        match have.get(name) {
            None => problems.push(format!(
                "{name} is missing (the model's UNet has it with shape {shape:?})"
            )),
            Some(s) if s != shape => problems.push(format!(
                "{name} has shape {s:?}, the model's UNet has {shape:?}"
            )),
            Some(_) => {}
        }
    }
    if let Some(first) = problems.first() {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" (and {} more mismatches)", n - 1),
        };
        bail!(
            "{}: does not fit this model's UNet: {first}{more}",
            path.display()
        );
    }
    Ok(())
}

/// A private temporary directory (mode 0700, an unpredictable name, created exclusively),
/// removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        use std::hash::{BuildHasher, Hasher};
        use std::os::unix::fs::DirBuilderExt;
        for _ in 0..8 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let dir = std::env::temp_dir().join(format!("dmd2-unet-{:016x}", h.finish()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", dir.display()));
                }
            }
        }
        bail!(
            "cannot create a temporary directory under {}",
            std::env::temp_dir().display()
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Read a PyTorch zip checkpoint's tensors and map them as safetensors.
fn open_torch_zip(path: &Path) -> Result<WeightFiles> {
    let read = |key: Option<&str>| {
        PthTensors::new(path, key).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read the PyTorch checkpoint: {e}",
                path.display()
            )
        })
    };
    let mut pth = read(None)?;
    if pth.tensor_infos().is_empty() {
        // {"state_dict": {...}} as some training scripts save it
        if let Ok(p) = read(Some("state_dict")) {
            pth = p;
        }
    }
    if pth.tensor_infos().is_empty() {
        bail!(
            "{}: no tensors found in the PyTorch checkpoint",
            path.display()
        );
    }
    let tmp = TempDir::new()?;
    let converted = tmp.0.join("unet.safetensors");
    write_safetensors(&pth, &converted)
        .with_context(|| format!("{}: cannot convert to safetensors", path.display()))?;
    let files = WeightFiles::open(std::slice::from_ref(&converted))?;
    // The open file outlives its name on Unix.
    drop(tmp);
    Ok(files)
}

/// Write every tensor of `pth` into a safetensors file, loading one tensor at a time.
fn write_safetensors(pth: &PthTensors, out: &Path) -> Result<()> {
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let entries: Vec<super::writer::TensorEntry> = names
        .iter()
        .map(|name| {
            let info = &pth.tensor_infos()[*name];
            super::writer::TensorEntry {
                name: (*name).clone(),
                dtype: info.dtype,
                shape: info.layout.dims().to_vec(),
            }
        })
        .collect();
    super::writer::write_streaming(out, &[], &entries, &Default::default(), |_, e| {
        Ok(pth
            .get(&e.name)
            .map_err(|err| anyhow::anyhow!("tensor {}: {err}", e.name))?
            .with_context(|| format!("tensor {} vanished", e.name))?
            .contiguous()?)
    })
}
