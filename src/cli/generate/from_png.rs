//! `--from-png`: finding the files an image names on this machine. Images carry file names
//! and hashes, not paths (A1111's `Model: NAME`, `Model hash`, `<lora:NAME:W>`, `Lora
//! hashes`; dmd2's own chunk the same way): a name is found as given (an older image's path,
//! or a file in the current directory), else in `--model-dir` / `--lora-dir` and below by
//! file name or stem, else by hash; a Hub repo id is taken as it is. What an image needs and
//! is not here is an error naming the image; LoRAs that are not here are one warning.

use crate::metadata::{ImageRef, ImageSettings, LoraRef};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// How deep below `--model-dir` / `--lora-dir` files are looked for (A1111's
/// `models/Stable-diffusion/SDXL/…` is three).
const DEPTH: usize = 4;

/// The PNG, and the directories its files may be in.
pub struct Finder<'a> {
    pub png: &'a Path,
    pub model_dir: Option<&'a Path>,
    pub lora_dir: Option<&'a Path>,
}

/// What a weights file is looked up by.
enum Hash<'a> {
    /// A1111's `Model hash` / `VAE hash`: 10 hex digits of the whole file's sha256.
    File(&'a str),
    /// Civitai's AutoV3 (`Lora hashes`).
    AutoV3(&'a str),
    None,
}

impl Hash<'_> {
    fn of(&self, path: &Path) -> Option<String> {
        match self {
            Hash::File(_) => crate::hashes::model_hash(path).ok(),
            Hash::AutoV3(_) => crate::hashes::lora_hash(path).ok(),
            Hash::None => None,
        }
    }

    fn want(&self) -> Option<String> {
        match self {
            Hash::File(h) | Hash::AutoV3(h) => Some(h.trim().to_ascii_lowercase()),
            Hash::None => None,
        }
    }

    fn matches(&self, path: &Path) -> bool {
        // At least 8 hex digits, so a stray short value matches nothing by chance.
        self.want().is_some_and(|w| {
            w.len() >= 8
                && self
                    .of(path)
                    .is_some_and(|h| h.starts_with(&w) || w.starts_with(&h))
        })
    }
}

impl Finder<'_> {
    /// The model the image was made with, as a path or repo id for [`crate::loader`].
    pub fn model(&self, s: &ImageSettings) -> Result<String> {
        // The Hub commit the image was made with, not today's main.
        if let Some(rev) = &s.model_revision {
            return Ok(crate::hub::pin_revision(&s.model, rev));
        }
        let hash = s.model_hash.as_deref().map_or(Hash::None, Hash::File);
        self.weights(Kind::Model, &s.model, hash, "--model PATH|REPO")
    }

    /// The `--unet` the image was made with.
    pub fn unet(&self, name: &str) -> Result<String> {
        self.weights(Kind::Unet, name, Hash::None, "--unet FILE")
    }

    /// The `--vae` the image was made with (a short name such as `taesdxl` as it is).
    pub fn vae(&self, name: &str, hash: Option<&str>) -> Result<String> {
        if crate::sources::VAE_ALIASES.iter().any(|(n, _)| *n == name) && !Path::new(name).exists()
        {
            return Ok(name.to_string());
        }
        let hash = hash.map_or(Hash::None, Hash::File);
        self.weights(Kind::Vae, name, hash, "--vae PATH|REPO")
    }

    /// A local file or folder by name (then hash) in `dir`, else a Hub repo id; an error
    /// naming the PNG when neither.
    fn weights(&self, kind: Kind, name: &str, hash: Hash, flag: &str) -> Result<String> {
        let png = self.png.display();
        let what = kind.what();
        let dir = self.model_dir;
        if name.trim().is_empty() {
            bail!("{png}: the image names no {what}; give {flag}");
        }
        if Path::new(name).exists() {
            self.check_hash(what, Path::new(name), &hash);
            return Ok(name.to_string());
        }
        if let Some(dir) = dir
            && let Some(found) = find(dir, name, &hash, kind)?
        {
            return Ok(found.display().to_string());
        }
        if let Ok(crate::hub::ModelRef::Repo { .. }) = crate::hub::ModelRef::parse(name) {
            return Ok(name.to_string());
        }
        let with_hash = match hash.want() {
            Some(h) => format!(" (hash {h})"),
            None => String::new(),
        };
        match dir {
            Some(d) => bail!(
                "{png}: {what} {name:?}{with_hash} is not in {} (searched by name and hash); give {flag}",
                d.display()
            ),
            None => bail!(
                "{png}: {what} {name:?}{with_hash} is not here; give {flag}, or --model-dir DIR to find it by name or hash"
            ),
        }
    }

    /// A file found by name whose hash is not the image's: said, not refused (the user
    /// may have fine-tuned or re-saved it).
    fn check_hash(&self, what: &str, path: &Path, hash: &Hash) {
        if let (Some(want), true) = (hash.want(), path.is_file())
            && let Some(got) = hash.of(path)
            && !got.starts_with(&want)
        {
            crate::stderr!(
                "warning: {}: {what} {} has hash {}, the image says {want}; the image may come out different",
                self.png.display(),
                path.display(),
                &got[..want.len().min(got.len())]
            );
        }
    }

    /// The LoRAs the image names, as `PATH:WEIGHT`. What cannot be found is said in one
    /// warning and left out (the image can still be made, differently).
    pub fn loras(&self, loras: &[LoraRef]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for l in loras {
            let hash = l.hash.as_deref().map_or(Hash::None, Hash::AutoV3);
            let found = if Path::new(&l.path).is_file() {
                self.check_hash("LoRA", Path::new(&l.path), &hash);
                Some(PathBuf::from(&l.path))
            } else {
                match self.lora_dir {
                    Some(dir) => find(dir, &l.path, &hash, Kind::Lora)?,
                    None => None,
                }
            };
            match found {
                Some(p) => out.push(format!("{}:{}", p.display(), l.weight)),
                None => missing.push(format!("{}:{}", l.path, l.weight)),
            }
        }
        if !missing.is_empty() {
            let hint = match self.lora_dir {
                Some(d) => format!("not found in {} by name or hash", d.display()),
                None => {
                    "give --lora-dir DIR to look them up, or --lora FILE:WEIGHT for each".into()
                }
            };
            crate::stderr!(
                "warning: {}: LoRAs the image names are not loaded ({}); {hint}",
                self.png.display(),
                missing.join(", ")
            );
        }
        Ok(out)
    }

    /// An init image or mask the image names: as given, else beside the PNG. Its pixels'
    /// hash is checked once it is read.
    pub fn image(&self, r: &ImageRef, what: &str, flag: &str) -> Result<PathBuf> {
        let given = Path::new(&r.path);
        if given.exists() || r.path == "-" {
            return Ok(given.to_path_buf());
        }
        if let Some(name) = given.file_name() {
            let beside = self.png.parent().unwrap_or(Path::new(".")).join(name);
            if beside.is_file() {
                return Ok(beside);
            }
        }
        bail!(
            "{}: its {what} {:?} is neither here nor beside it; give {flag} PATH",
            self.png.display(),
            r.path
        )
    }
}

/// What is looked for: which folders can be one.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Model,
    Unet,
    Vae,
    Lora,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Unet => "UNet",
            Kind::Vae => "VAE",
            Kind::Lora => "LoRA",
        }
    }

    /// A folder that can be this: a diffusers pipeline for a model, a component folder
    /// (`config.json`) for a UNet or VAE; a LoRA is a file.
    fn folder(self, dir: &Path) -> bool {
        match self {
            Kind::Model => crate::checkpoint::diffusers::is_model_folder(dir),
            Kind::Unet | Kind::Vae => dir.join("config.json").is_file(),
            Kind::Lora => false,
        }
    }
}

/// A candidate file's or component folder's hash is `hash`'s (see
/// [`crate::hashes::weights_file`]).
fn hash_matches(hash: &Hash, candidate: &Path) -> bool {
    crate::hashes::weights_file(candidate).is_some_and(|f| hash.matches(&f))
}

/// The file or folder in `dir` (or below) that can be a `kind` called `name` (its file name
/// or stem; an older image's path by its last part) — of several, the one whose hash is
/// `hash`'s — else the file whose hash is `hash`'s.
fn find(dir: &Path, name: &str, hash: &Hash, kind: Kind) -> Result<Option<PathBuf>> {
    let all = candidates(dir, DEPTH, kind)
        .with_context(|| format!("{}: cannot list it", dir.display()))?;
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    let by_name: Vec<&PathBuf> = all
        .iter()
        .filter(|f| {
            f.file_name().is_some_and(|n| n.to_string_lossy() == base)
                || f.is_file() && f.file_stem().is_some_and(|s| s.to_string_lossy() == base)
        })
        .collect();
    if by_name.len() > 1
        && let Some(f) = by_name.iter().find(|f| hash_matches(hash, f))
    {
        return Ok(Some((*f).clone()));
    }
    if let Some(f) = by_name.first() {
        return Ok(Some((*f).clone()));
    }
    let Some(want) = hash.want().filter(|_| !all.is_empty()) else {
        return Ok(None);
    };
    // Hashing reads every file once (cached by size and modification time after that).
    crate::stderr!(
        "note: no {} named {base:?} in {}; looking for hash {want} among {} file(s) there",
        kind.what(),
        dir.display(),
        all.len()
    );
    Ok(all.iter().find(|f| hash_matches(hash, f)).cloned())
}

/// The `.safetensors` files and the folders that can be a `kind` in `dir` and below to
/// `depth`, sorted.
fn candidates(dir: &Path, depth: usize, kind: Kind) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            if kind.folder(&p) {
                out.push(p.clone());
            }
            if depth > 0 {
                out.extend(candidates(&p, depth - 1, kind).unwrap_or_default());
            }
        } else if p.is_file()
            && p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}
