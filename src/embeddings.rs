//! Textual-inversion embeddings for SDXL, as A1111 and ComfyUI load them: a safetensors file
//! with `clip_l` `[n, 768]` and `clip_g` `[n, 1280]`, named by its file stem. Where a prompt's
//! tokens spell that name, the chunk gets `n` placeholder tokens whose input vectors are the
//! embedding's (A1111's `EmbeddingDatabase.find_embedding_at_position` and
//! `EmbeddingsWithFixes`).

use crate::tokenizer::ClipTokenizer;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most vectors one embedding may have: it must fit in a chunk of 75 tokens.
pub const MAX_VECTORS: usize = 75;

pub struct Embedding {
    /// The file stem: what a prompt writes to use it.
    pub name: String,
    pub path: PathBuf,
    /// `[n, 768]` and `[n, 1280]` (SDXL's widths), f32.
    pub clip_l: Tensor,
    pub clip_g: Tensor,
}

impl Embedding {
    pub fn vectors(&self) -> usize {
        self.clip_l.dim(0).unwrap_or(0)
    }
}

/// The embeddings of a run.
#[derive(Clone, Default)]
pub struct Embeddings {
    list: Vec<Arc<Embedding>>,
}

impl Embeddings {
    /// `files`, then every `.safetensors` in each of `dirs` (sorted by name). Two embeddings
    /// of one name are an error.
    pub fn load(files: &[PathBuf], dirs: &[PathBuf]) -> Result<Self> {
        let mut paths: Vec<PathBuf> = files.to_vec();
        for d in dirs {
            let entries = std::fs::read_dir(d).with_context(|| {
                format!("{}: cannot read the embeddings directory", d.display())
            })?;
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
                })
                .collect();
            found.sort();
            paths.extend(found);
        }
        let mut list: Vec<Arc<Embedding>> = Vec::new();
        for p in paths {
            let e = read(&p)?;
            if let Some(other) = list
                .iter()
                .find(|o| o.name.to_lowercase() == e.name.to_lowercase())
            {
                bail!(
                    "{}: an embedding named {:?} is already loaded from {}",
                    p.display(),
                    e.name,
                    other.path.display()
                );
            }
            list.push(Arc::new(e));
        }
        Ok(Self { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Embedding> {
        self.list.get(i).map(|e| e.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Embedding> {
        self.list.iter().map(|e| e.as_ref())
    }

    /// Refuses embeddings made for other text encoders (SD 1.x: 768 only, other widths).
    pub fn check_widths(&self, l: usize, g: usize) -> Result<()> {
        for e in self.iter() {
            let (el, eg) = (e.clip_l.dim(1)?, e.clip_g.dim(1)?);
            if (el, eg) != (l, g) {
                bail!(
                    "{}: embedding vectors are {el} (clip_l) and {eg} (clip_g) wide; this model's text encoders take {l} and {g}",
                    e.path.display()
                );
            }
        }
        Ok(())
    }

    /// Where prompts name them, in the ids of `tokenizer`.
    pub fn lookup(&self, tokenizer: &ClipTokenizer) -> Result<EmbeddingLookup> {
        let mut by_first: HashMap<u32, Vec<(Vec<u32>, usize)>> = HashMap::new();
        for (i, e) in self.list.iter().enumerate() {
            let ids = tokenizer.tokenize(&e.name)?;
            let Some(&first) = ids.first() else {
                bail!("{}: the embedding's name has no tokens", e.path.display());
            };
            by_first.entry(first).or_default().push((ids, i));
        }
        // Longest names first, as A1111 tries them.
        for v in by_first.values_mut() {
            v.sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));
        }
        Ok(EmbeddingLookup {
            by_first,
            vectors: self.list.iter().map(|e| e.vectors()).collect(),
        })
    }

    /// Names that are one ordinary word of the vocabulary: every use of that word becomes
    /// the embedding.
    pub fn word_clashes(&self, tokenizer: &ClipTokenizer) -> Vec<&str> {
        self.iter()
            .filter(|e| {
                let ids = tokenizer.tokenize(&e.name).unwrap_or_default();
                ids.len() == 1
                    && tokenizer.id_to_token(ids[0]).as_deref()
                        == Some(&format!("{}</w>", e.name.to_lowercase()))
            })
            .map(|e| e.name.as_str())
            .collect()
    }
}

/// Embedding names as token ids of one tokenizer.
pub struct EmbeddingLookup {
    by_first: HashMap<u32, Vec<(Vec<u32>, usize)>>,
    vectors: Vec<usize>,
}

impl EmbeddingLookup {
    /// The embedding whose name's tokens start at `tokens[at]`: its index, its vectors and
    /// how many tokens its name takes.
    pub fn find(&self, tokens: &[u32], at: usize) -> Option<(usize, usize, usize)> {
        let candidates = self.by_first.get(tokens.get(at)?)?;
        candidates
            .iter()
            .find(|(ids, _)| tokens[at..].starts_with(ids))
            .map(|(ids, i)| (*i, self.vectors[*i], ids.len()))
    }
}

fn read(path: &Path) -> Result<Embedding> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
        .with_context(|| format!("{}: no file name to call the embedding by", path.display()))?;
    let file = crate::weights::WeightFiles::open(&[path.to_path_buf()])?;
    let shapes = file.shapes();
    let get = |key: &str| -> Result<Tensor> {
        if !shapes.contains_key(key) {
            let hint =
                if shapes.contains_key("emb_params") || shapes.contains_key("string_to_param.*") {
                    " (an SD 1.x/2.x embedding? SDXL ones hold clip_l and clip_g)"
                } else {
                    ""
                };
            bail!("{}: no {key} tensor{hint}", path.display());
        }
        let t = file
            .load(key)
            .with_context(|| format!("{}: cannot read {key}", path.display()))?
            .to_dtype(DType::F32)?;
        let t = match t.rank() {
            2 => t,
            1 => t.unsqueeze(0)?,
            _ => bail!(
                "{}: {key} has shape {:?}, not [vectors, width]",
                path.display(),
                t.dims()
            ),
        };
        Ok(t)
    };
    let (clip_l, clip_g) = (get("clip_l")?, get("clip_g")?);
    let (nl, ng) = (clip_l.dim(0)?, clip_g.dim(0)?);
    if nl != ng {
        bail!("{}: clip_l has {nl} vectors, clip_g {ng}", path.display());
    }
    if nl == 0 || nl > MAX_VECTORS {
        bail!(
            "{}: {nl} vectors; an embedding has 1 to {MAX_VECTORS}",
            path.display()
        );
    }
    Ok(Embedding {
        name,
        path: path.to_path_buf(),
        clip_l,
        clip_g,
    })
}
