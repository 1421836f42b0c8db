//! Looking things up in the Hugging Face cache (`models--org--name/{blobs,refs,snapshots}`)
//! without the network.

use super::HubConfig;
use std::path::{Path, PathBuf};

pub(super) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot folder of a revision (which may not hold every file).
pub(super) fn cached_snapshot(cfg: &HubConfig, id: &str, rev: &str) -> Option<PathBuf> {
    let dir = cfg.repo_dir(id);
    let commit = if is_commit_hash(rev) {
        rev.to_string()
    } else {
        std::fs::read_to_string(dir.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    if commit.is_empty() {
        return None;
    }
    let snap = dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

pub(super) fn cached_file(cfg: &HubConfig, id: &str, rev: &str, file: &str) -> Option<PathBuf> {
    let p = cached_snapshot(cfg, id, rev)?.join(file);
    p.is_file().then_some(p)
}

pub(super) fn offline_error(cfg: &HubConfig, id: &str, rev: &str, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{id}: {what} (revision {rev}) is not in the Hugging Face cache {} and HF_HUB_OFFLINE=1 \
         forbids downloading it; download it elsewhere and pass a local path \
         (--model /path/to/model or /path/to/file.safetensors), or unset HF_HUB_OFFLINE",
        cfg.cache_dir.display()
    )
}

/// Which files of a diffusers snapshot dmd2 needs are missing (empty: complete).
pub(super) fn missing_in_snapshot(snap: &Path) -> Vec<String> {
    let index = snap.join("model_index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return vec!["model_index.json".into()];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec!["model_index.json (unreadable)".into()];
    };
    let listed = |c: &str| v.get(c).is_some_and(super::files::component_present);
    let mut missing = Vec::new();
    for (c, stem) in super::files::model_components() {
        let dir = snap.join(c);
        if !dir.join("config.json").is_file() {
            missing.push(format!("{c}/config.json"));
            continue;
        }
        match crate::checkpoint::diffusers::weight_files(&dir, stem) {
            Ok(files) => missing.extend(
                files
                    .iter()
                    .filter(|f| !f.is_file())
                    .map(|f| format!("{c}/{}", file_name(f))),
            ),
            Err(_) => missing.push(format!("{c}/{stem}.safetensors")),
        }
    }
    for c in super::files::TOKENIZER_COMPONENTS {
        if !listed(c) {
            continue;
        }
        let dir = snap.join(c);
        let bpe = dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file();
        if !bpe && !dir.join("tokenizer.json").is_file() {
            missing.push(format!("{c}/vocab.json"));
        }
    }
    missing
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
