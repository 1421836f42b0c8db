//! Prompt sources: `--prompt` flags, and prompt files (plain lines or JSON Lines) read as a
//! stream, so a million-line file is never held in memory.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};

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
    pub num_images: Option<usize>,
    pub name: Option<String>,
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

/// Checks that do not need the model: sizes and counts.
pub fn check_settings(s: &LineSettings, force: bool) -> Result<(), String> {
    if s.prompt.contains('\0') {
        return Err("the prompt contains a NUL byte".into());
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
    if s.num_images == Some(0) {
        return Err("num_images must be at least 1".into());
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
    File { path: PathBuf, format: PromptFormat },
    Stdin { format: PromptFormat },
}

impl PromptSource {
    pub fn name(&self) -> String {
        match self {
            PromptSource::Flags(_) => "--prompt".into(),
            PromptSource::File { path, .. } => path.display().to_string(),
            PromptSource::Stdin { .. } => "<stdin>".into(),
        }
    }

    /// Whether the whole source can be validated before any work (a regular file).
    pub fn checkable(&self) -> bool {
        !matches!(self, PromptSource::Stdin { .. })
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
            PromptSource::File { path, format } => {
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
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(Err(LineError {
                        source: source.clone(),
                        line: line_no,
                        message: format!("read error: {e}"),
                    }));
                }
            }
            let err = |message: String| {
                Some(Err(LineError {
                    source: source.clone(),
                    line: line_no,
                    message,
                }))
            };
            let Ok(text) = std::str::from_utf8(&buf) else {
                return err("not valid UTF-8".into());
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
