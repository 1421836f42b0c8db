//! LoRAs merged into the model weights at load time.
//!
//! [`apply_loras`] reads each LoRA file's header, resolves every adapter module against the
//! model's own weight names (see [`names`]), checks every module's factor shapes against its
//! weight, and only when all files pass attaches one [`Patch`] per module to the model's
//! [`ComponentWeights`]. The update ΔW is computed later, in f32, one weight at a time, as the
//! pipeline loads that weight (`W += weight · scale · ΔW`, then the cast to the compute dtype):
//! no second copy of the UNet is ever held, and sampling pays nothing.
//!
//! Formats, detected from the keys (several may be mixed in one file):
//! - kohya: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with the
//!   module named after diffusers' modules (the DMD2 LoRA) or the original LDM ones
//!   (`input_blocks_4_1_…`, most community SDXL LoRAs), `lora_te1_` / `lora_te2_` for the
//!   text encoders;
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, the older
//!   `.lora.down.weight` / `.lora.up.weight` and attention-processor spellings,
//!   `text_encoder.` / `text_encoder_2.` with or without `text_model.`; alpha from `.alpha`
//!   keys, else from diffusers' `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`,
//!   `use_rslora`), else alpha = rank;
//! - LyCORIS: LoCon (with `lora_mid` Tucker cores), LoHa (`hada_*`), LoKr (`lokr_*`), full
//!   `.diff`; see [`delta`] for the maths and alpha rules. DoRA (`dora_scale`), OFT, BOFT,
//!   GLoRA and (IA)³ files are rejected by name.

mod delta;
mod describe;
mod file;
mod names;

pub use describe::describe_file;
pub use file::{Adapter, LoraFile, Module, Spelling};
pub use names::{Lookup, NameTable, Naming, Target};

use crate::checkpoint::ModelParts;
use crate::keymap::Component;
use crate::weights::{ComponentWeights, MergeScratch, Patch};
use anyhow::{Result, anyhow, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// `PATH[:WEIGHT]` from the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f32,
}

impl FromStr for LoraSpec {
    type Err = String;

    /// The weight follows the last `:` when that part parses as a number; otherwise the
    /// whole argument is the path (weight 1.0). Negative weights and weights above 1 are
    /// allowed.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (path, weight) = match s.rsplit_once(':') {
            Some((p, w)) if w.trim().parse::<f32>().is_ok() => {
                let v = w.trim().parse::<f32>().map_err(|e| e.to_string())?;
                if !v.is_finite() {
                    return Err(format!("LoRA weight {w:?} is not a finite number"));
                }
                (p, v)
            }
            Some((p, "")) => {
                return Err(format!(
                    "{s:?}: nothing after ':' (use PATH or PATH:WEIGHT, e.g. {p}:0.8)"
                ));
            }
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err(format!("{s:?}: no LoRA path"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.weight)
    }
}

/// What merging one LoRA did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub file: PathBuf,
    pub weight: f32,
    /// e.g. "kohya LoRA, diffusers module names", "LyCORIS LoHa, LDM module names"
    pub format: String,
    /// Modules merged into a model weight.
    pub matched: usize,
    /// Adapter modules in the file.
    pub total: usize,
    /// Modules with no weight of that name in this model (file spelling).
    pub unmatched: Vec<String>,
    /// Keys that are no adapter factor dmd2 knows (left alone).
    pub ignored_keys: Vec<String>,
    /// Modules merged per model part.
    pub parts: Vec<(Component, usize)>,
}

/// Short names of the model parts for one-line reports.
pub fn component_label(c: Component) -> &'static str {
    match c {
        Component::Unet => "UNet",
        Component::TextEncoder => "CLIP-L",
        Component::TextEncoder2 => "bigG",
        Component::Vae => "VAE",
    }
}

impl fmt::Display for MergeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(c, n)| format!("{} {n}", component_label(*c)))
            .collect();
        write!(
            f,
            "LoRA {} ×{}: {}, {}/{} modules merged ({})",
            self.file.display(),
            self.weight,
            self.format,
            self.matched,
            self.total,
            parts.join(", ")
        )?;
        if !self.unmatched.is_empty() {
            write!(f, ", {} not in this model", self.unmatched.len())?;
        }
        if !self.ignored_keys.is_empty() {
            write!(f, ", {} unknown keys ignored", self.ignored_keys.len())?;
        }
        Ok(())
    }
}

impl MergeReport {
    /// The names behind the counts, one per line (for `--verbose`).
    pub fn details(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .unmatched
            .iter()
            .map(|m| format!("  not in this model: {m}"))
            .collect();
        v.extend(
            self.ignored_keys
                .iter()
                .map(|k| format!("  ignored key: {k}")),
        );
        v
    }
}

/// One module's planned patch.
struct Planned {
    component: Component,
    weight: String,
    patch: Patch,
}

/// Merge LoRAs into the model at load time: validate every file completely first, then
/// attach the patches. Errors name the file. The components must not be shared yet (apply
/// LoRAs before `Pipeline::load`).
pub fn apply_loras(parts: &mut ModelParts, specs: &[LoraSpec]) -> Result<Vec<MergeReport>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    for (c, w) in components(parts) {
        if Arc::strong_count(w) != 1 || Arc::weak_count(w) != 0 {
            bail!(
                "{}: the {} weights are already in use (LoRAs must be applied before the model is loaded)",
                parts.name,
                component_label(c)
            );
        }
    }
    let table = NameTable::build(parts);
    let mut planned = Vec::new();
    let mut reports = Vec::new();
    for spec in specs {
        let (report, patches) = plan(&table, spec)?;
        reports.push(report);
        planned.extend(patches);
    }
    // One set of merge buffers for the whole load, dropped with the weights.
    let scratch = Arc::new(std::sync::Mutex::new(MergeScratch::default()));
    for p in planned {
        let w = match p.component {
            Component::Unet => &mut parts.unet,
            Component::TextEncoder => &mut parts.text_encoder,
            Component::TextEncoder2 => &mut parts.text_encoder_2,
            Component::Vae => &mut parts.vae,
        };
        let w = Arc::get_mut(w)
            .ok_or_else(|| anyhow!("{}: the model weights are shared", parts.name))?;
        w.merge_scratch = scratch.clone();
        w.patches.entry(p.weight).or_default().push(p.patch);
    }
    Ok(reports)
}

fn components(parts: &ModelParts) -> [(Component, &Arc<ComponentWeights>); 4] {
    [
        (Component::Unet, &parts.unet),
        (Component::TextEncoder, &parts.text_encoder),
        (Component::TextEncoder2, &parts.text_encoder_2),
        (Component::Vae, &parts.vae),
    ]
}

/// The PEFT component prefix (a diffusers folder name) of a dotted module name.
fn peft_component(module: &str) -> Option<&'static str> {
    Component::ALL
        .into_iter()
        .map(Component::folder)
        .find(|p| module.strip_prefix(p).is_some_and(|r| r.starts_with('.')))
}

/// alpha (and rsLoRA) from diffusers' `lora_adapter_metadata` for a PEFT-style module.
fn metadata_alpha(file: &LoraFile, module: &str) -> (Option<f32>, bool) {
    let Some(meta) = &file.peft_metadata else {
        return (None, false);
    };
    let Some(comp) = peft_component(module) else {
        return (None, false);
    };
    let inner = &module[comp.len() + 1..];
    let get = |k: &str| meta.get(&format!("{comp}.{k}"));
    let rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    let pattern = get("alpha_pattern")
        .and_then(|v| v.as_object())
        .and_then(|pats| {
            pats.iter()
                .filter(|(k, _)| inner == k.as_str() || inner.ends_with(&format!(".{k}")))
                .max_by_key(|(k, _)| k.len())
                .and_then(|(_, v)| v.as_f64())
        });
    let alpha = pattern.or_else(|| get("lora_alpha").and_then(|v| v.as_f64()));
    (alpha.map(|a| a as f32).filter(|a| a.is_finite()), rslora)
}

fn plan(table: &NameTable, spec: &LoraSpec) -> Result<(MergeReport, Vec<Planned>)> {
    let file = LoraFile::open(&spec.path)?;
    let path = spec.path.display();
    if file.modules.is_empty() {
        let example: Vec<&str> = file.ignored.iter().take(3).map(String::as_str).collect();
        let looks_like = if file
            .shapes
            .keys()
            .any(|k| k.starts_with("model.diffusion_model.") || k.starts_with("conditioner."))
        {
            " (it looks like a model checkpoint)"
        } else {
            ""
        };
        bail!(
            "{path}: not a LoRA: no adapter keys (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*){looks_like}; its keys look like {}",
            example.join(", ")
        );
    }
    let files = file.files.clone();
    let mut unmatched = Vec::new();
    let mut planned: Vec<Planned> = Vec::new();
    let mut seen: HashMap<(Component, String), String> = HashMap::new();
    let mut spellings = BTreeSet::new();
    let mut algorithms = BTreeSet::new();
    let mut namings = BTreeSet::new();
    let mut per_part: BTreeMap<Component, usize> = BTreeMap::new();
    for m in &file.modules {
        spellings.insert(m.spelling);
        algorithms.insert(m.adapter.algorithm());
        let target = match table.lookup(&m.name) {
            Lookup::Found(t, naming) => {
                namings.insert(naming);
                t
            }
            Lookup::Ambiguous(ts) => {
                let names: Vec<String> = ts
                    .iter()
                    .map(|t| format!("{} {}", component_label(t.component), t.weight))
                    .collect();
                bail!(
                    "{path}: module {} could mean any of {}",
                    m.name,
                    names.join(", ")
                );
            }
            Lookup::Missing => {
                unmatched.push(m.name.clone());
                continue;
            }
        };
        let shape = delta::delta_shape(&file, &m.adapter)
            .map_err(|why| anyhow!("{path}: module {}: {why}", m.name))?;
        if !delta::fits(&shape, &target.shape) {
            bail!(
                "{path}: {} gives a {} update, but {} weight {} has shape {:?} (a LoRA for another model?)",
                m.adapter.main_key(),
                delta::describe_shape(&shape),
                component_label(target.component),
                target.weight,
                target.shape
            );
        }
        if let Some(other) = seen.insert((target.component, target.weight.clone()), m.name.clone())
        {
            bail!(
                "{path}: modules {other} and {} both change {} weight {}",
                m.name,
                component_label(target.component),
                target.weight
            );
        }
        let (alpha, rslora) = match m.alpha {
            Some(a) => (Some(a), false),
            None if matches!(
                m.spelling,
                Spelling::Peft | Spelling::LoraDot | Spelling::OldDiffusers
            ) =>
            {
                metadata_alpha(&file, &m.name)
            }
            None => (None, false),
        };
        let scale = delta::adapter_scale(&file, &m.adapter, alpha, rslora);
        *per_part.entry(target.component).or_default() += 1;
        if spec.weight != 0.0 {
            planned.push(Planned {
                component: target.component,
                weight: target.weight.clone(),
                patch: Patch {
                    delta: Arc::new(delta::AdapterDelta {
                        files: files.clone(),
                        adapter: m.adapter.clone(),
                        scale,
                    }),
                    multiplier: spec.weight,
                    file: spec.path.clone(),
                },
            });
        }
    }
    let total = file.modules.len();
    let matched = per_part.values().sum::<usize>();
    if matched == 0 {
        let example: Vec<&str> = unmatched.iter().take(2).map(String::as_str).collect();
        bail!(
            "{path}: this LoRA does not fit this model: 0 of {total} modules matched; is it for SDXL? (its modules are named like {})",
            example.join(", ")
        );
    }
    let report = MergeReport {
        file: spec.path.clone(),
        weight: spec.weight,
        format: format_name(&spellings, &algorithms, &namings),
        matched,
        total,
        unmatched,
        ignored_keys: file.ignored.clone(),
        parts: per_part.into_iter().collect(),
    };
    Ok((report, planned))
}

/// "kohya LoRA, diffusers module names", "PEFT LoRA (lora_A/lora_B)", "LyCORIS LoHa, LDM
/// module names", …
pub(crate) fn format_name(
    spellings: &BTreeSet<Spelling>,
    algorithms: &BTreeSet<&str>,
    namings: &BTreeSet<Naming>,
) -> String {
    let lycoris = spellings
        .iter()
        .any(|s| matches!(s, Spelling::Loha | Spelling::Lokr | Spelling::Diff))
        || algorithms.contains("LoCon");
    let family: Vec<&str> = spellings
        .iter()
        .filter_map(|s| match s {
            Spelling::Peft => Some("PEFT"),
            Spelling::LoraDot => Some("diffusers (lora.down/lora.up)"),
            Spelling::OldDiffusers => Some("diffusers (attention processors)"),
            Spelling::KohyaLora if !lycoris => Some("kohya"),
            _ => None,
        })
        .collect();
    let mut s = String::new();
    if lycoris {
        s.push_str("LyCORIS ");
    } else if !family.is_empty() {
        s.push_str(&family.join(" + "));
        s.push(' ');
    }
    s.push_str(&algorithms.iter().copied().collect::<Vec<_>>().join(" + "));
    let names: Vec<&str> = namings
        .iter()
        .filter_map(|n| match n {
            Naming::KohyaDiffusers => Some("diffusers module names"),
            Naming::KohyaLdm => Some("LDM module names"),
            _ => None,
        })
        .collect();
    if !names.is_empty() {
        s.push_str(", ");
        s.push_str(&names.join(" + "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let p = |s: &str| s.parse::<LoraSpec>();
        assert_eq!(
            p("a.safetensors").unwrap(),
            LoraSpec {
                path: "a.safetensors".into(),
                weight: 1.0
            }
        );
        assert_eq!(p("a.safetensors:0.7").unwrap().weight, 0.7);
        assert_eq!(p("a.safetensors:-1.5").unwrap().weight, -1.5);
        assert_eq!(p("a.safetensors:2").unwrap().weight, 2.0);
        let w = p("C:\\loras\\x.safetensors").unwrap();
        assert_eq!(w.path, PathBuf::from("C:\\loras\\x.safetensors"));
        assert_eq!(w.weight, 1.0);
        let w = p("dir:with:colons/x.safetensors:0.5").unwrap();
        assert_eq!(w.path, PathBuf::from("dir:with:colons/x.safetensors"));
        assert_eq!(w.weight, 0.5);
        assert!(p("a.safetensors:").is_err());
        assert!(p(":0.5").is_err());
        assert!(p("a.safetensors:nan").is_err());
        assert!(p("a.safetensors:inf").is_err());
    }

    #[test]
    fn peft_prefixes() {
        assert_eq!(peft_component("unet.down_blocks.0"), Some("unet"));
        assert_eq!(peft_component("text_encoder_2.x"), Some("text_encoder_2"));
        assert_eq!(peft_component("text_encoder.x"), Some("text_encoder"));
        assert_eq!(peft_component("unetx.y"), None);
    }
}
