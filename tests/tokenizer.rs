//! CLIP tokenization against the reference: for 326 prompts (every case's, awkward ones with
//! accents, CJK, emoji, apostrophes, `!`, odd whitespace and over-long text, and 300 random
//! strings) the ids of the tiny pipeline's two `CLIPTokenizer`s, padded and truncated to 77
//! as diffusers does (scripts/make_fixtures.py). Both the compiled-in tokenizer and the
//! folder's `vocab.json` + `merges.txt` give them, through tokenizers' pure-Rust regex
//! backend (fancy-regex).

mod common;

use dmd2::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Row {
    prompt: String,
    ids_1: Vec<u32>,
    ids_2: Vec<u32>,
}

#[test]
fn ids_match_the_reference_tokenizers() {
    let text = std::fs::read_to_string(common::fixtures().join("tokenizer_ids.json")).unwrap();
    let rows: Vec<Row> = serde_json::from_str(&text).unwrap();
    assert!(rows.len() >= 300);
    let tiny = common::fixtures().join("tiny");
    let pairs = [
        (
            ClipTokenizer::builtin("<|endoftext|>").unwrap(),
            ClipTokenizer::builtin("!").unwrap(),
        ),
        (
            ClipTokenizer::from_folder(&tiny.join("tokenizer")).unwrap(),
            ClipTokenizer::from_folder(&tiny.join("tokenizer_2")).unwrap(),
        ),
    ];
    for (t1, t2) in &pairs {
        for r in &rows {
            assert_eq!(
                t1.encode(&r.prompt).unwrap(),
                r.ids_1,
                "tokenizer 1: {:?}",
                r.prompt
            );
            assert_eq!(
                t2.encode(&r.prompt).unwrap(),
                r.ids_2,
                "tokenizer 2: {:?}",
                r.prompt
            );
        }
    }
}
