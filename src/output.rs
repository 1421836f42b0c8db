//! Writing images: PNG with the generation parameters in text chunks, written to a temporary
//! file beside the target and renamed into place so no partial image is ever left behind.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Text chunks stored in every PNG.
pub struct PngText {
    /// AUTOMATIC1111-style `parameters` text, read by image browsers and model sites.
    pub parameters: String,
    /// The exact settings as JSON (`dmd2` chunk).
    pub json: String,
}

/// Encode an RGB8 image as PNG bytes with the given text chunks.
pub fn encode_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: Option<&PngText>,
) -> Result<Vec<u8>> {
    if rgb.len() != width * height * 3 {
        bail!(
            "internal error: image buffer has {} bytes for {width}x{height}",
            rgb.len()
        );
    }
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(t) = text {
            // tEXt is Latin-1 only; prompts are UTF-8, so use iTXt when needed.
            if t.parameters.is_ascii() {
                enc.add_text_chunk("parameters".into(), t.parameters.clone())?;
            } else {
                enc.add_itxt_chunk("parameters".into(), t.parameters.clone())?;
            }
            enc.add_itxt_chunk("dmd2".into(), t.json.clone())?;
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(buf)
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    Ok(())
}

/// Remove temporary files left in `dir` by dmd2 processes that no longer run (killed while
/// writing). Files of live processes are left alone. Linux only (it asks /proc); a no-op
/// elsewhere.
pub fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else {
            continue;
        };
        if Path::new("/proc").is_dir() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The pid in a `.NAME.dmd2-PID.tmp` temporary file name.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, pid) = rest.rsplit_once(".dmd2-")?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(stale_pid(".00001-42.png.dmd2-1234.tmp"), Some(1234));
        assert_eq!(stale_pid("00001-42.png"), None);
        assert_eq!(stale_pid(".x.dmd2-abc.tmp"), None);
    }

    #[test]
    fn atomic_write_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("dmd2-out-{}", std::process::id()));
        let p = dir.join("sub/a.png");
        write_atomic(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
