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
