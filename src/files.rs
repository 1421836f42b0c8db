//! Reading the files users and strangers hand over: regular files only (a FIFO would block
//! forever, `/dev/zero` never ends) and bounded in size, with errors that name the file.

use anyhow::{Result, anyhow, bail};
use std::path::Path;

/// Size limits of the small files dmd2 reads whole.
pub mod limits {
    /// A JSON config (`config.json`, `model_index.json`, a scheduler config) or a preset.
    pub const CONFIG: u64 = 1 << 20;
    /// A tokenizer's `vocab.json`, `merges.txt` or `tokenizer.json` (CLIP's are ~1–2 MB).
    pub const TOKENIZER: u64 = 32 << 20;
    /// A PNG read for its settings (`--from-png`).
    pub const PNG: u64 = 256 << 20;
}

/// Refuses anything but a regular file (after symlinks).
pub fn require_regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let m = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{}: no such file", path.display()),
        _ => anyhow!("{}: cannot open: {e}", path.display()),
    })?;
    if m.is_dir() {
        bail!("{}: is a directory, not a file", path.display());
    }
    if !m.is_file() {
        bail!(
            "{}: not a regular file (a FIFO, socket or device); give a file",
            path.display()
        );
    }
    Ok(m)
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let size = require_regular_file(path)?.len();
    if size > limit {
        bail!(
            "{}: {size} bytes, more than the {limit} this kind of file may have",
            path.display()
        );
    }
    let f =
        std::fs::File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    let mut buf = Vec::with_capacity(size as usize);
    // `take`: a file that grows while it is read still stops at the limit.
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    if buf.len() as u64 > limit {
        bail!(
            "{}: grew past {limit} bytes while being read",
            path.display()
        );
    }
    Ok(buf)
}

/// A regular UTF-8 text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|_| anyhow!("{}: not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_and_large_files_are_refused() {
        let e = read_text(Path::new("/dev/null"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_text(&std::env::temp_dir(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory"), "{e}");
        let p = std::env::temp_dir().join(format!("dmd2-files-{}", std::process::id()));
        std::fs::write(&p, "x".repeat(11)).unwrap();
        let e = read_text(&p, 10).unwrap_err().to_string();
        assert!(e.contains("11 bytes"), "{e}");
        assert_eq!(read_text(&p, 11).unwrap().len(), 11);
        let _ = std::fs::remove_file(&p);
        let e = read_text(Path::new("/nonexistent/x"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such file"), "{e}");
    }
}
