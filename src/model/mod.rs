//! The model: architecture config, the BERT classifier, and loading a model directory.

pub mod bert;
pub mod config;
mod ops;

pub use bert::{BertClassifier, Kernels};
pub use config::BertConfig;
