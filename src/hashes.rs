//! The file hashes A1111 writes and Civitai links resources by: `Model hash` (the first 10
//! hex digits of the sha256 of the whole checkpoint file) and `Lora hashes` (the first 12 of
//! the sha256 of a safetensors file's bytes after its header: Civitai's AutoV3). Hashing a
//! 7 GB checkpoint takes seconds, so results are cached by path, size and modification time
//! in `$XDG_CACHE_HOME/dmd2/hashes.json` (as A1111 keeps `cache.json`).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `Model hash`: 10 hex digits of the whole file's sha256.
pub fn model_hash(path: &Path) -> Result<String> {
    model_hash_in(path, cache_file().as_deref())
}

fn model_hash_in(path: &Path, cache: Option<&Path>) -> Result<String> {
    Ok(cached(path, cache, "sha256", || sha256_from(path, 0))?[..10].to_string())
}

/// `Lora hashes` / AutoV3: 12 hex digits of the sha256 of the data after the safetensors
/// header (8 + header length bytes).
pub fn lora_hash(path: &Path) -> Result<String> {
    lora_hash_in(path, cache_file().as_deref())
}

fn lora_hash_in(path: &Path, cache: Option<&Path>) -> Result<String> {
    let full = cached(path, cache, "autov3", || {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        sha256_from(path, 8 + u64::from_le_bytes(len))
    })?;
    Ok(full[..12].to_string())
}

/// The file a weights path's A1111 hash is of: a file itself; a diffusers component folder's
/// single weights file (A1111's `VAE hash` of a VAE folder is that file's), none when the
/// folder has several or none.
pub fn weights_file(path: &Path) -> Option<PathBuf> {
    if !path.is_dir() {
        return Some(path.to_path_buf());
    }
    crate::checkpoint::diffusers::weight_files(path, "diffusion_pytorch_model")
        .ok()
        .filter(|f| f.len() == 1)
        .and_then(|mut f| f.pop())
}

fn sha256_from(path: &Path, offset: u64) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    f.seek(SeekFrom::Start(offset))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn cache_file() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("dmd2").join("hashes.json"))
}

/// The hash of `path` of `kind`, from the cache when the file's size and modification time
/// are those it was hashed at; a cache that cannot be read or written is only skipped.
fn cached(
    path: &Path,
    cache: Option<&Path>,
    kind: &str,
    compute: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let meta = crate::files::require_regular_file(path)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format!("{kind} {} {} {}", meta.len(), mtime, abs.display());
    let mut map: BTreeMap<String, String> = cache
        .and_then(|f| crate::files::read_text(f, 16 << 20).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(h) = map.get(&key).filter(|h| h.len() == 64) {
        return Ok(h.clone());
    }
    let h = compute()?;
    if let Some(f) = cache {
        map.insert(key, h.clone());
        let _ = write_atomically(f, &serde_json::to_vec_pretty(&map).unwrap_or_default());
    }
    Ok(h)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".hashes.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_a1111s_and_civitais() {
        let dir = std::env::temp_dir().join(format!("dmd2-hashes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A 2-byte "header" then data: AutoV3 hashes the data only.
        let p = dir.join("l.safetensors");
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend(b"{}abc");
        std::fs::write(&p, &bytes).unwrap();
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        let cache = dir.join("cache/hashes.json");
        assert_eq!(lora_hash_in(&p, Some(&cache)).unwrap(), "ba7816bf8f01");
        assert!(cache.exists());
        // Cached: the same answer again, from the cache file.
        assert_eq!(lora_hash_in(&p, Some(&cache)).unwrap(), "ba7816bf8f01");
        let whole = sha256_from(&p, 0).unwrap();
        assert_eq!(model_hash_in(&p, Some(&cache)).unwrap(), whole[..10]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
