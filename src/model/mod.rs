//! The model: architecture config, the BERT classifier, and loading a model directory.

pub mod bert;
pub mod config;
pub mod lexical;
mod ops;

pub use bert::{BertClassifier, Kernels};
pub use config::BertConfig;
pub use lexical::LexicalModel;
