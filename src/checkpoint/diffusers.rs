//! diffusers folders: `model_index.json` plus one sub-folder per component, each with its
//! `config.json` and safetensors weights.

use super::{Layout, ModelParts};
use crate::config::{ClipConfig, SchedulerConfig, UNetConfig, VaeArch};
use crate::keymap::{Component, Transform};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{ComponentWeights, WeightFiles};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A diffusers pipeline folder: `model_index.json`, or at least a `unet/` folder.
pub fn is_model_folder(dir: &Path) -> bool {
    dir.join("model_index.json").exists() || dir.join(Component::Unet.folder()).is_dir()
}

pub fn open(dir: &Path) -> Result<ModelParts> {
    if !is_model_folder(dir) {
        bail!(
            "{}: not a diffusers model folder (no model_index.json)",
            dir.display()
        );
    }
    let sub = |c: Component| -> Result<PathBuf> {
        let p = dir.join(c.folder());
        if !p.is_dir() {
            bail!(
                "{}: missing component folder {}/",
                dir.display(),
                c.folder()
            );
        }
        Ok(p)
    };
    let (unet_dir, te_dir, te2_dir, vae_dir) = (
        sub(Component::Unet)?,
        sub(Component::TextEncoder)?,
        sub(Component::TextEncoder2)?,
        sub(Component::Vae)?,
    );
    let unet_config = UNetConfig::from_diffusers_json(&unet_dir.join("config.json"))?;
    let text_encoder_config =
        ClipConfig::from_transformers_json(&te_dir.join("config.json"), false)?;
    let text_encoder_2_config =
        ClipConfig::from_transformers_json(&te2_dir.join("config.json"), true)?;
    let vae_config = VaeArch::from_diffusers_json(&vae_dir.join("config.json"))?;
    let scheduler_json = dir.join("scheduler/scheduler_config.json");
    let scheduler = if scheduler_json.exists() {
        SchedulerConfig::from_diffusers_json(&scheduler_json)?
    } else {
        SchedulerConfig::default()
    };

    let unet = component(&unet_dir, Component::Unet.weights_stem(), |k| {
        Some((k.to_string(), Transform::Identity))
    })?;
    let text_encoder = component(
        &te_dir,
        Component::TextEncoder.weights_stem(),
        text_encoder_name,
    )?;
    let text_encoder_2 = component(
        &te2_dir,
        Component::TextEncoder2.weights_stem(),
        text_encoder_name,
    )?;
    let vae = component(&vae_dir, Component::Vae.weights_stem(), vae_name)?;

    let tokenizer = match dir.join("tokenizer") {
        p if p.is_dir() => ClipTokenizer::from_folder(&p)?,
        _ => ClipTokenizer::builtin("<|endoftext|>")?,
    };
    let tokenizer_2 = match dir.join("tokenizer_2") {
        p if p.is_dir() => ClipTokenizer::from_folder(&p)?,
        _ => ClipTokenizer::builtin("!")?,
    };
    Ok(ModelParts {
        name: dir.display().to_string(),
        layout: Layout::Diffusers,
        unet_config,
        text_encoder_config,
        text_encoder_2_config,
        vae_config,
        unet: Arc::new(unet),
        text_encoder: Arc::new(text_encoder),
        text_encoder_2: Arc::new(text_encoder_2),
        vae: Arc::new(vae),
        tokenizer,
        tokenizer_2,
        force_zeros_for_empty_prompt: force_zeros(dir),
        scheduler,
        embeddings: Default::default(),
    })
}

/// diffusers' default image size for a folder model: `unet.sample_size × 2^(VAE levels − 1)`.
pub fn default_image_size(dir: &Path) -> Option<usize> {
    let read = |p: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_str(&crate::files::read_text(&p, crate::files::limits::CONFIG).ok()?).ok()
    };
    let unet = read(dir.join("unet/config.json"))?;
    let vae = read(dir.join("vae/config.json"))?;
    let sample = unet.get("sample_size")?.as_u64()? as usize;
    let levels = vae.get("block_out_channels")?.as_array()?.len();
    let size = sample.checked_mul(1usize.checked_shl(levels.checked_sub(1)? as u32)?)?;
    (size > 0).then_some(size)
}

fn force_zeros(dir: &Path) -> bool {
    crate::files::read_text(&dir.join("model_index.json"), crate::files::limits::CONFIG)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("force_zeros_for_empty_prompt")
                .and_then(|b| b.as_bool())
        })
        .unwrap_or(true)
}

/// The weight files of one component: `<stem>.safetensors`, its `.fp16` variant, or shards
/// listed by `<stem>.safetensors.index.json`.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(vec![p]);
        }
    }
    for name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let p = dir.join(&name);
        if p.exists() {
            let text = crate::files::read_text(&p, crate::files::limits::CONFIG)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", p.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no weight_map", p.display()))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    if dir.join(format!("{stem}.bin")).exists() || dir.join("pytorch_model.bin").exists() {
        bail!(
            "{}: only PyTorch .bin weights found; dmd2 reads safetensors for whole models",
            dir.display()
        );
    }
    bail!("{}: no {stem}.safetensors", dir.display())
}

fn component(
    dir: &Path,
    stem: &str,
    rename: impl Fn(&str) -> Option<(String, Transform)>,
) -> Result<ComponentWeights> {
    let files = Arc::new(WeightFiles::open(&weight_files(dir, stem)?)?);
    Ok(ComponentWeights::identity(files, rename))
}

/// transformers ≥ 5.6 saves CLIP text models without the `text_model.` prefix; hub files have
/// it. Both map to the prefix-less names.
pub fn text_encoder_name(k: &str) -> Option<(String, Transform)> {
    if k.ends_with("position_ids") {
        return None;
    }
    Some((
        k.strip_prefix("text_model.").unwrap_or(k).to_string(),
        Transform::Identity,
    ))
}

/// Older diffusers VAEs name the mid-block attention `query/key/value/proj_attn`.
pub fn vae_name(k: &str) -> Option<(String, Transform)> {
    const OLD: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    for (old, new) in OLD {
        if k.contains("attentions") && k.contains(old) {
            return Some((k.replace(old, new), Transform::Identity));
        }
    }
    Some((k.to_string(), Transform::Identity))
}
