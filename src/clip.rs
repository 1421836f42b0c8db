//! CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`).
//!
//! Weight names are those of transformers without the `text_model.` prefix (the loader
//! strips it), plus `text_projection.weight` for the second SDXL encoder.

use crate::config::{Activation, ClipConfig};
use crate::nn;
use crate::nn::Linear;
use candle_core::{D, DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: nn::linear(d, d, vb.pp("q_proj"))?,
            k: nn::linear(d, d, vb.pp("k_proj"))?,
            v: nn::linear(d, d, vb.pp("v_proj"))?,
            out: nn::linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: ((d / c.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let o = nn::attention_tokens(&q, &k, &v, self.heads, self.scale, true, false)?;
        self.out.forward(&o)
    }
}

struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln1: nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(c, vb.pp("self_attn"))?,
            ln2: nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: nn::linear(c.hidden_size, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: nn::linear(c.intermediate_size, c.hidden_size, vb.pp("mlp.fc2"))?,
            act: c.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.act {
            // x * sigmoid(1.702 x), as transformers' QuickGELUActivation
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// Output of one text encoder as SDXL uses it.
pub struct TextEncoderOutput {
    /// Hidden states after the penultimate layer (`hidden_states[-2]`), `[b, 77, hidden]`.
    pub penultimate: Tensor,
    /// `text_projection(final_layer_norm(last)[eos])`, `[b, proj]`; only with a projection.
    pub pooled: Option<Tensor>,
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        // The tables in the model's dtype: an f32 run may hand them over as stored in f16
        // (as it keeps linear weights, `Precision::f16_linear_as_stored`); they are looked
        // up, not multiplied, so they are widened here once.
        let token_table = vb
            .pp("embeddings.token_embedding")
            .get((c.vocab_size, c.hidden_size), "weight")?
            .to_dtype(vb.dtype())?;
        let token_embedding = Embedding::new(token_table, c.hidden_size);
        let position_embedding = vb
            .pp("embeddings.position_embedding")
            .get((c.max_position_embeddings, c.hidden_size), "weight")?
            .to_dtype(vb.dtype())?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(c, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let text_projection = match c.projection_dim {
            Some(p) => Some(nn::linear_no_bias(
                c.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            None => None,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// Encode token ids `[b, s]` (u32). The last layer only runs when a pooled output is wanted.
    pub fn encode(&self, ids: &Tensor) -> Result<TextEncoderOutput> {
        self.encode_with(ids, &[])
    }

    /// [`encode`](Self::encode) with input vectors put in place of token embeddings:
    /// `(row, position, vectors [n, hidden])` (textual inversion, as A1111's
    /// `EmbeddingsWithFixes`).
    pub fn encode_with(
        &self,
        ids: &Tensor,
        vectors: &[(usize, usize, Tensor)],
    ) -> Result<TextEncoderOutput> {
        let (_, s) = ids.dims2()?;
        let pos = self.position_embedding.i(..s)?;
        let mut x = self.token_embedding.forward(ids)?;
        for (row, at, v) in vectors {
            let (n, h) = v.dims2()?;
            let n = n.min(s.saturating_sub(*at));
            let v = v
                .narrow(0, 0, n)?
                .to_device(x.device())?
                .to_dtype(x.dtype())?
                .unsqueeze(0)?;
            x = x.slice_assign(&[*row..*row + 1, *at..*at + n, 0..h], &v)?;
        }
        let mut x = x.broadcast_add(&pos)?;
        let n = self.layers.len();
        for layer in &self.layers[..n - 1] {
            x = layer.forward(&x)?;
        }
        let penultimate = x.clone();
        let pooled = match &self.text_projection {
            None => None,
            Some(proj) => {
                let last = self.layers[n - 1].forward(&x)?;
                // transformers (eos_token_id == 2 configs, as SDXL's): the position of the
                // largest id, i.e. the first <|endoftext|>.
                let eos = ids
                    .to_dtype(DType::F32)?
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?;
                let rows = eos
                    .iter()
                    .enumerate()
                    .map(|(b, &p)| last.i((b, p as usize))?.unsqueeze(0))
                    .collect::<Result<Vec<_>>>()?;
                let rows = Tensor::cat(&rows, 0)?;
                Some(proj.forward(&self.final_layer_norm.forward(&rows)?)?)
            }
        };
        Ok(TextEncoderOutput {
            penultimate,
            pooled,
        })
    }
}
