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
    /// Written as typed (`0.7`, not f32's `0.699999988079071` widened to f64).
    #[serde(serialize_with = "shortest_f32")]
    pub weight: f32,
    /// Civitai's AutoV3 (12 hex digits), when the LoRA is a local file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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
    /// `--vae` as given, and A1111's `VAE hash` (10 hex digits) of its weights file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_hash: Option<String>,
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
    /// The hires fix (the image is its second pass, `scale` times `width`×`height`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<crate::img2img::Hires>,
    /// Inpainting's finish: mask blur radius and paste-back (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<f32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paste_back: bool,
    /// A1111's `Model hash` (10 hex digits) of a single-file checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// The Hub commit a repo-id `model` resolved to (`--from-png` asks for that commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
}

/// An f32 as the shortest decimal that reads back as it (what `--lora x:0.7` said).
fn shortest_f32<S: serde::Serializer>(w: &f32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(w.to_string().parse::<f64>().unwrap_or(f64::from(*w)))
}

fn plain() -> PromptSyntax {
    PromptSyntax::Plain
}

/// How a file goes into an image that may be shared: a local path by its file name (no
/// directories of this machine), a Hub repo id (`ORG/NAME[@REV][/FILE]`) as it is.
/// `--from-png` finds names again (`--model-dir`, `--lora-dir`, beside the PNG).
pub fn shared_name(spec: &str) -> String {
    if let Ok(crate::hub::ModelRef::Repo { .. }) = crate::hub::ModelRef::parse(spec) {
        return spec.to_string();
    }
    let p = Path::new(spec);
    // `.` or `dir/..` have no file name of their own: the folder's is taken.
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(p)
                .ok()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        });
    name.unwrap_or_else(|| spec.to_string())
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
        // LoRAs as A1111 writes them: tags in the prompt (their hashes below).
        for l in &self.loras {
            s.push_str(&format!(" <lora:{}:{}>", display_name(&l.path), l.weight));
        }
        // Always the line, empty when there is none (an empty SDXL negative is none to A1111
        // too: it zeroes it, as diffusers does for `None`).
        s.push_str("\nNegative prompt: ");
        s.push_str(self.negative_prompt.as_deref().unwrap_or(""));
        let sampler = match self.sampler.kind {
            SamplerKind::Dmd2 => "LCM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Ddim => "DDIM",
        };
        let steps = self.sampler.step_count();
        let mut kv = vec![
            ("Steps", steps.to_string()),
            ("Sampler", sampler.to_string()),
            ("CFG scale", self.cfg.to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
        ];
        // DMD2's trailing timesteps are A1111's and Forge's "Simple" schedule (ComfyUI's
        // `simple`): 999, 749, 499, 249 at 4 steps.
        if self.sampler.kind == SamplerKind::Dmd2 {
            kv.insert(2, ("Schedule type", "Simple".to_string()));
        }
        if let Some(h) = &self.model_hash {
            kv.push(("Model hash", h.clone()));
        }
        kv.push(("Model", quote(&display_name(&self.model))));
        if let Some(h) = &self.vae_hash {
            kv.push(("VAE hash", h.clone()));
        }
        if let Some(v) = &self.vae {
            // A1111 names the file; a repo or folder by its last part.
            let name = Path::new(v)
                .file_name()
                .map_or_else(|| v.clone(), |n| n.to_string_lossy().into_owned());
            kv.push(("VAE", quote(&name)));
        }
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
        let hashes: Vec<String> = self
            .loras
            .iter()
            .filter_map(|l| Some(format!("{}: {}", display_name(&l.path), l.hash.as_ref()?)))
            .collect();
        if !hashes.is_empty() {
            kv.push(("Lora hashes", format!("\"{}\"", hashes.join(", "))));
        }
        // The noise is drawn on the CPU, as A1111's "CPU" random source.
        kv.push(("RNG", "CPU".to_string()));
        // A1111 writes one `Denoising strength`: img2img's, else the hires pass's.
        match (self.strength, &self.hires) {
            (Some(st), _) => kv.push(("Denoising strength", st.to_string())),
            (None, Some(h)) => kv.push(("Denoising strength", h.strength.to_string())),
            _ => {}
        }
        if let Some(b) = self.mask_blur {
            kv.push(("Mask blur", b.to_string()));
        }
        if let Some(h) = &self.hires {
            kv.push(("Hires upscale", h.scale.to_string()));
            kv.push(("Hires steps", h.steps.to_string()));
            kv.push(("Hires upscaler", quote(h.upscaler.a1111_name())));
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

/// A1111's `<lora:NAME:WEIGHT>` tags taken out of a prompt: the prompt without them and the
/// (name, weight) of each.
pub fn strip_lora_tags(prompt: &str) -> (String, Vec<(String, String)>) {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(at) = rest.find("<lora:") {
        let Some(end) = rest[at..].find('>') else {
            break;
        };
        let inner = &rest[at + "<lora:".len()..at + end];
        let (n, w) = match inner.rsplit_once(':') {
            Some((n, w)) if w.trim().parse::<f64>().is_ok() => (n, w.trim()),
            _ => (inner, "1"),
        };
        tags.push((n.to_string(), w.to_string()));
        out.push_str(&rest[..at]);
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    // The tags were appended after a space (or stood between words): drop what is left over.
    let out = if tags.is_empty() {
        out
    } else {
        out.trim_end().to_string()
    };
    (out, tags)
}

/// Most text one PNG chunk may inflate to: a zTXt or compressed iTXt chunk of a megabyte can
/// claim gigabytes (a decompression bomb), and no settings text needs more than this.
pub const MAX_PNG_TEXT: usize = 1 << 20;

/// The text chunks of a PNG file, as (keyword, text). Compressed chunks are inflated up to
/// [`MAX_PNG_TEXT`] bytes; a chunk that would inflate past it is an error naming the file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = crate::files::read_bounded(path, crate::files::limits::PNG)?;
    let jpeg = bytes.starts_with(&[0xff, 0xd8, 0xff]);
    let webp = bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP";
    if jpeg || webp {
        return exif_text(path, bytes, jpeg);
    }
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

/// A JPEG's or WebP's A1111 parameters: EXIF UserComment, as `parameters` (A1111 keeps no
/// other text there).
fn exif_text(path: &Path, bytes: Vec<u8>, jpeg: bool) -> Result<Vec<(String, String)>> {
    use image::ImageDecoder;
    let unreadable =
        |e: image::ImageError| anyhow::anyhow!("{}: unreadable image ({e})", path.display());
    let cursor = std::io::Cursor::new(bytes);
    let exif = if jpeg {
        image::codecs::jpeg::JpegDecoder::new(cursor)
            .map_err(unreadable)?
            .exif_metadata()
    } else {
        image::codecs::webp::WebPDecoder::new(cursor)
            .map_err(unreadable)?
            .exif_metadata()
    }
    .map_err(unreadable)?;
    Ok(exif
        .as_deref()
        .and_then(crate::output::read_exif_user_comment)
        .filter(|t| t.len() <= MAX_PNG_TEXT)
        .map(|t| vec![("parameters".to_string(), t)])
        .unwrap_or_default())
}

/// The settings an image was made with: the exact `dmd2` JSON chunk when present (with the
/// edits of its `parameters` text, see [`read_png_settings`]), else what the A1111
/// `parameters` text says (DMD2 sampler defaults for what it lacks).
pub fn settings_from_png(path: &Path) -> Result<ImageSettings> {
    Ok(read_png_settings(path)?.0)
}

/// [`settings_from_png`] and what the user should hear about it, one warning per kind: the
/// keys of an A1111 text that dmd2 cannot apply or does not know, all in one line; and the
/// fields where the `parameters` text differs from the exact `dmd2` chunk. The `dmd2` chunk
/// is used where the two agree; where they differ the text was edited after the image was
/// made, and the text's values are taken.
pub fn read_png_settings(path: &Path) -> Result<(ImageSettings, Vec<String>)> {
    let chunks = read_png_text(path)?;
    let name = path.display();
    let text = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, t)| parse_a1111(t));
    let exact = match chunks.iter().find(|(k, _)| k == "dmd2") {
        Some((_, json)) => Some(
            serde_json::from_str::<ImageSettings>(json)
                .with_context(|| format!("{name}: unreadable dmd2 settings chunk"))?,
        ),
        None => None,
    };
    let mut warnings = Vec::new();
    let settings = match (exact, text) {
        (None, None) => bail!("{name}: no generation parameters in this PNG"),
        (None, Some(p)) => {
            let p = p.with_context(|| format!("{name}: unreadable parameters chunk"))?;
            let (s, notes) = from_text(&p, path)?;
            if !notes.is_empty() {
                warnings.push(format!(
                    "{name}: not applied from its parameters: {}",
                    notes.join("; ")
                ));
            }
            s
        }
        (Some(exact), None) => exact,
        (Some(mut exact), Some(p)) => {
            match p.and_then(|p| {
                let (t, _) = from_text(&p, path)?;
                Ok(merge_edits(&mut exact, &t, &p))
            }) {
                Ok(changed) if changed.is_empty() => {}
                Ok(changed) => warnings.push(format!(
                    "{name}: its parameters text differs from its dmd2 settings in {} (edited?); using the text's {}",
                    changed.join(", "),
                    if changed.len() == 1 { "value" } else { "values" }
                )),
                Err(e) => warnings.push(format!(
                    "{name}: its parameters text cannot be read ({e}); using the dmd2 settings"
                )),
            }
            exact
        }
    };
    Ok((settings, warnings))
}

/// An empty negative prompt is none (A1111 zeroes an empty SDXL negative as diffusers does
/// for `None`).
fn some_text(n: &Option<String>) -> Option<&str> {
    n.as_deref().filter(|s| !s.is_empty())
}

/// Takes into `exact` what the text `t` (parsed from `p`) says differently; returns the
/// names of the fields that differed. Fields the text does not state are left alone.
fn merge_edits(exact: &mut ImageSettings, t: &ImageSettings, p: &A1111) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if t.prompt != exact.prompt {
        changed.push("prompt");
        exact.prompt = t.prompt.clone();
    }
    if some_text(&t.negative_prompt) != some_text(&exact.negative_prompt) {
        changed.push("negative prompt");
        exact.negative_prompt = t.negative_prompt.clone();
    }
    if t.prompt_syntax != exact.prompt_syntax {
        changed.push("prompt syntax");
        exact.prompt_syntax = t.prompt_syntax;
    }
    if p.get("Seed").is_some() && t.seed != exact.seed {
        changed.push("seed");
        exact.seed = t.seed;
    }
    if p.get("Sampler").is_some() && t.sampler.kind != exact.sampler.kind {
        changed.push("sampler");
        exact.sampler.kind = t.sampler.kind;
    }
    if p.get("Steps").is_some() && t.sampler.step_count() != exact.sampler.step_count() {
        changed.push("steps");
        exact.sampler.steps = t.sampler.steps;
        exact.sampler.timesteps = t.sampler.timesteps.clone();
    } else if p.get("Timesteps").is_some() && t.sampler.timesteps != exact.sampler.timesteps {
        changed.push("timesteps");
        exact.sampler.timesteps = t.sampler.timesteps.clone();
    }
    if p.get("CFG scale").is_some() && t.cfg != exact.cfg {
        changed.push("CFG scale");
        exact.cfg = t.cfg;
    }
    if p.get("Size").is_some() && (t.width, t.height) != (exact.width, exact.height) {
        changed.push("size");
        (exact.width, exact.height) = (t.width, t.height);
    }
    if p.get("Model").is_some() && display_name(&t.model) != display_name(&exact.model) {
        changed.push("model");
        exact.model = t.model.clone();
        exact.model_hash = t.model_hash.clone();
        exact.model_revision = None;
    }
    // LoRAs: the tags' names and weights; a LoRA the chunk names keeps its file and hash.
    let named = |l: &LoraRef| (display_name(&l.path), l.weight);
    if t.loras.iter().map(named).ne(exact.loras.iter().map(named)) {
        changed.push("LoRAs");
        exact.loras = t
            .loras
            .iter()
            .map(|l| {
                match exact
                    .loras
                    .iter()
                    .find(|e| display_name(&e.path) == display_name(&l.path))
                {
                    Some(e) => LoraRef {
                        weight: l.weight,
                        ..e.clone()
                    },
                    None => l.clone(),
                }
            })
            .collect();
    }
    // The text's strength, as `from_text` read it: its hires pass's, else img2img's.
    if let Some(st) = p
        .get("Denoising strength")
        .and(t.hires.as_ref().map_or(t.strength, |h| Some(h.strength)))
    {
        match &mut exact.hires {
            Some(h) if h.strength != st => {
                changed.push("denoising strength");
                h.strength = st;
            }
            None if exact.strength != Some(st) => {
                changed.push("denoising strength");
                exact.strength = Some(st);
            }
            _ => {}
        }
    }
    changed
}

/// The keys of A1111's text that dmd2 reads, or knows to carry nothing to apply.
const KNOWN_KEYS: &[&str] = &[
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Timesteps",
    "Lora hashes",
    "RNG",
    "Denoising strength",
    "Mask blur",
    "Hires upscale",
    "Hires steps",
    "Hires upscaler",
    "Preset",
    "Prompt syntax",
    "Clip skip",
    "TI hashes",
    "Emphasis",
    "Version",
];

/// Settings from an A1111 text alone, and a note for each key that is not applied (why) or
/// not known.
fn from_text(p: &A1111, path: &Path) -> Result<(ImageSettings, Vec<String>)> {
    let name = path.display();
    let mut notes = Vec::new();
    let (prompt, tags) = strip_lora_tags(&p.prompt);
    // `<lora:NAME:W>` tags become LoRAs named NAME (not paths: `gen` looks them up, in
    // `--lora-dir` by name or by their `Lora hashes` entry), weights as written.
    let hashes: std::collections::HashMap<&str, &str> = p
        .get("Lora hashes")
        .map(|h| {
            h.split(',')
                .filter_map(|e| e.split_once(':'))
                .map(|(n, h)| (n.trim(), h.trim()))
                .collect()
        })
        .unwrap_or_default();
    let mut loras = Vec::new();
    for (n, w) in &tags {
        match w.parse::<f32>() {
            Ok(weight) if weight.is_finite() => loras.push(LoraRef {
                path: n.clone(),
                weight,
                hash: hashes.get(n.as_str()).map(|h| h.to_string()),
            }),
            _ => notes.push(format!("LoRA tag <lora:{n}:{w}> (no usable weight)")),
        }
    }
    if let Some(v) = p.get("VAE")
        && !matches!(v, "None" | "Automatic")
    {
        notes.push(format!(
            "VAE {v:?} (give --vae PATH|REPO to decode with it)"
        ));
    }
    if let Some(cs) = p.get("Clip skip")
        && cs != "1"
    {
        notes.push(format!(
            "Clip skip {cs} (dmd2 reads SDXL's penultimate layers)"
        ));
    }
    if let Some(r) = p.get("RNG")
        && r != "CPU"
    {
        notes.push(format!(
            "RNG {r:?} (dmd2 draws its noise on the CPU, as A1111's \"CPU\")"
        ));
    }
    if let Some(ti) = p.get("TI hashes") {
        notes.push(format!(
            "TI hashes {ti:?} (give --embedding FILE or --embedding-dir DIR for the embeddings the prompts name)"
        ));
    }
    // A1111's default emphasis is what dmd2's A1111 syntax does.
    if let Some(e) = p.get("Emphasis")
        && e != "Original"
    {
        notes.push(format!(
            "Emphasis {e:?} (dmd2 weights as A1111's \"Original\")"
        ));
    }
    if let Some(b) = p.get("Mask blur") {
        notes.push(format!("Mask blur {b} (give --mask and --mask-blur)"));
    }
    let num = |k: &str| -> Result<Option<f64>> {
        p.get(k)
            .map(|v| {
                v.parse::<f64>()
                    .with_context(|| format!("{name}: {k} is not a number"))
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
        None | Some("LCM") | Some("DMD2 (LCM)") | Some("lcm") => SamplerKind::Dmd2,
        Some(other) => {
            notes.push(format!(
                "Sampler {other:?} (not one dmd2 has; dmd2's own is used, --sampler to choose)"
            ));
            SamplerKind::Dmd2
        }
    };
    if kind == SamplerKind::Dmd2
        && let Some(st) = p.get("Schedule type")
        && !matches!(st, "Simple" | "Automatic" | "simple")
    {
        notes.push(format!(
            "Schedule type {st:?} (DMD2 runs its own timesteps)"
        ));
    }
    // Seeds are whole numbers: read as such (a float would round big ones).
    let seed = match p.get("Seed") {
        None => bail!("{name}: no Seed in the parameters"),
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            anyhow::anyhow!("{name}: Seed {v:?} is not a whole number from 0 to 2^64 - 1")
        })?,
    };
    // A1111's hires fix: `Hires upscale`, `Hires steps` (0: the first pass's), `Hires
    // upscaler`, and `Denoising strength` for its pass.
    let hires = match num("Hires upscale")? {
        None => None,
        Some(scale) => Some(crate::img2img::Hires {
            scale,
            upscaler: match p.get("Hires upscaler") {
                Some("Latent") | Some("Latent (bilinear)") => crate::img2img::HiresUpscaler::Latent,
                Some(u) if u.starts_with("Latent") => crate::img2img::HiresUpscaler::LatentNearest,
                None | Some("Lanczos") => crate::img2img::HiresUpscaler::Lanczos,
                Some(u) => {
                    notes.push(format!("Hires upscaler {u:?} (dmd2 upscales with Lanczos)"));
                    crate::img2img::HiresUpscaler::Lanczos
                }
            },
            strength: num("Denoising strength")?.unwrap_or(crate::img2img::Hires::DEFAULT_STRENGTH),
            steps: match num("Hires steps")? {
                Some(s) if s >= 1.0 => s as usize,
                _ => steps,
            },
        }),
    };
    let strength = match hires {
        Some(_) => None,
        None => num("Denoising strength")?,
    };
    if let Some(st) = strength {
        notes.push(format!(
            "Denoising strength {st} (an img2img setting: it applies with --init-image)"
        ));
    }
    let timesteps = p
        .get("Timesteps")
        .map(|t| {
            t.split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .ok()
        .flatten()
        // An edited `Steps` wins over a stale timestep list.
        .filter(|t| p.get("Steps").is_none() || t.len() == steps);
    let unknown: Vec<&str> = p
        .fields
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !KNOWN_KEYS.contains(k))
        .collect();
    if !unknown.is_empty() {
        notes.push(format!("unknown to dmd2: {}", unknown.join(", ")));
    }
    let settings = ImageSettings {
        prompt,
        negative_prompt: some_text(&p.negative_prompt).map(str::to_string),
        prompt_syntax: match p.get("Prompt syntax") {
            Some("plain") => PromptSyntax::Plain,
            _ => PromptSyntax::A1111,
        },
        seed,
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
        loras,
        unet: None,
        vae: None,
        vae_hash: None,
        preset: p.get("Preset").map(str::to_string),
        precision: None,
        init_image: None,
        mask: None,
        strength,
        hires,
        mask_blur: None,
        paste_back: false,
        model_hash: p.get("Model hash").map(str::to_string),
        model_revision: None,
    };
    Ok((settings, notes))
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
                hash: Some("0123456789ab".into()),
            }],
            unet: None,
            vae: None,
            vae_hash: None,
            preset: None,
            precision: Some("bf16".into()),
            init_image: None,
            mask: None,
            strength: None,
            hires: None,
            mask_blur: None,
            paste_back: false,
            model_hash: Some("31e35c80fc".into()),
            model_revision: None,
        }
    }

    #[test]
    fn a1111_round_trip() {
        let s = settings();
        let text = s.a1111();
        // A1111's own spellings, which Civitai, ComfyUI and sd-parsers read.
        assert!(
            text.contains(
                "Steps: 4, Sampler: LCM, Schedule type: Simple, CFG scale: 1.5, Seed: 42, Size: 1024x768, Model hash: 31e35c80fc, Model: sd_xl_base_1.0"
            ),
            "{text}"
        );
        assert!(
            text.starts_with("a cat, sitting <lora:dmd2_lora:0.7>\n"),
            "{text}"
        );
        let p = parse_a1111(&text).unwrap();
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(p.get("Seed"), Some("42"));
        assert_eq!(p.get("Lora hashes"), Some("dmd2_lora: 0123456789ab"));
        assert_eq!(p.get("RNG"), Some("CPU"));
        assert_eq!(p.get("Timesteps"), Some("999,749,499,249"));
        let (prompt, tags) = strip_lora_tags(&p.prompt);
        assert_eq!(prompt, "a cat, sitting");
        assert_eq!(tags, [("dmd2_lora".to_string(), "0.7".to_string())]);
    }

    /// LoRA weights appear in JSON as typed and read back to the same f32.
    #[test]
    fn lora_weights_as_typed() {
        let s = settings();
        let json = s.to_json();
        assert!(json.contains(r#""weight":0.7"#), "{json}");
        let back: ImageSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back.loras[0].weight, 0.7f32);
    }

    #[test]
    fn lora_tags_come_out_of_prompts() {
        let (p, t) = strip_lora_tags("a <lora:x:0.5> cat <lora:y> <lora:broken");
        assert_eq!(p, "a  cat  <lora:broken");
        assert_eq!(t, [("x".into(), "0.5".into()), ("y".into(), "1".into())]);
        assert_eq!(strip_lora_tags("plain").0, "plain");
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
