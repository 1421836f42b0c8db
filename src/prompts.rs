//! Prompt sources: `--prompt` flags, and prompt files (plain lines or JSON Lines, from files,
//! FIFOs or stdin) read as a stream, so a million-line file is never held in memory, and
//! line by line with a bound, so a line of gigabytes is never held either.

use crate::prompt_syntax::{PromptSyntax, parse_attention};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Longest prompt or negative prompt, in bytes. CLIP reads 75 tokens per chunk; even prompts
/// split into many chunks stay far below this.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;
/// Longest line of a prompt file, in bytes (a JSON line holds a prompt, a negative prompt and
/// settings, with escapes).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most images one prompt may ask for (`--num-images`, a JSON line's `num_images`).
pub const MAX_IMAGES_PER_PROMPT: u64 = 1 << 32;

/// Per-line settings of a JSON Lines prompt file. Unknown keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineSettings {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub cfg: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: Option<u64>,
    pub name: Option<String>,
    /// `"a1111"` or `"plain"`; the run's `--prompt-syntax` when absent.
    pub prompt_syntax: Option<PromptSyntax>,
    /// img2img / inpainting, paths relative to the prompt file's directory.
    pub init_image: Option<String>,
    pub mask: Option<String>,
    pub strength: Option<f64>,
}

/// One prompt to render, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// 1-based line number in the prompt file (0 for `--prompt`).
    pub line: usize,
    pub settings: LineSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptFormat {
    /// One prompt per line; blank lines and `#` comments skipped.
    Text,
    /// One JSON object per line.
    Jsonl,
}

/// A bad line, reported as `FILE:LINE: problem`.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub source: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.source, self.line, self.message)
    }
}

/// A prompt from any source (flags, files, PNG settings): no NUL byte (it could not go into a
/// PNG text chunk), at most [`MAX_PROMPT_BYTES`].
pub fn check_prompt(what: &str, p: &str) -> Result<(), String> {
    if p.contains('\0') {
        return Err(format!("the {what} contains a NUL byte"));
    }
    if p.len() > MAX_PROMPT_BYTES {
        return Err(format!(
            "the {what} has {} bytes, more than the {MAX_PROMPT_BYTES} a prompt may have",
            p.len()
        ));
    }
    Ok(())
}

/// `--num-images` or a line's `num_images`: 1..=2^32.
/// A prompt A1111's syntax can read (a weight that is not a number cannot be).
pub fn check_syntax(what: &str, p: &str, syntax: PromptSyntax) -> Result<(), String> {
    match syntax {
        PromptSyntax::Plain => Ok(()),
        PromptSyntax::A1111 => parse_attention(p)
            .map(|_| ())
            .map_err(|e| format!("{what}: {e}")),
    }
}

pub fn check_num_images(n: u64) -> Result<(), String> {
    if n == 0 {
        return Err("num_images must be at least 1".into());
    }
    if n > MAX_IMAGES_PER_PROMPT {
        return Err(format!(
            "num_images {n} is more than the {MAX_IMAGES_PER_PROMPT} one prompt may ask for"
        ));
    }
    Ok(())
}

/// Checks that do not need the model: prompts, sizes and counts.
pub fn check_settings(s: &LineSettings, force: bool) -> Result<(), String> {
    check_prompt("prompt", &s.prompt)?;
    if let Some(n) = &s.negative_prompt {
        check_prompt("negative prompt", n)?;
    }
    for (what, v) in [("width", s.width), ("height", s.height)] {
        if let Some(v) = v {
            check_dimension(what, v, force)?;
        }
    }
    if s.steps == Some(0) {
        return Err("steps must be at least 1".into());
    }
    if let Some(c) = s.cfg
        && !c.is_finite()
    {
        return Err("cfg must be a finite number".into());
    }
    if let Some(n) = s.num_images {
        check_num_images(n)?;
    }
    if let Some(t) = &s.name {
        crate::output::file_names::check_template(t).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sizes must be multiples of 8 within 64..=4096 (any multiple of 8 with `--force`).
pub fn check_dimension(what: &str, v: usize, force: bool) -> Result<(), String> {
    if v == 0 || !v.is_multiple_of(8) {
        return Err(format!("{what} {v} is not a positive multiple of 8"));
    }
    if !force && !(64..=4096).contains(&v) {
        return Err(format!(
            "{what} {v} is outside 64..4096 (use --force to go beyond)"
        ));
    }
    Ok(())
}

/// Parse one line of a prompt file; `Ok(None)` for lines to skip.
pub fn parse_line(text: &str, format: PromptFormat) -> Result<Option<LineSettings>, String> {
    let t = text.trim();
    match format {
        PromptFormat::Text => {
            if t.is_empty() || t.starts_with('#') {
                Ok(None)
            } else {
                Ok(Some(LineSettings {
                    prompt: t.to_string(),
                    ..Default::default()
                }))
            }
        }
        PromptFormat::Jsonl => {
            if t.is_empty() {
                return Ok(None);
            }
            let s: LineSettings = serde_json::from_str(t).map_err(|e| {
                let msg = e.to_string();
                // serde_json appends " at line 1 column N", meaningless for one line.
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                format!("invalid JSON line: {msg}")
            })?;
            Ok(Some(s))
        }
    }
}

/// Where prompts come from.
pub enum PromptSource {
    Flags(Vec<String>),
    /// A file by name: a regular file (read twice when checked before any work), or a FIFO,
    /// device or `<(…)` substitution (read once, as a stream).
    File {
        path: PathBuf,
        format: PromptFormat,
        regular: bool,
    },
    Stdin {
        format: PromptFormat,
    },
}

impl PromptSource {
    pub fn name(&self) -> String {
        match self {
            PromptSource::Flags(_) => "--prompt".into(),
            PromptSource::File { path, .. } => path.display().to_string(),
            PromptSource::Stdin { .. } => "<stdin>".into(),
        }
    }

    /// Whether the whole source can be read before any work and again for it (flags, a
    /// regular file).
    pub fn checkable(&self) -> bool {
        match self {
            PromptSource::Flags(_) => true,
            PromptSource::File { regular, .. } => *regular,
            PromptSource::Stdin { .. } => false,
        }
    }

    /// A `--prompt-file` value: `-` is stdin; anything else must exist and not be a directory.
    pub fn file(path: &Path, format: Option<PromptFormat>) -> Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(PromptSource::Stdin {
                format: format.unwrap_or(PromptFormat::Text),
            });
        }
        let m = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("{}: no such prompt file", path.display())
            }
            _ => anyhow::anyhow!("{}: cannot read the prompt file: {e}", path.display()),
        })?;
        if m.is_dir() {
            bail!("{}: is a directory, not a prompt file", path.display());
        }
        Ok(PromptSource::File {
            path: path.to_path_buf(),
            format: detect_format(path, format),
            regular: m.is_file(),
        })
    }

    /// Stream the items: each is a parsed line or a [`LineError`].
    pub fn items(
        &self,
        force: bool,
    ) -> Result<Box<dyn Iterator<Item = Result<PromptItem, LineError>> + '_>> {
        match self {
            PromptSource::Flags(prompts) => Ok(Box::new(prompts.iter().map(|p| {
                Ok(PromptItem {
                    line: 0,
                    settings: LineSettings {
                        prompt: p.clone(),
                        ..Default::default()
                    },
                })
            }))),
            PromptSource::File { path, format, .. } => {
                let f = std::fs::File::open(path)
                    .with_context(|| format!("{}: cannot open", path.display()))?;
                Ok(Box::new(lines(
                    std::io::BufReader::new(f),
                    *format,
                    self.name(),
                    force,
                )))
            }
            PromptSource::Stdin { format } => Ok(Box::new(lines(
                std::io::BufReader::new(std::io::stdin()),
                *format,
                self.name(),
                force,
            ))),
        }
    }
}

fn lines<R: BufRead + 'static>(
    reader: R,
    format: PromptFormat,
    source: String,
    force: bool,
) -> impl Iterator<Item = Result<PromptItem, LineError>> {
    let mut reader = reader;
    let mut line_no = 0usize;
    let mut buf = Vec::new();
    std::iter::from_fn(move || {
        loop {
            buf.clear();
            line_no += 1;
            let whole = match read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES) {
                Ok(None) => return None,
                Ok(Some(whole)) => whole,
                Err(e) => {
                    return Some(Err(LineError {
                        source: source.clone(),
                        line: line_no,
                        message: format!("read error: {e}"),
                    }));
                }
            };
            let err = |message: String| {
                Some(Err(LineError {
                    source: source.clone(),
                    line: line_no,
                    message,
                }))
            };
            if !whole {
                return err(format!(
                    "the line is longer than the {MAX_LINE_BYTES} bytes a line may have"
                ));
            }
            let Ok(text) = std::str::from_utf8(&buf) else {
                return err("not valid UTF-8".into());
            };
            // A UTF-8 byte-order mark (editors on Windows write one) is not part of line 1.
            let text = if line_no == 1 {
                text.strip_prefix('\u{feff}').unwrap_or(text)
            } else {
                text
            };
            match parse_line(text, format) {
                Ok(None) => continue,
                Ok(Some(s)) => {
                    if let Err(m) = check_settings(&s, force) {
                        return err(m);
                    }
                    return Some(Ok(PromptItem {
                        line: line_no,
                        settings: s,
                    }));
                }
                Err(m) => return err(m),
            }
        }
    })
}

/// Reads one line (up to and including `\n`) into `buf`, keeping at most `limit` bytes: the
/// rest of a longer line is read and dropped. `None` at the end; `Some(false)` when the line
/// was cut.
fn read_line_bounded<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<bool>> {
    let mut read_any = false;
    let mut whole = true;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(read_any.then_some(whole));
        }
        read_any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        if take > room {
            whole = false;
        }
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(take);
        if done {
            return Ok(Some(whole));
        }
    }
}

/// The format of a prompt file: `.jsonl` files are JSON Lines unless told otherwise.
pub fn detect_format(path: &Path, explicit: Option<PromptFormat>) -> PromptFormat {
    explicit.unwrap_or_else(|| {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
        {
            PromptFormat::Jsonl
        } else {
            PromptFormat::Text
        }
    })
}

/// Validate a whole checkable source up front; returns every bad line.
pub fn validate_all(src: &PromptSource, force: bool) -> Result<Vec<LineError>> {
    if !src.checkable() {
        bail!("internal error: stdin cannot be checked up front");
    }
    Ok(src.items(force)?.filter_map(|r| r.err()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines() {
        assert_eq!(parse_line("  # comment", PromptFormat::Text), Ok(None));
        assert_eq!(parse_line("   ", PromptFormat::Text), Ok(None));
        assert_eq!(
            parse_line(" a cat \n", PromptFormat::Text)
                .unwrap()
                .unwrap()
                .prompt,
            "a cat"
        );
    }

    #[test]
    fn jsonl_lines() {
        let s = parse_line(
            r#"{"prompt": "x", "seed": 3, "width": 512}"#,
            PromptFormat::Jsonl,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.prompt.as_str(), s.seed, s.width),
            ("x", Some(3), Some(512))
        );
        let e = parse_line(r#"{"prompt": "x", "colour": 3}"#, PromptFormat::Jsonl).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(parse_line("{not json", PromptFormat::Jsonl).is_err());
        assert!(
            parse_line(r#"{"seed": 1}"#, PromptFormat::Jsonl)
                .unwrap_err()
                .contains("prompt")
        );
    }

    #[test]
    fn sizes() {
        assert!(check_dimension("width", 512, false).is_ok());
        assert!(check_dimension("width", 100, false).is_err());
        assert!(check_dimension("width", 8192, false).is_err());
        assert!(check_dimension("width", 8192, true).is_ok());
        assert!(check_dimension("width", 0, true).is_err());
    }

    #[test]
    fn long_lines_and_bom() {
        let long = format!("{}\nnext\n", "x".repeat(MAX_LINE_BYTES + 10));
        let items: Vec<_> = lines(
            std::io::Cursor::new(long.into_bytes()),
            PromptFormat::Text,
            "f".into(),
            false,
        )
        .collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].as_ref().unwrap_err().message.contains("longer"));
        assert_eq!(items[1].as_ref().unwrap().settings.prompt, "next");
        let bom = "\u{feff}{\"prompt\": \"a\"}\n";
        let items: Vec<_> = lines(
            std::io::Cursor::new(bom.as_bytes().to_vec()),
            PromptFormat::Jsonl,
            "f".into(),
            false,
        )
        .collect();
        assert_eq!(items[0].as_ref().unwrap().settings.prompt, "a");
        let big = format!("{{\"prompt\": \"{}\"}}", "y".repeat(MAX_PROMPT_BYTES + 1));
        let e = check_settings(
            &parse_line(&big, PromptFormat::Jsonl).unwrap().unwrap(),
            false,
        );
        assert!(e.unwrap_err().contains("more than"));
        let e = parse_line(
            r#"{"prompt": "a", "num_images": 18446744073709551615}"#,
            PromptFormat::Jsonl,
        )
        .unwrap()
        .unwrap();
        assert!(
            check_settings(&e, false)
                .unwrap_err()
                .contains("num_images")
        );
    }

    #[test]
    fn streamed_with_line_numbers() {
        let data = "# header\n\nfirst\n{bad\nsecond\n";
        let items: Vec<_> = lines(
            std::io::Cursor::new(data.as_bytes().to_vec()),
            PromptFormat::Text,
            "f".into(),
            false,
        )
        .collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().line, 3);
        assert_eq!(items[2].as_ref().unwrap().line, 5);
    }
}
