//! Writing images: PNG with the generation parameters in text chunks, and output files that
//! can only create or replace regular files.
//!
//! Every target is checked before any work ([`check_target`]): a directory, a block device or
//! a file the run reads (compared by device and inode, so links and other spellings count)
//! is refused; a character device or FIFO the user names (`-o /dev/stdout`, a pipe) is
//! written to directly; anything else is written to a temporary file beside the target,
//! created exclusively under an unpredictable name (a planted file or symlink there makes the
//! create fail, never redirects it), synced, and renamed into place — so no partial image is
//! ever left behind and nothing outside the target is ever touched.
//!
//! The names of the files, from templates, are [`file_names`].

pub mod file_names;

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
            // tEXt is Latin-1 only; prompts are UTF-8, so iTXt when needed (and only then:
            // ImageMagick 6 and other older readers show tEXt alone).
            for (key, text) in [("parameters", &t.parameters), ("dmd2", &t.json)] {
                if text.is_ascii() {
                    enc.add_text_chunk(key.into(), text.clone())?;
                } else {
                    enc.add_itxt_chunk(key.into(), text.clone())?;
                }
            }
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(buf)
}

/// The image formats dmd2 writes, chosen by the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// With the parameters in `parameters` and `dmd2` text chunks.
    Png,
    /// Baseline JPEG at a quality (1–100), the parameters in EXIF UserComment as A1111 writes
    /// them.
    Jpeg { quality: u8 },
    /// Lossless WebP, the parameters in EXIF UserComment as A1111 writes them.
    WebP,
}

/// JPEG quality when `--quality` is not given.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

impl Format {
    /// `.png`, `.jpg`/`.jpeg` or `.webp` in any case; PNG without an extension (`-o out`,
    /// `/dev/stdout`); any other extension is an error naming the file.
    pub fn for_path(path: &Path, jpeg_quality: u8) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        Ok(match ext.as_deref() {
            None | Some("png") => Format::Png,
            Some("jpg" | "jpeg") => Format::Jpeg {
                quality: jpeg_quality,
            },
            Some("webp") => Format::WebP,
            Some(other) => bail!(
                "{}: .{other} is not an image format dmd2 writes (.png, .jpg or .jpeg, .webp)",
                path.display()
            ),
        })
    }
}

/// Encode an RGB8 image in `format`, with the generation parameters where that format's
/// readers look for them (see [`Format`]).
pub fn encode_image(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: Option<&PngText>,
    format: Format,
) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    if format == Format::Png {
        return encode_png(rgb, width, height, text);
    }
    if rgb.len() != width * height * 3 {
        bail!(
            "internal error: image buffer has {} bytes for {width}x{height}",
            rgb.len()
        );
    }
    let (w, h) = (
        u32::try_from(width).context("image too wide")?,
        u32::try_from(height).context("image too tall")?,
    );
    let exif = text.map(|t| exif_user_comment(&t.parameters));
    let mut buf = Vec::new();
    let color = image::ExtendedColorType::Rgb8;
    match format {
        Format::Jpeg { quality } => {
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality);
            if let Some(e) = exif {
                enc.set_exif_metadata(e)
                    .map_err(|e| anyhow::anyhow!("JPEG metadata: {e}"))?;
            }
            enc.write_image(rgb, w, h, color)
                .context("cannot encode the JPEG")?;
        }
        Format::WebP => {
            let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut buf);
            if let Some(e) = exif {
                enc.set_exif_metadata(e)
                    .map_err(|e| anyhow::anyhow!("WebP metadata: {e}"))?;
            }
            enc.write_image(rgb, w, h, color)
                .context("cannot encode the WebP")?;
        }
        Format::Png => unreachable!("handled above"),
    }
    Ok(buf)
}

/// EXIF (TIFF) holding one tag, the Exif IFD's UserComment, with `text` as A1111 stores its
/// parameters in JPEG and WebP files — byte for byte what its
/// `piexif.dump({"Exif": {UserComment: piexif.helper.UserComment.dump(text, "unicode")}})`
/// gives, less the `Exif\0\0` header: big-endian, `UNICODE\0` and UTF-16BE text, and, as
/// piexif writes it, no next-IFD link after the Exif IFD.
pub fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    // Header (8), IFD0 (one entry and its next-IFD link: 2 + 12 + 4) at 8, the Exif IFD
    // (2 + 12) at 26, the comment at 40.
    let (exif_ifd, data) = (26u32, 40u32);
    let mut t = b"MM\0\x2a".to_vec();
    t.extend(8u32.to_be_bytes());
    let ifd = |t: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32| {
        t.extend(1u16.to_be_bytes());
        t.extend(tag.to_be_bytes());
        t.extend(kind.to_be_bytes());
        t.extend(count.to_be_bytes());
        t.extend(value.to_be_bytes());
    };
    // IFD0: the ExifIFD pointer (LONG); no next IFD.
    ifd(&mut t, 0x8769, 4, 1, exif_ifd);
    t.extend(0u32.to_be_bytes());
    // The Exif IFD: UserComment (UNDEFINED bytes).
    ifd(&mut t, 0x9286, 7, comment.len() as u32, data);
    t.extend(comment);
    t
}

/// `UserComment` of an EXIF block as [`exif_user_comment`] writes it (and A1111, through
/// piexif): the text, or `None` when there is none or it is not in a form read here.
pub fn read_exif_user_comment(exif: &[u8]) -> Option<String> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let be = match tiff.get(..4)? {
        b"MM\0\x2a" => true,
        b"II\x2a\0" => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(o..o + 2)?.try_into().ok()?;
        Some(if be {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(o..o + 4)?.try_into().ok()?;
        Some(if be {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    // The entry of `tag` in the IFD at `ifd`: (count, value or offset).
    let find = |ifd: usize, tag: u16| -> Option<(u32, u32)> {
        let n = u16_at(ifd)? as usize;
        (0..n.min(512)).find_map(|i| {
            let e = ifd + 2 + 12 * i;
            (u16_at(e)? == tag).then_some((u32_at(e + 4)?, u32_at(e + 8)?))
        })
    };
    let (_, exif_ifd) = find(u32_at(4)? as usize, 0x8769)?;
    let (count, offset) = find(exif_ifd as usize, 0x9286)?;
    let data = tiff.get(offset as usize..(offset as usize).checked_add(count as usize)?)?;
    let (prefix, body) = data.split_at_checked(8)?;
    match prefix {
        b"UNICODE\0" => {
            // piexif writes UTF-16BE whatever the TIFF byte order.
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Some(String::from_utf16_lossy(&units))
        }
        b"ASCII\0\0\0" => Some(String::from_utf8_lossy(body).into_owned()),
        _ => None,
    }
}

/// A file's identity: device and inode. Two paths with the same identity are the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names (after symlinks), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// How an output path is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file, new or replaced: through a temporary file and a rename.
    File(PathBuf),
    /// A character device or FIFO the user named: written directly.
    Stream(PathBuf),
}

impl Target {
    pub fn path(&self) -> &Path {
        match self {
            Target::File(p) | Target::Stream(p) => p,
        }
    }
}

/// Decides how `path` is written, refusing what must not be: a directory, a block device, a
/// socket, or a file among `inputs` (the files this run reads).
pub fn check_target(path: &Path, inputs: &[FileId]) -> Result<Target> {
    use std::os::unix::fs::FileTypeExt;
    let name = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // Nothing there (or a dangling link, which the rename replaces): a new file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::File(path.to_path_buf()));
        }
        Err(e) => bail!("{name}: cannot write there: {e}"),
    };
    let t = meta.file_type();
    if t.is_dir() {
        bail!("{name}: is a directory; give a file name (or --out-dir for a directory)");
    }
    if t.is_block_device() {
        bail!("{name}: a block device; refusing to write an image onto it");
    }
    if t.is_socket() {
        bail!("{name}: a socket; give a file name");
    }
    if t.is_char_device() || t.is_fifo() {
        return Ok(Target::Stream(path.to_path_buf()));
    }
    if let Some(id) = FileId::of(path)
        && inputs.contains(&id)
    {
        bail!(
            "{name}: is an input of this run (a model, LoRA, prompt or settings file); refusing to overwrite it"
        );
    }
    Ok(Target::File(path.to_path_buf()))
}

/// The temporary-file name's marker: `.NAME.dmd2-PID-RANDOM.tmp`.
const TEMP_MARK: &str = ".dmd2-";

/// Longest file name the common file systems take.
const NAME_MAX: usize = 255;

/// An unpredictable 64-bit value (OS-seeded hasher keys, the time, a counter).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// `.NAME.dmd2-PID-RANDOM.tmp`, with NAME cut (at a character boundary) so the whole fits in
/// [`NAME_MAX`] bytes.
fn temp_name(file_name: &str) -> String {
    let tail = format!(
        "{TEMP_MARK}{}-{:016x}.tmp",
        std::process::id(),
        random_u64()
    );
    let room = NAME_MAX - 1 - tail.len();
    let mut cut = file_name.len().min(room);
    while !file_name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}{tail}", &file_name[..cut])
}

/// The temporary file being written, for the signal handler to remove on a forced exit.
static CURRENT_TEMP: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Removes the temporary file being written, if any (called when the process must exit now).
pub fn remove_current_temp() {
    if let Ok(mut t) = CURRENT_TEMP.try_lock()
        && let Some(p) = t.take()
    {
        let _ = std::fs::remove_file(p);
    }
}

/// Writes `bytes` to `target` (see [`OutputFile`]).
pub fn write(target: &Target, bytes: &[u8]) -> Result<()> {
    let mut out = OutputFile::create(target)?;
    out.write_all(bytes)
        .with_context(|| format!("{}: cannot write", target.path().display()))?;
    out.commit()
}

/// An output being written. A [`Target::File`] is written to a temporary file in the same
/// directory, created exclusively, and [`OutputFile::commit`] syncs and renames it into place;
/// dropped before that, the temporary file is removed and the target is untouched. A
/// [`Target::Stream`] is opened (never created) and written directly.
pub struct OutputFile {
    file: std::fs::File,
    target: PathBuf,
    /// The temporary file, for a regular target.
    temp: Option<PathBuf>,
}

impl OutputFile {
    pub fn create(target: &Target) -> Result<Self> {
        match target {
            Target::Stream(p) => Ok(Self {
                file: open_stream(p)?,
                target: p.clone(),
                temp: None,
            }),
            Target::File(p) => {
                let (temp, file) = create_temp(p, || temp_name(&file_name_of(p)))?;
                if let Ok(mut t) = CURRENT_TEMP.lock() {
                    *t = Some(temp.clone());
                }
                Ok(Self {
                    file,
                    target: p.clone(),
                    temp: Some(temp),
                })
            }
        }
    }

    /// Finishes the write: synced and renamed into place (a regular file), or flushed.
    pub fn commit(mut self) -> Result<()> {
        let name = self.target.display().to_string();
        let result = (|| -> std::io::Result<()> {
            self.file.flush()?;
            if let Some(temp) = &self.temp {
                self.file.sync_all()?;
                std::fs::rename(temp, &self.target)?;
                // The rename itself durable too.
                if let Some(dir) = self.target.parent()
                    && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    })
                {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })();
        result.with_context(|| format!("{name}: cannot write"))?;
        // Renamed: nothing left to remove.
        self.temp = None;
        Ok(())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Ok(mut t) = CURRENT_TEMP.lock() {
            *t = None;
        }
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into())
}

/// Creates a temporary file beside `path` (its directory created when missing) under the
/// names `candidate` gives, exclusively: an existing file or symlink at a name fails that
/// create instead of being followed or truncated, and the next name is tried (8 times).
fn create_temp(
    path: &Path,
    mut candidate: impl FnMut() -> String,
) -> Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    let mut last = None;
    for _ in 0..8 {
        let tmp = dir.join(candidate());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot write", path.display())),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
        .with_context(|| format!("{}: cannot create a temporary file", path.display()))
}

fn open_stream(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: a FIFO nobody reads fails at once (ENXIO) instead of hanging.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => anyhow::anyhow!("{}: no process reads this FIFO", path.display()),
            _ => anyhow::anyhow!("{}: cannot write: {e}", path.display()),
        })?;
    // Then blocking writes, so a slow reader is waited for rather than failing with EAGAIN.
    // SAFETY: fcntl on the descriptor of `f`, which this function owns.
    unsafe {
        let fd = f.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Creates `dir` (with its parents) under `root`, refusing a symlink on the way: an output
/// name with subdirectories must not lead outside the output directory through a planted or
/// pre-existing link.
pub fn create_dir_inside(root: &Path, dir: &Path) -> Result<()> {
    let rel = dir.strip_prefix(root).with_context(|| {
        format!(
            "{}: not inside the output directory {}",
            dir.display(),
            root.display()
        )
    })?;
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "{}: a symbolic link inside the output directory; refusing to write through it",
                at.display()
            ),
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{}: exists and is not a directory", at.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at)
                    .with_context(|| format!("{}: cannot create the directory", at.display()))?;
            }
            Err(e) => bail!("{}: {e}", at.display()),
        }
    }
    Ok(())
}

/// Remove temporary files left in `dir` by dmd2 processes that no longer run (killed while
/// writing). Files of live processes are left alone. Linux only (it asks /proc); a no-op
/// elsewhere.
pub fn remove_stale_temp_files(dir: &Path) {
    if !Path::new("/proc/self").is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else {
            continue;
        };
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The pid in a `.NAME.dmd2-PID-RANDOM.tmp` temporary file name.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = rest.rsplit_once(TEMP_MARK)?;
    let (pid, random) = tail.split_once('-')?;
    (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ASCII texts go in tEXt chunks (which every reader shows), others in iTXt.
    #[test]
    fn text_chunks_are_plain_when_they_can_be() {
        let chunks = |parameters: &str| {
            let text = PngText {
                parameters: parameters.into(),
                json: format!("{{\"prompt\":{parameters:?}}}"),
            };
            let png = encode_png(&[0; 3], 1, 1, Some(&text)).unwrap();
            let r = png::Decoder::new(std::io::Cursor::new(png))
                .read_info()
                .unwrap();
            let info = r.info();
            let mut latin1: Vec<String> = info
                .uncompressed_latin1_text
                .iter()
                .map(|t| t.keyword.clone())
                .collect();
            let mut utf8: Vec<String> = info.utf8_text.iter().map(|t| t.keyword.clone()).collect();
            latin1.sort();
            utf8.sort();
            (latin1, utf8)
        };
        let both = vec!["dmd2".to_string(), "parameters".to_string()];
        assert_eq!(chunks("a cat"), (both.clone(), vec![]));
        assert_eq!(chunks("a cät"), (vec![], both));
    }

    #[test]
    fn temp_names() {
        let t = temp_name("00001-42.png");
        assert_eq!(stale_pid(&t), Some(std::process::id()));
        assert_ne!(t, temp_name("00001-42.png"), "unpredictable");
        assert_eq!(
            stale_pid(".00001-42.png.dmd2-1234-00000000deadbeef.tmp"),
            Some(1234)
        );
        assert_eq!(stale_pid("00001-42.png"), None);
        assert_eq!(stale_pid(".x.dmd2-abc-00000000deadbeef.tmp"), None);
        // Long names are cut so the temporary name stays within NAME_MAX.
        let long = "é".repeat(127);
        let t = temp_name(&long);
        assert!(t.len() <= NAME_MAX, "{}", t.len());
        assert_eq!(stale_pid(&t), Some(std::process::id()));
    }

    /// A symlink planted at the temporary name is never followed: the create fails there, the
    /// file it points at is untouched.
    #[test]
    fn planted_symlink_at_the_temp_name() {
        let dir = std::env::temp_dir().join(format!("dmd2-plant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".planted.tmp")).unwrap();
        let r = create_temp(&dir.join("out.png"), || ".planted.tmp".into());
        assert!(r.is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // With fresh names it goes through, beside the planted link.
        let mut n = 0;
        let (tmp, _) = create_temp(&dir.join("out.png"), || {
            n += 1;
            if n == 1 {
                ".planted.tmp".into()
            } else {
                ".fresh.tmp".into()
            }
        })
        .unwrap();
        assert!(tmp.ends_with(".fresh.tmp"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn atomic_write_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("dmd2-out-{}", std::process::id()));
        let p = dir.join("sub/a.png");
        write(&Target::File(p.clone()), b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn targets() {
        let dir = std::env::temp_dir().join(format!("dmd2-targets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("model.safetensors");
        std::fs::write(&input, b"x").unwrap();
        let link = dir.join("link.png");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let ids = [FileId::of(&input).unwrap()];
        assert!(check_target(&input, &ids).is_err());
        assert!(check_target(&link, &ids).is_err(), "a link to an input");
        assert!(check_target(&dir, &ids).is_err());
        assert_eq!(
            check_target(Path::new("/dev/null"), &ids).unwrap(),
            Target::Stream("/dev/null".into())
        );
        let new = dir.join("new.png");
        assert_eq!(check_target(&new, &ids).unwrap(), Target::File(new.clone()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
