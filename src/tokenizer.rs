//! CLIP BPE tokenization as SDXL's two tokenizers do it.
//!
//! Hub repos ship `vocab.json` + `merges.txt` (no `tokenizer.json`), single files ship no
//! tokenizer at all: the CLIP tokenizer definition is compiled in (`assets/clip_tokenizer.json`)
//! and a folder's own vocabulary and merges are swapped into it when present.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use tokenizers::{AddedToken, Tokenizer};

/// CLIP's context length: BOS + 75 tokens + EOS.
pub const MAX_LENGTH: usize = 77;

static CLIP_TOKENIZER_JSON: &str = include_str!("../assets/clip_tokenizer.json");

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// The compiled-in CLIP tokenizer with the given pad token (`<|endoftext|>` for SDXL's
    /// first tokenizer, `!` for the second).
    pub fn builtin(pad_token: &str) -> Result<Self> {
        let json: Value =
            serde_json::from_str(CLIP_TOKENIZER_JSON).context("built-in tokenizer")?;
        Self::from_json(json, pad_token)
    }

    /// A diffusers `tokenizer/` folder: `tokenizer.json`, or `vocab.json` + `merges.txt`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let pad = read_pad_token(dir)?.unwrap_or_else(|| "<|endoftext|>".to_string());
        let tj = dir.join("tokenizer.json");
        if tj.exists() {
            let text = crate::files::read_text(&tj, crate::files::limits::TOKENIZER)?;
            let json: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", tj.display()))?;
            return Self::from_json(json, &pad)
                .with_context(|| format!("{}: unusable tokenizer", tj.display()));
        }
        let (vp, mp) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vp.exists() || !mp.exists() {
            bail!(
                "{}: no tokenizer.json and no vocab.json + merges.txt",
                dir.display()
            );
        }
        let vocab: Value = serde_json::from_str(&crate::files::read_text(
            &vp,
            crate::files::limits::TOKENIZER,
        )?)
        .with_context(|| format!("{}: invalid JSON", vp.display()))?;
        let merges_text = crate::files::read_text(&mp, crate::files::limits::TOKENIZER)?;
        let merges: Vec<Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| Value::String(l.to_string()))
            .collect();
        let mut json: Value =
            serde_json::from_str(CLIP_TOKENIZER_JSON).context("built-in tokenizer")?;
        json["model"]["vocab"] = vocab;
        json["model"]["merges"] = Value::Array(merges);
        Self::from_json(json, &pad)
            .with_context(|| format!("{}: unusable vocab.json/merges.txt", dir.display()))
    }

    fn from_json(mut json: Value, pad_token: &str) -> Result<Self> {
        // Truncation and padding are done here, exactly as transformers does for SDXL.
        json["truncation"] = Value::Null;
        json["padding"] = Value::Null;
        let mut inner = Tokenizer::from_bytes(serde_json::to_vec(&json)?)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .with_context(|| format!("token {t:?} missing from the vocabulary"))
        };
        let bos = id("<|startoftext|>")?;
        let eos = id("<|endoftext|>")?;
        let pad = id(pad_token)?;
        // transformers registers the pad token as a special token: a literal `!` in a prompt
        // is split out as that token (id 0) by SDXL's second tokenizer.
        if pad_token != "<|endoftext|>" {
            inner
                .add_special_tokens([AddedToken::from(pad_token.to_string(), true)])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
        })
    }

    /// `[BOS] + first 75 tokens + [EOS]`, padded to 77 with the pad token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.tokenize(text)?;
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.extend(tokens.iter().take(MAX_LENGTH - 2));
        ids.push(self.eos);
        ids.resize(MAX_LENGTH, self.pad);
        Ok(ids)
    }

    /// The text's tokens without BOS, EOS, padding or truncation.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (`cat</w>` for a word-final piece).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The `pad_token` of `tokenizer_config.json` or `special_tokens_map.json`.
fn read_pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(name);
        if !p.exists() {
            continue;
        }
        let text = crate::files::read_text(&p, crate::files::limits::CONFIG)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", p.display()))?;
        match v.get("pad_token") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}
