//! Prompt syntax: AUTOMATIC1111's attention brackets and `BREAK`, or plain text.
//!
//! [`parse_attention`] is a reimplementation of stable-diffusion-webui's
//! `prompt_parser.parse_prompt_attention` (v1.10): the same scan of the same token kinds in
//! the same order, the same float arithmetic, so weights such as `((x))` → 1.2100000000000002
//! come out bit for bit as A1111 computes them.

use serde::{Deserialize, Serialize};

/// How a prompt's text becomes CLIP tokens and weights.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// A1111/Forge: `(x)`, `[x]`, `(x:1.2)`, `BREAK`, chunks of 75 tokens without a limit.
    #[default]
    A1111,
    /// diffusers: the text as it is, cut to 75 tokens.
    Plain,
}

impl PromptSyntax {
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::A1111 => "a1111",
            PromptSyntax::Plain => "plain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "a1111" => Some(PromptSyntax::A1111),
            "plain" => Some(PromptSyntax::Plain),
            _ => None,
        }
    }
}

/// One run of text with one weight; `BREAK` is the segment `("BREAK", -1.0)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub text: String,
    pub weight: f64,
}

impl Segment {
    fn new(text: &str, weight: f64) -> Self {
        Self {
            text: text.to_string(),
            weight,
        }
    }

    /// The chunk separator (a `BREAK` that no bracket weighted).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// The token kinds of A1111's `re_attention`, tried in its order at each position.
enum Piece<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` or a lone `\`: the text after the backslash.
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:` weight `)`, e.g. `:1.2)` (the number as written).
    Weight(&'a str, &'a str),
    Close,
    CloseSquare,
    /// A run of anything but `\ ( ) [ ] :`, or a `:` on its own.
    Text(&'a str),
}

/// Python's `\s` on `str`: Unicode whitespace, plus the separators `\x1c`–`\x1f`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `\w` on `str`.
fn py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn next_piece(s: &str) -> (Piece<'_>, usize) {
    let mut chars = s.chars();
    let c = chars.next().unwrap_or('\0');
    match c {
        '\\' => {
            let next = chars.next();
            match next {
                Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    (Piece::Escaped(&s[1..1 + n.len_utf8()]), 1 + n.len_utf8())
                }
                _ => (Piece::Escaped(""), 1),
            }
        }
        '(' => (Piece::Open, 1),
        '[' => (Piece::OpenSquare, 1),
        ':' => match weight_at(s) {
            Some((number, len)) => (Piece::Weight(&s[..len], number), len),
            None => (Piece::Text(":"), 1),
        },
        ')' => (Piece::Close, 1),
        ']' => (Piece::CloseSquare, 1),
        _ => {
            let end = s
                .char_indices()
                .find(|&(_, c)| matches!(c, '\\' | '(' | ')' | '[' | ']' | ':'))
                .map_or(s.len(), |(i, _)| i);
            (Piece::Text(&s[..end]), end)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the number and the match's length.
fn weight_at(s: &str) -> Option<(&str, usize)> {
    let mut i = 1;
    let skip_space = |i: &mut usize| {
        while let Some(c) = s[*i..].chars().next().filter(|&c| py_space(c)) {
            *i += c.len_utf8();
        }
    };
    skip_space(&mut i);
    let start = i;
    if s[i..].starts_with(['+', '-']) {
        i += 1;
    }
    let digits = i;
    while s[i..].starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let end = i;
    skip_space(&mut i);
    s[i..].starts_with(')').then(|| (&s[start..end], i + 1))
}

/// Python's `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut part_start, mut search) = (0, 0);
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if before.is_some_and(py_word) || after.is_some_and(py_word) {
            search = at + 1;
            continue;
        }
        // The match starts where the whitespace before BREAK starts (not before the
        // previous match's end) and takes the whitespace after it.
        let mut start = at;
        while let Some(c) = text[part_start..start]
            .chars()
            .next_back()
            .filter(|&c| py_space(c))
        {
            start -= c.len_utf8();
        }
        let mut stop = end;
        while let Some(c) = text[stop..].chars().next().filter(|&c| py_space(c)) {
            stop += c.len_utf8();
        }
        parts.push(&text[part_start..start]);
        part_start = stop;
        search = stop;
    }
    parts.push(&text[part_start..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as runs of text with their weights. Fails
/// only on a weight that is not a number (`(x:.)`), where A1111 raises.
pub fn parse_attention(prompt: &str) -> Result<Vec<Segment>, String> {
    let mut res: Vec<Segment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    fn multiply(res: &mut [Segment], from: usize, m: f64) {
        for s in &mut res[from..] {
            s.weight *= m;
        }
    }
    let mut rest = prompt;
    while !rest.is_empty() {
        let (piece, len) = next_piece(rest);
        match piece {
            Piece::Escaped(t) => res.push(Segment::new(t, 1.0)),
            Piece::Open => round.push(res.len()),
            Piece::OpenSquare => square.push(res.len()),
            Piece::Weight(whole, number) => match round.pop() {
                Some(from) => {
                    let w: f64 = number
                        .parse()
                        .map_err(|_| format!("prompt: the weight in {whole:?} is not a number"))?;
                    multiply(&mut res, from, w);
                }
                None => push_text(&mut res, whole),
            },
            Piece::Close => match round.pop() {
                Some(from) => multiply(&mut res, from, ROUND),
                None => push_text(&mut res, ")"),
            },
            Piece::CloseSquare => match square.pop() {
                Some(from) => multiply(&mut res, from, SQUARE),
                None => push_text(&mut res, "]"),
            },
            Piece::Text(t) => push_text(&mut res, t),
        }
        rest = &rest[len..];
    }
    // Unclosed brackets run to the end, in the order they were opened.
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(Segment::new("", 1.0));
    }
    // Neighbours of equal weight merge.
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].weight == res[i + 1].weight {
            let next = res.remove(i + 1);
            res[i].text.push_str(&next.text);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

fn push_text(res: &mut Vec<Segment>, text: &str) {
    for (i, part) in split_break(text).into_iter().enumerate() {
        if i > 0 {
            res.push(Segment::new("BREAK", -1.0));
        }
        res.push(Segment::new(part, 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(p: &str) -> Vec<(String, f64)> {
        parse_attention(p)
            .unwrap()
            .into_iter()
            .map(|s| (s.text, s.weight))
            .collect()
    }

    fn seg(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// A1111's own doctests of `parse_prompt_attention`.
    #[test]
    fn a1111_doctests() {
        assert_eq!(parsed("normal text"), seg(&[("normal text", 1.0)]));
        assert_eq!(
            parsed("an (important) word"),
            seg(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parsed("(unbalanced"), seg(&[("unbalanced", 1.1)]));
        assert_eq!(parsed(r"\(literal\]"), seg(&[("(literal]", 1.0)]));
        assert_eq!(
            parsed("(unnecessary)(parens)"),
            seg(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            seg(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn break_splits_only_whole_words() {
        assert_eq!(
            parsed("a BREAK b"),
            seg(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(
            parsed("BREAK a"),
            seg(&[("", 1.0), ("BREAK", -1.0), ("a", 1.0)])
        );
        assert_eq!(
            parsed("a BREAK BREAK b"),
            seg(&[
                ("a", 1.0),
                ("BREAK", -1.0),
                ("", 1.0),
                ("BREAK", -1.0),
                ("b", 1.0)
            ])
        );
        assert_eq!(
            parsed("xBREAK BREAKy BREAK_"),
            seg(&[("xBREAK BREAKy BREAK_", 1.0)])
        );
        assert_eq!(
            parsed("a,BREAK,b"),
            seg(&[("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)])
        );
        // Inside brackets BREAK is weighted, so it is text again (as in A1111).
        assert_eq!(
            parsed("(a BREAK b)"),
            seg(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])
        );
    }

    #[test]
    fn strays_escapes_and_weights() {
        assert_eq!(parsed("a) b] c: d"), seg(&[("a) b] c: d", 1.0)]));
        assert_eq!(parsed(r"a\b"), seg(&[("ab", 1.0)]));
        assert_eq!(parsed(r"a\\b"), seg(&[(r"a\b", 1.0)]));
        assert_eq!(parsed("x:1.5)"), seg(&[("x:1.5)", 1.0)]));
        assert_eq!(parsed("(x: -0.5 )"), seg(&[("x", -0.5)]));
        assert_eq!(parsed("(x:+2.)"), seg(&[("x", 2.0)]));
        assert_eq!(parsed("(x:1.2"), seg(&[("x:1.2", 1.1)]));
        assert_eq!(parsed("[x:0.5]"), seg(&[("x:0.5", 1.0 / 1.1)]));
        assert_eq!(parsed("[[x]]"), seg(&[("x", (1.0 / 1.1) * (1.0 / 1.1))]));
        assert_eq!(parsed(""), seg(&[("", 1.0)]));
        assert_eq!(parsed("()"), seg(&[("", 1.0)]));
        assert!(parse_attention("(x:.)").is_err());
        assert!(parse_attention("(x:1.2.3)").is_err());
    }

    /// Never panics, and escaping every special character gives the text back at weight 1.
    #[test]
    fn escapes_round_trip_and_nothing_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let alphabet: Vec<char> = "ab ,:()[]\\.1-+BREAK é\t".chars().collect();
        for _ in 0..20_000 {
            let len = (state % 24) as usize;
            let mut s = String::new();
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let _ = parse_attention(&s);
            let escaped: String = s
                .chars()
                .flat_map(|c| {
                    let special = matches!(c, '(' | ')' | '[' | ']' | '\\');
                    special.then_some('\\').into_iter().chain([c])
                })
                .collect();
            let back = parse_attention(&escaped).unwrap();
            let text: String = back
                .iter()
                .map(|s| if s.is_break() { "" } else { s.text.as_str() })
                .collect();
            assert!(
                back.iter().all(|s| s.weight == 1.0 || s.is_break()),
                "{s:?}"
            );
            if !s.contains("BREAK") {
                assert_eq!(text, s, "{escaped:?}");
            }
        }
    }
}
