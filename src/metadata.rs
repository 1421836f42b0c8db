//! How an image was made: the exact settings (JSON, in a `dmd2` PNG chunk and in `--json`
//! output) and the AUTOMATIC1111 `parameters` text that image browsers and model sites read.

use crate::prompt_syntax::PromptSyntax;
use crate::scheduler::{SamplerKind, SamplerSpec, Spacing};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// An image a generation started from: the path as given and the sha256 of its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub path: String,
    pub weight: f32,
}

/// Everything needed to make an image again, bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSettings {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// How the prompts were read; PNGs of versions before it had plain prompts.
    #[serde(default = "plain")]
    pub prompt_syntax: PromptSyntax,
    pub seed: u64,
    pub sampler: SamplerSpec,
    pub cfg: f64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    #[serde(default)]
    pub unet: Option<String>,
    #[serde(default)]
    pub preset: Option<String>,
    /// The UNet's compute precision ("f32", "bf16", "f16"): bit-exact regeneration needs the
    /// same one (`--dtype`). Informational; absent in PNGs from older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// img2img and inpainting: the image, the mask, the strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<ImageRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<ImageRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
}

fn plain() -> PromptSyntax {
    PromptSyntax::Plain
}

fn display_name(path: &str) -> String {
    Path::new(path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

fn quote(v: &str) -> String {
    if v.contains([',', ':', '"']) {
        format!("\"{}\"", v.replace('"', "'"))
    } else {
        v.to_string()
    }
}

impl ImageSettings {
    /// The A1111 text: prompt, `Negative prompt:` line, then `Key: value` pairs.
    pub fn a1111(&self) -> String {
        let mut s = self.prompt.clone();
        if let Some(n) = &self.negative_prompt {
            s.push_str("\nNegative prompt: ");
            s.push_str(n);
        }
        let sampler = match self.sampler.kind {
            SamplerKind::Dmd2 => "DMD2 (LCM)",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Ddim => "DDIM",
        };
        let steps = self
            .sampler
            .timesteps
            .as_ref()
            .map_or(self.sampler.steps, |t| t.len());
        let mut kv = vec![
            ("Steps", steps.to_string()),
            ("Sampler", sampler.to_string()),
            ("CFG scale", self.cfg.to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model", quote(&display_name(&self.model))),
        ];
        if let Some(t) = &self.sampler.timesteps {
            kv.push((
                "Timesteps",
                quote(
                    &t.iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ));
        }
        if !self.loras.is_empty() {
            let l = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", display_name(&l.path), l.weight))
                .collect::<Vec<_>>();
            kv.push(("LoRAs", format!("\"{}\"", l.join(", "))));
        }
        if let Some(st) = self.strength {
            kv.push(("Denoising strength", st.to_string()));
        }
        if let Some(p) = &self.preset {
            kv.push(("Preset", quote(p)));
        }
        // A1111's own reading is the norm for these texts: only the other one is named.
        if self.prompt_syntax == PromptSyntax::Plain {
            kv.push(("Prompt syntax", "plain".to_string()));
        }
        kv.push(("Version", format!("dmd2 {}", env!("CARGO_PKG_VERSION"))));
        s.push('\n');
        s.push_str(
            &kv.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A parsed A1111 `parameters` text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct A1111 {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub fields: Vec<(String, String)>,
}

impl A1111 {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse A1111 `parameters` text. Never panics on any input.
pub fn parse_a1111(text: &str) -> Result<A1111> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("Steps:"))
    else {
        bail!("no `Steps:` line");
    };
    let mut prompt = Vec::new();
    let mut negative: Option<Vec<&str>> = None;
    for l in &lines[..last] {
        if let Some(n) = l.strip_prefix("Negative prompt:") {
            negative = Some(vec![n.strip_prefix(' ').unwrap_or(n)]);
        } else if let Some(n) = negative.as_mut() {
            n.push(l);
        } else {
            prompt.push(*l);
        }
    }
    let mut fields = Vec::new();
    let s = lines[last];
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else {
            bail!("malformed parameter {rest:?}")
        };
        // Junk before a key (after a quoted value, say) is dropped up to the last comma.
        let raw_key = &rest[..colon];
        let key = raw_key
            .rsplit(',')
            .next()
            .unwrap_or(raw_key)
            .trim()
            .to_string();
        rest = rest[colon + 1..].trim_start();
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let Some(end) = q.find('"') else {
                bail!("unclosed quote after {key}")
            };
            value = q[..end].to_string();
            rest = &q[end + 1..];
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        fields.push((key, value));
    }
    Ok(A1111 {
        prompt: prompt.join("\n"),
        negative_prompt: negative.map(|n| n.join("\n")),
        fields,
    })
}

/// Most text one PNG chunk may inflate to: a zTXt or compressed iTXt chunk of a megabyte can
/// claim gigabytes (a decompression bomb), and no settings text needs more than this.
pub const MAX_PNG_TEXT: usize = 1 << 20;

/// The text chunks of a PNG file, as (keyword, text). Compressed chunks are inflated up to
/// [`MAX_PNG_TEXT`] bytes; a chunk that would inflate past it is an error naming the file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = crate::files::read_bounded(path, crate::files::limits::PNG)?;
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder
        .read_info()
        .map_err(|e| anyhow::anyhow!("{}: not a readable PNG ({e})", path.display()))?;
    let info = reader.info();
    let too_big = |k: &str| {
        anyhow::anyhow!(
            "{}: text chunk {k:?} inflates to more than {MAX_PNG_TEXT} bytes",
            path.display()
        )
    };
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_PNG_TEXT)
            .map_err(|_| too_big(&t.keyword))?;
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_PNG_TEXT)
            .map_err(|_| too_big(&t.keyword))?;
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for (k, text) in &out {
        if text.len() > MAX_PNG_TEXT {
            return Err(too_big(k));
        }
    }
    Ok(out)
}

/// The settings an image was made with: the exact `dmd2` JSON chunk when present, else what
/// the A1111 `parameters` text says (DMD2 sampler defaults for what it lacks).
pub fn settings_from_png(path: &Path) -> Result<ImageSettings> {
    let chunks = read_png_text(path)?;
    if let Some((_, json)) = chunks.iter().find(|(k, _)| k == "dmd2") {
        return serde_json::from_str(json)
            .with_context(|| format!("{}: unreadable dmd2 settings chunk", path.display()));
    }
    let Some((_, text)) = chunks.iter().find(|(k, _)| k == "parameters") else {
        bail!("{}: no generation parameters in this PNG", path.display());
    };
    let p = parse_a1111(text)
        .with_context(|| format!("{}: unreadable parameters chunk", path.display()))?;
    let num = |k: &str| -> Result<Option<f64>> {
        p.get(k)
            .map(|v| {
                v.parse::<f64>()
                    .with_context(|| format!("{}: {k} is not a number", path.display()))
            })
            .transpose()
    };
    let (w, h) = match p.get("Size").and_then(|s| s.split_once('x')) {
        Some((w, h)) => (w.trim().parse().ok(), h.trim().parse().ok()),
        None => (None, None),
    };
    let steps = num("Steps")?.map(|s| s as usize).unwrap_or(4);
    let kind = match p.get("Sampler") {
        Some("Euler") => SamplerKind::Euler,
        Some("Euler a") => SamplerKind::EulerA,
        Some("DDIM") => SamplerKind::Ddim,
        _ => SamplerKind::Dmd2,
    };
    let timesteps = p
        .get("Timesteps")
        .map(|t| {
            t.split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .ok()
        .flatten();
    Ok(ImageSettings {
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        prompt_syntax: match p.get("Prompt syntax") {
            Some("plain") => PromptSyntax::Plain,
            _ => PromptSyntax::A1111,
        },
        seed: num("Seed")?
            .map(|s| s as u64)
            .context("no Seed in the parameters")?,
        sampler: SamplerSpec {
            kind,
            steps,
            timesteps,
            spacing: Spacing::Leading,
        },
        cfg: num("CFG scale")?.unwrap_or(1.0),
        width: w.unwrap_or(1024),
        height: h.unwrap_or(1024),
        model: p.get("Model").unwrap_or("").to_string(),
        loras: Vec::new(),
        unet: None,
        preset: p.get("Preset").map(str::to_string),
        precision: None,
        init_image: None,
        mask: None,
        strength: num("Denoising strength")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ImageSettings {
        ImageSettings {
            prompt: "a cat, sitting".into(),
            negative_prompt: Some("blurry".into()),
            prompt_syntax: PromptSyntax::Plain,
            seed: 42,
            sampler: SamplerSpec::dmd2(vec![999, 749, 499, 249]),
            cfg: 1.5,
            width: 1024,
            height: 768,
            model: "/m/sd_xl_base_1.0.safetensors".into(),
            loras: vec![LoraRef {
                path: "dmd2_lora.safetensors".into(),
                weight: 0.7,
            }],
            unet: None,
            preset: None,
            precision: Some("bf16".into()),
            init_image: None,
            mask: None,
            strength: None,
        }
    }

    #[test]
    fn a1111_round_trip() {
        let s = settings();
        let text = s.a1111();
        assert!(
            text.contains(
                "Steps: 4, Sampler: DMD2 (LCM), CFG scale: 1.5, Seed: 42, Size: 1024x768"
            ),
            "{text}"
        );
        let p = parse_a1111(&text).unwrap();
        assert_eq!(p.prompt, "a cat, sitting");
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(p.get("Seed"), Some("42"));
        assert_eq!(p.get("Model"), Some("sd_xl_base_1.0"));
        assert_eq!(p.get("LoRAs"), Some("dmd2_lora: 0.7"));
        assert_eq!(p.get("Timesteps"), Some("999,749,499,249"));
    }

    #[test]
    fn a1111_from_other_tools() {
        let t = "masterpiece, 1girl\nNegative prompt: bad hands\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: abc, Lora hashes: \"x: 1, y: 2\"";
        let p = parse_a1111(t).unwrap();
        assert_eq!(p.get("Lora hashes"), Some("x: 1, y: 2"));
        assert_eq!(p.get("Sampler"), Some("Euler a"));
        assert!(parse_a1111("no parameters here").is_err());
        assert!(parse_a1111("Steps: \"unclosed").is_err());
        // Found by tests/fuzz.rs: separators without values never become part of a key.
        let p = parse_a1111("Steps: , ,:").unwrap();
        assert!(
            p.fields.iter().all(|(k, _)| !k.contains(',')),
            "{:?}",
            p.fields
        );
    }
}
