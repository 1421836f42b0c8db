//! A prompt as CLIP chunks of 77 token ids with one weight each.
//!
//! `a1111` follows stable-diffusion-webui's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`
//! (v1.10): every parsed segment is tokenized on its own, tokens fill chunks of 75, a chunk
//! that fills up while a comma lies within its last 20 tokens moves the words after that
//! comma to the next chunk, `BREAK` closes the chunk, and each chunk becomes
//! BOS + 75 tokens (padded with EOS) + EOS. `plain` is diffusers' one truncated chunk.

use crate::embeddings::EmbeddingLookup;
use crate::prompt_syntax::{PromptSyntax, Segment, parse_attention};
use crate::tokenizer::ClipTokenizer;
use anyhow::{Result, anyhow};
use serde::Serialize;

/// Tokens of a chunk between its BOS and EOS.
pub const CHUNK_TOKENS: usize = 75;
/// How far back from a chunk's end a comma may be for the words after it to move on
/// (A1111's `comma_padding_backtrack` default).
pub const COMMA_BACKTRACK: usize = 20;

/// One CLIP input: 77 ids (BOS, tokens, EOS padding) and their weights (1 outside the text).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
    /// Textual-inversion embeddings: (position in `ids` of the first of its placeholder
    /// tokens, index in the run's [`Embeddings`](crate::embeddings::Embeddings)).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<(usize, usize)>,
}

impl Chunk {
    /// Whether every weight is 1: the chunk's encoding is left as the encoder made it.
    pub fn unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A prompt read in one syntax: its segments (A1111's `parse_prompt_attention` output, one
/// segment for `plain`) and its chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub segments: Vec<Segment>,
    pub chunks: Vec<Chunk>,
    /// Tokens of the text (A1111's count: full chunks count 75).
    pub token_count: usize,
    /// Tokens cut off by `plain`'s limit of 75.
    pub dropped: usize,
}

/// Chunks of `prompt` in `syntax`, with ids of `tokenizer`; in `a1111` syntax the names of
/// `embeddings` become their vectors' placeholders.
pub fn tokenize_prompt(
    tokenizer: &ClipTokenizer,
    syntax: PromptSyntax,
    prompt: &str,
    embeddings: Option<&EmbeddingLookup>,
) -> Result<TokenizedPrompt> {
    match syntax {
        PromptSyntax::Plain => {
            let tokens = tokenizer.tokenize(prompt)?;
            let ids = tokenizer.encode(prompt)?;
            let n = tokens.len();
            Ok(TokenizedPrompt {
                segments: vec![Segment {
                    text: prompt.to_string(),
                    weight: 1.0,
                }],
                chunks: vec![Chunk {
                    weights: vec![1.0; ids.len()],
                    ids,
                    embeddings: Vec::new(),
                }],
                token_count: n.min(CHUNK_TOKENS),
                dropped: n.saturating_sub(CHUNK_TOKENS),
            })
        }
        PromptSyntax::A1111 => {
            let segments = parse_attention(prompt).map_err(|e| anyhow!(e))?;
            let tokenized = segments
                .iter()
                .map(|s| tokenizer.tokenize(&s.text))
                .collect::<Result<Vec<_>>>()?;
            let comma = tokenizer.token_to_id(",</w>");
            let mut c = Chunker::new(tokenizer.bos_id(), tokenizer.eos_id(), comma);
            for (seg, tokens) in segments.iter().zip(&tokenized) {
                if seg.is_break() {
                    c.next_chunk(false);
                    continue;
                }
                let mut at = 0;
                while at < tokens.len() {
                    c.before_token(tokens[at]);
                    match embeddings.and_then(|e| e.find(tokens, at)) {
                        Some((index, vectors, name_len)) => {
                            c.push_embedding(index, vectors, seg.weight);
                            at += name_len;
                        }
                        None => {
                            c.push(tokens[at], seg.weight);
                            at += 1;
                        }
                    }
                }
            }
            let (chunks, token_count) = c.finish();
            Ok(TokenizedPrompt {
                segments,
                chunks,
                token_count,
                dropped: 0,
            })
        }
    }
}

/// The chunk of the empty prompt, which pads shorter prompts (A1111's `empty_chunk`).
pub fn empty_chunk(tokenizer: &ClipTokenizer) -> Chunk {
    let mut ids = vec![tokenizer.bos_id()];
    ids.resize(CHUNK_TOKENS + 2, tokenizer.eos_id());
    Chunk {
        weights: vec![1.0; ids.len()],
        ids,
        embeddings: Vec::new(),
    }
}

struct Chunker {
    bos: u32,
    eos: u32,
    comma: Option<u32>,
    chunks: Vec<Chunk>,
    tokens: Vec<u32>,
    weights: Vec<f64>,
    /// Embeddings placed in this chunk: (index in `tokens`, embedding).
    fixes: Vec<(usize, usize)>,
    /// Index in `tokens` of the last comma of this chunk.
    last_comma: Option<usize>,
    token_count: usize,
}

impl Chunker {
    fn new(bos: u32, eos: u32, comma: Option<u32>) -> Self {
        Self {
            bos,
            eos,
            comma,
            chunks: Vec::new(),
            tokens: Vec::new(),
            weights: Vec::new(),
            fixes: Vec::new(),
            last_comma: None,
            token_count: 0,
        }
    }

    /// What happens at each token of a segment before it (or the embedding its name starts)
    /// is placed: a comma is remembered; a full chunk moves the words after a recent comma
    /// on, then closes.
    fn before_token(&mut self, token: u32) {
        if Some(token) == self.comma {
            self.last_comma = Some(self.tokens.len());
        } else if self.tokens.len() == CHUNK_TOKENS
            && let Some(at) = self.last_comma
            && self.tokens.len() - at <= COMMA_BACKTRACK
        {
            let cut = at + 1;
            let moved = self.tokens.split_off(cut);
            let moved_w = self.weights.split_off(cut);
            // A1111 moves the tokens only: an embedding placed after the comma keeps its
            // place in this chunk (its vectors land on the padding there) and its
            // placeholders move on without vectors.
            self.next_chunk(false);
            self.tokens = moved;
            self.weights = moved_w;
        }
        if self.tokens.len() == CHUNK_TOKENS {
            self.next_chunk(false);
        }
    }

    fn push(&mut self, token: u32, weight: f64) {
        self.tokens.push(token);
        self.weights.push(weight);
    }

    /// `vectors` placeholder tokens (id 0) for embedding `index`, in a chunk with room for
    /// all of them.
    fn push_embedding(&mut self, index: usize, vectors: usize, weight: f64) {
        if self.tokens.len() + vectors > CHUNK_TOKENS {
            self.next_chunk(false);
        }
        self.fixes.push((self.tokens.len(), index));
        self.tokens.resize(self.tokens.len() + vectors, 0);
        self.weights.resize(self.weights.len() + vectors, weight);
    }

    fn next_chunk(&mut self, last: bool) {
        self.token_count += if last {
            self.tokens.len()
        } else {
            CHUNK_TOKENS
        };
        let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
        ids.push(self.bos);
        ids.append(&mut self.tokens);
        ids.resize(CHUNK_TOKENS + 1, self.eos);
        ids.push(self.eos);
        let mut weights = Vec::with_capacity(CHUNK_TOKENS + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(CHUNK_TOKENS + 2, 1.0);
        self.last_comma = None;
        // Positions in `ids` count the BOS in front.
        let embeddings = self.fixes.drain(..).map(|(p, i)| (p + 1, i)).collect();
        self.chunks.push(Chunk {
            ids,
            weights,
            embeddings,
        });
    }

    fn finish(mut self) -> (Vec<Chunk>, usize) {
        if !self.tokens.is_empty() || self.chunks.is_empty() {
            self.next_chunk(true);
        }
        (self.chunks, self.token_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> ClipTokenizer {
        ClipTokenizer::builtin("<|endoftext|>").unwrap()
    }

    fn real_tokens(c: &Chunk) -> usize {
        c.ids[1..].iter().take_while(|&&i| i != 49407).count()
    }

    #[test]
    fn plain_prompts_are_one_chunk_in_both_syntaxes() {
        let t = tok();
        for p in ["a photo of a cat", "", "blurry, low quality"] {
            let a = tokenize_prompt(&t, PromptSyntax::A1111, p, None).unwrap();
            let b = tokenize_prompt(&t, PromptSyntax::Plain, p, None).unwrap();
            assert_eq!(a.chunks, b.chunks, "{p:?}");
            assert_eq!(a.chunks[0].ids, t.encode(p).unwrap());
        }
    }

    #[test]
    fn weights_follow_the_tokens_of_their_segment() {
        let t = tok();
        let a = tokenize_prompt(&t, PromptSyntax::A1111, "a (red:1.5) [cat]", None).unwrap();
        let c = &a.chunks[0];
        assert_eq!(real_tokens(c), 3);
        assert_eq!(&c.weights[..5], &[1.0, 1.0, 1.5, 1.0 / 1.1, 1.0]);
        assert_eq!(c.ids.len(), 77);
        assert_eq!(a.token_count, 3);
    }

    #[test]
    fn long_prompts_chunk_with_the_comma_backtrack() {
        let t = tok();
        // 70 single-token words, a comma, then 10 more: the chunk fills 4 tokens after the
        // comma, so those move to chunk 2.
        let words: Vec<String> = (0..70).map(|_| "cat".to_string()).collect();
        let p = format!("{}, {}", words.join(" "), ["dog"; 10].join(" "));
        let a = tokenize_prompt(&t, PromptSyntax::A1111, &p, None).unwrap();
        assert_eq!(a.chunks.len(), 2);
        assert_eq!(real_tokens(&a.chunks[0]), 71);
        assert_eq!(a.chunks[0].ids[71], 267, "the comma ends chunk 1");
        assert_eq!(real_tokens(&a.chunks[1]), 10);
        assert_eq!(a.token_count, 85);
        // Without a comma near the end, the chunk is cut at 75.
        let p = vec!["cat"; 80].join(" ");
        let a = tokenize_prompt(&t, PromptSyntax::A1111, &p, None).unwrap();
        assert_eq!(
            a.chunks.iter().map(real_tokens).collect::<Vec<_>>(),
            [75, 5]
        );
        let plain = tokenize_prompt(&t, PromptSyntax::Plain, &p, None).unwrap();
        assert_eq!((plain.chunks.len(), plain.dropped), (1, 5));
    }

    #[test]
    fn break_starts_a_chunk() {
        let t = tok();
        let a = tokenize_prompt(&t, PromptSyntax::A1111, "a cat BREAK a dog", None).unwrap();
        assert_eq!(a.chunks.len(), 2);
        assert_eq!(a.chunks[0].ids[..4], [49406, 320, 2368, 49407]);
        assert_eq!(a.chunks[1].ids[..4], [49406, 320, 1929, 49407]);
        assert_eq!(a.token_count, 75 + 2);
        let a = tokenize_prompt(&t, PromptSyntax::A1111, "BREAK", None).unwrap();
        assert_eq!(a.chunks, vec![empty_chunk(&t); 1]);
        let a = tokenize_prompt(&t, PromptSyntax::A1111, "BREAK a", None).unwrap();
        assert_eq!(a.chunks[0], empty_chunk(&t));
        assert_eq!(a.chunks.len(), 2);
    }
}
