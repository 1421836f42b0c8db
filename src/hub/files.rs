//! Which files of a diffusers repo dmd2 needs: `model_index.json`, each component's config,
//! its safetensors weights (the `.fp16` variant preferred, never the `.bin` duplicates) and
//! the tokenizer files.

use crate::keymap::Component;
use anyhow::{Result, bail};
use std::collections::BTreeSet;

/// The components whose weights are needed, as (folder, weight file stem): the model's four
/// (the others only their configs).
pub(super) fn model_components() -> impl Iterator<Item = (&'static str, &'static str)> {
    Component::ALL
        .into_iter()
        .map(|c| (c.folder(), c.weights_stem()))
}

/// The diffusers folders of the tokenizers (configs and vocabularies, no weights).
pub(super) const TOKENIZER_COMPONENTS: [&str; 2] = ["tokenizer", "tokenizer_2"];

/// The files of a diffusers repo dmd2 needs, from its file list.
pub fn needed_files(
    id: &str,
    model_index: &serde_json::Value,
    files: &BTreeSet<&str>,
) -> Result<Vec<String>> {
    let mut out = vec!["model_index.json".to_string()];
    let in_dir = |dir: &str| -> Vec<&str> {
        files
            .iter()
            .copied()
            .filter(|f| {
                f.strip_prefix(dir)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| !r.contains('/'))
            })
            .collect()
    };
    let listed = |c: &str| model_index.get(c).is_some_and(component_present);
    for (c, _) in model_components() {
        if !listed(c) {
            bail!("{id}: model_index.json has no {c}; not an SDXL pipeline");
        }
        let here = in_dir(c);
        let config = format!("{c}/config.json");
        if !here.contains(&config.as_str()) {
            bail!("{id}: no {config} in the repo");
        }
        out.push(config);
        out.extend(select_weights(id, c, &here)?);
    }
    for c in TOKENIZER_COMPONENTS {
        if listed(c) {
            out.extend(
                in_dir(c)
                    .into_iter()
                    .filter(|f| f.ends_with(".json") || f.ends_with(".txt"))
                    .map(str::to_string),
            );
        }
    }
    if listed("scheduler") {
        out.extend(
            in_dir("scheduler")
                .into_iter()
                .filter(|f| f.ends_with(".json"))
                .map(str::to_string),
        );
    }
    Ok(out)
}

/// A component's safetensors weights: the `fp16` variant when the repo has it (single file
/// or shards with their index), else the plain ones. Never `.bin`, `.msgpack`, `.onnx`.
pub(super) fn select_weights(id: &str, comp: &str, here: &[&str]) -> Result<Vec<String>> {
    let name = |f: &str| f.rsplit('/').next().unwrap_or(f).to_string();
    let is_fp16 = |n: &str| n.ends_with(".fp16.safetensors") || n.contains(".fp16-");
    let variant_tag = |n: &str| {
        // model.<variant>.safetensors / model.<variant>-00001-of-00002.safetensors
        let stem = n.trim_end_matches(".safetensors");
        stem.split('.').count() > 1
    };
    let st: Vec<&str> = here
        .iter()
        .copied()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    let idx = |fp16: bool| {
        here.iter().copied().find(|f| {
            let n = name(f);
            if fp16 {
                n.ends_with(".safetensors.index.fp16.json")
            } else {
                n.ends_with(".safetensors.index.json")
            }
        })
    };
    for fp16 in [true, false] {
        let picks: Vec<&str> = st
            .iter()
            .copied()
            .filter(|f| {
                let n = name(f);
                if fp16 { is_fp16(&n) } else { !variant_tag(&n) }
            })
            .collect();
        if picks.is_empty() {
            continue;
        }
        let sharded = picks.iter().any(|f| f.contains("-of-"));
        let mut out: Vec<String> = picks.iter().map(|s| s.to_string()).collect();
        if sharded {
            match idx(fp16) {
                Some(i) => out.push(i.to_string()),
                None => continue,
            }
        }
        return Ok(out);
    }
    if here.iter().any(|f| f.ends_with(".bin")) {
        bail!(
            "{id}: {comp}/ has only PyTorch .bin weights; dmd2 reads safetensors for whole models"
        );
    }
    bail!("{id}: no safetensors weights in {comp}/")
}

/// A model_index.json entry naming a real component: `["library", "Class"]`.
pub(super) fn component_present(v: &serde_json::Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x.is_string()))
}
