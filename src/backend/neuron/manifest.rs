//! `neuron/manifest.json` in a model directory: what `deploy/neuron/compile.py` compiled.
//!
//! The runtime cannot be trusted to describe a NEFF's interface (dtype codes were renumbered
//! in SDK 2.28, and int64 inputs come back as int32 with a doubled last dimension), so the
//! compile step writes down what it traced and the backend checks each NEFF's tensor info
//! against it by name, byte size and shape. See deploy/neuron/README.md for the format.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::NeuronError;
use crate::backend::Bucket;

/// The manifest format this backend reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// neuronx-cc `--target` (e.g. `trn1`).
    pub target: String,
    pub sdk_version: String,
    pub compiler_version: String,
    #[serde(default)]
    pub compiler_flags: Vec<String>,
    /// The model directory's version (config.json `dealsift.version`, or its weights digest)
    /// the NEFFs were traced from: their weights are compiled in.
    pub model_version: String,
    /// NEFF inputs in NEFF order, each `[batch, seq]`.
    pub inputs: Vec<Input>,
    pub output: Output,
    pub buckets: Vec<BucketEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Input {
    /// NEFF tensor name (`input0`, ...).
    pub name: String,
    pub role: Role,
    pub dtype: String,
}

/// What the executor writes into an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    InputIds,
    AttentionMask,
    /// Written as zeros (single-segment input).
    TokenTypeIds,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::InputIds => "input_ids",
            Role::AttentionMask => "attention_mask",
            Role::TokenTypeIds => "token_type_ids",
        }
    }
}

/// The logits, `[batch, labels]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Output {
    pub name: String,
    pub dtype: String,
    pub labels: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BucketEntry {
    pub batch: usize,
    pub seq: usize,
    /// NEFF file, relative to the manifest's folder.
    pub neff: PathBuf,
}

impl Manifest {
    /// Path of the manifest in a model directory.
    pub fn path(model_dir: &Path) -> PathBuf {
        model_dir.join("neuron").join("manifest.json")
    }

    /// Reads and checks the manifest of `model_dir` against the model's version and labels.
    pub fn read(model_dir: &Path, model_version: &str, labels: usize) -> Result<Self, NeuronError> {
        let path = Self::path(model_dir);
        let text = std::fs::read_to_string(&path).map_err(|source| NeuronError::Io {
            path: path.clone(),
            source,
            hint: "compile the model for Neuron first (deploy/neuron/README.md)",
        })?;
        let manifest: Self = serde_json::from_str(&text).map_err(|e| NeuronError::Manifest(format!("{}: {e}", path.display())))?;
        manifest
            .check(model_version, labels)
            .map_err(|e| NeuronError::Manifest(format!("{}: {e}", path.display())))?;
        Ok(manifest)
    }

    fn check(&self, model_version: &str, labels: usize) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (this dealsift reads format {FORMAT})", self.format));
        }
        if self.model_version != model_version {
            return Err(format!(
                "the NEFFs were compiled from model version {:?} but the model directory is version {model_version:?}: recompile (deploy/neuron/compile.py)",
                self.model_version
            ));
        }
        for input in &self.inputs {
            if input.dtype != "int32" {
                return Err(format!(
                    "input {} is {}; Neuron inputs must be int32 (the compiler mangles int64 inputs): recompile with int32 example inputs",
                    input.name, input.dtype
                ));
            }
        }
        for role in [Role::InputIds, Role::AttentionMask, Role::TokenTypeIds] {
            let count = self.inputs.iter().filter(|i| i.role == role).count();
            let required = role != Role::TokenTypeIds;
            if count > 1 || (required && count == 0) {
                let wanted = if required { "exactly one" } else { "at most one" };
                return Err(format!("inputs must have {wanted} {} entry, found {count}", role.as_str()));
            }
        }
        let mut names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).chain([self.output.name.as_str()]).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("tensor names must be unique".into());
        }
        if self.output.dtype != "float32" {
            return Err(format!("output {} is {}; the backend reads float32 logits", self.output.name, self.output.dtype));
        }
        if self.output.labels == 0 || self.output.labels != labels {
            return Err(format!("output has {} labels but the model has {labels}", self.output.labels));
        }
        if self.buckets.is_empty() {
            return Err("no buckets".into());
        }
        let mut shapes: Vec<Bucket> = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            let shape = Bucket { batch: b.batch, seq: b.seq };
            if b.batch == 0 || b.seq == 0 {
                return Err(format!("bucket {}x{} is empty", b.batch, b.seq));
            }
            if shapes.contains(&shape) {
                return Err(format!("bucket {}x{} is listed twice", b.batch, b.seq));
            }
            shapes.push(shape);
        }
        Ok(())
    }

    /// The compiled shapes, sorted.
    pub fn shapes(&self) -> Vec<Bucket> {
        let mut shapes: Vec<Bucket> = self.buckets.iter().map(|b| Bucket { batch: b.batch, seq: b.seq }).collect();
        shapes.sort_unstable();
        shapes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Manifest, String> {
        let mut v = serde_json::json!({
            "format": 1, "target": "trn1", "sdk_version": "2.28.0", "compiler_version": "2.21.0",
            "compiler_flags": ["--target", "trn1"], "model_version": "1.0.0",
            "inputs": [
                {"name": "input0", "role": "input_ids", "dtype": "int32"},
                {"name": "input1", "role": "attention_mask", "dtype": "int32"}
            ],
            "output": {"name": "output0", "dtype": "float32", "labels": 2},
            "buckets": [{"batch": 8, "seq": 128, "neff": "b8_s128.neff"}, {"batch": 1, "seq": 64, "neff": "b1_s64.neff"}]
        });
        edit(&mut v);
        let m: Manifest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        m.check("1.0.0", 2).map(|_| m)
    }

    #[test]
    fn a_good_manifest_lists_sorted_shapes() {
        let m = manifest(|_| {}).unwrap();
        assert_eq!(m.shapes(), vec![Bucket { batch: 1, seq: 64 }, Bucket { batch: 8, seq: 128 }]);
        assert_eq!(m.inputs[1].role, Role::AttentionMask);
    }

    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let cases: Vec<(&str, Edit)> = vec![
            ("format 2", Box::new(|v| v["format"] = 2.into())),
            ("recompile", Box::new(|v| v["model_version"] = "0.9.0".into())),
            ("must be int32", Box::new(|v| v["inputs"][0]["dtype"] = "int64".into())),
            ("exactly one input_ids entry, found 2", Box::new(|v| v["inputs"][1]["role"] = "input_ids".into())),
            ("unique", Box::new(|v| v["inputs"][1]["name"] = "input0".into())),
            ("float32 logits", Box::new(|v| v["output"]["dtype"] = "bfloat16".into())),
            ("3 labels", Box::new(|v| v["output"]["labels"] = 3.into())),
            ("no buckets", Box::new(|v| v["buckets"] = serde_json::json!([]))),
            ("listed twice", Box::new(|v| v["buckets"][1] = serde_json::json!({"batch": 8, "seq": 128, "neff": "x.neff"}))),
            ("is empty", Box::new(|v| v["buckets"][1]["batch"] = 0.into())),
            ("unknown variant", Box::new(|v| v["inputs"][0]["role"] = "position_ids".into())),
        ];
        for (want, edit) in cases {
            let err = manifest(edit).expect_err(want);
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
