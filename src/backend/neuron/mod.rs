//! The AWS Neuron backend: the model compiled ahead of time into one NEFF per (batch, seq)
//! bucket (`deploy/neuron/compile.py`), run through libnrt on Trainium NeuronCores.
//!
//! libnrt is loaded at run time, so dealsift builds and runs without the Neuron SDK and
//! says what to install when it is asked for this backend and the library is missing.
//! Data parallel: one executor per visible NeuronCore (the batcher gives each its own
//! thread), each with every bucket's NEFF loaded on its core and its input and output
//! tensors allocated once, so a batch costs a few tensor writes, one `nrt_execute` and one
//! read. Runtime errors become `BackendError`s (see `status`); none of them panics.

mod ffi;
mod manifest;
mod runtime;
mod status;

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use self::manifest::{Manifest, Role};
use self::runtime::{Model, Runtime, Tensor, TensorInfo, TensorSet};
use self::status::CallError;
use super::{Backend, BackendInfo, Batch, Bucket, Shapes};
use crate::engine::ModelDir;
use crate::error::{BackendError, ModelError};

pub use self::ffi::LIBRARY_FILE;
pub use self::runtime::EXEC_TIMEOUT_ENV;

/// Where the aws-neuronx-runtime-lib package installs libnrt.
pub const DEFAULT_LIB_DIR: &str = "/opt/aws/neuron/lib";

const INSTALL_HINT: &str = "Install the Neuron runtime (package aws-neuronx-runtime-lib from the AWS Neuron APT or YUM repository, \
     see deploy/README.md), or point --neuron-lib-dir (DEALSIFT_NEURON_LIB_DIR) at the folder holding libnrt.so.1";

/// How to reach and drive the runtime.
#[derive(Debug, Clone)]
pub struct NeuronOptions {
    /// Folder holding `libnrt.so.1`.
    pub lib_dir: PathBuf,
    /// Seconds one execution may take before libnrt returns `NRT_TIMEOUT`; must already be in
    /// `NEURON_RT_EXEC_TIMEOUT` (see `Runtime::init`).
    pub exec_timeout_s: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NeuronError {
    #[error("cannot load the Neuron runtime library {} ({reason}). {INSTALL_HINT}", path.display())]
    Library { path: PathBuf, reason: String },
    #[error("{} has no {symbol} ({reason}); this backend needs libnrt from Neuron SDK 2.x: install a current aws-neuronx-runtime-lib", path.display())]
    Symbol { path: PathBuf, symbol: &'static str, reason: String },
    #[error("{}: {source}; {hint}", path.display())]
    Io { path: PathBuf, source: std::io::Error, hint: &'static str },
    #[error("Neuron manifest {0}")]
    Manifest(String),
    #[error("NEFF {0}")]
    Interface(String),
    #[error("Neuron runtime: {0}")]
    Call(#[from] CallError),
    #[error("Neuron backend: {0}")]
    Config(String),
}

impl From<NeuronError> for ModelError {
    fn from(e: NeuronError) -> Self {
        match e {
            NeuronError::Library { path, reason } => ModelError::io(
                &path,
                std::io::Error::other(format!("cannot load the Neuron runtime library ({reason}). {INSTALL_HINT}")),
            ),
            NeuronError::Io { path, source, hint } => ModelError::io(&path, std::io::Error::new(source.kind(), format!("{source}; {hint}"))),
            other => ModelError::Backend(other.to_string()),
        }
    }
}

/// libnrt, loaded and resolved but not yet initialised.
pub struct RuntimeLibrary(ffi::Api);

impl RuntimeLibrary {
    /// Loads `<lib_dir>/libnrt.so.1`. Cheap, and the first thing to fail without the SDK.
    pub fn open(lib_dir: &Path) -> Result<Self, NeuronError> {
        ffi::Api::open(lib_dir).map(Self)
    }
}

/// Initialises the runtime and loads every bucket of `model`'s `neuron/manifest.json` on
/// every visible NeuronCore: one executor per core.
pub fn load_executors(library: RuntimeLibrary, model: &ModelDir, options: &NeuronOptions) -> Result<Vec<Box<dyn Backend>>, NeuronError> {
    let manifest = Manifest::read(&model.path, &model.version, model.labels.len())?;
    let runtime = Runtime::init(library.0, options.exec_timeout_s)?;
    let cores = runtime.visible_cores();
    tracing::info!(
        library = %runtime.path().display(),
        runtime = runtime.version(),
        cores,
        sdk = manifest.sdk_version,
        compiler = manifest.compiler_version,
        target = manifest.target,
        flags = ?manifest.compiler_flags,
        exec_timeout_s = options.exec_timeout_s,
        "Neuron runtime initialised"
    );
    if cores == 0 {
        return Err(NeuronError::Config(
            "the runtime sees no NeuronCores: check neuron-ls, NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES and the device plugin's allocation".into(),
        ));
    }
    let shapes = manifest.shapes();
    let longest = shapes.iter().map(|b| b.seq).max().unwrap_or(0);
    if longest < model.window {
        tracing::warn!(longest, window = model.window, "the longest compiled bucket is shorter than the model window; longer texts are cut to it");
    }
    let neff_dir = model.path.join("neuron");
    let mut per_core: Vec<Vec<Compiled>> = (0..cores).map(|_| Vec::with_capacity(manifest.buckets.len())).collect();
    for entry in &manifest.buckets {
        let path = neff_dir.join(&entry.neff);
        let neff = std::fs::read(&path).map_err(|source| NeuronError::Io { path: path.clone(), source, hint: "the manifest lists a NEFF that cannot be read: recompile" })?;
        let bucket = Bucket { batch: entry.batch, seq: entry.seq };
        for (core, compiled) in per_core.iter_mut().enumerate() {
            let vnc = c_int::try_from(core).map_err(|_| NeuronError::Config(format!("core index {core} out of range")))?;
            let started = Instant::now();
            compiled.push(Compiled::load(&runtime, &manifest, bucket, &neff, vnc).map_err(|e| match e {
                NeuronError::Call(e) => NeuronError::Interface(format!("{} on core {core}: {e}", path.display())),
                NeuronError::Interface(e) => NeuronError::Interface(format!("{}: {e}", path.display())),
                other => other,
            })?);
            tracing::info!(neff = %path.display(), core, batch = bucket.batch, seq = bucket.seq, ms = started.elapsed().as_millis() as u64, "NEFF loaded");
        }
    }
    Ok(per_core
        .into_iter()
        .enumerate()
        .map(|(core, compiled)| Box::new(NeuronExecutor { core, compiled, shapes: shapes.clone() }) as Box<dyn Backend>)
        .collect())
}

/// One NeuronCore: every bucket's model and tensors, driven by one batcher worker thread.
struct NeuronExecutor {
    core: usize,
    compiled: Vec<Compiled>,
    shapes: Vec<Bucket>,
}

impl Backend for NeuronExecutor {
    fn info(&self) -> BackendInfo {
        BackendInfo { name: "neuron", shapes: Shapes::Buckets(self.shapes.clone()) }
    }

    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        let core = self.core;
        let compiled = self
            .compiled
            .iter_mut()
            .find(|c| c.bucket.batch == batch.rows && c.bucket.seq == batch.seq)
            .ok_or_else(|| BackendError::InvalidInput(format!("no NEFF compiled for {} rows of {} tokens on core {core}", batch.rows, batch.seq)))?;
        compiled.run(batch)
    }
}

/// One bucket on one core. Fields drop in order: the model is unloaded, then its tensors
/// freed, then the sets destroyed, as AWS's example tears down.
struct Compiled {
    bucket: Bucket,
    labels: usize,
    model: Model,
    inputs: Vec<(Role, Tensor)>,
    output: Tensor,
    input_set: TensorSet,
    output_set: TensorSet,
    /// Host-side bytes of one input, reused across batches.
    staging: Vec<u8>,
    /// Host-side bytes of the logits.
    logits: Vec<u8>,
}

impl Compiled {
    fn load(runtime: &Arc<Runtime>, manifest: &Manifest, bucket: Bucket, neff: &[u8], vnc: c_int) -> Result<Self, NeuronError> {
        let model = runtime.load(neff, vnc)?;
        check_interface(&model.tensor_info()?, manifest, bucket).map_err(NeuronError::Interface)?;
        let labels = manifest.output.labels;
        let input_bytes = bucket.batch * bucket.seq * 4;
        let mut input_set = runtime.tensor_set()?;
        let mut inputs = Vec::with_capacity(manifest.inputs.len());
        for input in &manifest.inputs {
            let tensor = runtime.tensor(vnc, input_bytes, &input.name)?;
            input_set.add(&input.name, &tensor)?;
            inputs.push((input.role, tensor));
        }
        let output = runtime.tensor(vnc, bucket.batch * labels * 4, &manifest.output.name)?;
        let mut output_set = runtime.tensor_set()?;
        output_set.add(&manifest.output.name, &output)?;
        Ok(Self {
            bucket,
            labels,
            model,
            inputs,
            logits: vec![0; bucket.batch * labels * 4],
            output,
            input_set,
            output_set,
            staging: Vec::with_capacity(input_bytes),
        })
    }

    fn run(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        let cells = self.bucket.batch * self.bucket.seq;
        if batch.input_ids.len() != cells || batch.attention_mask.len() != cells {
            return Err(BackendError::InvalidInput(format!("batch holds {} ids for a {}x{} bucket", batch.input_ids.len(), self.bucket.batch, self.bucket.seq)));
        }
        for (role, tensor) in &mut self.inputs {
            self.staging.clear();
            match role {
                Role::InputIds => int32_bytes(&batch.input_ids, &mut self.staging)?,
                Role::AttentionMask => int32_bytes(&batch.attention_mask, &mut self.staging)?,
                Role::TokenTypeIds => self.staging.resize(cells * 4, 0),
            }
            tensor.write(&self.staging)?;
        }
        self.model.execute(&self.input_set, &mut self.output_set)?;
        self.output.read(&mut self.logits)?;
        Ok(self
            .logits
            .chunks_exact(self.labels * 4)
            .map(|row| row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            .collect())
    }
}

/// Little-endian int32, the NEFF's input type.
fn int32_bytes(values: &[u32], out: &mut Vec<u8>) -> Result<(), BackendError> {
    for &v in values {
        let v = i32::try_from(v).map_err(|_| BackendError::InvalidInput(format!("token id {v} does not fit an int32 input")))?;
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// Checks a NEFF's tensors, as the runtime reports them, against the manifest: every input
/// and the one output present by name, with the bucket's byte size and (when reported)
/// shape. Dtype codes are not compared: their numbering changed in SDK 2.28.
fn check_interface(infos: &[TensorInfo], manifest: &Manifest, bucket: Bucket) -> Result<(), String> {
    let Bucket { batch, seq } = bucket;
    let listing = || infos.iter().map(|t| format!("{}{:?} ({} bytes)", t.name, t.shape, t.size)).collect::<Vec<_>>().join(", ");
    let expect = |t: &TensorInfo, shape: [usize; 2]| -> Result<(), String> {
        let bytes = shape[0] * shape[1] * 4;
        tracing::debug!(tensor = t.name, dtype = t.dtype, size = t.size, shape = ?t.shape, "NEFF tensor (dtype code not checked)");
        if t.usage == ffi::NRT_TENSOR_USAGE_INPUT && t.size == 2 * bytes {
            return Err(format!(
                "input {} is {} bytes, twice the int32 size of a {batch}x{seq} bucket: it was traced with int64 inputs, which the compiler passes as int32 pairs; recompile with int32 example inputs (deploy/neuron/compile.py does)",
                t.name, t.size
            ));
        }
        if t.size != bytes {
            return Err(format!("{} is {} bytes but the manifest's {batch}x{seq} bucket needs {bytes} ({}x{} x 4)", t.name, t.size, shape[0], shape[1]));
        }
        let wanted = [shape[0] as u32, shape[1] as u32];
        if !t.shape.is_empty() && t.shape != wanted {
            return Err(format!("{} has shape {:?} but the manifest's bucket needs {wanted:?}", t.name, t.shape));
        }
        Ok(())
    };
    for input in &manifest.inputs {
        let t = infos
            .iter()
            .find(|t| t.usage == ffi::NRT_TENSOR_USAGE_INPUT && t.name == input.name)
            .ok_or_else(|| format!("has no input {} (the manifest's {}); its tensors: {}", input.name, input.role.as_str(), listing()))?;
        expect(t, [batch, seq])?;
    }
    if let Some(extra) = infos.iter().find(|t| t.usage == ffi::NRT_TENSOR_USAGE_INPUT && !manifest.inputs.iter().any(|i| i.name == t.name)) {
        return Err(format!("input {} is not in the manifest, so nothing would write it; its tensors: {}", extra.name, listing()));
    }
    let outputs: Vec<&TensorInfo> = infos.iter().filter(|t| t.usage == ffi::NRT_TENSOR_USAGE_OUTPUT).collect();
    match outputs.as_slice() {
        [t] if t.name == manifest.output.name => expect(t, [batch, manifest.output.labels]),
        _ => Err(format!("must have exactly one output, {}; its tensors: {}", manifest.output.name, listing())),
    }
}
