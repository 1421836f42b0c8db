//! Presets: named settings (model, LoRAs, sampler, steps, CFG, size) in TOML. The ones in
//! `presets/` are compiled in; users add their own in `$XDG_CONFIG_HOME/dmd2/presets/` or
//! pass `--preset FILE.toml`. Explicit flags override a preset's values.

use crate::scheduler::{SamplerKind, Spacing};
use anyhow::{Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The preset used when neither `--model` nor `--preset` is given.
pub const DEFAULT_PRESET: &str = "dmd2-4step";

const BUILTIN: [(&str, &str); 6] = [
    ("dmd2-4step", include_str!("../presets/dmd2-4step.toml")),
    ("dmd2-8step", include_str!("../presets/dmd2-8step.toml")),
    (
        "dmd2-8step-cfg",
        include_str!("../presets/dmd2-8step-cfg.toml"),
    ),
    (
        "dmd2-hyper-4step",
        include_str!("../presets/dmd2-hyper-4step.toml"),
    ),
    ("dmd2-1step", include_str!("../presets/dmd2-1step.toml")),
    ("sdxl-teacher", include_str!("../presets/sdxl-teacher.toml")),
];

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub origin: String,
    pub description: Option<String>,
    pub model: Option<String>,
    /// `PATH_OR_REPO_FILE[:WEIGHT]`, as `--lora` takes them.
    pub loras: Option<Vec<String>>,
    pub unet: Option<String>,
    /// A VAE to decode with (`--vae`: path, repo, `taesdxl`).
    pub vae: Option<String>,
    pub sampler: Option<SamplerKind>,
    pub steps: Option<usize>,
    pub timesteps: Option<Vec<usize>>,
    pub timestep_spacing: Option<Spacing>,
    pub cfg: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub negative_prompt: Option<String>,
    /// `a1111` or `plain` (see `dmd2 gen --prompt-syntax`).
    pub prompt_syntax: Option<crate::prompt_syntax::PromptSyntax>,
}

impl Preset {
    pub fn parse(name: &str, origin: &str, text: &str) -> Result<Self> {
        let mut p: Preset =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {}", e.message()))?;
        p.name = name.to_string();
        p.origin = origin.to_string();
        Ok(p)
    }

    /// `key = value` lines for `dmd2 presets`.
    pub fn describe(&self) -> String {
        let mut lines = vec![format!("{} ({})", self.name, self.origin)];
        if let Some(d) = &self.description {
            lines.push(format!("  {d}"));
        }
        let mut kv = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                lines.push(format!("  {k} = {v}"));
            }
        };
        kv("model", self.model.clone());
        kv(
            "loras",
            self.loras.as_ref().map(|l| {
                if l.is_empty() {
                    "none".into()
                } else {
                    l.join(", ")
                }
            }),
        );
        kv("unet", self.unet.clone());
        kv("vae", self.vae.clone());
        kv("sampler", self.sampler.map(|s| s.name().to_string()));
        kv("steps", self.steps.map(|s| s.to_string()));
        kv(
            "timesteps",
            self.timesteps.as_ref().map(|t| format!("{t:?}")),
        );
        kv(
            "timestep_spacing",
            self.timestep_spacing
                .map(|s| format!("{s:?}").to_lowercase()),
        );
        kv("cfg", self.cfg.map(|c| c.to_string()));
        kv(
            "size",
            self.width.zip(self.height).map(|(w, h)| format!("{w}x{h}")),
        );
        kv("negative_prompt", self.negative_prompt.clone());
        kv(
            "prompt_syntax",
            self.prompt_syntax.map(|s| s.name().to_string()),
        );
        lines.join("\n")
    }
}

/// `$XDG_CONFIG_HOME/dmd2/presets`, or `~/.config/dmd2/presets`.
pub fn user_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("dmd2").join("presets"))
}

/// Every preset: built-in ones, then the user's (which may override a built-in by name).
/// The built-in presets' names (for shell completions).
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(name, _)| *name)
}

pub fn all() -> Result<Vec<Preset>> {
    let mut out: Vec<Preset> = BUILTIN
        .iter()
        .map(|(n, t)| Preset::parse(n, "built-in", t))
        .collect::<Result<Vec<_>>>()?;
    if let Some(dir) = user_dir()
        && let Ok(entries) = std::fs::read_dir(&dir)
    {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for f in files {
            let p = load_file(&f)?;
            out.retain(|q| q.name != p.name);
            out.push(p);
        }
    }
    Ok(out)
}

pub fn load_file(path: &Path) -> Result<Preset> {
    let text = crate::files::read_text(path, crate::files::limits::CONFIG)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Preset::parse(&name, &path.display().to_string(), &text)
}

/// `--preset NAME` (built-in or user) or `--preset FILE.toml`.
pub fn find(spec: &str) -> Result<Preset> {
    let path = Path::new(spec);
    if spec.ends_with(".toml") || path.is_file() {
        if !path.is_file() {
            bail!("{spec}: no such preset file");
        }
        return load_file(path);
    }
    let all = all()?;
    match all.iter().find(|p| p.name == spec) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "unknown preset {spec:?}; known: {}",
            all.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_say_what_they_set() {
        let get = |n: &str| find(n).unwrap();
        let p = get("dmd2-4step");
        assert_eq!(
            (p.steps, p.cfg, p.sampler),
            (Some(4), Some(1.0), Some(SamplerKind::Dmd2))
        );
        assert_eq!(
            p.loras.unwrap(),
            vec!["tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors:1.0"]
        );
        assert_eq!(
            p.model.as_deref(),
            Some("stabilityai/stable-diffusion-xl-base-1.0")
        );
        assert_eq!((p.width, p.height), (Some(1024), Some(1024)));
        let p = get("dmd2-8step");
        assert_eq!((p.steps, p.cfg), (Some(8), Some(1.0)));
        let p = get("dmd2-8step-cfg");
        assert_eq!((p.steps, p.cfg), (Some(8), Some(1.6)));
        assert!(p.loras.unwrap()[0].ends_with(":0.7"));
        let p = get("dmd2-hyper-4step");
        let l = p.loras.unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[1].starts_with("ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors:"));
        assert_eq!(p.steps, Some(4));
        let p = get("dmd2-1step");
        assert_eq!(p.timesteps, Some(vec![399]));
        assert_eq!(
            p.unet.as_deref(),
            Some("tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin")
        );
        assert_eq!(p.loras, Some(vec![]));
        let p = get("sdxl-teacher");
        assert_eq!(
            (p.sampler, p.steps, p.cfg),
            (Some(SamplerKind::Euler), Some(30), Some(7.0))
        );
        assert_eq!(p.loras, Some(vec![]));
    }

    #[test]
    fn unknown_keys_and_names_are_errors() {
        assert!(Preset::parse("x", "t", "stpes = 4").is_err());
        assert!(find("no-such-preset").is_err());
        assert!(Preset::parse("x", "t", "prompt_syntax = \"a1112\"").is_err());
    }

    #[test]
    fn prompt_syntax_is_a_setting() {
        let p = Preset::parse("x", "t", "prompt_syntax = \"plain\"").unwrap();
        assert_eq!(
            p.prompt_syntax,
            Some(crate::prompt_syntax::PromptSyntax::Plain)
        );
        assert!(p.describe().contains("prompt_syntax = plain"));
    }
}
