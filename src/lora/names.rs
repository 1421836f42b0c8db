//! Resolving LoRA module names against a model.
//!
//! Every weight a LoRA can target is listed from the model's own component maps (diffusers
//! names for every layout), and every spelling a LoRA file may use for it is generated from
//! that name: kohya's underscore-flattened diffusers names (`lora_unet_down_blocks_1_…`) and
//! original LDM names (`lora_unet_input_blocks_4_1_…`, from [`canonical_maps`]),
//! `lora_te1_text_model_…` / `lora_te2_…`, diffusers/PEFT dotted names with `unet.` /
//! `text_encoder.` / `text_encoder_2.` prefixes, with or without `text_model.`, and the old
//! diffusers attention-processor names (`attn1.processor.to_q`, `self_attn.to_q`). A module is
//! then one lookup: nothing is guessed from where the underscores are.

use crate::checkpoint::ModelParts;
use crate::config::sdxl_base;
use crate::keymap::{Component, UNET_PREFIX, canonical_maps};
use crate::weights::ComponentWeights;
use std::collections::HashMap;

/// How a spelling names the module (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Naming {
    /// `lora_unet_` + flattened diffusers name (the DMD2 LoRA, OneTrainer)
    KohyaDiffusers,
    /// `lora_unet_` + flattened LDM name (kohya sd-scripts for SDXL, most community LoRAs)
    KohyaLdm,
    /// `lora_te1_` / `lora_te2_` (the same in both kohya variants)
    KohyaText,
    /// dotted diffusers names (PEFT and older diffusers formats)
    Diffusers,
}

/// A weight a LoRA can change.
#[derive(Debug, Clone)]
pub struct Target {
    pub component: Component,
    /// diffusers name, `….weight`
    pub weight: String,
    pub shape: Vec<usize>,
}

enum Slot {
    One(usize, Naming),
    Ambiguous(Vec<usize>),
}

/// Spelling → target.
pub struct NameTable {
    pub targets: Vec<Target>,
    map: HashMap<String, Slot>,
}

pub enum Lookup<'a> {
    Found(&'a Target, Naming),
    Ambiguous(Vec<&'a Target>),
    Missing,
}

fn flat(s: &str) -> String {
    s.replace('.', "_")
}

/// The targets of one component: weights of 2 or 4 dimensions, with their shapes as the
/// model sees them (after the single-file transform).
fn component_targets(c: Component, w: &ComponentWeights) -> Vec<Target> {
    let shapes = w.files.shapes();
    w.map
        .iter()
        .filter(|(name, _)| name.ends_with(".weight"))
        .filter_map(|(name, m)| {
            let shape = m.transform.apply_to_shape(shapes.get(&m.source)?)?;
            matches!(shape.len(), 2 | 4).then(|| Target {
                component: c,
                weight: name.clone(),
                shape,
            })
        })
        .collect()
}

impl NameTable {
    /// Name table of SDXL base's weights (shapes left empty: for naming only, e.g. "how many
    /// modules have SDXL names").
    pub fn sdxl_base() -> Option<Self> {
        let maps = canonical_maps(
            &sdxl_base::unet(),
            &sdxl_base::text_encoder(),
            &sdxl_base::text_encoder_2(),
            &sdxl_base::vae(),
        )
        .ok()?;
        let mut targets = Vec::new();
        let mut ldm = HashMap::new();
        for c in [
            Component::Unet,
            Component::TextEncoder,
            Component::TextEncoder2,
        ] {
            for (name, m) in maps.get(&c)? {
                if !name.ends_with(".weight") {
                    continue;
                }
                if c == Component::Unet
                    && let Some(l) = m
                        .source
                        .strip_prefix(UNET_PREFIX)
                        .and_then(|s| s.strip_suffix(".weight"))
                {
                    ldm.insert(name.clone(), l.to_string());
                }
                targets.push(Target {
                    component: c,
                    weight: name.clone(),
                    shape: Vec::new(),
                });
            }
        }
        Some(Self::from_targets(targets, &ldm))
    }

    pub fn build(parts: &ModelParts) -> Self {
        let mut targets = Vec::new();
        for (c, w) in [
            (Component::Unet, &parts.unet),
            (Component::TextEncoder, &parts.text_encoder),
            (Component::TextEncoder2, &parts.text_encoder_2),
        ] {
            targets.extend(component_targets(c, w));
        }
        // UNet diffusers name → LDM module name, from the configuration (any layout).
        let ldm: HashMap<String, String> = canonical_maps(
            &parts.unet_config,
            &parts.text_encoder_config,
            &parts.text_encoder_2_config,
            // Only the UNet's names are read; any VAE plans.
            parts.vae_config.kl().unwrap_or(&sdxl_base::vae()),
        )
        .ok()
        .and_then(|mut maps| maps.remove(&Component::Unet))
        .map(|m| {
            m.into_iter()
                .filter_map(|(target, mapped)| {
                    let module = mapped
                        .source
                        .strip_prefix(UNET_PREFIX)?
                        .strip_suffix(".weight")?
                        .to_string();
                    Some((target, module))
                })
                .collect()
        })
        .unwrap_or_default();
        Self::from_targets(targets, &ldm)
    }

    pub fn from_targets(targets: Vec<Target>, unet_ldm: &HashMap<String, String>) -> Self {
        let mut map: HashMap<String, Slot> = HashMap::new();
        for (i, t) in targets.iter().enumerate() {
            let Some(module) = t.weight.strip_suffix(".weight") else {
                continue;
            };
            for (spelling, naming) in spellings(t.component, module, unet_ldm.get(&t.weight)) {
                match map.get_mut(&spelling) {
                    None => {
                        map.insert(spelling, Slot::One(i, naming));
                    }
                    Some(Slot::One(j, _)) if *j == i => {}
                    Some(slot) => {
                        let mut all = match slot {
                            Slot::One(j, _) => vec![*j],
                            Slot::Ambiguous(v) => std::mem::take(v),
                        };
                        if !all.contains(&i) {
                            all.push(i);
                        }
                        *slot = Slot::Ambiguous(all);
                    }
                }
            }
        }
        Self { targets, map }
    }

    pub fn lookup(&self, module: &str) -> Lookup<'_> {
        match self.map.get(module) {
            Some(Slot::One(i, n)) => Lookup::Found(&self.targets[*i], *n),
            Some(Slot::Ambiguous(v)) => {
                Lookup::Ambiguous(v.iter().map(|i| &self.targets[*i]).collect())
            }
            None => Lookup::Missing,
        }
    }

    /// Spellings that name more than one weight (none for SDXL-family models).
    pub fn ambiguous(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .map
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ambiguous(_)))
            .map(|(k, _)| k.as_str())
            .collect();
        v.sort();
        v
    }
}

/// Every accepted spelling of a module (its diffusers name without `.weight`).
fn spellings(c: Component, module: &str, ldm: Option<&String>) -> Vec<(String, Naming)> {
    let mut v = Vec::new();
    match c {
        Component::Unet => {
            v.push((
                format!("lora_unet_{}", flat(module)),
                Naming::KohyaDiffusers,
            ));
            if let Some(l) = ldm {
                v.push((format!("lora_unet_{}", flat(l)), Naming::KohyaLdm));
            }
            for prefix in ["unet.", ""] {
                v.push((format!("{prefix}{module}"), Naming::Diffusers));
                if let Some(old) = old_attention_name(module, ".processor") {
                    v.push((format!("{prefix}{old}"), Naming::Diffusers));
                }
            }
        }
        Component::TextEncoder | Component::TextEncoder2 => {
            let (kohya, prefix) = if c == Component::TextEncoder {
                ("lora_te1_", "text_encoder.")
            } else {
                ("lora_te2_", "text_encoder_2.")
            };
            if module.starts_with("text_projection") {
                v.push((format!("{kohya}{}", flat(module)), Naming::KohyaText));
            } else {
                v.push((
                    format!("{kohya}text_model_{}", flat(module)),
                    Naming::KohyaText,
                ));
            }
            for inner in ["", "text_model."] {
                v.push((format!("{prefix}{inner}{module}"), Naming::Diffusers));
                if let Some(old) = old_attention_name(module, "") {
                    v.push((format!("{prefix}{inner}{old}"), Naming::Diffusers));
                }
            }
        }
        Component::Vae => {}
    }
    v
}

/// Old diffusers attention-processor LoRA names: `attn1.to_q` → `attn1.processor.to_q`,
/// `attn1.to_out.0` → `attn1.processor.to_out`; text encoders: `self_attn.q_proj` →
/// `self_attn.to_q`, `out_proj` → `to_out`.
fn old_attention_name(module: &str, processor: &str) -> Option<String> {
    let (head, last) = module.rsplit_once('.')?;
    if processor.is_empty() {
        let new = match last {
            "q_proj" => "to_q",
            "k_proj" => "to_k",
            "v_proj" => "to_v",
            "out_proj" => "to_out",
            _ => return None,
        };
        return head.ends_with("self_attn").then(|| format!("{head}.{new}"));
    }
    let (attn, proj) = match module.strip_suffix(".to_out.0") {
        Some(h) => (h, "to_out"),
        None if matches!(last, "to_q" | "to_k" | "to_v") => (head, last),
        None => return None,
    };
    let attn_name = attn.rsplit('.').next()?;
    attn_name
        .starts_with("attn")
        .then(|| format!("{attn}{processor}.{proj}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_names() {
        assert_eq!(
            old_attention_name("a.attn1.to_q", ".processor").as_deref(),
            Some("a.attn1.processor.to_q")
        );
        assert_eq!(
            old_attention_name("a.attn2.to_out.0", ".processor").as_deref(),
            Some("a.attn2.processor.to_out")
        );
        assert_eq!(old_attention_name("a.attn2.to_q.0", ".processor"), None);
        assert_eq!(old_attention_name("a.proj_in", ".processor"), None);
        assert_eq!(
            old_attention_name("encoder.layers.0.self_attn.out_proj", "").as_deref(),
            Some("encoder.layers.0.self_attn.to_out")
        );
        assert_eq!(old_attention_name("encoder.layers.0.mlp.fc1", ""), None);
    }

    /// Every spelling of SDXL base's weights names exactly one weight.
    #[test]
    fn sdxl_base_has_no_ambiguous_spellings() {
        let table = NameTable::sdxl_base().expect("canonical maps");
        let n = table.targets.len();
        assert!(n > 1000, "{n} targets");
        assert_eq!(table.ambiguous(), Vec::<&str>::new());
        match table.lookup("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") {
            Lookup::Found(t, Naming::KohyaLdm) => assert_eq!(
                t.weight,
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
            ),
            _ => panic!("LDM name not found"),
        }
        match table.lookup("lora_unet_output_blocks_2_2_conv") {
            Lookup::Found(t, _) => assert_eq!(t.weight, "up_blocks.0.upsamplers.0.conv.weight"),
            _ => panic!("upsampler not found"),
        }
        match table.lookup("lora_te2_text_model_encoder_layers_31_mlp_fc2") {
            Lookup::Found(t, _) => {
                assert_eq!(t.component, Component::TextEncoder2);
                assert_eq!(t.weight, "encoder.layers.31.mlp.fc2.weight");
            }
            _ => panic!("te2 name not found"),
        }
    }
}
