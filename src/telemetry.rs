//! Prometheus metrics: what the service did (requests by status code, documents by label, input
//! lengths, where the time went) and how the batcher ran (batch rows and padded tokens, queue
//! depth, work dropped before compute). Served as OpenMetrics text on `GET /metrics` from a
//! listener of its own (`dealsift serve --metrics-addr`), so a scrape never waits behind gRPC
//! traffic. Names follow Prometheus conventions: `dealsift_` prefix, seconds, `_total` counters.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tonic::{Code, Status};

use crate::proto::{DocumentResult, Label};

/// The media type of the OpenMetrics text format, which Prometheus negotiates.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which RPC a request came by: a `Classify` call, one message of a `ClassifyStream` call, or
/// a KServe v2 `ModelInfer` call.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    Classify,
    ClassifyStream,
    ModelInfer,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::Classify => "Classify",
            Rpc::ClassifyStream => "ClassifyStream",
            Rpc::ModelInfer => "ModelInfer",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rpc: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DocumentLabels {
    label: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

impl ReloadLabels {
    fn of(ok: bool) -> Self {
        Self { result: if ok { "ok" } else { "failed" } }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model_id: String,
    version: String,
    backend: String,
}

/// Every metric the server records, and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RpcLabels, Histogram>,
    documents: Family<DocumentLabels, Counter>,
    truncated_documents: Counter,
    document_tokens: Histogram,
    stage_duration: Family<StageLabels, Histogram>,
    batch_rows: Histogram,
    batch_padded_tokens: Histogram,
    batch_failures: Counter,
    dropped_sequences: Counter,
    queued_sequences: Gauge,
    ready: Gauge,
    model: Family<ModelLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    key_reloads: Family<ReloadLabels, Counter>,
    unauthenticated: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds from 100 us to about 13 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 18))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dealsift");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Answered requests (Classify calls, ClassifyStream messages, ModelInfer calls) by gRPC status code", requests.clone());
        let request_duration = Family::<RpcLabels, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit("request_duration", "Time from receiving a request to its answer", Unit::Seconds, request_duration.clone());
        let documents = Family::<DocumentLabels, Counter>::default();
        registry.register("documents", "Classified documents by the label they were given", documents.clone());
        let truncated_documents = Counter::default();
        registry.register(
            "truncated_documents",
            "Documents longer than the model reads (the first window, or --max-chunks-per-document windows)",
            truncated_documents.clone(),
        );
        let document_tokens = Histogram::new(exponential_buckets(8.0, 2.0, 10));
        registry.register("document_tokens", "Tokens per classified document, special tokens excluded", document_tokens.clone());
        let stage_duration = Family::<StageLabels, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "document_stage_duration",
            "Per document: tokenize (and lexical stage), queue (longest wait of its windows), inference (its windows' batches)",
            Unit::Seconds,
            stage_duration.clone(),
        );
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register("batch_rows", "Sequences per computed batch (failed batches are not counted)", batch_rows.clone());
        let batch_padded_tokens = Histogram::new(exponential_buckets(16.0, 2.0, 12));
        registry.register("batch_padded_tokens", "Padded tokens (rows x longest row) per computed batch", batch_padded_tokens.clone());
        let batch_failures = Counter::default();
        registry.register("batch_failures", "Batches the backend failed to compute", batch_failures.clone());
        let dropped_sequences = Counter::default();
        registry.register(
            "dropped_sequences",
            "Queued windows dropped before compute: their deadline passed or their caller went away",
            dropped_sequences.clone(),
        );
        let queued_sequences = Gauge::default();
        registry.register(
            "queued_sequences",
            "Windows admitted and not yet answered, queued or computing (limit: --max-queue-sequences)",
            queued_sequences.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 while the model is loaded, warmed up and its backend healthy (grpc.health SERVING)", ready.clone());
        let model = Family::<ModelLabels, Gauge>::default();
        registry.register("model_info", "The served model (value 1)", model.clone());
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("model_reloads", "Model reloads (SIGHUP) by result: ok, or failed (the previous model kept serving)", reloads.clone());
        let key_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("api_key_reloads", "Re-reads of --api-key-file (SIGHUP) by result: ok, or failed (the previous keys kept)", key_reloads.clone());
        let unauthenticated = Counter::default();
        registry.register(
            "unauthenticated_requests",
            "Calls refused for a missing or unaccepted API key, before their body was read: classifier RPCs, and any path that is not open (health, reflection and the v2 probes are)",
            unauthenticated.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            documents,
            truncated_documents,
            document_tokens,
            stage_duration,
            batch_rows,
            batch_padded_tokens,
            batch_failures,
            dropped_sequences,
            queued_sequences,
            ready,
            model,
            reloads,
            key_reloads,
            unauthenticated,
        }
    }

    /// Starts timing a request; see [`Request`].
    pub fn start_request(&self, rpc: Rpc, id: CallId) -> Request<'_> {
        Request { metrics: self, rpc, id, started: Instant::now(), finished: false }
    }

    /// Records an answered request: its status and duration, and on success each
    /// document's label, length and timing.
    fn observe_request(&self, rpc: Rpc, outcome: Result<&[DocumentResult], Code>, elapsed: Duration) {
        let code = match outcome {
            Ok(_) => Code::Ok,
            Err(code) => code,
        };
        self.requests.get_or_create(&RequestLabels { rpc: rpc.name(), code: code_name(code) }).inc();
        self.request_duration.get_or_create(&RpcLabels { rpc: rpc.name() }).observe(elapsed.as_secs_f64());
        for doc in outcome.unwrap_or_default() {
            let label = if doc.label == Label::Deal as i32 { "deal" } else { "non_deal" };
            self.documents.get_or_create(&DocumentLabels { label }).inc();
            if doc.truncated {
                self.truncated_documents.inc();
            }
            self.document_tokens.observe(doc.token_count as f64);
            if let Some(t) = &doc.timing {
                for (stage, us) in [("tokenize", t.tokenize_us), ("queue", t.queue_us), ("inference", t.inference_us)] {
                    self.stage_duration.get_or_create(&StageLabels { stage }).observe(us as f64 * 1e-6);
                }
            }
        }
    }

    pub fn observe_batch(&self, rows: usize, padded_tokens: usize) {
        self.batch_rows.observe(rows as f64);
        self.batch_padded_tokens.observe(padded_tokens as f64);
    }

    pub fn batch_failed(&self) {
        self.batch_failures.inc();
    }

    pub fn sequence_dropped(&self) {
        self.dropped_sequences.inc();
    }

    /// Counts one window as queued until the returned guard is dropped.
    pub fn queued(&self) -> QueuedSequence {
        self.queued_sequences.inc();
        QueuedSequence(self.queued_sequences.clone())
    }

    /// The served model, and whether it is ready.
    pub fn set_serving(&self, model_id: &str, version: &str, backend: &str) {
        self.model.clear();
        let labels = ModelLabels { model_id: model_id.into(), version: version.into(), backend: backend.into() };
        self.model.get_or_create(&labels).set(1);
        self.ready.set(1);
    }

    /// Counts a model reload that succeeded (`ok`) or failed.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.get_or_create(&ReloadLabels::of(ok)).inc();
    }

    /// Counts a re-read of the API key file that succeeded (`ok`) or failed.
    pub fn api_keys_reloaded(&self, ok: bool) {
        self.key_reloads.get_or_create(&ReloadLabels::of(ok)).inc();
    }

    pub fn refused_unauthenticated(&self) {
        self.unauthenticated.inc();
    }

    pub fn set_not_ready(&self) {
        self.ready.set(0);
    }

    /// As grpc.health says for the classifier: loaded, warmed up and its backend healthy.
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Milliseconds to the microsecond, for logs (`8.462`, not `8.462318999999999`).
fn millis(elapsed: Duration) -> f64 {
    elapsed.as_micros() as f64 / 1e3
}

/// What names a call in the logs: its request id (`x-request-id`, the caller's or one made
/// here) and, when the caller sent W3C trace context (`traceparent`), its trace id, so the
/// server's log lines join the caller's distributed trace.
#[derive(Debug, Clone)]
pub struct CallId {
    pub request: Arc<str>,
    pub trace: Option<Arc<str>>,
}

/// A request being answered. `finish` records its outcome; a request dropped before that
/// (its client cancelled or went away, and tonic dropped the handler) counts as `CANCELLED`.
pub struct Request<'a> {
    metrics: &'a Metrics,
    rpc: Rpc,
    id: CallId,
    started: Instant,
    finished: bool,
}

impl Request<'_> {
    /// Records the answer (`Err`: the status sent instead) and logs it under the request's id:
    /// failures of the server's own making at `warn`, everything else at `debug`. Texts are
    /// never logged.
    pub fn finish(mut self, outcome: Result<&[DocumentResult], &Status>) {
        let elapsed = self.started.elapsed();
        self.metrics.observe_request(self.rpc, outcome.map_err(Status::code), elapsed);
        let (rpc, request_id, trace_id, elapsed_ms) = (self.rpc.name(), &*self.id.request, self.id.trace.as_deref(), millis(elapsed));
        match outcome {
            Ok(docs) => tracing::debug!(rpc, request_id, trace_id, documents = docs.len(), elapsed_ms, "answered"),
            Err(status) if matches!(status.code(), Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss) => {
                tracing::warn!(rpc, request_id, trace_id, code = code_name(status.code()), reason = status.message(), elapsed_ms, "request failed")
            }
            Err(status) => {
                tracing::debug!(rpc, request_id, trace_id, code = code_name(status.code()), reason = status.message(), elapsed_ms, "request refused")
            }
        }
        self.finished = true;
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let elapsed = self.started.elapsed();
            self.metrics.observe_request(self.rpc, Err(Code::Cancelled), elapsed);
            tracing::debug!(
                rpc = self.rpc.name(),
                request_id = &*self.id.request,
                trace_id = self.id.trace.as_deref(),
                elapsed_ms = millis(elapsed),
                "cancelled by the client"
            );
        }
    }
}

/// A window counted in `dealsift_queued_sequences`; dropping it uncounts it.
pub struct QueuedSequence(Gauge);

impl Drop for QueuedSequence {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The status code as gRPC spells it in its documentation (`OK`, `INVALID_ARGUMENT`, ...).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` and `GET /health` until `shutdown` resolves. `/health` answers 200
/// `SERVING` or 503 `NOT_SERVING` as grpc.health does, for probes and load balancers that
/// speak HTTP only (Kubernetes' gRPC probes cannot reach a TLS gRPC port).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let scraped = metrics.clone();
    let scrape = move || {
        let metrics = scraped.clone();
        async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()) }
    };
    let health = move || {
        let ready = metrics.is_ready();
        async move {
            match ready {
                true => (axum::http::StatusCode::OK, "SERVING\n"),
                false => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).route("/health", axum::routing::get(health));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Timing;

    fn result(label: Label, tokens: u32, truncated: bool) -> DocumentResult {
        DocumentResult {
            label: label as i32,
            token_count: tokens,
            truncated,
            timing: Some(Timing { tokenize_us: 50, queue_us: 2_000, inference_us: 30_000 }),
            ..Default::default()
        }
    }

    #[test]
    fn requests_documents_and_batches_are_counted() {
        let metrics = Metrics::new();
        let docs = [result(Label::Deal, 20, false), result(Label::NonDeal, 300, true)];
        metrics.observe_request(Rpc::Classify, Ok(&docs), Duration::from_millis(40));
        metrics.start_request(Rpc::ClassifyStream, CallId { request: "r1".into(), trace: None }).finish(Err(&Status::invalid_argument("bad")));
        drop(metrics.start_request(Rpc::Classify, CallId { request: "r2".into(), trace: Some("t2".into()) }));
        metrics.observe_batch(2, 256);
        let queued = metrics.queued();
        let text = metrics.encode();
        for line in [
            "dealsift_requests_total{rpc=\"Classify\",code=\"OK\"} 1",
            "dealsift_requests_total{rpc=\"ClassifyStream\",code=\"INVALID_ARGUMENT\"} 1",
            "dealsift_requests_total{rpc=\"Classify\",code=\"CANCELLED\"} 1",
            "dealsift_request_duration_seconds_count{rpc=\"Classify\"} 2",
            "dealsift_documents_total{label=\"deal\"} 1",
            "dealsift_documents_total{label=\"non_deal\"} 1",
            "dealsift_truncated_documents_total 1",
            "dealsift_document_tokens_count 2",
            "dealsift_document_tokens_sum 320.0",
            "dealsift_document_stage_duration_seconds_sum{stage=\"inference\"} 0.06",
            "dealsift_batch_rows_sum 2.0",
            "dealsift_batch_padded_tokens_sum 256.0",
            "dealsift_queued_sequences 1",
            "dealsift_ready 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        drop(queued);
        assert!(metrics.encode().lines().any(|l| l == "dealsift_queued_sequences 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn serving_names_the_model() {
        let metrics = Metrics::new();
        metrics.set_serving("m", "1.0.0", "cpu");
        let text = metrics.encode();
        assert!(text.contains("dealsift_model_info{model_id=\"m\",version=\"1.0.0\",backend=\"cpu\"} 1"), "{text}");
        assert!(text.lines().any(|l| l == "dealsift_ready 1"));
        metrics.set_not_ready();
        assert!(metrics.encode().lines().any(|l| l == "dealsift_ready 0"));
    }
}
