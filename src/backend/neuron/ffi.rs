//! The slice of libnrt's C API (Neuron SDK 2.28 headers: `nrt/nrt.h`, `nrt_experimental.h`,
//! `nrt_version.h`) that the backend calls, resolved at run time with `libloading` so that
//! dealsift builds and runs where the Neuron SDK is not installed.
//!
//! Only symbols present in every public header since the first (2022) are required; newer
//! ones are optional. Enums cross the boundary as `u32`: libnrt may return values added after
//! these declarations, and the dtype enum was renumbered in 2.28, so nothing here trusts them.

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};

use libloading::Library;

use super::NeuronError;

/// File name the runtime package installs (its SONAME; `libnrt.so` is a development symlink).
pub const LIBRARY_FILE: &str = "libnrt.so.1";

/// `nrt_model_t`, opaque.
#[repr(C)]
pub struct NrtModel {
    _opaque: [u8; 0],
}

/// `nrt_tensor_t`, opaque.
#[repr(C)]
pub struct NrtTensor {
    _opaque: [u8; 0],
}

/// `nrt_tensor_set_t` is `void` in the header.
pub type NrtTensorSet = c_void;

pub const NRT_FRAMEWORK_TYPE_NO_FW: u32 = 1;
pub const NRT_TENSOR_PLACEMENT_DEVICE: u32 = 0;
pub const NRT_TENSOR_USAGE_INPUT: u32 = 0;
pub const NRT_TENSOR_USAGE_OUTPUT: u32 = 1;
pub const NRT_TENSOR_NAME_MAX: usize = 256;

/// `nrt_tensor_info_t` (nrt_experimental.h).
#[repr(C)]
pub struct NrtTensorInfo {
    pub name: [c_char; NRT_TENSOR_NAME_MAX],
    pub usage: u32,
    /// Bytes.
    pub size: usize,
    pub dtype: u32,
    pub shape: *mut u32,
    pub ndim: u32,
}

/// `nrt_tensor_info_array_t`: a count, then that many `nrt_tensor_info_t` (a flexible array).
#[repr(C)]
pub struct NrtTensorInfoArray {
    pub tensor_count: u64,
    pub tensor_array: [NrtTensorInfo; 0],
}

/// `nrt_version_t` (nrt_version.h).
#[repr(C)]
pub struct NrtVersion {
    pub rt_major: u64,
    pub rt_minor: u64,
    pub rt_patch: u64,
    pub rt_maintenance: u64,
    pub rt_detail: [c_char; 128],
    pub git_hash: [c_char; 64],
}

// The 2.28 layouts as gcc lays them out on x86-64 (aarch64 agrees: LP64, natural alignment).
// libnrt exists only for 64-bit Linux, so other targets merely build this module.
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<NrtTensorInfo>() == 296 && align_of::<NrtTensorInfo>() == 8);
    assert!(offset_of!(NrtTensorInfo, name) == 0);
    assert!(offset_of!(NrtTensorInfo, usage) == 256);
    assert!(offset_of!(NrtTensorInfo, size) == 264);
    assert!(offset_of!(NrtTensorInfo, dtype) == 272);
    assert!(offset_of!(NrtTensorInfo, shape) == 280);
    assert!(offset_of!(NrtTensorInfo, ndim) == 288);
    assert!(size_of::<NrtTensorInfoArray>() == 8 && offset_of!(NrtTensorInfoArray, tensor_array) == 8);
    assert!(size_of::<NrtVersion>() == 224);
    assert!(offset_of!(NrtVersion, rt_detail) == 32 && offset_of!(NrtVersion, git_hash) == 160);
};

pub type InitFn = unsafe extern "C" fn(framework: u32, fw_version: *const c_char, fal_version: *const c_char) -> u32;
pub type CloseFn = unsafe extern "C" fn();
pub type LoadFn = unsafe extern "C" fn(neff: *const c_void, size: usize, vnc: i32, vnc_count: i32, model: *mut *mut NrtModel) -> u32;
pub type UnloadFn = unsafe extern "C" fn(model: *mut NrtModel) -> u32;
pub type GetTensorInfoFn = unsafe extern "C" fn(model: *mut NrtModel, info: *mut *mut NrtTensorInfoArray) -> u32;
pub type FreeTensorInfoFn = unsafe extern "C" fn(info: *mut NrtTensorInfoArray) -> u32;
pub type AllocateTensorSetFn = unsafe extern "C" fn(result: *mut *mut NrtTensorSet) -> u32;
pub type DestroyTensorSetFn = unsafe extern "C" fn(set: *mut *mut NrtTensorSet);
pub type AddTensorToSetFn = unsafe extern "C" fn(set: *mut NrtTensorSet, name: *const c_char, tensor: *mut NrtTensor) -> u32;
pub type TensorAllocateFn = unsafe extern "C" fn(placement: u32, vnc: c_int, size: usize, name: *const c_char, tensor: *mut *mut NrtTensor) -> u32;
pub type TensorFreeFn = unsafe extern "C" fn(tensor: *mut *mut NrtTensor);
pub type TensorWriteFn = unsafe extern "C" fn(tensor: *mut NrtTensor, buf: *const c_void, offset: usize, size: usize) -> u32;
pub type TensorReadFn = unsafe extern "C" fn(tensor: *const NrtTensor, buf: *mut c_void, offset: usize, size: usize) -> u32;
pub type ExecuteFn = unsafe extern "C" fn(model: *mut NrtModel, inputs: *const NrtTensorSet, outputs: *mut NrtTensorSet) -> u32;
pub type CountFn = unsafe extern "C" fn(count: *mut u32) -> u32;
pub type GetVersionFn = unsafe extern "C" fn(version: *mut NrtVersion, size: usize) -> u32;

/// libnrt's entry points. The function pointers are only valid while `_library` is loaded,
/// which is why they live in the same struct and are never handed out.
pub struct Api {
    pub init: InitFn,
    pub close: CloseFn,
    pub load: LoadFn,
    pub unload: UnloadFn,
    pub get_model_tensor_info: GetTensorInfoFn,
    pub free_model_tensor_info: FreeTensorInfoFn,
    pub allocate_tensor_set: AllocateTensorSetFn,
    pub destroy_tensor_set: DestroyTensorSetFn,
    pub add_tensor_to_tensor_set: AddTensorToSetFn,
    pub tensor_allocate: TensorAllocateFn,
    pub tensor_free: TensorFreeFn,
    pub tensor_write: TensorWriteFn,
    pub tensor_read: TensorReadFn,
    pub execute: ExecuteFn,
    /// `nrt_get_visible_vnc_count` (2.x) or, on older runtimes, `nrt_get_visible_nc_count`.
    pub visible_count: CountFn,
    pub get_version: Option<GetVersionFn>,
    pub path: PathBuf,
    _library: Library,
}

impl Api {
    /// Loads `<dir>/libnrt.so.1` and resolves the symbols the backend calls.
    pub fn open(dir: &Path) -> Result<Self, NeuronError> {
        let path = dir.join(LIBRARY_FILE);
        // SAFETY: loading runs the library's initialisers. libnrt's are the runtime's own
        // (no nrt_* call happens until nrt_init); the path is the operator's choice.
        let library = unsafe { Library::new(&path) }.map_err(|e| NeuronError::Library { path: path.clone(), reason: e.to_string() })?;
        let missing = |symbol: &'static str, e: libloading::Error| NeuronError::Symbol { path: path.clone(), symbol, reason: e.to_string() };
        macro_rules! required {
            ($name:literal, $ty:ty) => {
                // SAFETY: `$ty` is the symbol's signature in the 2.28 headers; the pointer is
                // copied out but only called while `_library` (stored below) is loaded.
                *unsafe { library.get::<$ty>(concat!($name, "\0").as_bytes()) }.map_err(|e| missing($name, e))?
            };
        }
        macro_rules! optional {
            ($name:literal, $ty:ty) => {
                // SAFETY: as for `required!`.
                unsafe { library.get::<$ty>(concat!($name, "\0").as_bytes()) }.ok().map(|s| *s)
            };
        }
        let visible_count = match optional!("nrt_get_visible_vnc_count", CountFn) {
            Some(f) => f,
            None => required!("nrt_get_visible_nc_count", CountFn),
        };
        let init = required!("nrt_init", InitFn);
        let close = required!("nrt_close", CloseFn);
        let load = required!("nrt_load", LoadFn);
        let unload = required!("nrt_unload", UnloadFn);
        let get_model_tensor_info = required!("nrt_get_model_tensor_info", GetTensorInfoFn);
        let free_model_tensor_info = required!("nrt_free_model_tensor_info", FreeTensorInfoFn);
        let allocate_tensor_set = required!("nrt_allocate_tensor_set", AllocateTensorSetFn);
        let destroy_tensor_set = required!("nrt_destroy_tensor_set", DestroyTensorSetFn);
        let add_tensor_to_tensor_set = required!("nrt_add_tensor_to_tensor_set", AddTensorToSetFn);
        let tensor_allocate = required!("nrt_tensor_allocate", TensorAllocateFn);
        let tensor_free = required!("nrt_tensor_free", TensorFreeFn);
        let tensor_write = required!("nrt_tensor_write", TensorWriteFn);
        let tensor_read = required!("nrt_tensor_read", TensorReadFn);
        let execute = required!("nrt_execute", ExecuteFn);
        let get_version = optional!("nrt_get_version", GetVersionFn);
        Ok(Self {
            init,
            close,
            load,
            unload,
            get_model_tensor_info,
            free_model_tensor_info,
            allocate_tensor_set,
            destroy_tensor_set,
            add_tensor_to_tensor_set,
            tensor_allocate,
            tensor_free,
            tensor_write,
            tensor_read,
            execute,
            visible_count,
            get_version,
            path,
            _library: library,
        })
    }
}

/// A fixed-size C string field up to its first NUL.
pub fn c_chars(field: &[c_char]) -> String {
    let bytes: Vec<u8> = field.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
