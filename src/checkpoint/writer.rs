//! Writing an original-layout (LDM/sgm) SDXL single file from any loaded model, with its
//! LoRA patches baked in.
//!
//! The key layout is exactly that of the original files ([`crate::keymap::canonical_maps`]:
//! `model.diffusion_model.…`, `conditioner.embedders.0.transformer.text_model.…`,
//! `conditioner.embedders.1.model.…` with OpenCLIP's fused `in_proj_weight` and transposed
//! `text_projection`, `first_stage_model.…` with `nin_shortcut` and 1x1-conv attention), so
//! dmd2 and other tools that read SDXL single files take it.
//!
//! Memory stays at about one tensor: the header is written first with every offset computed
//! from shapes and dtypes, then each tensor is loaded (patches merged in f32), assembled,
//! converted and written, and dropped. The file appears only when complete (temporary file
//! in the same folder, then rename).

use super::ModelParts;
use crate::keymap::{Assemble, Component, canonical_maps, original_tensors};
use crate::weights::ComponentWeights;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

/// One tensor of a file to write.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

pub use crate::safetensors_file::dtype_name;

/// Write a safetensors file tensor by tensor: `entries` in order, the data of entry `i` from
/// `data(i, entry)` (a tensor of exactly that dtype and shape, on the CPU). The header goes
/// first, so nothing but the tensor being written is held. The output is checked
/// ([`crate::output::check_target`]: no directory, device or input of `inputs` replaced) and
/// written through [`crate::output::OutputFile`]: complete or not at all.
pub fn write_streaming(
    out: &Path,
    inputs: &[crate::output::FileId],
    entries: &[TensorEntry],
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(usize, &TensorEntry) -> Result<Tensor>,
) -> Result<()> {
    if let Some(dir) = out.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        bail!("{}: no such directory", dir.display());
    }
    let target = crate::output::check_target(out, inputs)?;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).context("metadata")?,
        );
    }
    let mut offset = 0usize;
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        if !seen.insert(e.name.as_str()) {
            bail!("tensor {} twice in one file", e.name);
        }
        let bytes = e
            .shape
            .iter()
            .try_fold(e.dtype.size_in_bytes(), |a, &b| a.checked_mul(b))
            .ok_or_else(|| anyhow!("tensor {} is too large", e.name))?;
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| anyhow!("file too large"))?;
        header.insert(
            e.name.clone(),
            serde_json::json!({
                "dtype": dtype_name(e.dtype)?,
                "shape": e.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }

    let file = crate::output::OutputFile::create(&target)?;
    let name = out.display().to_string();
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow!("{name}: {e}");
    w.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&json).map_err(io)?;
    for (i, e) in entries.iter().enumerate() {
        let t = data(i, e).with_context(|| format!("tensor {}", e.name))?;
        if t.dtype() != e.dtype || t.dims() != e.shape.as_slice() {
            bail!(
                "tensor {}: got {:?} {:?}, the header says {:?} {:?}",
                e.name,
                t.dtype(),
                t.dims(),
                e.dtype,
                e.shape
            );
        }
        t.write_bytes(&mut w)
            .with_context(|| format!("{name}: writing {}", e.name))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| anyhow!("{name}: {}", e.error()))?;
    file.commit()
}

fn component(parts: &ModelParts, c: Component) -> &Arc<ComponentWeights> {
    match c {
        Component::Unet => &parts.unet,
        Component::TextEncoder => &parts.text_encoder,
        Component::TextEncoder2 => &parts.text_encoder_2,
        Component::Vae => &parts.vae,
    }
}

/// The shape of an original tensor assembled from parts of these shapes.
pub fn assembled_shape(assemble: Assemble, parts: &[Vec<usize>]) -> Option<Vec<usize>> {
    let first = parts.first()?;
    match assemble {
        Assemble::Identity => Some(first.clone()),
        Assemble::ConcatRows => {
            let rest = &first[1..];
            let mut rows = 0usize;
            for p in parts {
                if p.get(1..)? != rest {
                    return None;
                }
                rows = rows.checked_add(*p.first()?)?;
            }
            let mut s = vec![rows];
            s.extend_from_slice(rest);
            Some(s)
        }
        Assemble::Transpose => match first.as_slice() {
            [a, b] => Some(vec![*b, *a]),
            _ => None,
        },
        Assemble::Unsqueeze1x1 => match first.as_slice() {
            [o, i] => Some(vec![*o, *i, 1, 1]),
            _ => None,
        },
    }
}

fn assemble(how: Assemble, parts: Vec<Tensor>) -> candle_core::Result<Tensor> {
    match how {
        Assemble::ConcatRows => Tensor::cat(&parts, 0),
        _ => {
            let t = parts
                .into_iter()
                .next()
                .ok_or_else(|| candle_core::Error::Msg("no parts".into()))?;
            match how {
                Assemble::Transpose => t.t()?.contiguous(),
                Assemble::Unsqueeze1x1 => {
                    let (o, i) = t.dims2()?;
                    t.reshape((o, i, 1, 1))
                }
                _ => Ok(t),
            }
        }
    }
}

/// Write `parts` (any layout, LoRA patches included) as an original-layout SDXL single file.
/// `dtype`: the dtype of every tensor, or `None` to keep each tensor's stored dtype.
pub fn write_single_file(parts: &ModelParts, out: &Path, dtype: Option<DType>) -> Result<()> {
    if let Some(d) = dtype
        && !d.is_float()
    {
        bail!("--dtype must be a floating-point type, not {d:?}");
    }
    let vae = parts.vae_config.kl().with_context(|| {
        format!(
            "{}: a single SDXL file holds an AutoencoderKL; this model's VAE is an {}",
            parts.name,
            parts.vae_config.class_name()
        )
    })?;
    let maps = canonical_maps(
        &parts.unet_config,
        &parts.text_encoder_config,
        &parts.text_encoder_2_config,
        vae,
    )
    .map_err(|e| anyhow!("{}: {e}", parts.name))?;
    let originals = original_tensors(&maps);
    let mut shapes: HashMap<Component, BTreeMap<String, Vec<usize>>> = HashMap::new();
    let mut entries = Vec::with_capacity(originals.len());
    for t in &originals {
        let w = component(parts, t.component);
        let shapes = shapes
            .entry(t.component)
            .or_insert_with(|| w.files.shapes());
        let mut part_shapes = Vec::with_capacity(t.parts.len());
        let mut stored = None;
        for p in &t.parts {
            let m = w.map.get(p).ok_or_else(|| {
                anyhow!(
                    "{}: the {} has no tensor {p} (needed for {})",
                    parts.name,
                    t.component,
                    t.key
                )
            })?;
            let shape = shapes
                .get(&m.source)
                .and_then(|s| m.transform.apply_to_shape(s))
                .ok_or_else(|| {
                    anyhow!("{}: tensor {} has no usable shape", parts.name, m.source)
                })?;
            part_shapes.push(shape);
            if stored.is_none() {
                stored = w
                    .files
                    .dtype_of(&m.source)
                    .and_then(|d| DType::try_from(d).ok());
            }
        }
        let shape = assembled_shape(t.assemble, &part_shapes).ok_or_else(|| {
            anyhow!(
                "{}: the parts of {} do not assemble ({part_shapes:?})",
                parts.name,
                t.key
            )
        })?;
        let dtype = match (dtype, stored) {
            (Some(d), _) => d,
            (None, Some(d)) if d.is_float() => d,
            (None, _) => bail!("{}: {} is not stored as floating point", parts.name, t.key),
        };
        entries.push(TensorEntry {
            name: t.key.clone(),
            dtype,
            shape,
        });
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    // No output may replace a file the model or its LoRAs are read from.
    let inputs: Vec<crate::output::FileId> = [
        &parts.unet,
        &parts.text_encoder,
        &parts.text_encoder_2,
        &parts.vae,
    ]
    .iter()
    .flat_map(|c| {
        c.files
            .paths
            .iter()
            .chain(c.patches.values().flatten().map(|p| &p.file))
            .filter_map(|p| crate::output::FileId::of(p))
            .collect::<Vec<_>>()
    })
    .collect();
    write_streaming(out, &inputs, &entries, &metadata, |i, e| {
        let t = &originals[i];
        let w = component(parts, t.component);
        let loaded = t
            .parts
            .iter()
            .map(|p| w.load(p, e.dtype, &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(assemble(t.assemble, loaded)?)
    })
    .with_context(|| format!("writing {}", out.display()))
}

/// Keys of an original-layout file for a model of these configurations (for tests and
/// tools that compare key sets).
pub fn single_file_keys(parts: &ModelParts) -> Result<Vec<String>> {
    let vae = parts
        .vae_config
        .kl()
        .with_context(|| format!("{}: the VAE is not an AutoencoderKL", parts.name))?;
    let maps = canonical_maps(
        &parts.unet_config,
        &parts.text_encoder_config,
        &parts.text_encoder_2_config,
        vae,
    )
    .map_err(|e| anyhow!("{e}"))?;
    Ok(original_tensors(&maps).into_iter().map(|t| t.key).collect())
}
