//! Reading a LoRA file: its keys grouped into adapter modules, before any model is involved.
//!
//! A key is `<module><suffix>`; the suffix says which factor it is (`.lora_down.weight`,
//! `.lora_A.weight`, `.hada_w1_a`, `.lokr_w2_b`, `.alpha`, …) and the module part is resolved
//! against the model later ([`super::names`]). Only the safetensors header is read here, plus
//! the 0-dim alpha tensors; a factor is read from the file when its weight is merged.

use crate::weights::WeightFiles;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the factor keys of a module are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Spelling {
    /// `.lora_down.weight` / `.lora_up.weight` (kohya, LyCORIS LoCon)
    KohyaLora,
    /// `.lora_A.weight` / `.lora_B.weight` (PEFT, diffusers ≥ 0.21)
    Peft,
    /// `.lora.down.weight` / `.lora.up.weight` (older diffusers)
    LoraDot,
    /// `<proj>_lora.down.weight` (diffusers attention processors) or
    /// `.lora_linear_layer.down.weight` (old diffusers text encoders)
    OldDiffusers,
    /// LyCORIS `hada_*`
    Loha,
    /// LyCORIS `lokr_*`
    Lokr,
    /// LyCORIS full weight difference `.diff`
    Diff,
}

/// Which factor of an adapter a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Down,
    Up,
    Mid,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    Diff,
    Alpha,
}

enum Suffix {
    Factor(Part, Spelling),
    /// A weight-decomposed (DoRA) magnitude.
    Dora,
    /// An adapter algorithm dmd2 does not merge.
    Unsupported(&'static str),
}

/// Known key suffixes. Matching is by `ends_with`; no suffix is a suffix of another one
/// with a different meaning.
const SUFFIXES: &[(&str, Suffix)] = &[
    (
        ".lora_down.weight",
        Suffix::Factor(Part::Down, Spelling::KohyaLora),
    ),
    (
        ".lora_up.weight",
        Suffix::Factor(Part::Up, Spelling::KohyaLora),
    ),
    (
        ".lora_mid.weight",
        Suffix::Factor(Part::Mid, Spelling::KohyaLora),
    ),
    (".lora_A.weight", Suffix::Factor(Part::Down, Spelling::Peft)),
    (".lora_B.weight", Suffix::Factor(Part::Up, Spelling::Peft)),
    (
        ".lora_A.default.weight",
        Suffix::Factor(Part::Down, Spelling::Peft),
    ),
    (
        ".lora_B.default.weight",
        Suffix::Factor(Part::Up, Spelling::Peft),
    ),
    (
        ".lora.down.weight",
        Suffix::Factor(Part::Down, Spelling::LoraDot),
    ),
    (
        ".lora.up.weight",
        Suffix::Factor(Part::Up, Spelling::LoraDot),
    ),
    (
        "_lora.down.weight",
        Suffix::Factor(Part::Down, Spelling::OldDiffusers),
    ),
    (
        "_lora.up.weight",
        Suffix::Factor(Part::Up, Spelling::OldDiffusers),
    ),
    (
        ".lora_linear_layer.down.weight",
        Suffix::Factor(Part::Down, Spelling::OldDiffusers),
    ),
    (
        ".lora_linear_layer.up.weight",
        Suffix::Factor(Part::Up, Spelling::OldDiffusers),
    ),
    (".hada_w1_a", Suffix::Factor(Part::HadaW1A, Spelling::Loha)),
    (".hada_w1_b", Suffix::Factor(Part::HadaW1B, Spelling::Loha)),
    (".hada_w2_a", Suffix::Factor(Part::HadaW2A, Spelling::Loha)),
    (".hada_w2_b", Suffix::Factor(Part::HadaW2B, Spelling::Loha)),
    (".hada_t1", Suffix::Factor(Part::HadaT1, Spelling::Loha)),
    (".hada_t2", Suffix::Factor(Part::HadaT2, Spelling::Loha)),
    (".lokr_w1", Suffix::Factor(Part::LokrW1, Spelling::Lokr)),
    (".lokr_w1_a", Suffix::Factor(Part::LokrW1A, Spelling::Lokr)),
    (".lokr_w1_b", Suffix::Factor(Part::LokrW1B, Spelling::Lokr)),
    (".lokr_w2", Suffix::Factor(Part::LokrW2, Spelling::Lokr)),
    (".lokr_w2_a", Suffix::Factor(Part::LokrW2A, Spelling::Lokr)),
    (".lokr_w2_b", Suffix::Factor(Part::LokrW2B, Spelling::Lokr)),
    (".lokr_t2", Suffix::Factor(Part::LokrT2, Spelling::Lokr)),
    (".diff", Suffix::Factor(Part::Diff, Spelling::Diff)),
    (".alpha", Suffix::Factor(Part::Alpha, Spelling::KohyaLora)),
    (".dora_scale", Suffix::Dora),
    (".lora_magnitude_vector", Suffix::Dora),
    (".lora_magnitude_vector.weight", Suffix::Dora),
    (".lora_magnitude_vector.default.weight", Suffix::Dora),
    (
        ".lokr_t1",
        Suffix::Unsupported("LoKr with a Tucker-decomposed w1 (lokr_t1)"),
    ),
    (".oft_blocks", Suffix::Unsupported("OFT")),
    (".oft_diag", Suffix::Unsupported("OFT")),
    (".oft_R.weight", Suffix::Unsupported("OFT")),
    (".boft_R", Suffix::Unsupported("BOFT")),
    (".a1.weight", Suffix::Unsupported("GLoRA")),
    (".b1.weight", Suffix::Unsupported("GLoRA")),
    (".on_input", Suffix::Unsupported("(IA)³")),
];

fn classify(key: &str) -> Option<(&str, &'static Suffix)> {
    SUFFIXES.iter().find_map(|(s, kind)| {
        key.strip_suffix(s)
            .filter(|m| !m.is_empty())
            .map(|m| (m, kind))
    })
}

/// The factors of one adapter module, as key names in the file.
#[derive(Debug, Clone)]
pub enum Adapter {
    /// ΔW = up · (mid ∘) down, LoRA / LoCon.
    Lora {
        down: String,
        up: String,
        mid: Option<String>,
    },
    /// ΔW = (w1a · w1b) ⊙ (w2a · w2b), with Tucker cores t1/t2 for convolutions.
    Loha {
        w1a: String,
        w1b: String,
        w2a: String,
        w2b: String,
        t: Option<(String, String)>,
    },
    /// ΔW = w1 ⊗ w2, each factor full or a product of two.
    Lokr {
        w1: Factor,
        w2: Factor,
        t2: Option<String>,
    },
    /// ΔW stored as it is.
    Diff { diff: String },
}

#[derive(Debug, Clone)]
pub enum Factor {
    Full(String),
    Product(String, String),
}

impl Adapter {
    /// The algorithm, for reports.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Adapter::Lora { mid: Some(_), .. } => "LoCon",
            Adapter::Lora { .. } => "LoRA",
            Adapter::Loha { .. } => "LoHa",
            Adapter::Lokr { .. } => "LoKr",
            Adapter::Diff { .. } => "full diff",
        }
    }

    /// The key that best names this module in messages.
    pub fn main_key(&self) -> &str {
        match self {
            Adapter::Lora { down, .. } => down,
            Adapter::Loha { w1a, .. } => w1a,
            Adapter::Lokr {
                w1: Factor::Full(k) | Factor::Product(k, _),
                ..
            } => k,
            Adapter::Diff { diff } => diff,
        }
    }

    /// Every key of the factors.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Adapter::Lora { down, up, mid } => {
                let mut v = vec![down.as_str(), up.as_str()];
                v.extend(mid.as_deref());
                v
            }
            Adapter::Loha {
                w1a,
                w1b,
                w2a,
                w2b,
                t,
            } => {
                let mut v = vec![w1a.as_str(), w1b.as_str(), w2a.as_str(), w2b.as_str()];
                if let Some((t1, t2)) = t {
                    v.push(t1);
                    v.push(t2);
                }
                v
            }
            Adapter::Lokr { w1, w2, t2 } => {
                let mut v = Vec::new();
                for f in [w1, w2] {
                    match f {
                        Factor::Full(k) => v.push(k.as_str()),
                        Factor::Product(a, b) => {
                            v.push(a.as_str());
                            v.push(b.as_str());
                        }
                    }
                }
                v.extend(t2.as_deref());
                v
            }
            Adapter::Diff { diff } => vec![diff.as_str()],
        }
    }
}

/// One adapter module of the file.
#[derive(Debug, Clone)]
pub struct Module {
    /// The module part of the keys, as in the file (`lora_unet_…`, `unet.…`).
    pub name: String,
    pub spelling: Spelling,
    pub adapter: Adapter,
    /// The stored `.alpha`, if any.
    pub alpha: Option<f32>,
}

/// A parsed LoRA file.
pub struct LoraFile {
    pub path: PathBuf,
    pub files: Arc<WeightFiles>,
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub modules: Vec<Module>,
    /// Keys that belong to no adapter dmd2 knows (and alphas without factors).
    pub ignored: Vec<String>,
    /// diffusers' `lora_adapter_metadata` (PEFT LoraConfig per component), if present.
    pub peft_metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl fmt::Debug for LoraFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraFile")
            .field("path", &self.path)
            .field("modules", &self.modules.len())
            .finish()
    }
}

fn is_float(d: Option<safetensors::Dtype>) -> bool {
    matches!(
        d,
        Some(
            safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F32
                | safetensors::Dtype::F64
        )
    )
}

impl LoraFile {
    /// Open and parse a LoRA file. Errors start with the file name.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            bail!(
                "{}: is a directory; a LoRA is one .safetensors file",
                path.display()
            );
        }
        if !path.exists() {
            bail!("{}: no such file", path.display());
        }
        let files = Arc::new(WeightFiles::open(&[path.to_path_buf()])?);
        let shapes = files.shapes();
        let peft_metadata = peft_metadata(&files)?;
        let mut this = Self {
            path: path.to_path_buf(),
            files,
            shapes,
            modules: Vec::new(),
            ignored: Vec::new(),
            peft_metadata,
        };
        this.parse()
            .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Ok(this)
    }

    fn parse(&mut self) -> Result<()> {
        if self.shapes.is_empty() {
            bail!("holds no tensors");
        }
        // module → part → (key, spelling)
        let mut groups: BTreeMap<&str, BTreeMap<Part, (&str, Spelling)>> = BTreeMap::new();
        let mut dora = Vec::new();
        let mut unsupported: BTreeMap<&'static str, &str> = BTreeMap::new();
        let keys: Vec<String> = self.shapes.keys().cloned().collect();
        for key in &keys {
            match classify(key) {
                Some((module, Suffix::Factor(part, spelling))) => {
                    if let Some((other, _)) = groups
                        .entry(module)
                        .or_default()
                        .insert(*part, (key.as_str(), *spelling))
                    {
                        bail!("keys {other} and {key} hold the same factor of module {module}");
                    }
                }
                Some((_, Suffix::Dora)) => dora.push(key.as_str()),
                Some((_, Suffix::Unsupported(what))) => {
                    unsupported.entry(what).or_insert(key.as_str());
                }
                None => self.ignored.push(key.clone()),
            }
        }
        if let Some(first) = dora.first() {
            bail!(
                "DoRA (weight-decomposed LoRA: {} `dora_scale`/`lora_magnitude_vector` keys, e.g. {first}) is not supported; dmd2 merges LoRA, LoCon, LoHa and LoKr",
                dora.len()
            );
        }
        if let Some((what, key)) = unsupported.into_iter().next() {
            bail!(
                "{what} adapters (e.g. {key}) are not supported; dmd2 merges LoRA, LoCon, LoHa and LoKr"
            );
        }
        if let Some(meta) = &self.peft_metadata
            && meta.iter().any(|(k, v)| {
                k.ends_with(".use_dora") && v.as_bool() == Some(true) || k == "use_dora"
            })
        {
            bail!(
                "DoRA (weight-decomposed LoRA, `use_dora` in the adapter metadata) is not supported"
            );
        }
        let mut modules = Vec::new();
        for (name, parts) in groups {
            if let Some(m) = self.module(name, &parts)? {
                modules.push(m);
            }
        }
        self.modules = modules;
        Ok(())
    }

    /// Build one module from its keys; `None` for a lone alpha.
    fn module(
        &mut self,
        name: &str,
        parts: &BTreeMap<Part, (&str, Spelling)>,
    ) -> Result<Option<Module>> {
        let key = |p: Part| parts.get(&p).map(|(k, _)| k.to_string());
        let need = |p: Part, what: &str| {
            key(p).ok_or_else(|| anyhow!("module {name} has {what} but no {}", factor_name(p)))
        };
        let factors: Vec<(&Part, &(&str, Spelling))> =
            parts.iter().filter(|(p, _)| **p != Part::Alpha).collect();
        let Some((_, (_, spelling))) = factors.first() else {
            if let Some(k) = key(Part::Alpha) {
                self.ignored.push(k);
            }
            return Ok(None);
        };
        let spelling = *spelling;
        if let Some((_, (k, s))) = factors.iter().find(|(_, (_, s))| *s != spelling) {
            bail!("module {name} mixes key spellings ({k} is {s:?}, not {spelling:?})");
        }
        let adapter = match spelling {
            Spelling::KohyaLora | Spelling::Peft | Spelling::LoraDot | Spelling::OldDiffusers => {
                Adapter::Lora {
                    down: need(Part::Down, "an up factor")?,
                    up: need(Part::Up, "a down factor")?,
                    mid: key(Part::Mid),
                }
            }
            Spelling::Loha => Adapter::Loha {
                w1a: need(Part::HadaW1A, "LoHa factors")?,
                w1b: need(Part::HadaW1B, "LoHa factors")?,
                w2a: need(Part::HadaW2A, "LoHa factors")?,
                w2b: need(Part::HadaW2B, "LoHa factors")?,
                t: match (key(Part::HadaT1), key(Part::HadaT2)) {
                    (Some(a), Some(b)) => Some((a, b)),
                    (None, None) => None,
                    _ => bail!("module {name} has only one of hada_t1 / hada_t2"),
                },
            },
            Spelling::Lokr => {
                let factor = |full: Part, a: Part, b: Part| -> Result<Factor> {
                    match (key(full), key(a), key(b)) {
                        (Some(f), None, None) => Ok(Factor::Full(f)),
                        (None, Some(a), Some(b)) => Ok(Factor::Product(a, b)),
                        _ => bail!(
                            "module {name} needs either {} or both {} and {}",
                            factor_name(full),
                            factor_name(a),
                            factor_name(b)
                        ),
                    }
                };
                let w1 = factor(Part::LokrW1, Part::LokrW1A, Part::LokrW1B)?;
                let w2 = factor(Part::LokrW2, Part::LokrW2A, Part::LokrW2B)?;
                let t2 = key(Part::LokrT2);
                if t2.is_some() && matches!(w2, Factor::Full(_)) {
                    bail!("module {name} has lokr_t2 with a full lokr_w2");
                }
                Adapter::Lokr { w1, w2, t2 }
            }
            Spelling::Diff => Adapter::Diff {
                diff: need(Part::Diff, "a diff")?,
            },
        };
        for k in adapter.keys() {
            if !is_float(self.files.dtype_of(k)) {
                bail!(
                    "{k} has dtype {:?}; LoRA factors must be floating point",
                    self.files.dtype_of(k)
                );
            }
            let shape = self.shapes.get(k).map(Vec::as_slice).unwrap_or(&[]);
            if shape.contains(&0) {
                bail!("{k} is empty (shape {shape:?})");
            }
        }
        let alpha = match key(Part::Alpha) {
            Some(k) => Some(self.scalar(&k)?),
            None => None,
        };
        Ok(Some(Module {
            name: name.to_string(),
            spelling,
            adapter,
            alpha,
        }))
    }

    /// A one-element float tensor (alpha) as f32.
    fn scalar(&self, key: &str) -> Result<f32> {
        let shape = self.shapes.get(key).cloned().unwrap_or_default();
        if shape.iter().product::<usize>() != 1 || !is_float(self.files.dtype_of(key)) {
            bail!(
                "{key} should be one floating-point number, it has shape {shape:?} and dtype {:?}",
                self.files.dtype_of(key)
            );
        }
        let v = self
            .files
            .load(key)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .with_context(|| format!("cannot read {key}"))?;
        match v.first() {
            Some(a) if a.is_finite() => Ok(*a),
            _ => bail!("{key} is not a finite number"),
        }
    }

    /// The shape of a key (the caller got the key from this file).
    pub fn shape(&self, key: &str) -> &[usize] {
        self.shapes.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn factor_name(p: Part) -> &'static str {
    match p {
        Part::Down => "down (lora_down / lora_A)",
        Part::Up => "up (lora_up / lora_B)",
        Part::Mid => "lora_mid",
        Part::HadaW1A => "hada_w1_a",
        Part::HadaW1B => "hada_w1_b",
        Part::HadaW2A => "hada_w2_a",
        Part::HadaW2B => "hada_w2_b",
        Part::HadaT1 => "hada_t1",
        Part::HadaT2 => "hada_t2",
        Part::LokrW1 => "lokr_w1",
        Part::LokrW1A => "lokr_w1_a",
        Part::LokrW1B => "lokr_w1_b",
        Part::LokrW2 => "lokr_w2",
        Part::LokrW2A => "lokr_w2_a",
        Part::LokrW2B => "lokr_w2_b",
        Part::LokrT2 => "lokr_t2",
        Part::Diff => "diff",
        Part::Alpha => "alpha",
    }
}

/// diffusers' `lora_adapter_metadata` (a JSON string in the safetensors `__metadata__`).
fn peft_metadata(
    files: &WeightFiles,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let Some(raw) = files
        .metadata(0)
        .and_then(|m| m.get("lora_adapter_metadata"))
    else {
        return Ok(None);
    };
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::Object(m)) => Ok(Some(m)),
        _ => bail!(
            "{}: its lora_adapter_metadata is not a JSON object",
            files.describe()
        ),
    }
}
