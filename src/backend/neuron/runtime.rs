//! Owned libnrt objects, released in the order the runtime requires: every model, tensor and
//! tensor set holds the `Runtime`, so `nrt_close` runs only after the last of them is gone.

use std::ffi::{c_int, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

use super::ffi::{self, Api, NrtModel, NrtTensor, NrtTensorInfo, NrtTensorSet, NrtVersion};
use super::status::{CallError, NrtStatus};
use super::NeuronError;

/// libnrt reads this in `nrt_init`/`nrt_load`; its default differs between documents (30 s
/// or 600 s), so the backend always sets it.
pub const EXEC_TIMEOUT_ENV: &str = "NEURON_RT_EXEC_TIMEOUT";

/// Libraries initialised by this process, and their runtime while it is alive: libnrt cannot
/// be initialised twice, not even after `nrt_close`, so a model loaded while another still
/// holds the runtime (a reload) shares it.
static INITIALISED: Mutex<Vec<(PathBuf, Weak<Runtime>)>> = Mutex::new(Vec::new());

/// The initialised runtime (`nrt_init` done; `nrt_close` on drop).
pub struct Runtime {
    api: Api,
    visible_cores: u32,
    version: String,
}

impl Runtime {
    /// Initialises libnrt once for this process, or returns the runtime already initialised
    /// while it is still in use. `NEURON_RT_EXEC_TIMEOUT` must already hold
    /// `exec_timeout_s`: the environment is set before threads start (`dealsift serve` does),
    /// because changing it now would race with other threads reading it.
    pub fn init(api: Api, exec_timeout_s: u32) -> Result<Arc<Self>, NeuronError> {
        let configured = std::env::var(EXEC_TIMEOUT_ENV).ok();
        if configured.as_deref().map(str::trim) != Some(exec_timeout_s.to_string().as_str()) {
            return Err(NeuronError::Config(format!(
                "{EXEC_TIMEOUT_ENV} is {configured:?} but the execution timeout is {exec_timeout_s}s: export {EXEC_TIMEOUT_ENV}={exec_timeout_s} before the process starts threads"
            )));
        }
        let mut initialised = INITIALISED.lock().unwrap_or_else(|p| p.into_inner());
        let key = std::fs::canonicalize(&api.path).unwrap_or_else(|_| api.path.clone());
        if let Some((_, runtime)) = initialised.iter().find(|(path, _)| *path == key) {
            return runtime.upgrade().ok_or_else(|| {
                NeuronError::Config(format!("{} was already initialised and closed by this process; libnrt cannot be initialised twice", key.display()))
            });
        }
        // SAFETY: the signature is nrt_init's; the version strings are NUL-terminated and
        // outlive the call. No other nrt_* call has been made on this library.
        let status = unsafe { (api.init)(ffi::NRT_FRAMEWORK_TYPE_NO_FW, c"".as_ptr(), c"".as_ptr()) };
        NrtStatus(status).check("nrt_init")?;
        let mut runtime = Self { api, visible_cores: 0, version: String::new() };
        let mut cores = 0u32;
        // SAFETY: `cores` is a valid u32 for the call to write.
        let counted = NrtStatus(unsafe { (runtime.api.visible_count)(&mut cores) }).check("nrt_get_visible_vnc_count");
        runtime.visible_cores = cores;
        runtime.version = runtime.read_version();
        let runtime = Arc::new(runtime);
        // Recorded before any early return: from here on, dropping `runtime` closes libnrt.
        initialised.push((key, Arc::downgrade(&runtime)));
        counted?;
        Ok(runtime)
    }

    fn read_version(&self) -> String {
        let Some(get_version) = self.api.get_version else {
            return "unknown (no nrt_get_version)".into();
        };
        let mut v = NrtVersion { rt_major: 0, rt_minor: 0, rt_patch: 0, rt_maintenance: 0, rt_detail: [0; 128], git_hash: [0; 64] };
        // SAFETY: `v` is an nrt_version_t and its size is passed, as the header asks.
        match NrtStatus(unsafe { get_version(&mut v, std::mem::size_of::<NrtVersion>()) }).check("nrt_get_version") {
            Ok(()) => format!("{}.{}.{}.{} ({})", v.rt_major, v.rt_minor, v.rt_patch, v.rt_maintenance, ffi::c_chars(&v.rt_detail)),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// NeuronCores this process may use (`NEURON_RT_VISIBLE_CORES` / `NEURON_RT_NUM_CORES`, as
    /// the runtime applied them), addressed 0..n.
    pub fn visible_cores(&self) -> u32 {
        self.visible_cores
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn path(&self) -> &Path {
        &self.api.path
    }

    /// Loads a NEFF on core `vnc` (an index among the visible cores).
    pub fn load(self: &Arc<Self>, neff: &[u8], vnc: c_int) -> Result<Model, CallError> {
        let mut model: *mut NrtModel = std::ptr::null_mut();
        // SAFETY: `neff` is readable for its length during the call; vnc_count is -1 as the
        // 2.28 header requires; `model` receives the handle.
        let status = unsafe { (self.api.load)(neff.as_ptr().cast(), neff.len(), vnc, -1, &mut model) };
        NrtStatus(status).check("nrt_load")?;
        let ptr = NonNull::new(model).ok_or(CallError { call: "nrt_load", status: NrtStatus(super::status::NRT_INVALID_HANDLE) })?;
        Ok(Model { runtime: self.clone(), ptr })
    }

    /// A zeroed device tensor of `size` bytes on core `vnc`.
    pub fn tensor(self: &Arc<Self>, vnc: c_int, size: usize, name: &str) -> Result<Tensor, NeuronError> {
        let label = c_string(name)?;
        let mut tensor: *mut NrtTensor = std::ptr::null_mut();
        // SAFETY: nrt_tensor_allocate's signature; `label` outlives the call (libnrt uses the
        // name for logs); `tensor` receives the handle. DEVICE placement: HOST is deprecated
        // and VIRTUAL was removed in Neuron 2.30.
        let status = unsafe { (self.api.tensor_allocate)(ffi::NRT_TENSOR_PLACEMENT_DEVICE, vnc, size, label.as_ptr(), &mut tensor) };
        NrtStatus(status).check("nrt_tensor_allocate")?;
        let ptr = NonNull::new(tensor).ok_or(CallError { call: "nrt_tensor_allocate", status: NrtStatus(super::status::NRT_INVALID_HANDLE) })?;
        Ok(Tensor { runtime: self.clone(), ptr })
    }

    pub fn tensor_set(self: &Arc<Self>) -> Result<TensorSet, CallError> {
        let mut set: *mut NrtTensorSet = std::ptr::null_mut();
        // SAFETY: `set` receives the handle.
        NrtStatus(unsafe { (self.api.allocate_tensor_set)(&mut set) }).check("nrt_allocate_tensor_set")?;
        let ptr = NonNull::new(set).ok_or(CallError { call: "nrt_allocate_tensor_set", status: NrtStatus(super::status::NRT_INVALID_HANDLE) })?;
        Ok(TensorSet { runtime: self.clone(), ptr, names: Vec::new() })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // SAFETY: nrt_init succeeded, and every model, tensor and set (each holding an Arc of
        // this runtime) has been released, so this is the process's last libnrt call.
        unsafe { (self.api.close)() };
    }
}

fn c_string(name: &str) -> Result<CString, NeuronError> {
    CString::new(name).map_err(|_| NeuronError::Manifest(format!("tensor name {name:?} contains a NUL byte")))
}

/// One entry of `nrt_get_model_tensor_info`, copied out of the runtime's array.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub usage: u32,
    pub size: usize,
    /// Logged, never trusted: the enum's values changed in SDK 2.28.
    pub dtype: u32,
    pub shape: Vec<u32>,
}

/// A loaded NEFF (`nrt_unload` on drop).
pub struct Model {
    runtime: Arc<Runtime>,
    ptr: NonNull<NrtModel>,
}

// SAFETY: a libnrt model handle is not tied to the thread that loaded it (AWS's own servers
// drive each core's model from a worker thread); the executor that owns it is its only user.
unsafe impl Send for Model {}

impl Model {
    /// The NEFF's inputs and outputs as the runtime reports them.
    pub fn tensor_info(&self) -> Result<Vec<TensorInfo>, CallError> {
        let mut array: *mut ffi::NrtTensorInfoArray = std::ptr::null_mut();
        // SAFETY: a live model handle; `array` receives a runtime-owned allocation.
        NrtStatus(unsafe { (self.runtime.api.get_model_tensor_info)(self.ptr.as_ptr(), &mut array) }).check("nrt_get_model_tensor_info")?;
        if array.is_null() {
            return Err(CallError { call: "nrt_get_model_tensor_info", status: NrtStatus(super::status::NRT_INVALID_HANDLE) });
        }
        // SAFETY: the runtime returned an nrt_tensor_info_array_t: a count followed by that many
        // nrt_tensor_info_t (layout asserted in ffi.rs), each `shape` pointing at `ndim` u32s
        // (or null) while the array lives. Everything is copied before the array is freed.
        let infos = unsafe {
            let count = usize::try_from((*array).tensor_count).unwrap_or(0);
            let first = std::ptr::addr_of!((*array).tensor_array).cast::<NrtTensorInfo>();
            std::slice::from_raw_parts(first, count)
                .iter()
                .map(|t| TensorInfo {
                    name: ffi::c_chars(&t.name),
                    usage: t.usage,
                    size: t.size,
                    dtype: t.dtype,
                    shape: if t.shape.is_null() { Vec::new() } else { std::slice::from_raw_parts(t.shape, t.ndim as usize).to_vec() },
                })
                .collect()
        };
        // SAFETY: the array came from nrt_get_model_tensor_info and is freed exactly once.
        NrtStatus(unsafe { (self.runtime.api.free_model_tensor_info)(array) }).check("nrt_free_model_tensor_info")?;
        Ok(infos)
    }

    /// Runs the model synchronously: the outputs are written when it returns.
    pub fn execute(&self, inputs: &TensorSet, outputs: &mut TensorSet) -> Result<(), CallError> {
        // SAFETY: live handles from this runtime; the sets' tensors are alive (owned next to
        // them) and used by no other thread.
        NrtStatus(unsafe { (self.runtime.api.execute)(self.ptr.as_ptr(), inputs.ptr.as_ptr(), outputs.ptr.as_ptr()) }).check("nrt_execute")
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: a live model handle, unloaded once.
        if let Err(e) = NrtStatus(unsafe { (self.runtime.api.unload)(self.ptr.as_ptr()) }).check("nrt_unload") {
            tracing::warn!(error = %e, "could not unload a Neuron model");
        }
    }
}

/// A device tensor (`nrt_tensor_free` on drop).
pub struct Tensor {
    runtime: Arc<Runtime>,
    ptr: NonNull<NrtTensor>,
}

// SAFETY: as for `Model`: one owner thread at a time, no thread affinity.
unsafe impl Send for Tensor {}

impl Tensor {
    /// Copies `bytes` to the start of the tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        // SAFETY: a live tensor; `bytes` is readable for its length during the call. The
        // runtime rejects writes past the tensor's size.
        NrtStatus(unsafe { (self.runtime.api.tensor_write)(self.ptr.as_ptr(), bytes.as_ptr().cast(), 0, bytes.len()) }).check("nrt_tensor_write")
    }

    /// Fills `buf` from the start of the tensor.
    pub fn read(&self, buf: &mut [u8]) -> Result<(), CallError> {
        // SAFETY: a live tensor; `buf` is writable for its length during the call.
        NrtStatus(unsafe { (self.runtime.api.tensor_read)(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), 0, buf.len()) }).check("nrt_tensor_read")
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        let mut ptr = self.ptr.as_ptr();
        // SAFETY: a live tensor, freed once.
        unsafe { (self.runtime.api.tensor_free)(&mut ptr) };
    }
}

/// A named group of tensors passed to `nrt_execute` (`nrt_destroy_tensor_set` on drop). It
/// refers to its tensors without owning them: the owner frees the tensors first, as AWS's
/// example does, then the set.
pub struct TensorSet {
    runtime: Arc<Runtime>,
    ptr: NonNull<NrtTensorSet>,
    /// The header does not say whether the runtime copies member names, so they live as
    /// long as the set.
    names: Vec<CString>,
}

// SAFETY: as for `Model`.
unsafe impl Send for TensorSet {}

impl TensorSet {
    /// Adds `tensor` under `name`, which must be the NEFF's tensor name.
    pub fn add(&mut self, name: &str, tensor: &Tensor) -> Result<(), NeuronError> {
        let key = c_string(name)?;
        // SAFETY: live handles; `key` is kept with the set below. The tensor outlives every
        // use of the set (both are owned by the same executor, tensors dropped first).
        let status = unsafe { (self.runtime.api.add_tensor_to_tensor_set)(self.ptr.as_ptr(), key.as_ptr(), tensor.ptr.as_ptr()) };
        NrtStatus(status).check("nrt_add_tensor_to_tensor_set")?;
        self.names.push(key);
        Ok(())
    }
}

impl Drop for TensorSet {
    fn drop(&mut self) {
        let mut ptr = self.ptr.as_ptr();
        // SAFETY: a live set, destroyed once.
        unsafe { (self.runtime.api.destroy_tensor_set)(&mut ptr) };
    }
}
