//! Parsing `--model` / `--lora` / `--unet` values: a local path, or a Hub reference
//! `ORG/NAME[@REV][/FILE]`.

use anyhow::{Result, bail};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a model (or file) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// An existing local file or folder.
    Local(PathBuf),
    /// A Hub repo: a diffusers repo when `file` is `None`, else one file in it.
    Repo {
        id: String,
        revision: Option<String>,
        file: Option<String>,
    },
}

impl ModelRef {
    /// `PATH` if it exists, else `org/name[@rev][/path/in/repo]`. Strings that can only be
    /// paths (`./x`, `/x`, `~/x`, `x.safetensors`, `dir/x.safetensors`) and do not exist are
    /// a "no such file" error.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty model path or repo id");
        }
        let p = Path::new(s);
        if p.exists() {
            return Ok(ModelRef::Local(p.to_path_buf()));
        }
        let no_such = || anyhow::anyhow!("{s}: no such file or directory");
        let looks_like_path = s.starts_with('/')
            || s.starts_with("./")
            || s.starts_with("../")
            || s.starts_with('~')
            || s.starts_with('.')
            || s.contains('\\')
            || s.contains("//")
            || (s.len() >= 2 && s.as_bytes()[1] == b':');
        if looks_like_path {
            return Err(no_such());
        }
        let mut parts = s.splitn(3, '/');
        let (Some(org), Some(name_rev)) = (parts.next(), parts.next()) else {
            return Err(no_such());
        };
        let file = parts.next().map(str::to_string);
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, Some(r.to_string())),
            Some(_) => bail!("{s}: empty revision after '@'"),
            None => (name_rev, None),
        };
        // `models/sdxl.safetensors` is a missing local file, not a repo called so.
        if file.is_none() && has_weight_extension(name) {
            return Err(no_such());
        }
        if !valid_repo_part(org) || !valid_repo_part(name) {
            return Err(no_such());
        }
        if let Some(f) = &file
            && (f.is_empty() || f.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        {
            bail!("{s}: '{f}' is not a file path inside a repo");
        }
        Ok(ModelRef::Repo {
            id: format!("{org}/{name}"),
            revision,
            file,
        })
    }
}

impl std::str::FromStr for ModelRef {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelRef::parse(s)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Local(p) => write!(f, "{}", p.display()),
            ModelRef::Repo { id, revision, file } => {
                write!(f, "{id}")?;
                if let Some(r) = revision {
                    write!(f, "@{r}")?;
                }
                if let Some(file) = file {
                    write!(f, "/{file}")?;
                }
                Ok(())
            }
        }
    }
}

fn has_weight_extension(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf"]
        .iter()
        .any(|e| l.ends_with(e))
}

/// Hub repo names: letters, digits, `-`, `_`, `.`; no leading/trailing `-`/`.`, no `..`.
fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("..")
}
