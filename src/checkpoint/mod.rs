//! Checkpoint formats: where the weights of a model come from and how their names map to
//! the model's (diffusers) names.
//!
//! - a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, …), see [`diffusers`];
//! - an original-layout (LDM/sgm) single-file `.safetensors`, see [`single_file`].

pub mod diffusers;
pub mod single_file;
pub mod unet_file;
pub mod writer;

use crate::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::tokenizer::ClipTokenizer;
use crate::weights::ComponentWeights;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Everything needed to build the SDXL pipeline, before any tensor is read.
pub struct ModelParts {
    /// What the model was loaded from, for messages and metadata.
    pub name: String,
    pub layout: Layout,
    pub unet_config: UNetConfig,
    pub text_encoder_config: ClipConfig,
    pub text_encoder_2_config: ClipConfig,
    pub vae_config: VaeConfig,
    pub unet: Arc<ComponentWeights>,
    pub text_encoder: Arc<ComponentWeights>,
    pub text_encoder_2: Arc<ComponentWeights>,
    pub vae: Arc<ComponentWeights>,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    /// SDXL pipelines use zero negative embeddings when CFG is on and no negative prompt
    /// was given (`model_index.json`'s `force_zeros_for_empty_prompt`, true for SDXL).
    pub force_zeros_for_empty_prompt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    SingleFile,
}

/// Open a model from a diffusers folder or a single-file checkpoint.
pub fn open(path: &Path) -> Result<ModelParts> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if path.is_dir() {
        diffusers::open(path)
    } else {
        open_single_file(path)
    }
}

/// An original-layout single file: architecture inferred from the tensor shapes, tokenizers
/// from the compiled-in CLIP vocabulary.
fn open_single_file(path: &Path) -> Result<ModelParts> {
    let files = Arc::new(crate::weights::WeightFiles::open(&[path.to_path_buf()])?);
    let layout = single_file::detect(&files.shapes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut maps = layout.maps;
    let mut take = |c: single_file::Component| {
        Arc::new(ComponentWeights {
            files: files.clone(),
            map: maps.remove(&c).unwrap_or_default(),
            patches: Default::default(),
        })
    };
    Ok(ModelParts {
        name: path.display().to_string(),
        layout: Layout::SingleFile,
        unet: take(single_file::Component::Unet),
        text_encoder: take(single_file::Component::TextEncoder),
        text_encoder_2: take(single_file::Component::TextEncoder2),
        vae: take(single_file::Component::Vae),
        unet_config: layout.unet,
        text_encoder_config: layout.text_encoder,
        text_encoder_2_config: layout.text_encoder_2,
        vae_config: layout.vae,
        tokenizer: ClipTokenizer::builtin("<|endoftext|>")?,
        tokenizer_2: ClipTokenizer::builtin("!")?,
        force_zeros_for_empty_prompt: true,
    })
}

/// Check a safetensors header before mapping the file, so that a wrong or damaged file gives
/// a one-line reason rather than a decoder error.
pub fn check_safetensors_header(path: &Path) -> Result<()> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    let mut len = [0u8; 8];
    if size < 8 || f.read_exact(&mut len).is_err() {
        bail!(
            "{}: not a safetensors file (only {size} bytes)",
            path.display()
        );
    }
    let n = u64::from_le_bytes(len);
    if n > size - 8 || n > 100 << 20 {
        bail!(
            "{}: not a safetensors file, or truncated (header claims {n} bytes, the file has {size})",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: cannot read the header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|_| {
        anyhow::anyhow!(
            "{}: not a safetensors file (the header is not JSON)",
            path.display()
        )
    })?;
    let obj = v
        .as_object()
        .with_context(|| format!("{}: not a safetensors file (bad header)", path.display()))?;
    if let Ok(Keys(keys)) = serde_json::from_slice::<Keys>(&header) {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = keys.iter().find(|k| !seen.insert(k.as_str())) {
            bail!(
                "{}: corrupt header: tensor {dup} appears twice",
                path.display()
            );
        }
    }
    let data_len = size - 8 - n;
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .with_context(|| format!("{}: tensor {name} has no data offsets", path.display()))?;
        let begin = info
            .get("data_offsets")
            .and_then(|o| o.get(0))
            .and_then(|e| e.as_u64())
            .with_context(|| format!("{}: tensor {name} has no data offsets", path.display()))?;
        spans.push((begin, end, name.as_str()));
        if end > data_len {
            bail!(
                "{}: truncated or corrupt: tensor {name} ends at byte {end} of the data, which has {data_len}",
                path.display()
            );
        }
        match info.get("dtype").and_then(|d| d.as_str()) {
            Some(
                "F32" | "F16" | "BF16" | "F64" | "I64" | "I32" | "U8" | "I8" | "BOOL" | "U32"
                | "I16" | "U16",
            ) => {}
            Some(other) => bail!(
                "{}: tensor {name} has dtype {other}, which dmd2 does not read",
                path.display()
            ),
            None => bail!("{}: tensor {name} has no dtype", path.display()),
        }
    }
    // The tensors must tile the data exactly, as the safetensors format requires.
    spans.sort();
    let mut at = 0;
    for (begin, end, name) in &spans {
        if *begin != at || end < begin {
            bail!(
                "{}: corrupt: the data of tensor {name} overlaps another or leaves a gap",
                path.display()
            );
        }
        at = *end;
    }
    if at != data_len {
        bail!(
            "{}: corrupt: {} bytes after the last tensor",
            path.display(),
            data_len - at
        );
    }
    Ok(())
}

/// The top-level keys of a JSON object in order, duplicates kept (serde_json's `Map` would
/// silently keep the last one).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}
