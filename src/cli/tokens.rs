//! `dmd2 tokens`: a prompt's CLIP tokens, chunks and weights, as A1111's token counter shows
//! them, without loading a model (every SDXL model uses the same CLIP vocabulary, which is
//! built in).

use crate::embeddings::Embeddings;
use crate::prompt_chunks::{CHUNK_TOKENS, TokenizedPrompt, tokenize_prompt};
use crate::prompt_syntax::PromptSyntax;
use crate::tokenizer::ClipTokenizer;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use std::io::Read;

#[derive(Debug, Args)]
pub struct TokensArgs {
    /// The prompt (`-` or nothing: read it from stdin).
    pub prompt: Option<String>,
    /// A negative prompt, counted the same way.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// How the prompts are read (see `dmd2 gen --prompt-syntax`).
    #[arg(long, value_enum, default_value_t = PromptSyntax::A1111)]
    pub prompt_syntax: PromptSyntax,
    /// Textual-inversion embeddings the prompt may name (see `dmd2 gen --embedding`).
    #[arg(long = "embedding", value_name = "FILE")]
    pub embeddings: Vec<std::path::PathBuf>,
    /// A directory of embeddings.
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<std::path::PathBuf>,
    /// One JSON object: `segments` ([text, weight] as A1111's parse_prompt_attention gives
    /// them), `chunks` (77 ids of the first CLIP tokenizer and 77 weights each), and the same
    /// under `negative_prompt` when one is given.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TokensArgs) -> Result<()> {
    let prompt = match a.prompt.as_deref() {
        None | Some("-") => read_stdin_prompt()?,
        Some(p) => p.to_string(),
    };
    crate::prompts::check_prompt("prompt", &prompt).map_err(bad)?;
    if let Some(n) = &a.negative_prompt {
        crate::prompts::check_prompt("negative prompt", n).map_err(bad)?;
    }
    let tokenizer = ClipTokenizer::builtin("<|endoftext|>")?;
    let embeddings = Embeddings::load(
        &a.embeddings,
        &a.embedding_dir.iter().cloned().collect::<Vec<_>>(),
    )
    .map_err(crate::error::bad_input)?;
    let lookup = embeddings.lookup(&tokenizer)?;
    let lookup = (!embeddings.is_empty()).then_some(&lookup);
    let read = |p: &str| {
        tokenize_prompt(&tokenizer, a.prompt_syntax, p, lookup).map_err(crate::error::bad_input)
    };
    let pos = read(&prompt)?;
    let neg = a.negative_prompt.as_deref().map(read).transpose()?;
    let text = if a.json {
        let mut v = as_json(&tokenizer, &embeddings, &pos);
        v["prompt_syntax"] = json!(a.prompt_syntax.name());
        if let Some(n) = &neg {
            v["negative_prompt"] = as_json(&tokenizer, &embeddings, n);
        }
        format!("{v}\n")
    } else {
        let mut t = describe(&tokenizer, &embeddings, "prompt", &pos);
        if let Some(n) = &neg {
            t += &describe(&tokenizer, &embeddings, "negative prompt", n);
        }
        t
    };
    crate::stdio::write_stdout(text.as_bytes())
}

fn bad(message: String) -> anyhow::Error {
    crate::error::bad_input(anyhow::anyhow!(message))
}

fn read_stdin_prompt() -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return Err(bad(
            "no prompt: give PROMPT, or pipe one in (dmd2 tokens - < prompt.txt)".into(),
        ));
    }
    let limit = crate::prompts::MAX_PROMPT_BYTES as u64 + 1;
    let mut buf = Vec::new();
    std::io::stdin()
        .take(limit)
        .read_to_end(&mut buf)
        .context("stdin: cannot read the prompt")?;
    let text = String::from_utf8(buf).map_err(|_| bad("stdin: the prompt is not UTF-8".into()))?;
    // A prompt piped in ends with the line's newline, which is not part of it.
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

fn embedding_name(embeddings: &Embeddings, i: usize) -> String {
    embeddings
        .get(i)
        .map(|e| e.name.clone())
        .unwrap_or_default()
}

fn as_json(tokenizer: &ClipTokenizer, embeddings: &Embeddings, t: &TokenizedPrompt) -> Value {
    json!({
        "segments": t.segments.iter().map(|s| json!([s.text, s.weight])).collect::<Vec<_>>(),
        "chunks": t.chunks.iter().map(|c| {
            let mut v = json!({
                "ids": c.ids,
                "weights": c.weights,
                "tokens": c.ids.iter().map(|&i| token_text(tokenizer, i)).collect::<Vec<_>>(),
            });
            if !c.embeddings.is_empty() {
                // [position of its first vector in ids, name]
                v["embeddings"] = json!(c.embeddings.iter()
                    .map(|&(p, i)| json!([p, embedding_name(embeddings, i)]))
                    .collect::<Vec<_>>());
            }
            v
        }).collect::<Vec<_>>(),
        "token_count": t.token_count,
        "dropped": t.dropped,
    })
}

fn token_text(tokenizer: &ClipTokenizer, id: u32) -> String {
    tokenizer.id_to_token(id).unwrap_or_default()
}

/// A1111's counter (`12/75`) and, per chunk, its tokens with the weights that are not 1.
fn describe(
    tokenizer: &ClipTokenizer,
    embeddings: &Embeddings,
    what: &str,
    t: &TokenizedPrompt,
) -> String {
    let limit = t.token_count.max(1).div_ceil(CHUNK_TOKENS) * CHUNK_TOKENS;
    let mut s = format!(
        "{what}: {}/{limit} tokens, {} chunk{}\n",
        t.token_count,
        t.chunks.len(),
        if t.chunks.len() == 1 { "" } else { "s" }
    );
    if t.dropped > 0 {
        s += &format!(
            "  {} token{} past the first {CHUNK_TOKENS} are cut off (--prompt-syntax plain)\n",
            t.dropped,
            if t.dropped == 1 { "" } else { "s" }
        );
    }
    let (bos, eos) = (tokenizer.bos_id(), tokenizer.eos_id());
    for (n, c) in t.chunks.iter().enumerate() {
        // An embedding's vectors show as `<name#k>`.
        let mut placed = std::collections::HashMap::new();
        for &(p, i) in &c.embeddings {
            let e = embeddings.get(i);
            for k in 0..e.map_or(0, |e| e.vectors()) {
                placed.insert(
                    p + k,
                    format!("<{}#{}>", embedding_name(embeddings, i), k + 1),
                );
            }
        }
        let words: Vec<String> = c
            .ids
            .iter()
            .enumerate()
            .zip(&c.weights)
            .filter(|&((p, &id), _)| placed.contains_key(&p) || (id != bos && id != eos))
            .map(|((p, &id), &w)| {
                let text = match placed.get(&p) {
                    Some(name) => name.clone(),
                    None => token_text(tokenizer, id).replace("</w>", ""),
                };
                if w == 1.0 {
                    text
                } else {
                    format!("{text}:{}", round3(w))
                }
            })
            .collect();
        s += &format!(
            "  chunk {}: {} token{}: {}\n",
            n + 1,
            words.len(),
            if words.len() == 1 { "" } else { "s" },
            words.join(" ")
        );
    }
    s
}

fn round3(w: f64) -> f64 {
    (w * 1000.0).round() / 1000.0
}
