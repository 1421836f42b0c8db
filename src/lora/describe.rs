//! `dmd2 inspect`: what a file is — a LoRA (format, ranks, alphas, modules, parts) or an SDXL
//! checkpoint (layout, architecture inferred from the shapes, dtypes, parameters).

use super::file::{Adapter, Factor, LoraFile, Spelling};
use super::names::{Lookup, NameTable};
use super::{component_label, format_name};
use crate::checkpoint::single_file;
use crate::checkpoint::{self, ModelParts};
use crate::config::{ClipConfig, UNetConfig, VaeArch, sdxl_base};
use crate::keymap::Component;
use crate::weights::{ComponentWeights, WeightFiles};
use anyhow::{Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

/// A few lines describing the file or folder at `path`.
pub fn describe_file(path: &Path) -> Result<String> {
    if path.is_dir() {
        let parts = checkpoint::open(path)?;
        return Ok(describe_checkpoint(&parts, "diffusers folder"));
    }
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let shapes = WeightFiles::open(&[path.to_path_buf()])?.shapes();
    let lora_error = match LoraFile::open(path) {
        Ok(lora) if !lora.modules.is_empty() => return Ok(describe_lora(&lora)),
        Ok(_) => None,
        Err(e) => Some(e),
    };
    match single_file::detect(&shapes) {
        Ok(_) => {
            let parts = checkpoint::open(path)?;
            Ok(describe_checkpoint(
                &parts,
                "original (LDM/sgm) single file",
            ))
        }
        Err(e) => match lora_error {
            // An adapter file dmd2 does not merge (DoRA, OFT, …): say so.
            Some(le) => Err(le),
            None => bail!(
                "{}: neither a LoRA nor an SDXL checkpoint dmd2 reads: {e}",
                path.display()
            ),
        },
    }
}

fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// "4" or "4, 8 (most: 4)" or "2–64 (most: 16)" for a multiset of values.
fn summary<T: Ord + Copy + std::fmt::Display>(values: &[T]) -> String {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(*v).or_default() += 1;
    }
    let Some((most, _)) = counts.iter().max_by_key(|(_, n)| **n) else {
        return "none".into();
    };
    match counts.len() {
        1 => most.to_string(),
        2..=4 => {
            let all: Vec<String> = counts.keys().map(|v| v.to_string()).collect();
            format!("{} (most: {most})", all.join(", "))
        }
        _ => {
            let (lo, hi) = (counts.keys().next(), counts.keys().next_back());
            match (lo, hi) {
                (Some(lo), Some(hi)) => format!("{lo}–{hi} (most: {most})"),
                _ => most.to_string(),
            }
        }
    }
}

/// Which model part a module name belongs to, from its prefix alone.
fn part_of(name: &str) -> Option<Component> {
    if name.starts_with("lora_unet_") || name.starts_with("unet.") {
        Some(Component::Unet)
    } else if name.starts_with("lora_te1_")
        || name.starts_with("lora_te_")
        || name.starts_with("text_encoder.")
    {
        Some(Component::TextEncoder)
    } else if name.starts_with("lora_te2_") || name.starts_with("text_encoder_2.") {
        Some(Component::TextEncoder2)
    } else {
        None
    }
}

fn describe_lora(f: &LoraFile) -> String {
    let mut spellings = BTreeSet::new();
    let mut algorithms = BTreeSet::new();
    let mut namings = BTreeSet::new();
    let mut ranks = Vec::new();
    let mut alphas = Vec::new();
    let mut parts: BTreeMap<Option<Component>, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let base = NameTable::sdxl_base();
    let mut sdxl_named = 0;
    for m in &f.modules {
        spellings.insert(m.spelling);
        algorithms.insert(m.adapter.algorithm());
        *parts.entry(part_of(&m.name)).or_default() += 1;
        if let Some(t) = &base
            && let Lookup::Found(_, n) = t.lookup(&m.name)
        {
            sdxl_named += 1;
            namings.insert(n);
        }
        let rank = match &m.adapter {
            Adapter::Lora { down, .. } => f.shape(down).first().copied(),
            Adapter::Loha { w1b, .. } => f.shape(w1b).first().copied(),
            Adapter::Lokr {
                w2: Factor::Product(_, b),
                ..
            }
            | Adapter::Lokr {
                w1: Factor::Product(_, b),
                ..
            } => f.shape(b).first().copied(),
            _ => None,
        };
        if let Some(r) = rank {
            ranks.push(r);
        }
        if let Some(a) = m.alpha {
            alphas.push(a);
        }
        for k in m.adapter.keys() {
            if let Some(d) = f.files.dtype_of(k) {
                *dtypes.entry(format!("{d:?}")).or_default() += 1;
            }
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {}",
        f.path.display(),
        format_name(&spellings, &algorithms, &namings)
    );
    let _ = writeln!(s, "  modules: {}", f.modules.len());
    let part_list: Vec<String> = parts
        .iter()
        .map(|(c, n)| match c {
            Some(c) => format!("{} {n}", component_label(*c)),
            None => format!("unknown {n}"),
        })
        .collect();
    let _ = writeln!(s, "  parts: {}", part_list.join(", "));
    if !ranks.is_empty() {
        let _ = writeln!(s, "  rank: {}", summary(&ranks));
    }
    let alpha_line = if alphas.is_empty() {
        let meta = f.peft_metadata.as_ref().and_then(|m| {
            let v: Vec<String> = m
                .iter()
                .filter(|(k, _)| k.ends_with(".lora_alpha"))
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        });
        match meta {
            Some(m) => format!("from metadata: {m}"),
            None => "none stored (alpha = rank, scale 1)".to_string(),
        }
    } else {
        // Alphas are small numbers; show them with their scale for the common rank.
        let mut keys: Vec<u32> = alphas.iter().map(|a| a.to_bits()).collect();
        keys.sort();
        let distinct: BTreeSet<u32> = keys.into_iter().collect();
        let mut v: Vec<String> = distinct
            .iter()
            .map(|b| f32::from_bits(*b).to_string())
            .collect();
        if v.len() > 4 {
            v = vec![format!("{} distinct values", v.len())];
        }
        let mut line = v.join(", ");
        if distinct.len() == 1
            && let (Some(a), Some(r)) = (alphas.first(), ranks.first())
            && ranks.iter().all(|x| x == r)
            && *r > 0
        {
            let _ = write!(line, " (scale {})", a / *r as f32);
        }
        line
    };
    let _ = writeln!(s, "  alpha: {alpha_line}");
    let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} ({n})")).collect();
    let _ = writeln!(s, "  dtypes: {}", dt.join(", "));
    if base.is_some() {
        let _ = writeln!(
            s,
            "  SDXL module names: {sdxl_named} of {}",
            f.modules.len()
        );
    }
    if f.modules.iter().any(|m| m.spelling == Spelling::Peft) && f.peft_metadata.is_some() {
        let _ = writeln!(s, "  PEFT adapter metadata: present");
    }
    if !f.ignored.is_empty() {
        let _ = writeln!(
            s,
            "  unknown keys: {} (e.g. {})",
            f.ignored.len(),
            f.ignored[0]
        );
    }
    s.trim_end().to_string()
}

/// Parameters and dtypes of a component's stored tensors.
fn stored(w: &ComponentWeights) -> (usize, BTreeMap<String, usize>) {
    let shapes = w.files.shapes();
    let sources: BTreeSet<&str> = w.map.values().map(|m| m.source.as_str()).collect();
    let mut params = 0usize;
    let mut dtypes = BTreeMap::new();
    for s in sources {
        if let Some(shape) = shapes.get(s) {
            params = params.saturating_add(shape.iter().product::<usize>());
        }
        if let Some(d) = w.files.dtype_of(s) {
            *dtypes.entry(format!("{d:?}")).or_default() += 1;
        }
    }
    (params, dtypes)
}

fn unet_line(c: &UNetConfig) -> String {
    let widths: Vec<String> = c.block_out_channels.iter().map(|w| w.to_string()).collect();
    let down: Vec<String> = c
        .down_attention
        .iter()
        .zip(&c.down_transformer_depth)
        .map(|(a, d)| if *a { d.to_string() } else { "-".into() })
        .collect();
    let up: Vec<String> = c
        .up_attention
        .iter()
        .zip(&c.up_transformer_depth)
        .map(|(a, d)| if *a { d.to_string() } else { "-".into() })
        .collect();
    let mid = c
        .mid_transformer_depth
        .map(|d| d.to_string())
        .unwrap_or_else(|| "-".into());
    format!(
        "{} levels, widths {}, {} resnets per level, transformer depths down [{}] mid {mid} up [{}], cross-attention {}, added conditioning {}",
        c.block_out_channels.len(),
        widths.join("/"),
        c.layers_per_block,
        down.join(", "),
        up.join(", "),
        c.cross_attention_dim,
        c.projection_class_embeddings_input_dim
    )
}

fn clip_line(c: &ClipConfig) -> String {
    let mut s = format!(
        "{} layers, width {}, MLP {}, {} heads",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads
    );
    if let Some(p) = c.projection_dim {
        let _ = write!(s, ", projection {p}");
    }
    s
}

fn vae_line(arch: &VaeArch) -> String {
    let c = match arch {
        VaeArch::Kl(c) => c,
        VaeArch::Tiny(t) => {
            return format!(
                "tiny (AutoencoderTiny), widths {}/{}, {} latent channels",
                t.encoder_block_out_channels.first().copied().unwrap_or(0),
                t.decoder_block_out_channels.first().copied().unwrap_or(0),
                t.latent_channels
            );
        }
    };
    let widths: Vec<String> = c.block_out_channels.iter().map(|w| w.to_string()).collect();
    format!(
        "widths {}, {} resnets per level, {} latent channels",
        widths.join("/"),
        c.layers_per_block,
        c.latent_channels
    )
}

fn describe_checkpoint(parts: &ModelParts, layout: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}: SDXL checkpoint, {layout}", parts.name);
    let sdxl = parts.unet_config.block_out_channels == sdxl_base::unet().block_out_channels
        && parts.unet_config.down_transformer_depth == sdxl_base::unet().down_transformer_depth
        && parts.text_encoder_2_config.num_hidden_layers
            == sdxl_base::text_encoder_2().num_hidden_layers;
    let _ = writeln!(
        s,
        "  architecture: {}",
        if sdxl {
            "SDXL base shapes (SDXL 1.0 and its fine-tunes)"
        } else {
            "SDXL family, other sizes"
        }
    );
    let mut total = 0usize;
    let mut all_dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let rows: [(&str, &Arc<ComponentWeights>, String); 4] = [
        ("UNet", &parts.unet, unet_line(&parts.unet_config)),
        (
            "text encoder 1 (CLIP ViT-L)",
            &parts.text_encoder,
            clip_line(&parts.text_encoder_config),
        ),
        (
            "text encoder 2 (OpenCLIP ViT-bigG)",
            &parts.text_encoder_2,
            clip_line(&parts.text_encoder_2_config),
        ),
        ("VAE", &parts.vae, vae_line(&parts.vae_config)),
    ];
    for (label, w, line) in rows {
        let (n, dtypes) = stored(w);
        total = total.saturating_add(n);
        for (d, k) in dtypes {
            *all_dtypes.entry(d).or_default() += k;
        }
        let _ = writeln!(s, "  {label}: {line}; {} parameters", count(n));
    }
    let dt: Vec<String> = all_dtypes
        .iter()
        .map(|(d, n)| format!("{d} ({n} tensors)"))
        .collect();
    let _ = writeln!(s, "  dtypes: {}", dt.join(", "));
    let _ = writeln!(s, "  parameters: {} ({total})", count(total));
    s.trim_end().to_string()
}
