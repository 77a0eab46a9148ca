//! A real server on port 0 with the fixture model, and backends that misbehave on purpose.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dealsift::backend::cpu::CpuBackend;
use dealsift::backend::{Backend, BackendInfo, Batch};
use dealsift::batcher::BatcherConfig;
use dealsift::engine::{Engine, ModelDir};
use dealsift::error::{BackendError, ModelError};
use dealsift::proto::deal_classifier_client::DealClassifierClient;
use dealsift::proto::{ClassifyRequest, Document};
use dealsift::server::{self, EngineHooks, ServeError, ServerConfig};
use dealsift::service::Limits;
use dealsift::tokenize::LongText;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert")
}

/// A fresh copy of the fixture model in a temporary directory, for tests that change it.
pub fn fixture_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dealsift-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// Polls `condition` every 10 ms for up to 10 s.
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    for _ in 0..1000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

pub fn config() -> ServerConfig {
    ServerConfig {
        batcher: BatcherConfig {
            max_batch_tokens: 4096,
            max_batch_size: 32,
            max_queue_sequences: 1024,
            max_queue_delay: Duration::from_millis(2),
        },
        limits: Limits {
            max_documents_per_request: 64,
            max_document_bytes: 4096,
            max_chunks_per_document: 8,
            max_stream_in_flight: 16,
            default_long_text: LongText::Truncate,
        },
        max_message_bytes: 4 << 20,
        max_concurrent_streams: 1024,
        keepalive: None,
        tls: None,
        reload: None,
        api_keys: None,
    }
}

/// The fixture model behind `wrap`, which may slow it down or make it fail.
pub fn loader(
    config: &ServerConfig,
    wrap: impl Fn(CpuBackend) -> Box<dyn Backend> + Send + Sync + 'static,
) -> impl Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static {
    let batcher = config.batcher.clone();
    let max_chunks = config.limits.max_chunks_per_document;
    move |hooks| {
        let model = ModelDir::open(&fixture_dir(), Some(128))?;
        let cpu = CpuBackend::load(&fixture_dir(), &model.config, batcher.max_batch_size, model.window, Default::default())?;
        server::start_engine(model, vec![wrap(cpu)], batcher.clone(), max_chunks, hooks)
    }
}

/// The fixture model's loader, held until the returned sender sends, so a test can look at a
/// server that is still loading.
pub fn gated_loader(config: &ServerConfig) -> (std::sync::mpsc::Sender<()>, impl Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static) {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let inner = loader(config, plain);
    let gated = move |hooks| {
        go_rx.lock().unwrap().recv().unwrap();
        inner(hooks)
    };
    (go_tx, gated)
}

pub fn plain(cpu: CpuBackend) -> Box<dyn Backend> {
    Box::new(cpu)
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served.
    pub metrics_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    pub async fn start<L>(config: ServerConfig, load: L) -> Self
    where
        L: Fn(EngineHooks) -> Result<Engine, ModelError> + Send + Sync + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::run(listener, Some(metrics_listener), load, config, async {
            let _ = rx.await;
        }));
        Self { addr, metrics_addr, shutdown: Some(tx), handle }
    }

    /// Starts the fixture model and waits until health says SERVING.
    pub async fn ready() -> Self {
        Self::ready_with(config(), plain).await
    }

    pub async fn ready_with(config: ServerConfig, wrap: impl Fn(CpuBackend) -> Box<dyn Backend> + Send + Sync + 'static) -> Self {
        let load = loader(&config, wrap);
        let server = Self::start(config, load).await;
        server.wait_serving().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.unwrap()
    }

    pub async fn client(&self) -> DealClassifierClient<Channel> {
        DealClassifierClient::connect(self.url()).await.unwrap()
    }

    pub async fn health(&self) -> ServingStatus {
        let mut client = HealthClient::new(self.channel().await);
        let req = HealthCheckRequest { service: "dealsift.v1.DealClassifier".into() };
        let status = client.check(req).await.unwrap().into_inner().status;
        ServingStatus::try_from(status).unwrap()
    }

    pub async fn wait_serving(&self) {
        eventually("the server is SERVING", || async { self.health().await == ServingStatus::Serving }).await;
    }

    /// `GET /metrics`: (status line, content type, body).
    pub async fn scrape(&self) -> (String, String, String) {
        self.http_get("/metrics").await
    }

    /// Scrapes `/metrics` and checks that each of `lines` is one of its lines.
    pub async fn assert_metric_lines(&self, lines: &[&str]) {
        let (_, _, metrics) = self.scrape().await;
        for line in lines {
            assert!(metrics.lines().any(|l| l == *line), "no {line:?} in\n{metrics}");
        }
    }

    /// `GET path` on the metrics port over plain HTTP/1.1: (status line, content type, body).
    pub async fn http_get(&self, path: &str) -> (String, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.metrics_addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.lines().next().unwrap_or_default().to_string();
        let content_type = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("content-type")))
            .map(|(_, value)| value.trim().to_string())
            .unwrap_or_default();
        (status, content_type, body.to_string())
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.await.unwrap()
    }
}

pub fn doc(id: &str, text: &str) -> Document {
    Document { id: id.into(), text: text.into(), title: None }
}

pub fn request(docs: Vec<Document>) -> ClassifyRequest {
    ClassifyRequest { documents: docs, options: None }
}

pub const HEADLINES: &[&str] = &[
    "Microsoft agrees to acquire Activision Blizzard for $68.7 billion in cash",
    "Stripe raises $6.5 billion in Series I funding at a $50 billion valuation",
    "Apple unveils new iPhone with faster chip and better camera",
    "Oil prices slip as investors weigh demand outlook",
    "Arm Holdings prices IPO at $51 a share, valuing chip designer at $54.5 billion",
    "Amazon and Anthropic sign multi-year cloud deal worth billions",
    "Central bank holds interest rates steady amid inflation worries",
    "Local team wins championship after dramatic overtime finish",
];

/// A backend that holds each batch for `delay` and counts the rows it computed.
pub struct Slow {
    pub inner: CpuBackend,
    pub delay: Duration,
    pub rows: Arc<AtomicUsize>,
}

impl Backend for Slow {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        std::thread::sleep(self.delay);
        let real_rows = (0..batch.rows).filter(|r| batch.attention_mask[r * batch.seq + 1] == 1).count();
        self.rows.fetch_add(real_rows, Ordering::SeqCst);
        self.inner.predict(batch)
    }
}

/// A backend that counts its drops (an engine's backends are dropped when it is freed).
pub struct Counted {
    pub inner: Box<dyn Backend>,
    pub dropped: Arc<AtomicUsize>,
}

impl Backend for Counted {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        self.inner.predict(batch)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// A backend that fails every batch with `error`.
pub struct Failing {
    pub inner: CpuBackend,
    pub error: BackendError,
    /// Batches to pass before failing (the warm-up needs one).
    pub pass: usize,
}

impl Backend for Failing {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn predict(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        if self.pass > 0 {
            self.pass -= 1;
            return self.inner.predict(batch);
        }
        Err(self.error.clone())
    }
}
