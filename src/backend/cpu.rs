//! The CPU backend. Two implementations of the same f32 model: the fast encoder
//! (`dealsift-cpu-encoder`: token-packed batches, fused vectorised kernels) serves by
//! default; the candle model, which training uses, stays selectable as the reference.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dealsift_cpu_encoder::{Dims, Encoder, EncoderError};

use super::{Backend, BackendInfo, Batch, Shapes};
use crate::error::{BackendError, ModelError};
use crate::model::bert::encoder_root;
use crate::model::{BertClassifier, BertConfig};

/// Which implementation computes the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// The fast encoder (default).
    #[default]
    Fast,
    /// The candle model: slower, the accuracy reference.
    Reference,
}

enum Model {
    Fast(Box<Encoder>),
    Reference(BertClassifier),
}

pub struct CpuBackend {
    model: Model,
    max_batch: usize,
    max_seq: usize,
}

impl CpuBackend {
    /// Loads `model.safetensors` (any float dtype; computed in f32).
    pub fn load(dir: &Path, cfg: &BertConfig, max_batch: usize, max_seq: usize, kernels: CpuKernels) -> Result<Self, ModelError> {
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(ModelError::Invalid(format!("{} not found", weights.display())));
        }
        // SAFETY: the file is mapped read-only and not modified while the server runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
        let model = match kernels {
            CpuKernels::Reference => Model::Reference(BertClassifier::load(vb, cfg)?),
            CpuKernels::Fast => Model::Fast(Box::new(load_fast(vb, cfg)?)),
        };
        Ok(Self { model, max_batch, max_seq })
    }
}

fn load_fast(vb: VarBuilder, cfg: &BertConfig) -> Result<Encoder, ModelError> {
    if cfg.hidden_act != "gelu" {
        return Err(ModelError::Invalid(format!(
            "the fast CPU kernels implement hidden_act \"gelu\" only, the model has {:?}; use the reference kernels",
            cfg.hidden_act
        )));
    }
    let encoder_vb = encoder_root(&vb);
    let dims = Dims {
        hidden: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        intermediate: cfg.intermediate_size,
        layers: cfg.num_hidden_layers,
        labels: cfg.num_labels(),
        vocab: cfg.vocab_size,
        max_positions: cfg.max_position_embeddings,
        type_vocab: cfg.type_vocab_size,
        layer_norm_eps: cfg.layer_norm_eps as f32,
    };
    let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, EncoderError> {
        let root = if name.starts_with("classifier.") { &vb } else { &encoder_vb };
        let tensor = root.get(shape, name).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
        tensor.map_err(|e| EncoderError::Weight { name: name.to_string(), problem: e.to_string() })
    };
    Encoder::load(dims, get).map_err(|e| ModelError::Invalid(e.to_string()))
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cpu", shapes: Shapes::Any { max_batch: self.max_batch, max_seq: self.max_seq } }
    }

    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        match &mut self.model {
            Model::Fast(encoder) => encoder
                .forward(&batch.input_ids, &batch.attention_mask, batch.rows, batch.seq)
                .map_err(|e| BackendError::InvalidInput(e.to_string())),
            Model::Reference(model) => {
                let device = Device::Cpu;
                let shape = (batch.rows, batch.seq);
                let ids = Tensor::from_slice(&batch.input_ids, shape, &device)?;
                let mask = Tensor::from_slice(&batch.attention_mask, shape, &device)?;
                let types = ids.zeros_like()?;
                Ok(model.forward(&ids, &types, &mask)?.to_vec2::<f32>()?)
            }
        }
    }
}
