//! A BERT encoder with a sequence-classification head, mirroring Hugging Face's
//! `BertForSequenceClassification` (weight names included), so a checkpoint saved by
//! `transformers` loads unchanged and one saved by `dealsift train` loads in `transformers`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

use super::config::BertConfig;
use super::ops;

/// Which kernels to run. candle's fused softmax and layer-norm kernels have no backward
/// pass, so training uses ours (`super::ops`), which do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    Fused,
    Differentiable,
}

fn norm(ln: &LayerNorm, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match (kernels, ln.bias()) {
        (Kernels::Fused, _) => ln.forward(x),
        (Kernels::Differentiable, Some(bias)) => ops::layer_norm(x, ln.weight(), bias, ln.eps()),
        (Kernels::Differentiable, None) => candle_core::bail!("layer norm without a bias: not a BERT checkpoint"),
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(Self {
            word: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(cfg.max_position_embeddings, cfg.hidden_size, vb.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, cfg.hidden_size, vb.pp("token_type_embeddings"))?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let x = self
            .word
            .forward(input_ids)?
            .add(&self.token_type.forward(token_type_ids)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        norm(&self.norm, &x, kernels)
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let (self_vb, out_vb) = (vb.pp("self"), vb.pp("output"));
        Ok(Self {
            query: linear(h, h, self_vb.pp("query"))?,
            key: linear(h, h, self_vb.pp("key"))?,
            value: linear(h, h, self_vb.pp("value"))?,
            output: linear(h, h, out_vb.pp("dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, out_vb.pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `mask` is additive, shaped (batch, 1, 1, seq): 0 for real tokens, a large negative for padding.
    fn forward(&self, x: &Tensor, mask: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = q.matmul(&k.t()?)?;
        let probs = match kernels {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)?,
            Kernels::Differentiable => ops::masked_softmax(&scores, mask, scale)?,
        };
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, ()))?;
        norm(&self.norm, &self.output.forward(&ctx)?.add(x)?, kernels)
    }
}

struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(Self {
            attention: SelfAttention::load(vb.pp("attention"), cfg)?,
            intermediate: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("output").pp("dense"))?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let x = self.attention.forward(x, mask, kernels)?;
        let h = self.intermediate.forward(&x)?;
        let h = match kernels {
            Kernels::Fused => h.gelu_erf()?,
            Kernels::Differentiable => ops::gelu(&h)?,
        };
        norm(&self.norm, &self.output.forward(&h)?.add(&x)?, kernels)
    }
}

/// `BertForSequenceClassification`: encoder, tanh pooler over `[CLS]`, linear classifier.
pub struct BertClassifier {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Linear,
    classifier: Linear,
    kernels: Kernels,
    /// Layers below this index get no gradient (their output is detached).
    frozen_layers: usize,
}

impl BertClassifier {
    /// Loads from a VarBuilder rooted at the checkpoint. Accepts both the classification
    /// layout (`bert.` prefix + `classifier`) and a bare `BertModel` checkpoint, whose
    /// missing classifier is then created through the VarBuilder (for fine-tuning).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let encoder_vb = encoder_root(&vb);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(encoder_vb.pp("encoder.layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::load(encoder_vb.pp("embeddings"), cfg)?,
            layers,
            pooler: linear(cfg.hidden_size, cfg.hidden_size, encoder_vb.pp("pooler").pp("dense"))?,
            classifier: linear(cfg.hidden_size, cfg.num_labels(), vb.pp("classifier"))?,
            kernels: Kernels::Fused,
            frozen_layers: 0,
        })
    }

    /// Stops gradients below encoder layer `n` (and into all embeddings): fine-tuning
    /// then trains only the top layers, pooler and classifier, for a cheaper backward pass.
    pub fn freeze_below(self, n: usize) -> Self {
        Self { frozen_layers: n, ..self }
    }

    /// Switches kernels (training needs `Kernels::Differentiable`).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Logits, shaped (batch, labels). `input_ids`, `token_type_ids` and `attention_mask`
    /// are (batch, seq) u32 tensors; padded positions have mask 0.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let hidden = self.encode(input_ids, token_type_ids, attention_mask)?;
        self.classify(&hidden)
    }

    /// Final hidden states, shaped (batch, seq, hidden).
    pub fn encode(&self, input_ids: &Tensor, token_type_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(input_ids, token_type_ids, self.kernels)?;
        let mask = additive_mask(attention_mask, x.dtype())?;
        if self.frozen_layers > 0 {
            x = x.detach();
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask, self.kernels)?;
            if i + 1 == self.frozen_layers {
                x = x.detach();
            }
        }
        Ok(x)
    }

    /// Pooler and classifier over the `[CLS]` position of `hidden`.
    pub fn classify(&self, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        self.classifier.forward(&pooled)
    }
}

/// Where the encoder's weights start: under `bert.` in a classification checkpoint, at the
/// root in a bare `BertModel` one. The classifier head is always at the root.
pub fn encoder_root<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
        vb.pp("bert")
    } else {
        vb.clone()
    }
}

/// (batch, seq) 0/1 mask -> (batch, 1, 1, seq) additive mask. A finite large negative keeps
/// rows that are all padding (bucket filler) free of NaNs.
fn additive_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(dtype)?;
    ((keep - 1.0)? * 1e9)?.reshape((b, 1, 1, s))
}

/// Softmax over the label dimension.
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)
}
