//! The Neuron backend against nrt-standin, a software libnrt built from this repository
//! (crates/nrt-standin): the binding's call order and checks, then a real gRPC server on
//! port 0 with the loader `dealsift serve --backend neuron` uses. Each test loads its own
//! copy of the stand-in, so each has its own runtime (libnrt allows one per process).
//! What only a Trn1 can verify is listed in deploy/README.md.

mod common;

use std::ffi::{c_char, CString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::*;
use dealsift::backend::neuron::{self, NeuronOptions, RuntimeLibrary};
use dealsift::backend::{Batch, Bucket, Shapes};
use dealsift::engine::{softmax, Engine, ModelDir};
use dealsift::error::{BackendError, ModelError};
use dealsift::proto::{ClassifyOptions, GetModelInfoRequest};
use dealsift::server::{self, EngineHooks, ModelSpec, ServerConfig};
use dealsift::tokenize::{LongText, TextEncoder};
use serde_json::{json, Value};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const EXEC_TIMEOUT_S: u32 = 7;
const NRT_TIMEOUT: u32 = 5;
const NRT_HW_ERROR: u32 = 6;
const NRT_EXEC_BAD_INPUT: u32 = 1002;

/// NEFF inputs as compile.py traces them: (NEFF name, role).
const TRACED_INPUTS: &[(&str, &str)] = &[("input0", "input_ids"), ("input1", "attention_mask")];

/// Backend options; the first call exports NEURON_RT_EXEC_TIMEOUT (as `dealsift serve` does
/// before it starts threads). Every test calls this before it touches a runtime, and `Once`
/// holds them all until the variable is set, so no runtime reads the environment meanwhile.
fn options(lib_dir: &Path) -> NeuronOptions {
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var(neuron::EXEC_TIMEOUT_ENV, EXEC_TIMEOUT_S.to_string()));
    NeuronOptions { lib_dir: lib_dir.to_path_buf(), exec_timeout_s: EXEC_TIMEOUT_S }
}

/// libnrt_standin.so, which cargo builds next to this test because it is a dev-dependency.
fn standin_library() -> PathBuf {
    let file = format!("{}nrt_standin{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps.join(&file), deps.parent().unwrap().join(&file)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{file} not found near {}: `cargo test` builds it (nrt-standin is a dev-dependency)", exe.display()))
}

/// The stand-in's test controls, through the same loaded copy the backend uses.
struct Standin {
    lib: libloading::Library,
}

impl Standin {
    fn open(path: &Path) -> Self {
        // SAFETY: the stand-in has no initialisers beyond Rust's own.
        Self { lib: unsafe { libloading::Library::new(path) }.unwrap() }
    }

    /// The next `count` calls of `call` after `skip` more return `status`.
    fn inject(&self, call: &str, status: u32, skip: u64, count: u64) {
        type Inject = unsafe extern "C" fn(*const c_char, u32, u64, u64) -> u32;
        let call = CString::new(call).unwrap();
        // SAFETY: the stand-in exports standin_inject with this signature.
        let rc = unsafe { self.lib.get::<Inject>(b"standin_inject\0").unwrap()(call.as_ptr(), status, skip, count) };
        assert_eq!(rc, 0);
    }

    fn report(&self) -> Value {
        type Report = unsafe extern "C" fn(*mut c_char, usize) -> usize;
        // SAFETY: the stand-in exports standin_report with this signature.
        let report = unsafe { self.lib.get::<Report>(b"standin_report\0").unwrap() };
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: `buf` is writable for its length.
            let len = unsafe { report(buf.as_mut_ptr().cast(), buf.len()) };
            if len < buf.len() {
                buf.truncate(len);
                return serde_json::from_slice(&buf).unwrap();
            }
            buf.resize(len * 2, 0);
        }
    }
}

/// The stand-in's computation, written out independently of it.
fn standin_logits(ids: &[u32], mask: &[u32]) -> Vec<f32> {
    let weighted: i64 = ids.iter().zip(mask).map(|(&i, &m)| i64::from(i) * i64::from(m)).sum();
    let ones: u32 = mask.iter().sum();
    vec![weighted.rem_euclid(97) as f32 / 10.0, ones as f32 / 10.0]
}

fn neff(batch: usize, seq: usize, inputs: &[(&str, &str)], delay_ms: u64) -> Value {
    json!({
        "standin_neff": 1,
        "name": format!("b{batch}_s{seq}"),
        "exec_delay_ms": delay_ms,
        "inputs": inputs.iter().map(|(name, role)| json!({"name": name, "role": role, "dtype": 8, "shape": [batch, seq]})).collect::<Vec<_>>(),
        "outputs": [{"name": "output0", "dtype": 10, "shape": [batch, 2]}],
    })
}

/// A model directory (the tiny-bert fixture plus `neuron/`: a manifest and stand-in NEFFs)
/// and a private copy of the stand-in library as `<lib_dir>/libnrt.so.1`.
struct Fixture {
    root: PathBuf,
    lib_dir: PathBuf,
    model_dir: PathBuf,
    standin: Standin,
}

impl Fixture {
    fn new(name: &str, buckets: &[(usize, usize)], inputs: &[(&str, &str)], delay_ms: u64) -> Self {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("neuron-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        let (lib_dir, model_dir) = (root.join("lib"), root.join("model"));
        std::fs::create_dir_all(&lib_dir).unwrap();
        std::fs::create_dir_all(model_dir.join("neuron")).unwrap();
        std::fs::copy(standin_library(), lib_dir.join(neuron::LIBRARY_FILE)).unwrap();
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(fixture_dir().join(file), model_dir.join(file)).unwrap();
        }
        let version = ModelDir::open(&model_dir, None).unwrap().version;
        let mut entries = Vec::new();
        for &(batch, seq) in buckets {
            let file = format!("b{batch}_s{seq}.neff");
            std::fs::write(model_dir.join("neuron").join(&file), neff(batch, seq, inputs, delay_ms).to_string()).unwrap();
            entries.push(json!({"batch": batch, "seq": seq, "neff": file}));
        }
        let manifest = json!({
            "format": 1,
            "target": "trn1",
            "sdk_version": "2.28.0 (nrt-standin)",
            "compiler_version": "none: stand-in NEFFs",
            "compiler_flags": [],
            "model_version": version,
            "inputs": inputs.iter().map(|(name, role)| json!({"name": name, "role": role, "dtype": "int32"})).collect::<Vec<_>>(),
            "output": {"name": "output0", "dtype": "float32", "labels": 2},
            "buckets": entries,
        });
        std::fs::write(model_dir.join("neuron/manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
        let standin = Standin::open(&lib_dir.join(neuron::LIBRARY_FILE));
        Self { root, lib_dir, model_dir, standin }
    }

    fn neff_path(&self, batch: usize, seq: usize) -> PathBuf {
        self.model_dir.join(format!("neuron/b{batch}_s{seq}.neff"))
    }

    /// The loader `dealsift serve --backend neuron` runs.
    fn loader(&self, config: &ServerConfig) -> impl Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static {
        let spec = ModelSpec { dir: self.model_dir.clone(), max_sequence_length: None, cpu_kernels: Default::default() };
        let options = options(&self.lib_dir);
        let batcher = config.batcher.clone();
        let max_chunks = config.limits.max_chunks_per_document;
        move |hooks| server::load_neuron(&spec, &options, batcher.clone(), max_chunks, hooks)
    }

    async fn serve(&self, config: ServerConfig) -> TestServer {
        let server = TestServer::start(config.clone(), self.loader(&config)).await;
        server.wait_serving().await;
        server
    }

    fn load_error(&self) -> String {
        let model = ModelDir::open(&self.model_dir, None).unwrap();
        let library = RuntimeLibrary::open(&self.lib_dir).unwrap();
        match neuron::load_executors(library, &model, &options(&self.lib_dir)) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    /// After the runtime is closed: nothing leaked, nothing out of order.
    fn assert_closed_cleanly(&self) {
        let report = self.standin.report();
        assert_eq!(report["violations"], json!([]), "log: {:#}", report["log"]);
        assert_eq!(report["init_calls"], 1);
        assert_eq!(report["close_calls"], 1);
        for live in ["live_models", "live_tensors", "live_tensor_sets", "live_tensor_infos"] {
            assert_eq!(report[live], 0, "{live}");
        }
    }

    fn executes(&self, model: &str) -> u64 {
        self.standin.report()["executes_per_model"][model].as_u64().unwrap_or(0)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn the_binding_drives_the_runtime_in_the_order_it_requires() {
    let fx = Fixture::new("order", &[(1, 16), (4, 32)], TRACED_INPUTS, 0);
    let model = ModelDir::open(&fx.model_dir, None).unwrap();
    let library = RuntimeLibrary::open(&fx.lib_dir).unwrap();
    let Ok(mut executors) = neuron::load_executors(library, &model, &options(&fx.lib_dir)) else { panic!("load failed") };
    assert_eq!(executors.len(), 2, "one executor per stand-in NeuronCore");
    let info = executors[0].info();
    assert_eq!(info.name, "neuron");
    assert_eq!(info.shapes, Shapes::Buckets(vec![Bucket { batch: 1, seq: 16 }, Bucket { batch: 4, seq: 32 }]));

    // Three sequences padded to the 4x32 bucket, as the batcher packs them; each core runs it.
    let seqs: Vec<Vec<u32>> = vec![vec![101, 2054, 3000, 102], (100..130).collect(), vec![101, 7, 102]];
    let batch = Batch::pack(seqs.iter().map(Vec::as_slice), Bucket { batch: 4, seq: 32 }, 0);
    for executor in &mut executors {
        let rows = executor.predict(&batch).unwrap();
        assert_eq!(rows.len(), 4);
        for (r, row) in rows.iter().enumerate() {
            let cells = r * 32..(r + 1) * 32;
            assert_eq!(row, &standin_logits(&batch.input_ids[cells.clone()], &batch.attention_mask[cells]), "row {r}");
        }
    }
    let uncompiled = Batch::pack(seqs[..1].iter().map(Vec::as_slice), Bucket { batch: 2, seq: 16 }, 0);
    assert!(matches!(executors[0].predict(&uncompiled), Err(BackendError::InvalidInput(m)) if m.contains("no NEFF compiled for 2 rows")));
    let too_big = Batch::pack([[101, u32::MAX, 102].as_slice()].into_iter(), Bucket { batch: 1, seq: 16 }, 0);
    assert!(matches!(executors[0].predict(&too_big), Err(BackendError::InvalidInput(m)) if m.contains("int32")));
    drop(executors);

    fx.assert_closed_cleanly();
    let report = fx.standin.report();
    assert_eq!(report["exec_timeout_env"], EXEC_TIMEOUT_S.to_string(), "set before nrt_init");
    assert_eq!(report["executes_per_core"], json!({"0": 1, "1": 1}));
    let log: Vec<&str> = report["log"].as_array().unwrap().iter().filter_map(Value::as_str).filter(|l| !l.starts_with(' ')).collect();
    let call = |l: &str| l.split(' ').next().unwrap_or_default().to_string();
    let first = |name: &str| log.iter().position(|l| call(l) == name).unwrap_or_else(|| panic!("{name} never called: {log:#?}"));
    let order = [
        "nrt_init",
        "nrt_get_visible_vnc_count",
        "nrt_load",
        "nrt_get_model_tensor_info",
        "nrt_free_model_tensor_info",
        "nrt_allocate_tensor_set",
        "nrt_tensor_allocate",
        "nrt_add_tensor_to_tensor_set",
        "nrt_tensor_write",
        "nrt_execute",
        "nrt_tensor_read",
        "nrt_unload",
        "nrt_tensor_free",
        "nrt_destroy_tensor_set",
        "nrt_close",
    ];
    for pair in order.windows(2) {
        assert!(first(pair[0]) < first(pair[1]), "{} must come before {}: {log:#?}", pair[0], pair[1]);
    }
    // Teardown, per model: unload, free its three tensors, destroy its two sets; close last.
    let teardown: Vec<String> = log[first("nrt_unload")..].iter().map(|l| call(l)).collect();
    let per_model = ["nrt_unload", "nrt_tensor_free", "nrt_tensor_free", "nrt_tensor_free", "nrt_destroy_tensor_set", "nrt_destroy_tensor_set"];
    let mut expected: Vec<&str> = per_model.iter().copied().cycle().take(per_model.len() * 4).collect();
    expected.push("nrt_close");
    assert_eq!(teardown, expected);
}

#[test]
fn neff_tensors_are_checked_against_the_manifest_by_name_size_and_shape() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 5] = [
        ("int64", |n| n["inputs"][0]["shape"] = json!([1, 32]), "traced with int64 inputs"),
        ("missing", |n| drop(n["inputs"].as_array_mut().unwrap().remove(1)), "has no input input1 (the manifest's attention_mask)"),
        ("extra", |n| n["inputs"].as_array_mut().unwrap().push(json!({"name": "input2", "dtype": 8, "shape": [1, 16]})), "input2 is not in the manifest"),
        ("labels", |n| n["outputs"][0]["shape"] = json!([1, 3]), "output0 is 12 bytes but the manifest's 1x16 bucket needs 8"),
        ("shape", |n| n["inputs"][0]["shape"] = json!([16, 1]), "input0 has shape [16, 1]"),
    ];
    for (name, edit, want) in cases {
        let fx = Fixture::new(&format!("interface-{name}"), &[(1, 16)], TRACED_INPUTS, 0);
        let mut neff = neff(1, 16, TRACED_INPUTS, 0);
        edit(&mut neff);
        std::fs::write(fx.neff_path(1, 16), neff.to_string()).unwrap();
        let err = fx.load_error();
        assert!(err.contains(want) && err.contains("b1_s16.neff"), "{name}: {err}");
        fx.assert_closed_cleanly();
    }

    // A file the runtime cannot load: its status, named, with what to do.
    let fx = Fixture::new("interface-not-a-neff", &[(1, 16)], TRACED_INPUTS, 0);
    std::fs::write(fx.neff_path(1, 16), b"\x7fNEFF from another compiler").unwrap();
    let err = fx.load_error();
    assert!(err.contains("nrt_load returned NRT_UNSUPPORTED_NEFF_VERSION (10)") && err.contains("recompile"), "{err}");
    fx.assert_closed_cleanly();

    // Dtype codes are not trusted (pre-2.28 runtimes number FLOAT32 1, not 0xA): sizes and
    // shapes decide.
    let fx = Fixture::new("interface-legacy-dtype", &[(1, 16)], TRACED_INPUTS, 0);
    let mut legacy = neff(1, 16, TRACED_INPUTS, 0);
    legacy["outputs"][0]["dtype"] = json!(1);
    std::fs::write(fx.neff_path(1, 16), legacy.to_string()).unwrap();
    let model = ModelDir::open(&fx.model_dir, None).unwrap();
    let library = RuntimeLibrary::open(&fx.lib_dir).unwrap();
    assert!(neuron::load_executors(library, &model, &options(&fx.lib_dir)).is_ok());
}

#[test]
fn a_missing_runtime_library_is_named_with_how_to_install_it() {
    let Err(err) = RuntimeLibrary::open(Path::new("/nonexistent/neuron/lib")) else { panic!("opened") };
    let err = ModelError::from(err).to_string();
    for want in ["/nonexistent/neuron/lib/libnrt.so.1", "aws-neuronx-runtime-lib", "--neuron-lib-dir"] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
}

#[test]
fn serve_with_the_neuron_backend_and_no_sdk_exits_nonzero_naming_the_library() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dealsift"))
        .args(["serve", "--backend", "neuron", "--neuron-lib-dir", "/nonexistent/neuron/lib", "--addr", "127.0.0.1:0", "--metrics-addr", "off", "--model-dir"])
        .arg(fixture_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dealsift serve --backend neuron kept running without libnrt");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    for want in ["/nonexistent/neuron/lib/libnrt.so.1", "aws-neuronx-runtime-lib"] {
        assert!(stderr.contains(want), "{want:?} not in {stderr}");
    }
}

/// What the server should answer for `text`: the stand-in's logits of its first window,
/// through the model's calibration.
fn expected_scores(model_dir: &Path, window: usize, text: &str) -> Vec<f32> {
    let model = ModelDir::open(model_dir, None).unwrap();
    let encoder = TextEncoder::from_file(&model_dir.join("tokenizer.json"), window).unwrap();
    let ids = encoder.encode(None, text, LongText::Truncate, 1).unwrap().windows.remove(0);
    softmax(&standin_logits(&ids, &vec![1; ids.len()]), model.temperature)
}

fn assert_scores(got: &dealsift::proto::DocumentResult, want: &[f32]) {
    let got: Vec<f32> = got.scores.iter().map(|s| s.score).collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[tokio::test]
async fn classify_pads_batches_to_buckets_and_answers_with_the_runtime_logits() {
    // Inputs in an order unlike the traced one, with token_type_ids: the executor must bind
    // by the manifest's names and roles (the stand-in adds sum(token_type_ids) to logit 0).
    let inputs = [("input0", "attention_mask"), ("input1", "token_type_ids"), ("input2", "input_ids")];
    let fx = Fixture::new("serve", &[(1, 16), (4, 32), (8, 64)], &inputs, 0);
    let mut config = config();
    // Long enough that one request's windows always form one batch.
    config.batcher.max_queue_delay = Duration::from_millis(200);
    let server = fx.serve(config).await;
    let mut client = server.client().await;

    let info = client.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.backend, "neuron");
    assert_eq!(info.executors, 2);
    let buckets: Vec<(u32, u32)> = info.buckets.iter().map(|b| (b.batch_size, b.sequence_length)).collect();
    assert_eq!(buckets, [(1, 16), (4, 32), (8, 64)]);
    assert_eq!(info.max_sequence_length, 64, "the window is capped at the longest bucket");

    // Three headlines: one batch of 3 rows, padded to a 4-row bucket.
    let shapes = Shapes::Buckets(vec![Bucket { batch: 1, seq: 16 }, Bucket { batch: 4, seq: 32 }, Bucket { batch: 8, seq: 64 }]);
    let encoder = TextEncoder::from_file(&fx.model_dir.join("tokenizer.json"), 64).unwrap();
    let longest = HEADLINES[..3].iter().map(|t| encoder.encode(None, t, LongText::Truncate, 1).unwrap().windows[0].len()).max().unwrap();
    let bucket = shapes.fit(3, longest).unwrap();
    assert_eq!(bucket.batch, 4);
    let key = format!("b{}_s{}", bucket.batch, bucket.seq);
    let before = fx.executes(&key);
    let docs = HEADLINES[..3].iter().enumerate().map(|(i, t)| doc(&i.to_string(), t)).collect();
    let results = client.classify(request(docs)).await.unwrap().into_inner().results;
    for (r, text) in results.iter().zip(HEADLINES) {
        assert_scores(r, &expected_scores(&fx.model_dir, 64, text));
    }
    assert_eq!(fx.executes(&key), before + 1, "one execution of {key}");

    // A long text, cut to the 64-token window, alone in the 8x64 bucket (7 padding rows).
    let long = HEADLINES.join(". ");
    let before = fx.executes("b8_s64");
    let mut req = request(vec![doc("long", &long)]);
    req.options = Some(ClassifyOptions { threshold: None, long_text: dealsift::proto::LongText::Truncate as i32 });
    let result = client.classify(req).await.unwrap().into_inner().results.remove(0);
    assert!(result.truncated);
    assert_scores(&result, &expected_scores(&fx.model_dir, 64, &long));
    assert_eq!(fx.executes("b8_s64"), before + 1);

    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

/// A server on a 1x32 bucket, warmed up; then `status` is injected into the next `count`
/// executions and one document is sent.
async fn inject_and_classify(name: &str, status: u32, count: u64) -> (Fixture, TestServer, tonic::Status) {
    let fx = Fixture::new(name, &[(1, 32)], TRACED_INPUTS, 0);
    let server = fx.serve(config()).await;
    fx.standin.inject("nrt_execute", status, 0, count);
    let err = server.client().await.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap_err();
    (fx, server, err)
}

#[tokio::test]
async fn a_bad_input_status_is_invalid_argument_and_the_service_keeps_serving() {
    let (fx, server, err) = inject_and_classify("bad-input", NRT_EXEC_BAD_INPUT, 1).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("NRT_EXEC_BAD_INPUT (1002)"), "{}", err.message());
    assert_eq!(server.health().await, ServingStatus::Serving);
    server.client().await.classify(request(vec![doc("b", HEADLINES[1])])).await.unwrap();
    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

#[tokio::test]
async fn a_timeout_status_is_unavailable_and_the_service_keeps_serving() {
    let (fx, server, err) = inject_and_classify("timeout", NRT_TIMEOUT, 1).await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("NRT_TIMEOUT (5)") && err.message().contains("--neuron-exec-timeout-s"), "{}", err.message());
    assert_eq!(server.health().await, ServingStatus::Serving);
    server.client().await.classify(request(vec![doc("b", HEADLINES[1])])).await.unwrap();
    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

#[tokio::test]
async fn a_hardware_error_is_unavailable_and_marks_the_service_not_serving() {
    let (fx, server, err) = inject_and_classify("hardware", NRT_HW_ERROR, u64::MAX).await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("NRT_HW_ERROR (6)"), "{}", err.message());
    for _ in 0..200 {
        if server.health().await == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.health().await, ServingStatus::NotServing);
    let err = server.client().await.classify(request(vec![doc("b", HEADLINES[1])])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("restart"), "{}", err.message());
    // The server still shuts down in order: models unloaded, tensors freed, runtime closed.
    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

/// libnrt allows one runtime per process: a reload loads the new models on the runtime the
/// served ones hold, and the old ones are unloaded once replaced.
#[tokio::test]
async fn a_reload_loads_on_the_same_runtime_and_unloads_the_replaced_models() {
    let fx = Fixture::new("reload", &[(1, 32)], TRACED_INPUTS, 0);
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut config = config();
    config.reload = Some(reload.clone());
    let server = fx.serve(config).await;
    let live_models = || fx.standin.report()["live_models"].as_u64().unwrap();
    let served = live_models();
    assert!(served > 0);

    reload.notify_one();
    eventually("the reload is counted", || async { server.scrape().await.2.lines().any(|l| l == "dealsift_model_reloads_total{result=\"ok\"} 1") }).await;
    eventually("the replaced models are unloaded", || async { live_models() == served }).await;
    server.client().await.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
    assert_eq!(fx.standin.report()["init_calls"], 1);
    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

#[tokio::test]
async fn two_cores_execute_batches_at_the_same_time() {
    // Each execution takes 150 ms on the stand-in; one row per batch, so four documents are
    // four batches for two executors.
    let fx = Fixture::new("parallel", &[(1, 32)], TRACED_INPUTS, 150);
    let mut config = config();
    config.batcher.max_batch_size = 1;
    let server = fx.serve(config).await;
    let client = server.client().await;
    let calls = (0..4).map(|i| {
        let mut client = client.clone();
        async move { client.classify(request(vec![doc(&i.to_string(), HEADLINES[i])])).await }
    });
    for (i, answer) in futures::future::join_all(calls).await.into_iter().enumerate() {
        assert_scores(&answer.unwrap().into_inner().results[0], &expected_scores(&fx.model_dir, 32, HEADLINES[i]));
    }
    let report = fx.standin.report();
    let per_core = &report["executes_per_core"];
    assert!(per_core["0"].as_u64() > Some(0) && per_core["1"].as_u64() > Some(0), "{per_core}");
    assert!(report["max_concurrent_executes"].as_u64() >= Some(2), "{report:#}");
    server.stop().await.unwrap();
    fx.assert_closed_cleanly();
}

#[tokio::test]
async fn the_binary_runs_one_executor_per_core_neuron_rt_visible_cores_names() {
    let fx = Fixture::new("cli-visible-cores", &[(1, 32)], TRACED_INPUTS, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dealsift"))
        .args(["serve", "--backend", "neuron", "--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--neuron-lib-dir"])
        .arg(&fx.lib_dir)
        .arg("--model-dir")
        .arg(&fx.model_dir)
        .env("NEURON_RT_VISIBLE_CORES", "1")
        .env("DEALSIFT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Log lines, colours removed, until the server says it is serving.
    let mut addr = None;
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let mut plain = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|&c| c == 'm');
            } else {
                plain.push(c);
            }
        }
        addr = addr.or_else(|| plain.split_whitespace().find_map(|w| w.strip_prefix("addr=")).map(str::to_string));
        let serving = plain.contains("serving model=");
        seen.push(plain);
        if serving {
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no address in the log: {seen:#?}"));
    assert!(seen.iter().any(|l| l.contains("serving model=")), "{seen:#?}");

    let mut client = dealsift::proto::deal_classifier_client::DealClassifierClient::connect(format!("http://{addr}")).await.unwrap();
    let info = client.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.backend.as_str(), info.executors), ("neuron", 1), "NEURON_RT_VISIBLE_CORES=1 leaves one core");
    let result = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap().into_inner().results.remove(0);
    assert_scores(&result, &expected_scores(&fx.model_dir, 32, HEADLINES[0]));

    // SIGTERM: graceful shutdown, the runtime closed, exit 0.
    drop(client);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}
