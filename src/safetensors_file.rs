//! The one safetensors reader: every checkpoint, UNet, VAE and LoRA file is opened here and
//! its header validated before any tensor is touched.
//!
//! The validation is the `safetensors` crate's own (`SafeTensors::read_metadata`: each
//! tensor's shape × dtype size computed with overflow checks and equal to its byte range, the
//! ranges contiguous and tiling the data to the end of the file), run on a read-only memory
//! map of which only the header's pages are read. Before it, this module refuses what the
//! crate would accept or report without a name: special files (a FIFO would block forever),
//! duplicate tensor names (JSON objects keep the last), and dtypes dmd2 does not read. Every
//! error names the file; none quotes the file's bytes back (a stranger's file may be a secret
//! of someone else's).

use anyhow::{Result, anyhow, bail};
use candle_core::DType;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Headers larger than this are refused (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Bytes of data (= shape × dtype size, checked).
    pub len: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        // The product was checked against the byte length when the header was read.
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// The dtypes dmd2 reads, by their safetensors names.
const READABLE: [(&str, Dtype); 11] = [
    ("F64", Dtype::F64),
    ("F32", Dtype::F32),
    ("F16", Dtype::F16),
    ("BF16", Dtype::BF16),
    ("I64", Dtype::I64),
    ("I32", Dtype::I32),
    ("I16", Dtype::I16),
    ("I8", Dtype::I8),
    ("U32", Dtype::U32),
    ("U8", Dtype::U8),
    ("BOOL", Dtype::BOOL),
];

/// candle's dtype for a stored one, when candle has it.
pub fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors name of a candle dtype (for writing).
pub fn dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => bail!("cannot write dtype {other:?}"),
    })
}

impl SafetensorsFile {
    /// Reads and validates the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display();
        let size = crate::files::require_regular_file(path)?.len();
        let file = std::fs::File::open(path).map_err(|e| anyhow!("{name}: cannot open: {e}"))?;
        if size < 8 {
            bail!("{name}: not a safetensors file (only {size} bytes)");
        }
        let mut len = [0u8; 8];
        read_exact_at(&file, &mut len, 0).map_err(|e| anyhow!("{name}: cannot read: {e}"))?;
        let n = u64::from_le_bytes(len);
        if n > size - 8 || n > MAX_HEADER {
            // The length is not quoted: for a file of another kind it is just its first bytes.
            bail!(
                "{name}: not a safetensors file, or truncated (its header length does not fit the file's {size} bytes)"
            );
        }
        let mut header = vec![0u8; n as usize];
        read_exact_at(&file, &mut header, 8)
            .map_err(|e| anyhow!("{name}: cannot read the header: {e}"))?;
        let keys = check_header_json(&header).map_err(|e| anyhow!("{name}: {e}"))?;
        // SAFETY: a read-only private mapping; only the header's pages are read. A file
        // changed under it could give wrong bytes (never unsafety in this reader's use: the
        // slice is only read by the safetensors crate's validation, which bounds-checks).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| anyhow!("{name}: cannot map the file: {e}"))?;
        let (n_header, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow!("{name}: {}", explain(e, &keys, size - 8 - n)))?;
        drop(map);
        let data_start = 8 + n_header as u64;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| {
                let (s, e) = info.data_offsets;
                let entry = TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s as u64,
                    len: (e - s) as u64,
                };
                (k, entry)
            })
            .collect();
        let metadata = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }
}

/// Positioned read of exactly `buf.len()` bytes.
/// Fills `buf` from `offset`: a positioned read, so threads can share one open file.
pub fn read_exact_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(f, buf, offset) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What the header says per tensor, for checks and messages: (name, dtype, shape, offsets).
struct HeaderKey {
    name: String,
    shape: Vec<u64>,
    dtype_bytes: u64,
    offsets: (u64, u64),
}

/// Checks the header as JSON before the safetensors crate parses it: an object, no name twice,
/// every dtype one dmd2 reads. Returns the tensors as written.
fn check_header_json(header: &[u8]) -> Result<Vec<HeaderKey>> {
    let v: serde_json::Value = serde_json::from_slice(header)
        .map_err(|_| anyhow!("not a safetensors file (the header is not JSON)"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("not a safetensors file (the header is not a JSON object)"))?;
    let Keys(keys) = serde_json::from_slice(header)
        .map_err(|_| anyhow!("not a safetensors file (bad header)"))?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = keys.iter().find(|k| !seen.insert(k.as_str())) {
        bail!("corrupt header: tensor {dup} appears twice");
    }
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some(d) => d,
            None => bail!("tensor {name} has no dtype"),
        };
        let Some(&(_, dt)) = READABLE.iter().find(|(s, _)| *s == dtype) else {
            bail!("tensor {name} has dtype {dtype}, which dmd2 does not read");
        };
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| anyhow!("tensor {name} has no valid shape"))?;
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| match o.as_slice() {
                [a, b] => Some((a.as_u64()?, b.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| anyhow!("tensor {name} has no valid data offsets"))?;
        out.push(HeaderKey {
            name: name.clone(),
            shape,
            dtype_bytes: dt.bitsize().div_ceil(8) as u64,
            offsets,
        });
    }
    Ok(out)
}

/// A safetensors error as one reason, naming the tensor where the crate does not.
fn explain(e: safetensors::SafeTensorError, keys: &[HeaderKey], data_len: u64) -> String {
    use safetensors::SafeTensorError as E;
    let bytes = |k: &HeaderKey| {
        k.shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(k.dtype_bytes))
    };
    // Data past the end of the file explains any complaint best: the file is cut short, or
    // its offsets lie.
    if let Some(k) = keys.iter().find(|k| k.offsets.1 > data_len) {
        return format!(
            "truncated or corrupt: tensor {} ends at byte {} of the data, which has {data_len}",
            k.name, k.offsets.1
        );
    }
    match e {
        E::ValidationOverflow | E::TensorInvalidInfo => {
            for k in keys {
                match bytes(k) {
                    None => {
                        return format!(
                            "corrupt: tensor {} has shape {:?}, whose size overflows",
                            k.name, k.shape
                        );
                    }
                    Some(b) if k.offsets.1.checked_sub(k.offsets.0) != Some(b) => {
                        return format!(
                            "corrupt: tensor {} has shape {:?}, which does not match its {} bytes of data",
                            k.name,
                            k.shape,
                            k.offsets.1.saturating_sub(k.offsets.0)
                        );
                    }
                    _ => {}
                }
            }
            "corrupt: a tensor's shape does not match its data".into()
        }
        E::InvalidOffset(name) => {
            format!("corrupt: the data of tensor {name} overlaps another or leaves a gap")
        }
        E::MetadataIncompleteBuffer => {
            let end = keys.iter().map(|k| k.offsets.1).max().unwrap_or(0);
            format!("corrupt: {} bytes after the last tensor", data_len - end)
        }
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            "not a safetensors file (bad header)".into()
        }
        E::HeaderTooLarge | E::HeaderTooSmall | E::InvalidHeaderLength => {
            "not a safetensors file, or truncated".into()
        }
        other => format!("corrupt: {other}"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, header: &str, data: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("dmd2-st-{}-{name}", std::process::id()));
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        std::fs::write(&p, b).unwrap();
        p
    }

    fn err(name: &str, header: &str, data: usize) -> String {
        let p = file(name, header, data);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        let _ = std::fs::remove_file(&p);
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        e
    }

    #[test]
    fn reads_a_valid_header() {
        let p = file(
            "ok",
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2,3],"data_offsets":[8,20]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            20,
        );
        let f = SafetensorsFile::open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert_eq!(f.metadata["format"], "pt");
        let n = f.tensors.len();
        assert_eq!(n, 2);
        let b = &f.tensors["b"];
        assert_eq!(
            (b.dtype, b.shape.clone(), b.len),
            (Dtype::F16, vec![2, 3], 12)
        );
        assert_eq!(b.start, f.tensors["a"].start + 8);
    }

    /// Shapes whose element count wraps u64 are refused by name, though their byte ranges
    /// look plausible.
    #[test]
    fn wrapping_shapes_are_refused() {
        let huge = (1u64 << 59) + 4;
        let e = err(
            "wrap",
            &format!(r#"{{"w":{{"dtype":"F32","shape":[{huge},32],"data_offsets":[0,512]}}}}"#),
            512,
        );
        assert!(e.contains("tensor w") && e.contains("overflow"), "{e}");
        let e = err(
            "lie",
            r#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,32]}}"#,
            32,
        );
        assert!(
            e.contains("tensor w") && e.contains("does not match"),
            "{e}"
        );
    }

    #[test]
    fn broken_headers_are_named() {
        let e = err("notjson", "hello there", 0);
        assert!(e.contains("not a safetensors file"), "{e}");
        let e = err(
            "dtype",
            r#"{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(e.contains("dtype F8_E4M3"), "{e}");
        let e = err(
            "gap",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        );
        assert!(e.contains("tensor a"), "{e}");
        let e = err(
            "trunc",
            r#"{"a":{"dtype":"U8","shape":[100],"data_offsets":[0,100]}}"#,
            10,
        );
        assert!(e.contains("truncated"), "{e}");
        let e = err(
            "tail",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            5,
        );
        assert!(e.contains("after the last tensor"), "{e}");
        let e = err(
            "dup",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(e.contains("appears twice"), "{e}");
    }

    /// A file of another kind: the error does not quote its first bytes as a length.
    #[test]
    fn other_files_are_not_quoted() {
        let p = std::env::temp_dir().join(format!("dmd2-st-{}-png", std::process::id()));
        std::fs::write(&p, b"\x89PNG\r\n\x1a\n and then some secret text").unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        let _ = std::fs::remove_file(&p);
        let n = u64::from_le_bytes(*b"\x89PNG\r\n\x1a\n").to_string();
        assert!(
            e.contains("not a safetensors file") && !e.contains(&n),
            "{e}"
        );
    }

    #[test]
    fn special_files_are_refused() {
        let e = SafetensorsFile::open(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = SafetensorsFile::open(&std::env::temp_dir())
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory"), "{e}");
    }
}
