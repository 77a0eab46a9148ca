//! The model as the service sees it: a model directory opened, documents tokenized,
//! their windows sent through the batcher, and per-document results put together.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::batcher::{Batcher, JobError, QueueFull, Reservation};
use crate::error::{BackendError, ModelError};
use crate::model::config::LexicalMeta;
use crate::model::{lexical, BertConfig, LexicalModel};
use crate::proto::{DocumentResult, Label, LabelScore, Timing};
use crate::tokenize::{Encoded, LongText, TextEncoder};

/// A Hugging Face-style model directory and what dealsift reads from it.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: BertConfig,
    pub model_id: String,
    pub version: String,
    pub labels: Vec<String>,
    pub deal_index: usize,
    pub temperature: f64,
    pub threshold: f32,
    /// Tokens per window, special tokens included.
    pub window: usize,
    /// The whole-document lexical model and how it joins the transformer, when the directory
    /// has one.
    pub lexical: Option<(Arc<LexicalModel>, LexicalMeta)>,
}

impl ModelDir {
    /// Reads `config.json` (and `tokenizer_config.json`'s `model_max_length`, when present).
    /// `max_window` caps the window further (e.g. to what an accelerator was compiled for).
    pub fn open(path: &Path, max_window: Option<usize>) -> Result<Self, ModelError> {
        let config = BertConfig::from_file(&path.join("config.json"))?;
        let meta = &config.dealsift;
        let tokenizer_max = std::fs::read_to_string(path.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_max_length")?.as_u64())
            .map(|n| n as usize);
        let window = [meta.max_sequence_length, tokenizer_max, max_window]
            .into_iter()
            .flatten()
            .fold(config.max_position_embeddings, usize::min);
        let file = path.join(lexical::FILE);
        let lexical = match meta.lexical {
            Some(how) => {
                if !file.is_file() {
                    return Err(ModelError::Invalid(format!(
                        "config.json sets dealsift.lexical but {} is missing: restore it, or remove dealsift.lexical to serve the transformer alone",
                        file.display()
                    )));
                }
                Some((Arc::new(LexicalModel::load(&file, how.vocabulary)?), how))
            }
            None => {
                if file.is_file() {
                    tracing::warn!(file = %file.display(), "ignored: config.json has no dealsift.lexical section");
                }
                None
            }
        };
        let version = match &meta.version {
            Some(v) => v.clone(),
            None => weights_digest(std::iter::once(path.join("model.safetensors")).chain(lexical.as_ref().map(|_| file.clone())))?,
        };
        let model_id = meta.model_id.clone().unwrap_or_else(|| {
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        let temperature = meta.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(ModelError::Invalid(format!("dealsift.temperature must be > 0, got {temperature}")));
        }
        let threshold = match &lexical {
            Some((_, how)) => how.threshold,
            None => meta.threshold.unwrap_or(0.5),
        } as f32;
        Ok(Self {
            path: path.to_path_buf(),
            labels: config.labels()?,
            deal_index: config.deal_index()?,
            config,
            model_id,
            version,
            temperature,
            threshold,
            window,
            lexical,
        })
    }
}

/// First 12 hex digits of the SHA-256 of the weights files: identifies an unversioned model.
fn weights_digest(paths: impl IntoIterator<Item = PathBuf>) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}

/// Per-request options, validated.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub threshold: f32,
    pub long_text: LongText,
}

/// A document, validated.
#[derive(Debug, Clone)]
pub struct Doc {
    pub id: String,
    pub title: Option<String>,
    pub text: String,
}

/// How the caller wants to wait for room in the queue.
#[derive(Debug, Clone, Copy)]
pub enum Admission {
    /// Fail at once with `QueueFull` (unary calls: the client retries with backoff).
    FailFast,
    /// Wait for room (streams: backpressure to the client).
    Wait,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    #[error("deadline exceeded after {0:?}; the server could not finish in time (raise the deadline, or ModelInfer's timeout parameter, or send fewer documents)")]
    DeadlineExceeded(Duration),
    #[error("request needs {needed} model windows but the queue holds {limit}; send fewer or shorter documents")]
    TooLarge { needed: usize, limit: usize },
    #[error("tokenization failed: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Backend(BackendError),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl From<JobError> for EngineError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::DeadlineExceeded { waited } => Self::DeadlineExceeded(waited),
            JobError::Backend(b) => Self::Backend(b),
        }
    }
}

pub struct Engine {
    pub model: ModelDir,
    encoder: Arc<TextEncoder>,
    batcher: Batcher,
    pub max_chunks: usize,
}

impl Engine {
    pub fn new(model: ModelDir, encoder: TextEncoder, batcher: Batcher, max_chunks: usize) -> Self {
        Self { model, encoder: Arc::new(encoder), batcher, max_chunks }
    }

    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    pub fn shutdown(&self) {
        self.batcher.shutdown();
    }

    /// Classifies documents; results come back in input order.
    pub async fn classify(&self, docs: Vec<Doc>, options: Options, deadline: Option<Instant>, admission: Admission) -> Result<Vec<DocumentResult>, EngineError> {
        let started = Instant::now();
        let encoder = self.encoder.clone();
        let lexical = self.model.lexical.as_ref().map(|(model, how)| (model.clone(), how.joins));
        let max_chunks = self.max_chunks;
        let (encoded, ids) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(docs.len());
            let mut ids = Vec::with_capacity(docs.len());
            for doc in docs {
                let t0 = Instant::now();
                let enc = encoder.encode(doc.title.as_deref(), &doc.text, options.long_text, max_chunks)?;
                let lexical_logit = lexical
                    .as_ref()
                    .filter(|(_, joins)| joins.includes(enc.longer_than_window()))
                    .map(|(m, _)| m.logit(doc.title.as_deref(), &doc.text));
                out.push((enc, lexical_logit, t0.elapsed()));
                ids.push(doc.id);
            }
            Ok::<_, ModelError>((out, ids))
        })
        .await
        .map_err(|_| EngineError::ShuttingDown)?
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;

        let needed: usize = encoded.iter().map(|(e, _, _)| e.windows.len()).sum();
        if needed > self.batcher.capacity() {
            return Err(EngineError::TooLarge { needed, limit: self.batcher.capacity() });
        }
        let reservation: Reservation = match admission {
            Admission::FailFast => self.batcher.try_reserve(needed)?,
            Admission::Wait => self.batcher.reserve(needed).await,
        };
        let windows: Vec<Vec<u32>> = encoded.iter().flat_map(|(e, _, _)| e.windows.iter().cloned()).collect();
        let receivers = self.batcher.submit(reservation, windows, deadline);
        let wait_all = futures::future::join_all(receivers);
        let answers = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), wait_all)
                .await
                .map_err(|_| EngineError::DeadlineExceeded(started.elapsed()))?,
            None => wait_all.await,
        };
        let mut scored = Vec::with_capacity(answers.len());
        for answer in answers {
            scored.push(answer.map_err(|_| EngineError::ShuttingDown)??);
        }
        let mut scored = scored.into_iter();
        Ok(encoded
            .into_iter()
            .zip(ids)
            .map(|((enc, lexical_logit, tokenize), id)| {
                let windows: Vec<_> = scored.by_ref().take(enc.windows.len()).collect();
                self.result(id, &enc, lexical_logit, tokenize, windows, options)
            })
            .collect())
    }

    fn result(&self, id: String, enc: &Encoded, lexical_logit: Option<f32>, tokenize: Duration, windows: Vec<crate::batcher::Scored>, options: Options) -> DocumentResult {
        let probs: Vec<Vec<f32>> = windows.iter().map(|w| softmax(&w.logits, self.model.temperature)).collect();
        let deal = self.model.deal_index;
        let scores: Vec<f32> = match options.long_text {
            LongText::ChunkMean => (0..self.model.labels.len())
                .map(|l| probs.iter().map(|p| p[l]).sum::<f32>() / probs.len() as f32)
                .collect(),
            LongText::ChunkMax | LongText::Truncate => probs
                .iter()
                .max_by(|a, b| a[deal].total_cmp(&b[deal]))
                .cloned()
                .unwrap_or_default(),
        };
        let scores = match (lexical_logit, &self.model.lexical) {
            (Some(z), Some((_, how))) => {
                let p = combine(scores.get(deal).copied().unwrap_or(0.0), z, how);
                (0..scores.len()).map(|l| if l == deal { p } else { 1.0 - p }).collect()
            }
            _ => scores,
        };
        let deal_probability = scores.get(deal).copied().unwrap_or(0.0);
        let label = if deal_probability >= options.threshold { Label::Deal } else { Label::NonDeal };
        let queue = windows.iter().map(|w| w.queue).max().unwrap_or_default();
        let inference = windows.iter().map(|w| w.inference).sum::<Duration>();
        DocumentResult {
            id,
            label: label as i32,
            deal_probability,
            scores: self.model.labels.iter().zip(&scores).map(|(l, &score)| LabelScore { label: l.clone(), score }).collect(),
            token_count: enc.token_count as u32,
            truncated: enc.truncated,
            chunks: enc.windows.len() as u32,
            timing: Some(Timing {
                tokenize_us: tokenize.as_micros() as u64,
                queue_us: queue.as_micros() as u64,
                inference_us: inference.as_micros() as u64,
            }),
        }
    }
}

/// The deal probability as served: the transformer's calibrated probability, joined (`combine`)
/// to the lexical logit when the text has one, i.e. is one the stage joins (`classify`).
pub fn joined_probability(transformer_probability: f32, lexical_logit: Option<f32>, how: &LexicalMeta) -> f32 {
    lexical_logit.map_or(transformer_probability, |z| combine(transformer_probability, z, how))
}

/// The deal probability from the transformer's calibrated probability and the lexical logit,
/// for a text the stage joins (`LexicalMeta::joins`).
pub fn combine(transformer_probability: f32, lexical_logit: f32, how: &LexicalMeta) -> f32 {
    let z = ((1.0 - how.weight) * log_odds(transformer_probability) + how.weight * lexical_logit as f64) / how.temperature;
    (1.0 / (1.0 + (-z).exp())) as f32
}

/// ln(p / (1 - p)), with p kept off 0 and 1.
pub fn log_odds(p: f32) -> f64 {
    let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

/// Softmax of `logits / temperature`, computed in f64 for stability.
pub fn softmax(logits: &[f32], temperature: f64) -> Vec<f32> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scaled.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}
