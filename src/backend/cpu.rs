//! The CPU reference backend: the candle BERT classifier in f32.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{Backend, BackendInfo, Batch, Shapes};
use crate::error::{BackendError, ModelError};
use crate::model::{BertClassifier, BertConfig};

pub struct CpuBackend {
    model: BertClassifier,
    device: Device,
    max_batch: usize,
    max_seq: usize,
}

impl CpuBackend {
    /// Loads `model.safetensors` (any float dtype; computed in f32).
    pub fn load(dir: &Path, cfg: &BertConfig, max_batch: usize, max_seq: usize) -> Result<Self, ModelError> {
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(ModelError::Invalid(format!("{} not found", weights.display())));
        }
        let device = Device::Cpu;
        // SAFETY: the file is mapped read-only and not modified while the server runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
        let model = BertClassifier::load(vb, cfg)?;
        Ok(Self { model, device, max_batch, max_seq })
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cpu", shapes: Shapes::Any { max_batch: self.max_batch, max_seq: self.max_seq } }
    }

    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        let shape = (batch.rows, batch.seq);
        let ids = Tensor::from_slice(&batch.input_ids, shape, &self.device)?;
        let mask = Tensor::from_slice(&batch.attention_mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        Ok(self.model.forward(&ids, &types, &mask)?.to_vec2::<f32>()?)
    }
}
