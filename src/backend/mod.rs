//! The compute boundary. A backend turns a padded batch of token ids into logits; the
//! batcher decides what goes into a batch and which shape it is padded to.

pub mod cpu;
pub mod neuron;

use crate::error::BackendError;

/// A (batch, sequence) shape an accelerator was compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bucket {
    pub batch: usize,
    pub seq: usize,
}

/// The shapes a backend can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shapes {
    /// Any batch up to `max_batch` rows and any length up to `max_seq` tokens.
    Any { max_batch: usize, max_seq: usize },
    /// Only these shapes (sorted); a batch is padded to the smallest that fits it.
    Buckets(Vec<Bucket>),
}

impl Shapes {
    /// The smallest shape that holds `rows` sequences of up to `seq` tokens, if any.
    pub fn fit(&self, rows: usize, seq: usize) -> Option<Bucket> {
        match self {
            Shapes::Any { max_batch, max_seq } => {
                (rows <= *max_batch && seq <= *max_seq).then_some(Bucket { batch: rows, seq })
            }
            Shapes::Buckets(buckets) => buckets
                .iter()
                .filter(|b| b.batch >= rows && b.seq >= seq)
                .min_by_key(|b| (b.batch * b.seq, b.seq))
                .copied(),
        }
    }

    /// Longest sequence any shape takes.
    pub fn max_seq(&self) -> usize {
        match self {
            Shapes::Any { max_seq, .. } => *max_seq,
            Shapes::Buckets(b) => b.iter().map(|b| b.seq).max().unwrap_or(0),
        }
    }

    /// Most rows any shape takes.
    pub fn max_batch(&self) -> usize {
        match self {
            Shapes::Any { max_batch, .. } => *max_batch,
            Shapes::Buckets(b) => b.iter().map(|b| b.batch).max().unwrap_or(0),
        }
    }
}

/// A dense, row-major batch: `rows` x `seq` token ids with a 0/1 attention mask.
/// Padding rows (to fill a bucket) have an all-zero mask except the first position.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub rows: usize,
    pub seq: usize,
}

impl Batch {
    /// Packs sequences into `shape`, padding with `pad_id`.
    pub fn pack<'a>(sequences: impl ExactSizeIterator<Item = &'a [u32]>, shape: Bucket, pad_id: u32) -> Self {
        let Bucket { batch: rows, seq } = shape;
        let mut input_ids = vec![pad_id; rows * seq];
        let mut attention_mask = vec![0u32; rows * seq];
        let used = sequences.len();
        for (row, ids) in sequences.enumerate() {
            input_ids[row * seq..row * seq + ids.len()].copy_from_slice(ids);
            attention_mask[row * seq..row * seq + ids.len()].fill(1);
        }
        for row in used..rows {
            attention_mask[row * seq] = 1;
        }
        Self { input_ids, attention_mask, rows, seq }
    }
}

/// What a backend is, for `GetModelInfo` and the batcher.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    pub name: &'static str,
    pub shapes: Shapes,
}

/// One executor of the model. Each instance is owned by one worker thread, so `predict`
/// may keep per-thread state (pre-allocated tensors, a bound device core).
pub trait Backend: Send {
    fn info(&self) -> BackendInfo;
    /// Logits for each row of `batch` (padding rows included), `labels` values per row.
    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError>;
}
