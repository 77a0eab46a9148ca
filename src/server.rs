//! Server lifecycle: bind, serve health and reflection at once, load and warm the model
//! in the background, flip health to SERVING, and shut down gracefully.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::auth::{ApiKeys, KeyCheck};
use crate::backend::cpu::{CpuBackend, CpuKernels};
use crate::backend::neuron::{self, NeuronOptions, RuntimeLibrary};
use crate::backend::Backend;
use crate::batcher::{Batcher, BatcherConfig};
use crate::engine::{Admission, Doc, Engine, ModelDir, Options};
use crate::error::{BackendError, ModelError};
use crate::model::config::Joins;
use crate::kserve::InferenceService;
use crate::proto::deal_classifier_server::DealClassifierServer;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::service::{DealService, Limits, State};
use crate::telemetry::{self, Metrics};
use crate::tokenize::{LongText, TextEncoder};

/// Everything `run` needs besides the listener and the model.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub batcher: BatcherConfig,
    pub limits: Limits,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Calls in progress at once on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings on every connection; `None`: none.
    pub keepalive: Option<Keepalive>,
    /// TLS on the gRPC port (see [`tls_config`]); `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// Each notification reads `api_keys`' file again and loads the model again, serving it in
    /// place of the current one once it has passed its warm-up (`dealsift serve` notifies on
    /// SIGHUP); `None`: never.
    pub reload: Option<Arc<Notify>>,
    /// Keys the classifier RPCs require (`--api-key-file`); `None` leaves them open.
    pub api_keys: Option<ApiKeys>,
}

/// A ping every `interval`; a connection whose ping goes unanswered for `timeout` is closed.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// TLS from PEM files: the server's certificate chain and key, and optionally the CA whose
/// certificates clients must present (mutual TLS: only they are answered). A connection that
/// has not finished its handshake within `handshake_timeout` is closed.
pub fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>, handshake_timeout: Duration) -> Result<ServerTlsConfig, ServeError> {
    let read = |path: &Path, flag: &str| std::fs::read(path).map_err(|e| ServeError::Tls(format!("{flag} {}: {e}", path.display())));
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?))
        .timeout(handshake_timeout);
    Ok(match client_ca {
        Some(ca) => config.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?)),
        None => config,
    })
}

/// How long the metrics endpoint may take to finish its open scrapes at shutdown.
const METRICS_DRAIN: Duration = Duration::from_secs(2);

/// Called by a backend executor when the device or runtime fails.
pub type FatalHook = Arc<dyn Fn(&BackendError) + Send + Sync>;

/// What the server hands the model loader: where a backend failure is reported, and the
/// metrics the batcher records into.
#[derive(Clone)]
pub struct EngineHooks {
    pub on_fatal: FatalHook,
    pub metrics: Arc<Metrics>,
}

impl EngineHooks {
    /// For an engine outside a server (CLI tools, benchmarks, tests): failures only fail
    /// the calls, and the metrics are not exported.
    pub fn detached() -> Self {
        Self { on_fatal: Arc::new(|_| {}), metrics: Arc::new(Metrics::new()) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model failed to load: {0}")]
    Load(#[from] ModelError),
    #[error("model failed its warm-up: {0}")]
    Warmup(String),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Which backend runs the model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    /// Caps the model's window (tokens, special tokens included).
    pub max_sequence_length: Option<usize>,
    /// Which implementation the CPU backend runs.
    pub cpu_kernels: CpuKernels,
}

/// Opens a model directory on the CPU backend and starts its batcher.
pub fn load_cpu(spec: &ModelSpec, batcher: BatcherConfig, max_chunks: usize, hooks: EngineHooks) -> Result<Engine, ModelError> {
    let model = open_model(spec)?;
    let backend = CpuBackend::load(&model.path, &model.config, batcher.max_batch_size, model.window, spec.cpu_kernels)?;
    start_engine(model, vec![Box::new(backend)], batcher, max_chunks, hooks)
}

/// Opens a model directory's compiled NEFFs (`neuron/manifest.json`) on every visible
/// NeuronCore and starts its batcher. libnrt is loaded first: without the Neuron SDK that is
/// the error worth reporting, before anything about the model.
pub fn load_neuron(spec: &ModelSpec, options: &NeuronOptions, batcher: BatcherConfig, max_chunks: usize, hooks: EngineHooks) -> Result<Engine, ModelError> {
    let library = RuntimeLibrary::open(&options.lib_dir)?;
    let model = open_model(spec)?;
    let executors = neuron::load_executors(library, &model, options)?;
    start_engine(model, executors, batcher, max_chunks, hooks)
}

/// Opens `spec.dir` with symlinks resolved first, so that every file of one load comes from
/// the same directory even if a link is switched to a new version meanwhile. A model without
/// a `dealsift.model_id` is still named after the directory as given, not its target.
fn open_model(spec: &ModelSpec) -> Result<ModelDir, ModelError> {
    let resolved = spec.dir.canonicalize().unwrap_or_else(|_| spec.dir.clone());
    let mut model = ModelDir::open(&resolved, spec.max_sequence_length)?;
    if model.config.dealsift.model_id.is_none() {
        model.model_id = spec.dir.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    }
    Ok(model)
}

/// Wires a model directory's tokenizer and already-loaded executors into an engine.
pub fn start_engine(
    model: ModelDir,
    executors: Vec<Box<dyn Backend>>,
    batcher: BatcherConfig,
    max_chunks: usize,
    hooks: EngineHooks,
) -> Result<Engine, ModelError> {
    let max_seq = executors.first().map(|e| e.info().shapes.max_seq()).unwrap_or(0);
    let window = model.window.min(max_seq);
    if let (Some((_, how)), Some(trained)) = (&model.lexical, model.config.dealsift.max_sequence_length) {
        // A stage joined to every text does not depend on the window.
        if how.joins == Joins::LongTexts && window < trained {
            tracing::warn!(window, trained, "serving a shorter window than the model was trained for: texts between the two lengths are joined to the lexical stage, whose weight and threshold were fit without them");
        }
    }
    let encoder = TextEncoder::from_file(&model.path.join("tokenizer.json"), window)?;
    let model = ModelDir { window, ..model };
    let pad_id = model.config.pad_token_id;
    let batcher = Batcher::start(executors, batcher, pad_id, hooks.on_fatal, hooks.metrics)
        .map_err(|e| ModelError::Invalid(format!("cannot start executor threads: {e}")))?;
    Ok(Engine::new(model, encoder, batcher, max_chunks))
}

/// A generated service that accepts compressed requests, compresses responses for clients that
/// ask, and holds messages to `max_bytes` both ways. (A macro: the generated servers share
/// these methods but no trait.)
macro_rules! with_transport_settings {
    ($service:expr, $max_bytes:expr) => {
        $service
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Deflate)
            .max_decoding_message_size($max_bytes)
            .max_encoding_message_size($max_bytes)
    };
}

/// Serves gRPC on `listener` (and Prometheus metrics on `metrics_listener`, if given) until
/// `shutdown` resolves (or the model fails to load), then finishes in-flight work and
/// returns. `load` runs on a blocking thread; health says NOT_SERVING until it has returned
/// and a warm-up request has passed through the whole pipeline. It runs again on each
/// `config.reload` notification: see [`ServerConfig::reload`].
pub async fn run<L>(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    load: L,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    L: Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static,
{
    let mut server = Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(config.keepalive.map(|k| k.interval))
        .http2_keepalive_timeout(config.keepalive.map(|k| k.timeout));
    if let Some(tls) = config.tls.clone() {
        // Checks the certificate and key before anything starts.
        server = server.tls_config(tls).map_err(|e| {
            let cause = std::iter::successors(std::error::Error::source(&e), |e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>();
            ServeError::Tls(format!("{e} ({}): check --tls-cert, --tls-key and --tls-client-ca", cause.join(": ")))
        })?;
    }
    let metrics = Arc::new(Metrics::new());
    // Dropped when gRPC has stopped: the metrics endpoint stops with it.
    let (metrics_stop, mut metrics_stopped) = tokio::sync::watch::channel(());
    let metrics_server = metrics_listener.map(|l| {
        tokio::spawn(telemetry::serve(l, metrics.clone(), async move {
            let _ = metrics_stopped.changed().await;
        }))
    });

    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let state = Arc::new(State::new(config.limits.clone(), metrics.clone()));
    // dealsift's API and the KServe v2 face, on the same port, under the same settings.
    let service = with_transport_settings!(DealClassifierServer::new(DealService::new(state.clone())), config.max_message_bytes);
    let inference = with_transport_settings!(GrpcInferenceServiceServer::new(InferenceService::new(state.clone())), config.max_message_bytes);
    // Keys are checked on the headers, before a request's body is read or inflated.
    let key_check = KeyCheck::new(config.api_keys.clone(), metrics.clone());

    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<ServeError>();
    // Backend failures, tagged with the number of the load whose engine reported them.
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, BackendError)>();
    // Held while the served engine and what health and metrics say of it change together, so
    // a failure and a reload finishing at the same moment cannot leave them disagreeing.
    let transition = Arc::new(tokio::sync::Mutex::new(()));
    let lifecycle = Lifecycle { load: Arc::new(load), key_check: key_check.clone(), state: state.clone(), reporter: reporter.clone(), fatal_tx, transition: transition.clone() };
    let models = tokio::spawn(lifecycle.run(failed_tx, config.reload.clone()));

    let fatal_state = state.clone();
    let fatal_reporter = reporter.clone();
    tokio::spawn(async move {
        while let Some((generation, err)) = fatal_rx.recv().await {
            let _transition = transition.lock().await;
            if !fatal_state.set_failed(generation, err.clone()) {
                tracing::warn!(error = %err, "the backend of a model not (or no longer) served failed; the served model is unaffected");
                continue;
            }
            tracing::error!(error = %err, "backend failed; health is NOT_SERVING until a restart or a reload");
            fatal_state.metrics.set_not_ready();
            set_health(&fatal_reporter, ServingStatus::NotServing).await;
        }
    });

    let mut load_failure = None;
    let stop = async {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down: finishing in-flight requests"),
            Ok(err) = failed_rx => load_failure = Some(err),
        }
    };
    server
        .layer(key_check.clone())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(inference)
        // TCP_NODELAY: a response is several small writes (headers, message, trailers);
        // with Nagle's algorithm they wait for the client's delayed ACK (tens of ms).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stop)
        .await?;
    // No reload may install an engine after this one is shut down: wait until the task has
    // stopped (a load still running on its blocking thread is dropped when it returns).
    models.abort();
    let _ = models.await;
    metrics.set_not_ready();
    if let Some(engine) = state.engine() {
        // Finishes the work already queued: joins threads, so off the async workers.
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    }
    drop(metrics_stop);
    if let Some(mut server) = metrics_server {
        // A scraper holding a connection open must not hold up shutdown.
        match tokio::time::timeout(METRICS_DRAIN, &mut server).await {
            Ok(joined) => joined.map_err(|e| ServeError::Metrics(std::io::Error::other(e)))?.map_err(ServeError::Metrics)?,
            Err(_) => server.abort(),
        }
    }
    match load_failure {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Loads models and installs them: once at start (a failure there ends the server), then on
/// each reload notification (a failure there leaves the current model serving), when the API
/// key file is read again too.
struct Lifecycle<L> {
    load: Arc<L>,
    key_check: KeyCheck,
    state: Arc<State>,
    reporter: HealthReporter,
    fatal_tx: tokio::sync::mpsc::UnboundedSender<(u64, BackendError)>,
    transition: Arc<tokio::sync::Mutex<()>>,
}

impl<L> Lifecycle<L>
where
    L: Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static,
{
    async fn run(self, failed: tokio::sync::oneshot::Sender<ServeError>, reload: Option<Arc<Notify>>) {
        match self.load_and_warm_up(0).await {
            Ok(engine) => self.install(0, engine).await,
            Err(e) => {
                let _ = failed.send(e);
                return;
            }
        }
        let Some(reload) = reload else { return };
        for generation in 1.. {
            reload.notified().await;
            match self.key_check.reload() {
                Some(Ok(keys)) => {
                    self.state.metrics.api_keys_reloaded(true);
                    tracing::info!(keys, "API keys read again");
                }
                Some(Err(e)) => {
                    self.state.metrics.api_keys_reloaded(false);
                    tracing::error!(error = %e, "API key file rejected; the previous keys stay");
                }
                None => {}
            }
            let previous = self.state.engine().map(|e| e.model.version.clone()).unwrap_or_default();
            tracing::info!(previous_version = %previous, "reloading the model");
            match self.load_and_warm_up(generation).await {
                Ok(engine) => {
                    self.install(generation, engine).await;
                    self.state.metrics.reloaded(true);
                }
                Err(e) => {
                    self.state.metrics.reloaded(false);
                    tracing::error!(error = %e, version = %previous, "reload failed; the previous model keeps serving");
                }
            }
        }
    }

    /// Runs `load` on a blocking thread, then one request through the new engine.
    async fn load_and_warm_up(&self, generation: u64) -> Result<Arc<Engine>, ServeError> {
        let fatal_tx = self.fatal_tx.clone();
        let hooks = EngineHooks {
            on_fatal: Arc::new(move |e: &BackendError| {
                let _ = fatal_tx.send((generation, e.clone()));
            }),
            metrics: self.state.metrics.clone(),
        };
        let load = self.load.clone();
        let engine = match tokio::task::spawn_blocking(move || load(hooks)).await {
            Ok(Ok(engine)) => Arc::new(engine),
            Ok(Err(e)) => return Err(ServeError::Load(e)),
            Err(e) => return Err(ServeError::Warmup(format!("loader panicked: {e}"))),
        };
        // A failed engine is dropped: its threads stop without blocking this task.
        warm_up(&engine).await?;
        Ok(engine)
    }

    /// Serves `engine` from the next request on; the one it replaces is freed when its last
    /// request has been answered (see `Batcher`'s `Drop`).
    async fn install(&self, generation: u64, engine: Arc<Engine>) {
        let _transition = self.transition.lock().await;
        self.state.set_engine(generation, engine.clone());
        self.state.metrics.set_serving(&engine.model.model_id, &engine.model.version, engine.batcher().info().name);
        set_health(&self.reporter, ServingStatus::Serving).await;
        let lexical = engine.model.lexical.as_ref().map(|(_, how)| (how.joins, how.weight));
        tracing::info!(model = %engine.model.model_id, version = %engine.model.version, backend = engine.batcher().info().name, threshold = %engine.model.threshold, ?lexical, "serving");
    }
}

/// The classifier's health, under both services' names (dealsift's and the KServe v2 face's)
/// and the server's ("").
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status(<DealClassifierServer<DealService> as tonic::server::NamedService>::NAME, status).await;
    reporter.set_service_status(<GrpcInferenceServiceServer<InferenceService> as tonic::server::NamedService>::NAME, status).await;
    reporter.set_service_status("", status).await;
}

/// One real request through tokenizer, batcher and backend before reporting SERVING.
async fn warm_up(engine: &Engine) -> Result<(), ServeError> {
    let doc = Doc { id: "warm-up".into(), title: None, text: "Acme Corp agrees to buy Widget Inc for $1 billion.".into() };
    let options = Options { threshold: 0.5, long_text: LongText::Truncate };
    let deadline = Some(std::time::Instant::now() + Duration::from_secs(300));
    engine
        .classify(vec![doc], options, deadline, Admission::Wait)
        .await
        .map(|_| ())
        .map_err(|e| ServeError::Warmup(e.to_string()))
}
