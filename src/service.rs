//! The `dealsift.v1.DealClassifier` gRPC service: validation, deadlines, status codes.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::engine::{Admission, Doc, Engine, EngineError, Options};
use crate::error::BackendError;
use crate::model::config::Joins;
use crate::proto::{
    self, classify_stream_response::Outcome, deal_classifier_server::DealClassifier, ClassifyRequest, ClassifyResponse,
    ClassifyStreamRequest, ClassifyStreamResponse, GetModelInfoRequest, ItemError, ModelInfo,
};
use crate::telemetry::{CallId, Metrics, Rpc};
use crate::tokenize::LongText;

/// Per-request limits, all configurable (see `dealsift serve --help`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_documents_per_request: usize,
    pub max_document_bytes: usize,
    pub max_chunks_per_document: usize,
    pub max_stream_in_flight: usize,
    pub default_long_text: LongText,
}

/// Shared by the gRPC handlers and the server's lifecycle tasks.
pub struct State {
    current: RwLock<Current>,
    limits: Limits,
    pub metrics: Arc<Metrics>,
}

/// The engine being served, which load produced it, and whether its backend has failed.
#[derive(Default)]
struct Current {
    engine: Option<Arc<Engine>>,
    generation: u64,
    /// Set when the backend reports a device or runtime failure; a reload clears it.
    failure: Option<BackendError>,
}

impl State {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self { current: RwLock::new(Current::default()), limits, metrics }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `engine`, the product of load number `generation`, from the next request on;
    /// requests holding the previous engine finish on it.
    pub fn set_engine(&self, generation: u64, engine: Arc<Engine>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Current { engine: Some(engine), generation, failure: None };
    }

    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.read().engine.clone()
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Records a backend failure of load number `generation`. Returns false, and records
    /// nothing, when that engine is no longer the one served (it failed after a reload).
    pub fn set_failed(&self, generation: u64, err: BackendError) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != generation {
            return false;
        }
        current.failure.get_or_insert(err);
        true
    }

    fn ready(&self) -> Result<Arc<Engine>, Status> {
        self.ready_or_wait_for("grpc.health.v1 SERVING")
    }

    /// The engine, if it can serve; else `UNAVAILABLE`, saying why and (while loading) to wait
    /// for `signal`.
    pub(crate) fn ready_or_wait_for(&self, signal: &str) -> Result<Arc<Engine>, Status> {
        let current = self.read();
        if let Some(err) = &current.failure {
            return Err(Status::unavailable(format!(
                "backend failed and is not serving: {err}; the server needs a restart or a model reload (SIGHUP)"
            )));
        }
        current.engine.clone().ok_or_else(|| Status::unavailable(format!("model is still loading; wait for {signal} and retry")))
    }
}

#[derive(Clone)]
pub struct DealService {
    state: Arc<State>,
}

impl DealService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// Metadata naming a request: the caller's, echoed, or one the server made.
const REQUEST_ID: &str = "x-request-id";

/// The call's names for the logs: its request id and its W3C trace id, if any. `fallback`
/// names the call when it has no valid `x-request-id` (a KServe request's own `id` field);
/// failing both, the server makes an id.
pub(crate) fn call_id(metadata: &MetadataMap, fallback: Option<&str>) -> CallId {
    let given = metadata.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    let request = given.and_then(valid_request_id).or_else(|| fallback.and_then(valid_request_id)).unwrap_or_else(new_request_id);
    CallId { request, trace: trace_id(metadata) }
}

/// The trace id of a valid W3C `traceparent` header (`version-traceid-parentid-flags`, lower-case
/// hex; version `ff` and all-zero ids are invalid). Anything else is ignored, as the W3C
/// recommendation says a receiver should.
fn trace_id(metadata: &MetadataMap) -> Option<Arc<str>> {
    let value = metadata.get("traceparent")?.to_str().ok()?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let mut fields = value.trim().split('-');
    let (version, trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || fields.next().is_none())
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2);
    valid.then(|| trace.into())
}

/// A caller's request id, if it is 1 to 128 printable ASCII characters (others are replaced).
fn valid_request_id(id: &str) -> Option<Arc<str>> {
    ((1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())).then(|| id.into())
}

/// A request id made here: a random prefix per process, then a counter.
fn new_request_id() -> Arc<str> {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{:08x}-{}", PREFIX.get_or_init(rand::random), NEXT.fetch_add(1, Ordering::Relaxed)).into()
}

/// Sends the request's id back in the response (or error) metadata.
pub(crate) fn tag<T>(answer: &mut Result<Response<T>, Status>, request_id: &str) {
    match answer {
        Ok(response) => {
            if let Ok(value) = MetadataValue::try_from(request_id) {
                response.metadata_mut().insert(REQUEST_ID, value);
            }
        }
        Err(status) => tag_status(status, request_id),
    }
}

/// Sends the request's id back in an error's metadata.
pub(crate) fn tag_status(status: &mut Status, request_id: &str) {
    if let Ok(value) = MetadataValue::try_from(request_id) {
        status.metadata_mut().insert(REQUEST_ID, value);
    }
}

/// Margin by which our own deadline precedes the client's: tonic cancels the call at the
/// client's deadline, so answering DEADLINE_EXCEEDED ourselves must happen before it, with
/// room for the request's transit and a busy machine's scheduling (20 ms was too little on
/// two loaded cores).
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(2), Duration::from_millis(100))
}

/// The call's deadline from the `grpc-timeout` header, less the margin.
pub(crate) fn deadline(metadata: &MetadataMap, start: Instant) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(start + timeout.saturating_sub(deadline_margin(timeout)))
}

/// `grpc-timeout` is up to 8 digits and a unit: H, M, S, m (ms), u (us), n (ns).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn options(raw: Option<&proto::ClassifyOptions>, engine: &Engine, limits: &Limits) -> Result<Options, Status> {
    let default = proto::ClassifyOptions::default();
    let raw = raw.unwrap_or(&default);
    let threshold = raw.threshold.unwrap_or(engine.model.threshold);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Status::invalid_argument(format!("options.threshold is {threshold}; it must be within [0, 1]")));
    }
    let long_text = match proto::LongText::try_from(raw.long_text) {
        Ok(proto::LongText::Unspecified) => limits.default_long_text,
        Ok(proto::LongText::Truncate) => LongText::Truncate,
        Ok(proto::LongText::ChunkMax) => LongText::ChunkMax,
        Ok(proto::LongText::ChunkMean) => LongText::ChunkMean,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "options.long_text = {} is not a LongText value; use 1 (TRUNCATE), 2 (CHUNK_MAX) or 3 (CHUNK_MEAN)",
                raw.long_text
            )))
        }
    };
    Ok(Options { threshold, long_text })
}

impl From<LongText> for proto::LongText {
    fn from(mode: LongText) -> Self {
        match mode {
            LongText::Truncate => Self::Truncate,
            LongText::ChunkMax => Self::ChunkMax,
            LongText::ChunkMean => Self::ChunkMean,
        }
    }
}

fn document(raw: proto::Document, field: &str, limits: &Limits) -> Result<Doc, Status> {
    if raw.text.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field}.text is empty or whitespace; send the news text to classify")));
    }
    let bytes = raw.text.len() + raw.title.as_ref().map_or(0, String::len);
    if bytes > limits.max_document_bytes {
        return Err(Status::invalid_argument(format!(
            "{field} is {bytes} bytes (title + text); the limit is {} bytes (server flag --max-document-bytes): send the lede or split the text",
            limits.max_document_bytes
        )));
    }
    Ok(Doc { id: raw.id, title: raw.title, text: raw.text })
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::QueueFull(_) => Code::ResourceExhausted,
            EngineError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            EngineError::TooLarge { .. } => Code::InvalidArgument,
            EngineError::Tokenizer(_) => Code::Internal,
            EngineError::Backend(BackendError::InvalidInput(_)) => Code::InvalidArgument,
            EngineError::Backend(BackendError::Timeout(_) | BackendError::Fatal(_)) => Code::Unavailable,
            EngineError::Backend(BackendError::Inference(_)) => Code::Internal,
            EngineError::ShuttingDown => Code::Unavailable,
        };
        let message = match &e {
            EngineError::QueueFull(q) => format!("{q}; retry with backoff, or raise --max-queue-sequences"),
            other => other.to_string(),
        };
        Status::new(code, message)
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;

impl DealService {
    async fn answer_classify(&self, request: Request<ClassifyRequest>) -> Result<Response<ClassifyResponse>, Status> {
        let deadline = deadline(request.metadata(), Instant::now());
        let engine = self.state.ready()?;
        let limits = &self.state.limits;
        let req = request.into_inner();
        if req.documents.is_empty() {
            return Err(Status::invalid_argument("documents is empty; send at least one document"));
        }
        if req.documents.len() > limits.max_documents_per_request {
            return Err(Status::invalid_argument(format!(
                "{} documents in one call; the limit is {} (server flag --max-documents-per-request): split the call or use ClassifyStream",
                req.documents.len(),
                limits.max_documents_per_request
            )));
        }
        let options = options(req.options.as_ref(), &engine, limits)?;
        let docs = req
            .documents
            .into_iter()
            .enumerate()
            .map(|(i, d)| document(d, &format!("documents[{i}]"), limits))
            .collect::<Result<Vec<_>, _>>()?;
        let results = engine.classify(docs, options, deadline, Admission::FailFast).await?;
        Ok(Response::new(ClassifyResponse {
            results,
            model_id: engine.model.model_id.clone(),
            model_version: engine.model.version.clone(),
        }))
    }
}

#[tonic::async_trait]
impl DealClassifier for DealService {
    async fn classify(&self, request: Request<ClassifyRequest>) -> Result<Response<ClassifyResponse>, Status> {
        let id = call_id(request.metadata(), None);
        let call = self.state.metrics.start_request(Rpc::Classify, id.clone());
        let mut answer = self.answer_classify(request).await;
        call.finish(answer.as_ref().map(|r| r.get_ref().results.as_slice()));
        tag(&mut answer, &id.request);
        answer
    }

    type ClassifyStreamStream = ResultStream;

    async fn classify_stream(&self, request: Request<Streaming<ClassifyStreamRequest>>) -> Result<Response<ResultStream>, Status> {
        let deadline = deadline(request.metadata(), Instant::now());
        let call_id = call_id(request.metadata(), None);
        if let Err(status) = self.state.ready() {
            // Refused before any message is read: counted as one request.
            self.state.metrics.start_request(Rpc::ClassifyStream, call_id.clone()).finish(Err(&status));
            let mut refused = Err(status);
            tag::<ResultStream>(&mut refused, &call_id.request);
            return refused;
        }
        let stream_id = call_id.clone();
        let state = self.state.clone();
        let in_flight = state.limits.max_stream_in_flight.max(1);
        // `buffered` answers in request order and stops pulling requests when `in_flight`
        // are unanswered: HTTP/2 flow control then pushes back on the client.
        let out = request
            .into_inner()
            .map(move |item| {
                let (state, call_id) = (state.clone(), stream_id.clone());
                async move {
                    let msg = item?;
                    let call = state.metrics.start_request(Rpc::ClassifyStream, call_id);
                    let id = msg.document.as_ref().map(|d| d.id.clone()).unwrap_or_default();
                    // Each message goes to the engine served when it is read: a long-lived
                    // stream moves to a reloaded model with its next message.
                    let engine = state.ready();
                    let answer = match &engine {
                        Ok(engine) => classify_item(msg, engine, &state.limits, deadline).await,
                        Err(status) => Err(status.clone()),
                    };
                    call.finish(answer.as_ref().map(std::slice::from_ref));
                    let outcome = match answer {
                        Ok(result) => Outcome::Result(result),
                        Err(status) => Outcome::Error(ItemError { code: status.code() as i32, message: status.message().to_string() }),
                    };
                    let (model_id, model_version) = match &engine {
                        Ok(engine) => (engine.model.model_id.clone(), engine.model.version.clone()),
                        Err(_) => Default::default(),
                    };
                    Ok(ClassifyStreamResponse { outcome: Some(outcome), model_id, model_version, id })
                }
            })
            .buffered(in_flight);
        let mut answer = Ok(Response::new(Box::pin(out) as ResultStream));
        tag(&mut answer, &call_id.request);
        answer
    }

    async fn get_model_info(&self, _request: Request<GetModelInfoRequest>) -> Result<Response<ModelInfo>, Status> {
        let engine = self.state.ready()?;
        Ok(Response::new(model_info(&engine, &self.state.limits)))
    }
}

async fn classify_item(msg: ClassifyStreamRequest, engine: &Engine, limits: &Limits, deadline: Option<Instant>) -> Result<proto::DocumentResult, Status> {
    let options = options(msg.options.as_ref(), engine, limits)?;
    let doc = document(msg.document.unwrap_or_default(), "document", limits)?;
    let mut results = engine.classify(vec![doc], options, deadline, Admission::Wait).await?;
    results.pop().ok_or_else(|| Status::internal("no result for the document"))
}

fn model_info(engine: &Engine, limits: &Limits) -> ModelInfo {
    let batcher = engine.batcher();
    let config = batcher.config();
    let buckets = match &batcher.info().shapes {
        crate::backend::Shapes::Any { .. } => Vec::new(),
        crate::backend::Shapes::Buckets(b) => {
            b.iter().map(|b| proto::Bucket { batch_size: b.batch as u32, sequence_length: b.seq as u32 }).collect()
        }
    };
    let default_long_text = proto::LongText::from(limits.default_long_text);
    ModelInfo {
        model_id: engine.model.model_id.clone(),
        model_version: engine.model.version.clone(),
        labels: engine.model.labels.clone(),
        max_sequence_length: engine.model.window as u32,
        backend: batcher.info().name.to_string(),
        default_threshold: engine.model.threshold,
        default_long_text: default_long_text as i32,
        limits: Some(proto::Limits {
            max_documents_per_request: limits.max_documents_per_request as u32,
            max_document_bytes: limits.max_document_bytes as u32,
            max_batch_tokens: config.max_batch_tokens as u32,
            max_batch_size: config.max_batch_size as u32,
            max_queue_sequences: config.max_queue_sequences as u32,
            max_queue_delay_us: config.max_queue_delay.as_micros() as u32,
            max_chunks_per_document: limits.max_chunks_per_document as u32,
            max_stream_in_flight: limits.max_stream_in_flight as u32,
        }),
        buckets,
        executors: batcher.executors() as u32,
        lexical_stage: engine.model.lexical.is_some(),
        lexical_joins_all_texts: engine.model.lexical.as_ref().is_some_and(|(_, how)| how.joins == Joins::AllTexts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn trace_ids_come_from_valid_traceparent_headers_only() {
        let trace = |value: &str| {
            let mut metadata = MetadataMap::new();
            metadata.insert("traceparent", value.parse().unwrap());
            trace_id(&metadata).map(|t| t.to_string())
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(), Some(id));
        assert_eq!(trace(&format!("01-{id}-00f067aa0ba902b7-01-later")).as_deref(), Some(id), "a later version may add fields");
        for bad in [
            format!("00-{id}-00f067aa0ba902b7-01-extra"),
            format!("ff-{id}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{id}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase()),
            format!("00-{id}-00f067aa0ba902b7"),
            "garbage".to_string(),
        ] {
            assert_eq!(trace(&bad), None, "{bad}");
        }
        assert!(trace_id(&MetadataMap::new()).is_none());
    }

    #[test]
    fn margin_is_bounded() {
        assert_eq!(deadline_margin(Duration::from_millis(5)), Duration::from_millis(2));
        assert_eq!(deadline_margin(Duration::from_millis(100)), Duration::from_millis(10));
        assert_eq!(deadline_margin(Duration::from_millis(500)), Duration::from_millis(50));
        assert_eq!(deadline_margin(Duration::from_secs(30)), Duration::from_millis(100));
    }
}
