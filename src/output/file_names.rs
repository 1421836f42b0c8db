//! Output file names from templates like `{index:05}-{seed}.png`, kept inside the output
//! directory whatever a template or a prompt file's `name` field says.

use anyhow::{Result, bail};
use std::path::{Component, Path, PathBuf};

pub const DEFAULT_TEMPLATE: &str = "{index:05}-{seed}.png";
const FIELDS: [&str; 6] = ["index", "seed", "prompt", "line", "steps", "preset"];

/// Values a template can use.
pub struct NameFields<'a> {
    pub index: u64,
    pub seed: u64,
    pub prompt: &'a str,
    pub line: usize,
    pub steps: usize,
    pub preset: &'a str,
}

/// Check a template's syntax and fields up front.
pub fn check_template(t: &str) -> Result<()> {
    render_with(t, &mut |field, _| {
        if FIELDS.contains(&field) {
            Ok(String::new())
        } else {
            bail!("unknown field {{{field}}} (known: {})", FIELDS.join(", "))
        }
    })
    .map(|_| ())
}

/// Render a template: `{field}`, `{field:N}` (pad with spaces) or `{field:0N}` (zeros).
pub fn render(t: &str, f: &NameFields) -> Result<String> {
    render_with(t, &mut |field, spec| {
        let value = match field {
            "index" => f.index.to_string(),
            "seed" => f.seed.to_string(),
            "prompt" => slug(f.prompt),
            "line" => f.line.to_string(),
            "steps" => f.steps.to_string(),
            "preset" => f.preset.to_string(),
            other => bail!("unknown field {{{other}}}"),
        };
        Ok(pad(&value, spec))
    })
}

fn pad(v: &str, spec: &str) -> String {
    let (zero, width) = match spec.strip_prefix('0') {
        Some(w) => (true, w),
        None => (false, spec),
    };
    let width: usize = width.parse().unwrap_or(0).min(64);
    if v.len() >= width {
        v.to_string()
    } else if zero {
        format!("{}{v}", "0".repeat(width - v.len()))
    } else {
        format!("{}{v}", " ".repeat(width - v.len()))
    }
}

fn render_with(t: &str, value: &mut dyn FnMut(&str, &str) -> Result<String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            bail!("name template {t:?}: unclosed {{")
        };
        let inner = &after[..close];
        let (field, spec) = inner.split_once(':').unwrap_or((inner, ""));
        if !spec.is_empty() && !spec.chars().all(|c| c.is_ascii_digit()) {
            bail!("name template {t:?}: bad format {{{inner}}}");
        }
        out.push_str(&value(field, spec)?);
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        bail!("name template {t:?}: stray }}");
    }
    out.push_str(rest);
    Ok(out)
}

/// A file-name-safe slug of a prompt: lowercase letters and digits, `-` between words, at
/// most 48 characters.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(|c| c.to_lowercase()) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 48 {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() { "image".into() } else { out }
}

/// Join a rendered name under `dir`, refusing anything that could escape it: absolute paths,
/// `..`, NUL bytes, empty names, components longer than 255 bytes. Adds `.png` unless the
/// name ends in an image extension dmd2 writes (`.png`, `.jpg`, `.jpeg`, `.webp`).
pub fn safe_join(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        bail!("empty output name");
    }
    if name.contains('\0') {
        bail!("output name {name:?} contains a NUL byte");
    }
    let mut name = name.to_string();
    let lower = name.to_ascii_lowercase();
    if ![".png", ".jpg", ".jpeg", ".webp"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        name.push_str(".png");
    }
    let rel = Path::new(&name);
    let mut out = dir.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(part) => {
                if part.len() > 255 {
                    bail!("output name {name:?} has a component longer than 255 bytes");
                }
                out.push(part);
            }
            Component::CurDir => {}
            _ => bail!("output name {name:?} would leave the output directory"),
        }
    }
    if out == dir {
        bail!("output name {name:?} names no file");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> NameFields<'static> {
        NameFields {
            index: 7,
            seed: 42,
            prompt: "A Red Car, at night!",
            line: 3,
            steps: 4,
            preset: "dmd2-4step",
        }
    }

    #[test]
    fn templates() {
        assert_eq!(render(DEFAULT_TEMPLATE, &fields()).unwrap(), "00007-42.png");
        assert_eq!(
            render("{prompt}_{line}_{steps}_{preset}", &fields()).unwrap(),
            "a-red-car-at-night_3_4_dmd2-4step"
        );
        assert!(check_template("{nope}").is_err());
        assert!(check_template("{index").is_err());
        assert!(check_template("{index:x}").is_err());
        assert!(check_template("{index:05}-{seed}").is_ok());
    }

    #[test]
    fn paths_stay_inside() {
        let d = Path::new("/out");
        assert_eq!(safe_join(d, "a/b").unwrap(), Path::new("/out/a/b.png"));
        assert!(safe_join(d, "../x.png").is_err());
        assert!(safe_join(d, "a/../../x.png").is_err());
        assert!(safe_join(d, "/etc/passwd").is_err());
        assert!(safe_join(d, "a\0b").is_err());
        assert!(safe_join(d, &"x".repeat(300)).is_err());
        assert!(safe_join(d, "").is_err());
    }
}
