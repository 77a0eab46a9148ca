//! A software stand-in for libnrt, the AWS Neuron runtime's C library, so dealsift's Neuron
//! backend can be tested where no Trainium and no Neuron SDK exist (see README.md).
//!
//! It exports the libnrt symbols the backend resolves, with the SDK 2.28 header's signatures
//! and struct layouts, and behaves like the runtime where the backend depends on it: one
//! runtime per process (`nrt_init` .. `nrt_close`), models loaded per NeuronCore, tensors
//! allocated on a core and grouped in named tensor sets, synchronous `nrt_execute`, status
//! codes for misuse. Tensors live in host memory. A "NEFF" here is a small JSON document
//! (format below) and execution computes a fixed function of the inputs, so tests can check
//! every number that reaches a client.
//!
//! It is stricter than the runtime where strictness catches backend bugs: every misuse is
//! also recorded as a violation, and `nrt_execute` demands that each input was written since
//! the previous execution. Two extra symbols, `standin_inject` and `standin_report`, let tests
//! inject failures and read what happened; the real libnrt has neither.
//!
//! NEFF format (JSON): `{"standin_neff": 1, "name": "b4_s32", "exec_delay_ms": 0,
//! "inputs": [{"name": "input0", "role": "input_ids", "dtype": 8, "shape": [4, 32]}, ...],
//! "outputs": [{"name": "output0", "dtype": 10, "shape": [4, 2]}]}`. Roles are `input_ids`,
//! `attention_mask` and `token_type_ids`; each tensor's byte size is its element count x 4
//! unless `size` says otherwise. Row `r` of the one output is
//! `[(sum(ids*mask) mod 97) / 10 + sum(token_type_ids), sum(mask) / 10, 2, 3, ...]`.

// Every exported function's contract is the one nrt.h documents for it (valid pointers from
// this library, NUL-terminated names, buffers of the stated size); the stand-in checks what
// it can and reports the rest as violations.
#![allow(clippy::missing_safety_doc)]

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

// NRT_STATUS values (nrt_status.h, 2.28).
const NRT_SUCCESS: u32 = 0;
const NRT_FAILURE: u32 = 1;
const NRT_INVALID: u32 = 2;
const NRT_INVALID_HANDLE: u32 = 3;
const NRT_LOAD_NOT_ENOUGH_NC: u32 = 9;
const NRT_UNSUPPORTED_NEFF_VERSION: u32 = 10;
const NRT_UNINITIALIZED: u32 = 13;
const NRT_CLOSED: u32 = 14;

const NRT_FRAMEWORK_TYPE_NO_FW: u32 = 1;
const NRT_TENSOR_PLACEMENT_DEVICE: u32 = 0;
const NRT_TENSOR_USAGE_INPUT: u32 = 0;
const NRT_TENSOR_USAGE_OUTPUT: u32 = 1;

/// NeuronCores of the pretend instance: a trn1.2xlarge has two.
const TOTAL_CORES: u32 = 2;

/// `nrt_tensor_info_t` (nrt_experimental.h, 2.28).
#[repr(C)]
pub struct TensorInfo {
    name: [c_char; 256],
    usage: u32,
    size: usize,
    dtype: u32,
    shape: *mut u32,
    ndim: u32,
}

/// `nrt_tensor_info_array_t`: a count followed by a flexible array of `TensorInfo`.
#[repr(C)]
pub struct TensorInfoArray {
    tensor_count: u64,
    tensor_array: [TensorInfo; 0],
}

/// `nrt_version_t` (nrt_version.h).
#[repr(C)]
pub struct Version {
    rt_major: u64,
    rt_minor: u64,
    rt_patch: u64,
    rt_maintenance: u64,
    rt_detail: [c_char; 128],
    git_hash: [c_char; 64],
}

// The 2.28 header layouts on 64-bit Linux, as measured with gcc.
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<TensorInfo>() == 296);
    assert!(offset_of!(TensorInfo, usage) == 256);
    assert!(offset_of!(TensorInfo, size) == 264);
    assert!(offset_of!(TensorInfo, dtype) == 272);
    assert!(offset_of!(TensorInfo, shape) == 280);
    assert!(offset_of!(TensorInfo, ndim) == 288);
    assert!(offset_of!(TensorInfoArray, tensor_array) == 8);
    assert!(size_of::<Version>() == 224);
    assert!(offset_of!(Version, rt_detail) == 32);
    assert!(offset_of!(Version, git_hash) == 160);
};

#[derive(Debug, Clone, Deserialize)]
struct Neff {
    standin_neff: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    exec_delay_ms: u64,
    inputs: Vec<NeffTensor>,
    outputs: Vec<NeffTensor>,
}

#[derive(Debug, Clone, Deserialize)]
struct NeffTensor {
    name: String,
    #[serde(default)]
    role: Option<String>,
    dtype: u32,
    shape: Vec<u32>,
    #[serde(default)]
    size: Option<usize>,
}

impl NeffTensor {
    fn bytes(&self) -> usize {
        self.size.unwrap_or_else(|| self.shape.iter().map(|&d| d as usize).product::<usize>() * 4)
    }
}

struct Model {
    vnc: i32,
    neff: Neff,
}

struct Tensor {
    vnc: i32,
    data: Vec<u8>,
    /// Written since the last execution that read it.
    fresh: bool,
}

struct InfoAlloc {
    layout: Layout,
    _shapes: Vec<Box<[u32]>>,
}

#[derive(Debug, Clone, Serialize)]
struct Injection {
    call: String,
    status: u32,
    skip: u64,
    count: u64,
}

/// What tests read back through `standin_report`.
#[derive(Serialize)]
struct Report {
    init_calls: u32,
    close_calls: u32,
    /// `NEURON_RT_EXEC_TIMEOUT` as seen by `nrt_init`.
    exec_timeout_env: Option<String>,
    visible_cores: u32,
    /// Successful executions per NeuronCore.
    executes_per_core: BTreeMap<i32, u64>,
    /// Successful executions per NEFF `name`.
    executes_per_model: BTreeMap<String, u64>,
    /// Most executions in progress at once (they overlap while `exec_delay_ms` sleeps).
    max_concurrent_executes: u32,
    live_models: usize,
    live_tensors: usize,
    live_tensor_sets: usize,
    live_tensor_infos: usize,
    /// Calls in order, e.g. `nrt_load vnc=0 neff=b4_s32`.
    log: Vec<String>,
    /// Calls the real runtime would reject, or that break its required order.
    violations: Vec<String>,
    pending_injections: Vec<Injection>,
}

struct State {
    initialized: bool,
    closed: bool,
    next_handle: usize,
    models: BTreeMap<usize, Model>,
    tensors: BTreeMap<usize, Tensor>,
    sets: BTreeMap<usize, BTreeMap<String, usize>>,
    infos: BTreeMap<usize, InfoAlloc>,
    injections: Vec<Injection>,
    running: u32,
    report: Report,
}

/// The runtime is one per process, and so is the stand-in's state.
static STATE: Mutex<State> = Mutex::new(State {
    initialized: false,
    closed: false,
    next_handle: 0,
    models: BTreeMap::new(),
    tensors: BTreeMap::new(),
    sets: BTreeMap::new(),
    infos: BTreeMap::new(),
    injections: Vec::new(),
    running: 0,
    report: Report {
        init_calls: 0,
        close_calls: 0,
        exec_timeout_env: None,
        visible_cores: 0,
        executes_per_core: BTreeMap::new(),
        executes_per_model: BTreeMap::new(),
        max_concurrent_executes: 0,
        live_models: 0,
        live_tensors: 0,
        live_tensor_sets: 0,
        live_tensor_infos: 0,
        log: Vec::new(),
        violations: Vec::new(),
        pending_injections: Vec::new(),
    },
});

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn log(&mut self, entry: String) {
        self.report.log.push(entry);
    }

    /// Records a misuse and returns `status` for the caller to report.
    fn violation(&mut self, status: u32, what: String) -> u32 {
        self.report.log.push(format!("  violation: {what}"));
        self.report.violations.push(what);
        status
    }

    /// The call may proceed only between `nrt_init` and `nrt_close`.
    fn check_open(&mut self, call: &str) -> Result<(), u32> {
        if self.closed {
            return Err(self.violation(NRT_CLOSED, format!("{call} after nrt_close")));
        }
        if !self.initialized {
            return Err(self.violation(NRT_UNINITIALIZED, format!("{call} before nrt_init")));
        }
        Ok(())
    }

    fn check_vnc(&mut self, call: &str, vnc: i32) -> Result<(), u32> {
        if vnc < 0 || vnc as u32 >= self.report.visible_cores {
            return Err(self.violation(NRT_INVALID, format!("{call}: vnc {vnc} is not one of the {} visible cores", self.report.visible_cores)));
        }
        Ok(())
    }

    /// A status injected for this call, if one is due.
    fn injected(&mut self, call: &str) -> Option<u32> {
        let due = self.injections.iter_mut().find(|i| i.call == call && i.count > 0)?;
        if due.skip > 0 {
            due.skip -= 1;
            return None;
        }
        due.count -= 1;
        let status = due.status;
        self.injections.retain(|i| i.count > 0);
        self.log(format!("  injected status {status}"));
        Some(status)
    }

    fn handle(&mut self) -> usize {
        self.next_handle += 1;
        // Opaque and never dereferenced by callers, so any distinct non-null value will do.
        0x1000 + self.next_handle * 0x10
    }
}

/// Cores the runtime would claim: `NEURON_RT_VISIBLE_CORES` ("3", "3-6", "3-5,6"), else
/// `NEURON_RT_NUM_CORES` (0 = all), else all.
fn visible_cores() -> Result<u32, String> {
    if let Ok(list) = std::env::var("NEURON_RT_VISIBLE_CORES") {
        let mut count = 0;
        for part in list.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let (lo, hi): (u32, u32) = match (lo.trim().parse(), hi.trim().parse()) {
                (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
                _ => return Err(format!("NEURON_RT_VISIBLE_CORES={list:?} is not a core list")),
            };
            if hi >= TOTAL_CORES {
                return Err(format!("NEURON_RT_VISIBLE_CORES={list:?} names core {hi}; this instance has {TOTAL_CORES}"));
            }
            count += hi - lo + 1;
        }
        return Ok(count);
    }
    match std::env::var("NEURON_RT_NUM_CORES").ok().and_then(|n| n.parse::<u32>().ok()) {
        Some(n) if n > TOTAL_CORES => Err(format!("NEURON_RT_NUM_CORES={n}; this instance has {TOTAL_CORES}")),
        Some(n) if n > 0 => Ok(n),
        _ => Ok(TOTAL_CORES),
    }
}

/// # Safety
/// `ptr` must be null or a NUL-terminated string.
unsafe fn c_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    Some(unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
}

fn fill_c_chars(dst: &mut [c_char], src: &str) {
    let room = dst.len().saturating_sub(1);
    for (d, s) in dst.iter_mut().zip(src.bytes().take(room)) {
        *d = s as c_char;
    }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_init(framework: u32, fw_version: *const c_char, fal_version: *const c_char) -> u32 {
    let mut s = lock();
    s.report.init_calls += 1;
    s.log(format!("nrt_init framework={framework}"));
    if s.closed {
        return s.violation(NRT_FAILURE, "nrt_init after nrt_close: the runtime cannot be re-initialised".into());
    }
    if s.initialized {
        return s.violation(NRT_INVALID, "nrt_init called twice".into());
    }
    if framework != NRT_FRAMEWORK_TYPE_NO_FW || fw_version.is_null() || fal_version.is_null() {
        return s.violation(NRT_INVALID, "nrt_init: a plain application passes NRT_FRAMEWORK_TYPE_NO_FW, \"\", \"\"".into());
    }
    if let Some(status) = s.injected("nrt_init") {
        return status;
    }
    match visible_cores() {
        Ok(n) => s.report.visible_cores = n,
        Err(e) => {
            s.log(format!("  {e}"));
            return NRT_LOAD_NOT_ENOUGH_NC;
        }
    }
    s.report.exec_timeout_env = std::env::var("NEURON_RT_EXEC_TIMEOUT").ok();
    s.initialized = true;
    NRT_SUCCESS
}

#[no_mangle]
pub extern "C" fn nrt_close() {
    let mut s = lock();
    s.report.close_calls += 1;
    s.log("nrt_close".into());
    if !s.initialized {
        s.violation(NRT_INVALID, "nrt_close without a successful nrt_init".into());
        return;
    }
    let leftovers = [
        ("models still loaded (nrt_unload first)", s.models.len()),
        ("tensors not freed", s.tensors.len()),
        ("tensor sets not destroyed", s.sets.len()),
        ("tensor info arrays not freed", s.infos.len()),
    ];
    for (what, n) in leftovers {
        if n > 0 {
            s.violation(NRT_INVALID, format!("nrt_close with {n} {what}"));
        }
    }
    s.initialized = false;
    s.closed = true;
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_visible_nc_count(count: *mut u32) -> u32 {
    // SAFETY: the same contract as the vnc variant.
    unsafe { visible_count("nrt_get_visible_nc_count", count) }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_visible_vnc_count(count: *mut u32) -> u32 {
    // SAFETY: `count` is valid for writes per the header's contract.
    unsafe { visible_count("nrt_get_visible_vnc_count", count) }
}

/// # Safety
/// `count` must be null or valid for a `u32` write.
unsafe fn visible_count(call: &str, count: *mut u32) -> u32 {
    let mut s = lock();
    s.log(call.to_string());
    if count.is_null() {
        return s.violation(NRT_INVALID, format!("{call}: null count"));
    }
    // Callable before nrt_init, when it answers from the environment.
    let n = if s.initialized { s.report.visible_cores } else { visible_cores().unwrap_or(0) };
    // SAFETY: non-null and valid for writes per the caller's contract.
    unsafe { count.write(n) };
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_version(ver: *mut Version, size: usize) -> u32 {
    let mut s = lock();
    s.log("nrt_get_version".into());
    if ver.is_null() || size != std::mem::size_of::<Version>() {
        return s.violation(NRT_INVALID, format!("nrt_get_version: size {size}, expected sizeof(nrt_version_t)"));
    }
    let mut v = Version { rt_major: 2, rt_minor: 28, rt_patch: 0, rt_maintenance: 0, rt_detail: [0; 128], git_hash: [0; 64] };
    fill_c_chars(&mut v.rt_detail, "nrt-standin (dealsift contract tests, not a Neuron runtime)");
    fill_c_chars(&mut v.git_hash, "standin");
    // SAFETY: non-null and, per the size check, a whole nrt_version_t.
    unsafe { ver.write(v) };
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_load(neff_bytes: *const c_void, size: usize, vnc: i32, vnc_count: i32, model: *mut *mut c_void) -> u32 {
    let mut s = lock();
    s.log(format!("nrt_load vnc={vnc}"));
    if let Err(status) = s.check_open("nrt_load") {
        return status;
    }
    if neff_bytes.is_null() || model.is_null() {
        return s.violation(NRT_INVALID, "nrt_load: null NEFF or model pointer".into());
    }
    if vnc_count != -1 {
        s.violation(NRT_SUCCESS, format!("nrt_load: vnc_count {vnc_count} (deprecated in 2.28: always pass -1)"));
    }
    if let Err(status) = s.check_vnc("nrt_load", vnc) {
        return status;
    }
    if let Some(status) = s.injected("nrt_load") {
        return status;
    }
    // SAFETY: the caller passes `size` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(neff_bytes.cast::<u8>(), size) };
    let neff: Neff = match serde_json::from_slice(bytes) {
        Ok(n) => n,
        Err(e) => {
            s.log(format!("  not a stand-in NEFF: {e}"));
            return NRT_UNSUPPORTED_NEFF_VERSION;
        }
    };
    if neff.standin_neff != 1 || neff.outputs.len() != 1 {
        s.log("  stand-in NEFF format 1 with one output expected".into());
        return NRT_UNSUPPORTED_NEFF_VERSION;
    }
    let handle = s.handle();
    s.log(format!("  loaded neff={}", neff.name));
    s.models.insert(handle, Model { vnc, neff });
    // SAFETY: checked non-null; valid for writes per the contract.
    unsafe { model.write(handle as *mut c_void) };
    NRT_SUCCESS
}

#[no_mangle]
pub extern "C" fn nrt_unload(model: *mut c_void) -> u32 {
    let mut s = lock();
    s.log("nrt_unload".into());
    if let Err(status) = s.check_open("nrt_unload") {
        return status;
    }
    match s.models.remove(&(model as usize)) {
        Some(m) => {
            s.log(format!("  unloaded vnc={} neff={}", m.vnc, m.neff.name));
            NRT_SUCCESS
        }
        None => s.violation(NRT_INVALID_HANDLE, "nrt_unload: unknown model".into()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_model_tensor_info(model: *mut c_void, tensor_info: *mut *mut TensorInfoArray) -> u32 {
    let mut s = lock();
    s.log("nrt_get_model_tensor_info".into());
    if let Err(status) = s.check_open("nrt_get_model_tensor_info") {
        return status;
    }
    if tensor_info.is_null() {
        return s.violation(NRT_INVALID, "nrt_get_model_tensor_info: null result pointer".into());
    }
    let Some(m) = s.models.get(&(model as usize)) else {
        return s.violation(NRT_INVALID_HANDLE, "nrt_get_model_tensor_info: unknown model".into());
    };
    let entries: Vec<(NeffTensor, u32)> = m
        .neff
        .inputs
        .iter()
        .map(|t| (t.clone(), NRT_TENSOR_USAGE_INPUT))
        .chain(m.neff.outputs.iter().map(|t| (t.clone(), NRT_TENSOR_USAGE_OUTPUT)))
        .collect();
    let Ok(layout) = Layout::from_size_align(8 + entries.len() * std::mem::size_of::<TensorInfo>(), 8) else {
        return NRT_INVALID;
    };
    // SAFETY: the layout has a non-zero size (the 8-byte count).
    let array = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<TensorInfoArray>();
    if array.is_null() {
        return NRT_INVALID;
    }
    let mut shapes = Vec::with_capacity(entries.len());
    // SAFETY: `array` is a fresh, zeroed allocation of `layout`, which holds the count and
    // `entries.len()` TensorInfo records; each record is written in bounds.
    unsafe {
        (*array).tensor_count = entries.len() as u64;
        let first = std::ptr::addr_of_mut!((*array).tensor_array).cast::<TensorInfo>();
        for (i, (t, usage)) in entries.iter().enumerate() {
            let mut shape: Box<[u32]> = t.shape.clone().into_boxed_slice();
            let mut info = TensorInfo { name: [0; 256], usage: *usage, size: t.bytes(), dtype: t.dtype, shape: shape.as_mut_ptr(), ndim: shape.len() as u32 };
            fill_c_chars(&mut info.name, &t.name);
            first.add(i).write(info);
            shapes.push(shape);
        }
        tensor_info.write(array);
    }
    s.infos.insert(array as usize, InfoAlloc { layout, _shapes: shapes });
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_free_model_tensor_info(tensor_info: *mut TensorInfoArray) -> u32 {
    let mut s = lock();
    s.log("nrt_free_model_tensor_info".into());
    match s.infos.remove(&(tensor_info as usize)) {
        // SAFETY: allocated by nrt_get_model_tensor_info with this layout, freed once (removed
        // from the map above).
        Some(alloc) => unsafe {
            std::alloc::dealloc(tensor_info.cast::<u8>(), alloc.layout);
            NRT_SUCCESS
        },
        None => s.violation(NRT_INVALID, "nrt_free_model_tensor_info: not an array this runtime handed out (or freed twice)".into()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_allocate_tensor_set(result: *mut *mut c_void) -> u32 {
    let mut s = lock();
    s.log("nrt_allocate_tensor_set".into());
    if let Err(status) = s.check_open("nrt_allocate_tensor_set") {
        return status;
    }
    if result.is_null() {
        return s.violation(NRT_INVALID, "nrt_allocate_tensor_set: null result pointer".into());
    }
    let handle = s.handle();
    s.sets.insert(handle, BTreeMap::new());
    // SAFETY: checked non-null; valid for writes per the contract.
    unsafe { result.write(handle as *mut c_void) };
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_destroy_tensor_set(tensor_set: *mut *mut c_void) {
    let mut s = lock();
    s.log("nrt_destroy_tensor_set".into());
    if tensor_set.is_null() {
        s.violation(NRT_INVALID, "nrt_destroy_tensor_set: null pointer".into());
        return;
    }
    // SAFETY: checked non-null; points at the caller's set handle.
    let handle = unsafe { tensor_set.read() } as usize;
    if s.sets.remove(&handle).is_none() {
        s.violation(NRT_INVALID, "nrt_destroy_tensor_set: unknown tensor set".into());
        return;
    }
    // SAFETY: as above.
    unsafe { tensor_set.write(std::ptr::null_mut()) };
}

#[no_mangle]
pub unsafe extern "C" fn nrt_add_tensor_to_tensor_set(tensor_set: *mut c_void, tensor_name: *const c_char, tensor: *mut c_void) -> u32 {
    let mut s = lock();
    // SAFETY: NUL-terminated per the contract.
    let name = unsafe { c_str(tensor_name) };
    s.log(format!("nrt_add_tensor_to_tensor_set name={}", name.as_deref().unwrap_or("<null>")));
    if let Err(status) = s.check_open("nrt_add_tensor_to_tensor_set") {
        return status;
    }
    let Some(name) = name else {
        return s.violation(NRT_INVALID, "nrt_add_tensor_to_tensor_set: null name".into());
    };
    if !s.tensors.contains_key(&(tensor as usize)) {
        return s.violation(NRT_INVALID_HANDLE, format!("nrt_add_tensor_to_tensor_set {name}: unknown tensor"));
    }
    match s.sets.get_mut(&(tensor_set as usize)) {
        Some(set) => {
            set.insert(name, tensor as usize);
            NRT_SUCCESS
        }
        None => s.violation(NRT_INVALID_HANDLE, format!("nrt_add_tensor_to_tensor_set {name}: unknown tensor set")),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_allocate(placement: u32, vnc: c_int, size: usize, name: *const c_char, tensor: *mut *mut c_void) -> u32 {
    let mut s = lock();
    // SAFETY: NUL-terminated per the contract.
    let label = unsafe { c_str(name) }.unwrap_or_default();
    s.log(format!("nrt_tensor_allocate vnc={vnc} size={size} name={label}"));
    if let Err(status) = s.check_open("nrt_tensor_allocate") {
        return status;
    }
    if placement != NRT_TENSOR_PLACEMENT_DEVICE {
        return s.violation(NRT_INVALID, format!("nrt_tensor_allocate {label}: placement {placement} (HOST is deprecated and VIRTUAL removed; use DEVICE)"));
    }
    if let Err(status) = s.check_vnc("nrt_tensor_allocate", vnc) {
        return status;
    }
    if tensor.is_null() || size == 0 {
        return s.violation(NRT_INVALID, format!("nrt_tensor_allocate {label}: null result or zero size"));
    }
    let handle = s.handle();
    s.tensors.insert(handle, Tensor { vnc, data: vec![0; size], fresh: false });
    // SAFETY: checked non-null; valid for writes per the contract.
    unsafe { tensor.write(handle as *mut c_void) };
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_free(tensor: *mut *mut c_void) {
    let mut s = lock();
    s.log("nrt_tensor_free".into());
    if tensor.is_null() {
        s.violation(NRT_INVALID, "nrt_tensor_free: null pointer".into());
        return;
    }
    // SAFETY: checked non-null; points at the caller's tensor handle.
    let handle = unsafe { tensor.read() } as usize;
    if s.tensors.remove(&handle).is_none() {
        s.violation(NRT_INVALID, "nrt_tensor_free: unknown tensor (or freed twice)".into());
        return;
    }
    // SAFETY: as above.
    unsafe { tensor.write(std::ptr::null_mut()) };
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_write(tensor: *mut c_void, buf: *const c_void, offset: usize, size: usize) -> u32 {
    let mut s = lock();
    s.log(format!("nrt_tensor_write size={size}"));
    if let Err(status) = s.check_open("nrt_tensor_write") {
        return status;
    }
    if let Some(status) = s.injected("nrt_tensor_write") {
        return status;
    }
    let Some(t) = s.tensors.get_mut(&(tensor as usize)) else {
        return s.violation(NRT_INVALID_HANDLE, "nrt_tensor_write: unknown tensor".into());
    };
    let len = t.data.len();
    if buf.is_null() || offset.checked_add(size).is_none_or(|end| end > len) {
        return s.violation(NRT_INVALID, format!("nrt_tensor_write: {size} bytes at {offset} into a {len}-byte tensor"));
    }
    // SAFETY: the caller passes `size` readable bytes; the destination range was bounds-checked.
    unsafe { std::ptr::copy_nonoverlapping(buf.cast::<u8>(), t.data.as_mut_ptr().add(offset), size) };
    t.fresh = true;
    NRT_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_read(tensor: *const c_void, buf: *mut c_void, offset: usize, size: usize) -> u32 {
    let mut s = lock();
    s.log(format!("nrt_tensor_read size={size}"));
    if let Err(status) = s.check_open("nrt_tensor_read") {
        return status;
    }
    if let Some(status) = s.injected("nrt_tensor_read") {
        return status;
    }
    let Some(t) = s.tensors.get(&(tensor as usize)) else {
        return s.violation(NRT_INVALID_HANDLE, "nrt_tensor_read: unknown tensor".into());
    };
    let len = t.data.len();
    if buf.is_null() || offset.checked_add(size).is_none_or(|end| end > len) {
        return s.violation(NRT_INVALID, format!("nrt_tensor_read: {size} bytes at {offset} from a {len}-byte tensor"));
    }
    // SAFETY: the caller passes `size` writable bytes; the source range was bounds-checked.
    unsafe { std::ptr::copy_nonoverlapping(t.data.as_ptr().add(offset), buf.cast::<u8>(), size) };
    NRT_SUCCESS
}

/// What one execution needs once the lock is released.
struct Run {
    vnc: i32,
    name: String,
    delay: Duration,
    inputs: Vec<(String, Vec<u8>)>,
    output: usize,
    output_shape: Vec<u32>,
}

/// Checks the sets against the model and takes the inputs, all under the lock.
fn prepare(s: &mut State, model: usize, input_set: usize, output_set: usize) -> Result<Run, u32> {
    let Some(m) = s.models.get(&model) else {
        return Err(s.violation(NRT_INVALID_HANDLE, "nrt_execute: unknown or unloaded model".into()));
    };
    let (vnc, neff) = (m.vnc, m.neff.clone());
    let (Some(inputs), Some(outputs)) = (s.sets.get(&input_set).cloned(), s.sets.get(&output_set).cloned()) else {
        return Err(s.violation(NRT_INVALID_HANDLE, "nrt_execute: unknown tensor set".into()));
    };
    let mut problems = Vec::new();
    let mut bound = Vec::new();
    for (wanted, set, is_input) in neff.inputs.iter().map(|t| (t, &inputs, true)).chain(neff.outputs.iter().map(|t| (t, &outputs, false))) {
        let Some(t) = set.get(&wanted.name).and_then(|h| s.tensors.get(h).map(|t| (*h, t))) else {
            problems.push(format!("{} missing from the {} set", wanted.name, if is_input { "input" } else { "output" }));
            continue;
        };
        let (handle, t) = t;
        if t.vnc != vnc {
            problems.push(format!("{} is on vnc {} but the model is on vnc {vnc}", wanted.name, t.vnc));
        }
        if t.data.len() != wanted.bytes() {
            problems.push(format!("{} has {} bytes, the NEFF wants {}", wanted.name, t.data.len(), wanted.bytes()));
        }
        if is_input && !t.fresh {
            problems.push(format!("{} was not written since the last execution", wanted.name));
        }
        bound.push((wanted.clone(), handle, is_input));
    }
    if !problems.is_empty() {
        return Err(s.violation(NRT_INVALID, format!("nrt_execute: {}", problems.join("; "))));
    }
    let mut run = Run { vnc, name: neff.name.clone(), delay: Duration::from_millis(neff.exec_delay_ms), inputs: Vec::new(), output: 0, output_shape: Vec::new() };
    for (wanted, handle, is_input) in bound {
        if is_input {
            if let Some(t) = s.tensors.get_mut(&handle) {
                t.fresh = false;
                run.inputs.push((wanted.role.clone().unwrap_or_default(), t.data.clone()));
            }
        } else {
            run.output = handle;
            run.output_shape = wanted.shape.clone();
        }
    }
    Ok(run)
}

/// The stand-in's model: see the crate documentation.
fn compute(run: &Run) -> Vec<u8> {
    let (rows, labels) = match run.output_shape.as_slice() {
        [rows, labels] => (*rows as usize, *labels as usize),
        _ => (0, 0),
    };
    let ints = |role: &str| -> Vec<i64> {
        run.inputs
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, b)| b.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect())
            .unwrap_or_default()
    };
    let (ids, mask, types) = (ints("input_ids"), ints("attention_mask"), ints("token_type_ids"));
    let seq = ids.len().checked_div(rows).unwrap_or(0);
    let mut out = Vec::with_capacity(rows * labels * 4);
    for r in 0..rows {
        let row = |v: &[i64]| v.get(r * seq..(r + 1) * seq).map(<[i64]>::to_vec).unwrap_or_default();
        let (ids, mask, types) = (row(&ids), row(&mask), row(&types));
        let weighted: i64 = ids.iter().zip(&mask).map(|(i, m)| i * m).sum();
        let values = [weighted.rem_euclid(97) as f32 / 10.0 + types.iter().sum::<i64>() as f32, mask.iter().sum::<i64>() as f32 / 10.0];
        for l in 0..labels {
            let v = values.get(l).copied().unwrap_or(l as f32);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[no_mangle]
pub extern "C" fn nrt_execute(model: *mut c_void, input_set: *const c_void, output_set: *mut c_void) -> u32 {
    let run = {
        let mut s = lock();
        s.log("nrt_execute".into());
        if let Err(status) = s.check_open("nrt_execute") {
            return status;
        }
        let run = match prepare(&mut s, model as usize, input_set as usize, output_set as usize) {
            Ok(run) => run,
            Err(status) => return status,
        };
        s.log(format!("  executing vnc={} neff={}", run.vnc, run.name));
        if let Some(status) = s.injected("nrt_execute") {
            return status;
        }
        s.running += 1;
        s.report.max_concurrent_executes = s.report.max_concurrent_executes.max(s.running);
        run
    };
    // Outside the lock, so executions on different cores overlap as on the device.
    std::thread::sleep(run.delay);
    let logits = compute(&run);
    let mut s = lock();
    s.running -= 1;
    match s.tensors.get_mut(&run.output) {
        Some(t) if t.data.len() == logits.len() => t.data.copy_from_slice(&logits),
        _ => return s.violation(NRT_INVALID, "nrt_execute: output tensor freed or resized during execution".into()),
    }
    *s.report.executes_per_core.entry(run.vnc).or_default() += 1;
    *s.report.executes_per_model.entry(run.name).or_default() += 1;
    NRT_SUCCESS
}

/// Test control (not in libnrt): the next `count` calls of `call` (e.g. "nrt_execute") after
/// `skip` more successful ones return `status`. Returns 0, or `NRT_INVALID` for a null name.
#[no_mangle]
pub unsafe extern "C" fn standin_inject(call: *const c_char, status: u32, skip: u64, count: u64) -> u32 {
    // SAFETY: NUL-terminated per the contract.
    let Some(call) = (unsafe { c_str(call) }) else {
        return NRT_INVALID;
    };
    let mut s = lock();
    s.log(format!("standin_inject {call} status={status} skip={skip} count={count}"));
    s.injections.push(Injection { call, status, skip, count });
    NRT_SUCCESS
}

/// Test control (not in libnrt): writes the report as NUL-terminated JSON into `buf` when it
/// fits in `len` bytes, and returns the JSON's length (call with `len` 0 to size the buffer).
#[no_mangle]
pub unsafe extern "C" fn standin_report(buf: *mut c_char, len: usize) -> usize {
    let json = {
        let mut s = lock();
        s.report.live_models = s.models.len();
        s.report.live_tensors = s.tensors.len();
        s.report.live_tensor_sets = s.sets.len();
        s.report.live_tensor_infos = s.infos.len();
        s.report.pending_injections = s.injections.clone();
        serde_json::to_string(&s.report).unwrap_or_default()
    };
    if !buf.is_null() && json.len() < len {
        // SAFETY: `buf` holds `len` > json.len() bytes per the contract.
        unsafe {
            std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast::<u8>(), json.len());
            buf.add(json.len()).write(0);
        }
    }
    json.len()
}
