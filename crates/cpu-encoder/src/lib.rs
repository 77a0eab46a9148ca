//! A BERT sequence classifier for CPU inference, written for speed rather than generality.
//!
//! Where a general tensor library pads every sequence to the batch's longest, allocates a
//! fresh buffer for each op and runs softmax, GELU and layer norm as chains of
//! single-purpose passes, this encoder:
//! - packs the batch's real tokens densely, so padding costs nothing, and attends within
//!   each sequence only (no mask needed);
//! - multiplies with the `gemm` crate straight from strided views (fused QKV projection,
//!   per-head attention without transposes or copies);
//! - runs each row kernel in one pass, vectorised for the CPU at hand;
//! - computes the last layer for the `[CLS]` rows only (the classifier reads nothing else);
//! - reuses its buffers between calls.
//!
//! The arithmetic is f32 throughout and matches the reference model to ~1e-5.

pub mod kernels;

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("weight {name}: {problem}")]
    Weight { name: String, problem: String },
    #[error("bad batch: {0}")]
    Batch(String),
}

/// The architecture numbers the encoder needs.
#[derive(Debug, Clone)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub labels: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub layer_norm_eps: f32,
}

/// A linear layer `y = x Wᵀ + b`. W is kept transposed, (in, out) row-major: gemm then
/// reads it as a plain row-major right-hand side, which at small batches halves the time of
/// the largest products compared with PyTorch's (out, in) layout.
struct Dense {
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Dense {
    /// From PyTorch's (out, in) row-major weight.
    fn new(weight: &[f32], bias: Vec<f32>, inputs: usize, outputs: usize) -> Self {
        let mut weight_t = vec![0f32; weight.len()];
        for (o, row) in weight.chunks_exact(inputs).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                weight_t[i * outputs + o] = w;
            }
        }
        Self {
            weight_t,
            bias,
            inputs,
            outputs,
        }
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value projections stacked (3·hidden, hidden); the query rows carry
    /// the 1/sqrt(head_dim) attention scale.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    up: Dense,
    down: Dense,
    output_norm: Norm,
}

/// Scratch reused across calls; grows to the largest batch seen.
#[derive(Default)]
struct Workspace {
    hidden: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    projected: Vec<f32>,
    intermediate: Vec<f32>,
    cls: Vec<f32>,
    query: Vec<f32>,
}

/// One sequence's place in the packed token matrix.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

pub struct Encoder {
    dims: Dims,
    word_embeddings: Vec<f32>,
    /// Position embedding plus token-type-0 embedding, one row per position.
    position_embeddings: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    pooler: Dense,
    classifier: Dense,
    workspace: Workspace,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Encoder {
    /// Builds the encoder from Hugging Face `BertForSequenceClassification` weights;
    /// `get(name, shape)` returns a tensor (row-major f32) by its name without the
    /// `bert.` prefix, checking its shape.
    pub fn load(
        dims: Dims,
        mut get: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, EncoderError>,
    ) -> Result<Self, EncoderError> {
        let (h, i) = (dims.hidden, dims.intermediate);
        if dims.heads == 0 || h % dims.heads != 0 {
            return Err(EncoderError::Weight {
                name: "config".into(),
                problem: format!("hidden size {h} is not a multiple of {} heads", dims.heads),
            });
        }
        // (weight, bias) in PyTorch's layout.
        let mut raw = |name: &str,
                       outputs: usize,
                       inputs: usize|
         -> Result<(Vec<f32>, Vec<f32>), EncoderError> {
            Ok((
                get(&format!("{name}.weight"), &[outputs, inputs])?,
                get(&format!("{name}.bias"), &[outputs])?,
            ))
        };
        let dense = |(weight, bias): (Vec<f32>, Vec<f32>)| {
            let (outputs, inputs) = (bias.len(), weight.len() / bias.len().max(1));
            Dense::new(&weight, bias, inputs, outputs)
        };
        let mut layers = Vec::with_capacity(dims.layers);
        let scale = 1.0 / ((h / dims.heads) as f32).sqrt();
        let mut norms = Vec::new();
        for l in 0..dims.layers {
            let p = format!("encoder.layer.{l}");
            let (mut qw, mut qb) = raw(&format!("{p}.attention.self.query"), h, h)?;
            qw.iter_mut().chain(qb.iter_mut()).for_each(|v| *v *= scale);
            let (kw, kb) = raw(&format!("{p}.attention.self.key"), h, h)?;
            let (vw, vb) = raw(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = dense(([qw, kw, vw].concat(), [qb, kb, vb].concat()));
            layers.push((
                qkv,
                dense(raw(&format!("{p}.attention.output.dense"), h, h)?),
                dense(raw(&format!("{p}.intermediate.dense"), i, h)?),
                dense(raw(&format!("{p}.output.dense"), h, i)?),
            ));
            norms.push((
                format!("{p}.attention.output.LayerNorm"),
                format!("{p}.output.LayerNorm"),
            ));
        }
        let pooler = dense(raw("pooler.dense", h, h)?);
        let classifier = dense(raw("classifier", dims.labels, h)?);
        let mut norm = |name: &str| -> Result<Norm, EncoderError> {
            Ok(Norm {
                gamma: get(&format!("{name}.weight"), &[h])?,
                beta: get(&format!("{name}.bias"), &[h])?,
            })
        };
        let layers = layers
            .into_iter()
            .zip(norms)
            .map(|((qkv, attention_out, up, down), (n1, n2))| {
                Ok(Layer {
                    qkv,
                    attention_out,
                    attention_norm: norm(&n1)?,
                    up,
                    down,
                    output_norm: norm(&n2)?,
                })
            })
            .collect::<Result<Vec<_>, EncoderError>>()?;
        let embedding_norm = norm("embeddings.LayerNorm")?;
        let word_embeddings = get("embeddings.word_embeddings.weight", &[dims.vocab, h])?;
        let mut position_embeddings = get(
            "embeddings.position_embeddings.weight",
            &[dims.max_positions, h],
        )?;
        let token_type = get(
            "embeddings.token_type_embeddings.weight",
            &[dims.type_vocab, h],
        )?;
        for row in position_embeddings.chunks_exact_mut(h) {
            row.iter_mut()
                .zip(&token_type[..h])
                .for_each(|(p, t)| *p += t);
        }
        Ok(Self {
            dims,
            word_embeddings,
            position_embeddings,
            embedding_norm,
            layers,
            pooler,
            classifier,
            workspace: Workspace::default(),
        })
    }

    /// Logits for each row of a padded (rows, seq) batch. Each row's mask must be a run of
    /// ones then zeros (padding at the end), with at least one token.
    pub fn forward(
        &mut self,
        input_ids: &[u32],
        attention_mask: &[u32],
        rows: usize,
        seq: usize,
    ) -> Result<Vec<Vec<f32>>, EncoderError> {
        if input_ids.len() != rows * seq || attention_mask.len() != rows * seq {
            return Err(EncoderError::Batch(format!(
                "expected {rows}x{seq} ids and mask, got {} and {}",
                input_ids.len(),
                attention_mask.len()
            )));
        }
        if seq > self.dims.max_positions {
            return Err(EncoderError::Batch(format!(
                "sequence length {seq} exceeds the model's {} positions",
                self.dims.max_positions
            )));
        }
        let mut spans = Vec::with_capacity(rows);
        let mut tokens = Vec::with_capacity(input_ids.len());
        for r in 0..rows {
            let mask = &attention_mask[r * seq..(r + 1) * seq];
            let len = mask.iter().take_while(|&&m| m == 1).count();
            if len == 0 || mask[len..].iter().any(|&m| m != 0) {
                return Err(EncoderError::Batch(format!(
                    "row {r}: the attention mask must be ones then zeros, with at least one token"
                )));
            }
            spans.push(Span {
                start: tokens.len(),
                len,
            });
            tokens.extend_from_slice(&input_ids[r * seq..r * seq + len]);
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.dims.vocab) {
            return Err(EncoderError::Batch(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.dims.vocab
            )));
        }
        Ok(self.run(&tokens, &spans))
    }

    fn run(&mut self, tokens: &[u32], spans: &[Span]) -> Vec<Vec<f32>> {
        let Dims {
            hidden: h,
            intermediate: inter,
            layer_norm_eps: eps,
            ..
        } = self.dims;
        let (n, rows) = (tokens.len(), spans.len());
        let ws = &mut self.workspace;
        resize(&mut ws.hidden, n * h);
        resize(&mut ws.qkv, n * 3 * h);
        resize(&mut ws.context, n * h);
        resize(&mut ws.projected, n * h);
        resize(&mut ws.intermediate, n * inter);
        resize(&mut ws.cls, rows * h);
        resize(&mut ws.query, rows * h);

        // Embeddings: word + position + token type 0, then layer norm.
        let (words, positions) = (&self.word_embeddings, &self.position_embeddings);
        for span in spans {
            for p in 0..span.len {
                let t = span.start + p;
                let id = tokens[t] as usize;
                let out = &mut ws.hidden[t * h..(t + 1) * h];
                for ((o, w), e) in out
                    .iter_mut()
                    .zip(&words[id * h..(id + 1) * h])
                    .zip(&positions[p * h..(p + 1) * h])
                {
                    *o = w + e;
                }
            }
        }
        par_rows(&mut ws.hidden[..n * h], h, |x| {
            kernels::add_layer_norm(
                x,
                None,
                None,
                &self.embedding_norm.gamma,
                &self.embedding_norm.beta,
                eps,
            )
        });

        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            let cls_only = l == last;
            let Workspace {
                hidden,
                qkv,
                context,
                projected,
                intermediate,
                cls,
                query,
            } = &mut *ws;
            let hidden = &mut hidden[..n * h];
            // Queries: every token, or in the last layer only each sequence's [CLS].
            let (out_rows, x) = if cls_only {
                for (r, span) in spans.iter().enumerate() {
                    cls[r * h..(r + 1) * h]
                        .copy_from_slice(&hidden[span.start * h..(span.start + 1) * h]);
                }
                dense_rows(
                    &layer.qkv,
                    h..3 * h,
                    hidden,
                    n,
                    &mut qkv[..n * 3 * h],
                    3 * h,
                    h,
                    true,
                );
                dense_rows(
                    &layer.qkv,
                    0..h,
                    &cls[..rows * h],
                    rows,
                    &mut query[..rows * h],
                    h,
                    0,
                    true,
                );
                (rows, &mut cls[..rows * h])
            } else {
                dense_rows(
                    &layer.qkv,
                    0..3 * h,
                    hidden,
                    n,
                    &mut qkv[..n * 3 * h],
                    3 * h,
                    0,
                    true,
                );
                (n, hidden)
            };
            attend(
                &self.dims,
                spans,
                &qkv[..n * 3 * h],
                if cls_only {
                    Some(&query[..rows * h])
                } else {
                    None
                },
                &mut context[..out_rows * h],
            );
            let projected = &mut projected[..out_rows * h];
            let context = &context[..out_rows * h];
            residual_block(
                &layer.attention_out,
                &layer.attention_norm,
                context,
                x,
                projected,
                eps,
            );
            let intermediate = &mut intermediate[..out_rows * inter];
            dense_rows(
                &layer.up,
                0..inter,
                x,
                out_rows,
                intermediate,
                inter,
                0,
                false,
            );
            par_rows(intermediate, inter, |x| {
                kernels::bias_gelu(x, &layer.up.bias)
            });
            residual_block(
                &layer.down,
                &layer.output_norm,
                intermediate,
                x,
                projected,
                eps,
            );
        }
        if self.layers.is_empty() {
            for (r, span) in spans.iter().enumerate() {
                ws.cls[r * h..(r + 1) * h]
                    .copy_from_slice(&ws.hidden[span.start * h..(span.start + 1) * h]);
            }
        }

        let mut pooled = vec![0f32; rows * h];
        dense_rows(
            &self.pooler,
            0..h,
            &ws.cls[..rows * h],
            rows,
            &mut pooled,
            h,
            0,
            true,
        );
        kernels::tanh(&mut pooled);
        let labels = self.dims.labels;
        let mut logits = vec![0f32; rows * labels];
        dense_rows(
            &self.classifier,
            0..labels,
            &pooled,
            rows,
            &mut logits,
            labels,
            0,
            true,
        );
        logits.chunks(labels).map(<[f32]>::to_vec).collect()
    }
}

/// Scaled dot-product attention within each sequence, one task per (sequence, head).
/// `cls_queries` (one row per sequence) replaces the per-token queries of `qkv`.
fn attend(
    dims: &Dims,
    spans: &[Span],
    qkv: &[f32],
    cls_queries: Option<&[f32]>,
    context: &mut [f32],
) {
    let h = dims.hidden;
    let heads = dims.heads;
    let d = h / heads;
    let context = SharedMut(context.as_mut_ptr());
    (0..spans.len() * heads).into_par_iter().for_each(|task| {
        let (r, head) = (task / heads, task % heads);
        let span = spans[r];
        let (queries, q_stride, m, out_row) = match cls_queries {
            Some(q) => (&q[r * h + head * d..], h, 1, r),
            None => (
                &qkv[span.start * 3 * h + head * d..],
                3 * h,
                span.len,
                span.start,
            ),
        };
        let keys = &qkv[span.start * 3 * h + h + head * d..];
        let values = &qkv[span.start * 3 * h + 2 * h + head * d..];
        SCORES.with_borrow_mut(|scores| {
            resize(scores, m * span.len);
            // SAFETY: every view lies inside its slice: rows advance by the stride, at
            // most `m` or `span.len` rows, `d` columns from the head's offset. Each task
            // writes its own (rows, head) block of `context`, disjoint from all others.
            unsafe {
                gemm::gemm(
                    m,
                    span.len,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    span.len as isize,
                    false,
                    queries.as_ptr(),
                    1,
                    q_stride as isize,
                    keys.as_ptr(),
                    (3 * h) as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                kernels::softmax_rows(&mut scores[..m * span.len], span.len);
                let out = context.get().add(out_row * h + head * d);
                gemm::gemm(
                    m,
                    d,
                    span.len,
                    out,
                    1,
                    h as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    span.len as isize,
                    values.as_ptr(),
                    1,
                    (3 * h) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    });
}

/// A pointer tasks may write through when each writes a disjoint region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

impl SharedMut {
    /// A method, so closures capture the wrapper (Send + Sync), not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// `out[r, offset..offset + outs.len()] = x[r] · W[outs]ᵀ (+ b[outs] if `add_bias`)` for
/// `rows` rows of `x`, where `out` rows are `out_stride` apart. Without `add_bias` the
/// caller folds the bias into the next row kernel, saving a pass over the output.
#[allow(clippy::too_many_arguments)]
fn dense_rows(
    layer: &Dense,
    outs: std::ops::Range<usize>,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
    offset: usize,
    add_bias: bool,
) {
    let (k, n) = (layer.inputs, outs.len());
    assert!(
        x.len() >= rows * k
            && out.len() >= (rows.max(1) - 1) * out_stride + offset + n
            && outs.end <= layer.outputs
    );
    if add_bias {
        for r in 0..rows {
            out[r * out_stride + offset..r * out_stride + offset + n]
                .copy_from_slice(&layer.bias[outs.clone()]);
        }
    }
    let threads = if rows * n * k >= 1 << 16 {
        rayon::current_num_threads()
    } else {
        1
    };
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: bounds are asserted above; Wᵀ is (inputs, outputs) row-major, read from
    // column `outs.start` on.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr().add(offset),
            1,
            out_stride as isize,
            add_bias,
            x.as_ptr(),
            1,
            k as isize,
            layer.weight_t.as_ptr().add(outs.start),
            1,
            layer.outputs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x <- LayerNorm(x + input · Wᵀ + b)`: the residual block closing attention and the
/// feed-forward network; the bias joins the layer-norm pass. `scratch` holds the product.
fn residual_block(
    layer: &Dense,
    norm: &Norm,
    input: &[f32],
    x: &mut [f32],
    scratch: &mut [f32],
    eps: f32,
) {
    let (width, rows) = (layer.outputs, x.len() / layer.outputs);
    dense_rows(layer, 0..width, input, rows, scratch, width, 0, false);
    par_rows2(x, scratch, width, |x, a| {
        kernels::add_layer_norm(x, Some(a), Some(&layer.bias), &norm.gamma, &norm.beta, eps)
    });
}

/// Applies `f` to blocks of whole `width`-wide rows in parallel.
fn par_rows(x: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    let block = rows_per_task(x.len() / width) * width;
    x.par_chunks_mut(block).for_each(f);
}

/// Like [`par_rows`], with the matching rows of `other`.
fn par_rows2(
    x: &mut [f32],
    other: &[f32],
    width: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    let block = rows_per_task(x.len() / width) * width;
    x.par_chunks_mut(block)
        .zip(other.par_chunks(block))
        .for_each(|(a, b)| f(a, b));
}

fn rows_per_task(rows: usize) -> usize {
    (rows / (4 * rayon::current_num_threads())).max(1)
}
