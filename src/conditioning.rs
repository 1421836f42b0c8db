//! SDXL's text conditioning: a prompt through both CLIP encoders, chunk by chunk.
//!
//! Each encoder reads its own tokenizer's chunks ([`crate::prompt_chunks`]); its penultimate
//! hidden states are weighted per token with A1111's "Original" emphasis
//! (`sd_emphasis.EmphasisOriginal`: `z *= w`, then `z *= mean(z before) / mean(z after)`,
//! per chunk and encoder), the two encoders' states are put side by side and the chunks one
//! after another: `context` is `[1, 77·k, 768 + 1280]`. The pooled embedding is encoder 2's
//! for the first chunk. A one-chunk prompt with no weights is exactly diffusers'
//! `encode_prompt`.

use crate::clip::ClipTextModel;
use crate::embeddings::{EmbeddingLookup, Embeddings};
use crate::prompt_chunks::{Chunk, empty_chunk, tokenize_prompt};
use crate::prompt_syntax::PromptSyntax;
use crate::tokenizer::{ClipTokenizer, MAX_LENGTH};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Prompt conditioning: `context` `[B, 77·k, cross]`, `pooled` `[B, P]`.
#[derive(Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl Conditioning {
    /// Chunks of 77 tokens in `context`.
    pub fn chunks(&self) -> Result<usize> {
        Ok(self.context.dim(1)? / MAX_LENGTH)
    }

    /// This conditioning with `empty` (the empty prompt's, one chunk) appended until it has
    /// `chunks` chunks: A1111 pads the shorter of a prompt and its negative this way.
    pub fn padded(&self, chunks: usize, empty: &Conditioning) -> Result<Conditioning> {
        let have = self.chunks()?;
        if have >= chunks {
            return Ok(self.clone());
        }
        let rows = self.context.dim(0)?;
        let fill = empty
            .context
            .repeat((rows, chunks - have, 1))?
            .to_dtype(self.context.dtype())?;
        Ok(Conditioning {
            context: Tensor::cat(&[&self.context, &fill], 1)?,
            pooled: self.pooled.clone(),
        })
    }

    /// Rows side by side (`[B, …]`), each padded with `empty` to the longest.
    pub fn stack(rows: &[Conditioning], empty: &Conditioning) -> Result<Conditioning> {
        let chunks = rows
            .iter()
            .map(|c| c.chunks())
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .context("no conditioning")?;
        let rows = rows
            .iter()
            .map(|c| c.padded(chunks, empty))
            .collect::<Result<Vec<_>>>()?;
        let ctx: Vec<&Tensor> = rows.iter().map(|c| &c.context).collect();
        let pooled: Vec<&Tensor> = rows.iter().map(|c| &c.pooled).collect();
        Ok(Conditioning {
            context: Tensor::cat(&ctx, 0)?,
            pooled: Tensor::cat(&pooled, 0)?,
        })
    }
}

/// SDXL's two tokenizers and text encoders, and the run's textual-inversion embeddings.
pub struct TextEncoders<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub tokenizer_2: &'a ClipTokenizer,
    pub encoder: &'a ClipTextModel,
    pub encoder_2: &'a ClipTextModel,
    pub device: &'a Device,
    pub embeddings: &'a TextEmbeddings,
}

/// Embeddings with their names looked up in each tokenizer.
pub struct TextEmbeddings {
    pub embeddings: Embeddings,
    lookup: Option<(EmbeddingLookup, EmbeddingLookup)>,
}

impl TextEmbeddings {
    pub fn new(
        embeddings: Embeddings,
        tokenizer: &ClipTokenizer,
        tokenizer_2: &ClipTokenizer,
    ) -> Result<Self> {
        let lookup = if embeddings.is_empty() {
            None
        } else {
            Some((
                embeddings.lookup(tokenizer)?,
                embeddings.lookup(tokenizer_2)?,
            ))
        };
        Ok(Self { embeddings, lookup })
    }

    pub fn none() -> Self {
        Self {
            embeddings: Embeddings::default(),
            lookup: None,
        }
    }
}

impl TextEncoders<'_> {
    /// One prompt's conditioning, `[1, 77·k, cross]` and `[1, P]`.
    pub fn encode(&self, syntax: PromptSyntax, prompt: &str) -> Result<Conditioning> {
        let (l1, l2) = match &self.embeddings.lookup {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let mut chunks_1 = tokenize_prompt(self.tokenizer, syntax, prompt, l1)?.chunks;
        let mut chunks_2 = tokenize_prompt(self.tokenizer_2, syntax, prompt, l2)?.chunks;
        // The tokenizers agree but for SDXL's second one reading `!` as its pad token, which
        // can change where a long prompt's chunks end: the shorter list gets empty chunks.
        let k = chunks_1.len().max(chunks_2.len());
        chunks_1.resize(k, empty_chunk(self.tokenizer));
        chunks_2.resize(k, empty_chunk(self.tokenizer_2));
        let all = &self.embeddings.embeddings;
        let vectors_1 = placed(&chunks_1, |i| all.get(i).map(|e| &e.clip_l))?;
        let vectors_2 = placed(&chunks_2, |i| all.get(i).map(|e| &e.clip_g))?;
        let z1 = encode_chunks(
            self.encoder,
            self.tokenizer,
            &chunks_1,
            &vectors_1,
            self.device,
        )?;
        let z2 = encode_chunks(
            self.encoder_2,
            self.tokenizer_2,
            &chunks_2,
            &vectors_2,
            self.device,
        )?;
        let context = Tensor::cat(&[z1.0, z2.0], 2)?; // [k, 77, cross]
        let cross = context.dim(2)?;
        let context = context.reshape((1, k * MAX_LENGTH, cross))?;
        let pooled =
            z2.1.context("text encoder 2 has no projection")?
                .narrow(0, 0, 1)?
                .to_dtype(DType::F32)?;
        Ok(Conditioning { context, pooled })
    }

    /// The empty prompt's conditioning (one chunk), which pads longer neighbours.
    pub fn encode_empty(&self) -> Result<Conditioning> {
        self.encode(PromptSyntax::Plain, "")
    }
}

/// The embeddings' vectors where `chunks` place them: (chunk, position, vectors).
fn placed<'a>(
    chunks: &[Chunk],
    vectors_of: impl Fn(usize) -> Option<&'a Tensor>,
) -> Result<Vec<(usize, usize, Tensor)>> {
    let mut out = Vec::new();
    for (row, c) in chunks.iter().enumerate() {
        for &(at, i) in &c.embeddings {
            let v = vectors_of(i).context("internal error: an embedding index out of range")?;
            out.push((row, at, v.clone()));
        }
    }
    Ok(out)
}

/// One encoder over `chunks` (a batch of `k` rows): the weighted penultimate states
/// `[k, 77, hidden]` (f32) and the pooled output of every row.
fn encode_chunks(
    encoder: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    chunks: &[Chunk],
    vectors: &[(usize, usize, Tensor)],
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let ids: Vec<u32> = chunks
        .iter()
        .flat_map(|c| pad_after_eos(&c.ids, tokenizer))
        .collect();
    let ids = Tensor::from_vec(ids, (chunks.len(), MAX_LENGTH), device)?;
    let out = encoder.encode_with(&ids, vectors)?;
    let z = out.penultimate.to_dtype(DType::F32)?;
    let z = if chunks.iter().all(Chunk::unweighted) {
        z
    } else {
        let rows = chunks
            .iter()
            .enumerate()
            .map(|(j, c)| emphasis(&z.narrow(0, j, 1)?, &c.weights))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)?
    };
    Ok((z, out.pooled))
}

/// Ids after the first EOS become the tokenizer's pad id (A1111's `process_tokens` for
/// encoders whose pad differs from EOS: OpenCLIP bigG pads with 0, i.e. `!`).
fn pad_after_eos(ids: &[u32], tokenizer: &ClipTokenizer) -> Vec<u32> {
    let eos = tokenizer.eos_id();
    let mut out = ids.to_vec();
    if let Some(first) = ids.iter().position(|&i| i == eos) {
        for id in &mut out[first + 1..] {
            *id = tokenizer.pad_id();
        }
    }
    out
}

/// A1111's "Original" emphasis on one chunk `z` `[1, 77, hidden]` (f32).
fn emphasis(z: &Tensor, weights: &[f64]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::from_vec(w, (1, weights.len(), 1), z.device())?;
    let original = z.mean_all()?.to_scalar::<f32>()?;
    let weighted = z.broadcast_mul(&w)?;
    let now = weighted.mean_all()?.to_scalar::<f32>()?;
    let ratio = original / now;
    // A chunk whose weights cancel its mean (all weights 0, say) has nothing to restore:
    // A1111 would divide by zero and make NaN; the weighted states are kept as they are.
    if !ratio.is_finite() {
        return Ok(weighted);
    }
    Ok((weighted * f64::from(ratio))?)
}
