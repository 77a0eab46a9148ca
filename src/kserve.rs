//! The KServe Open Inference Protocol v2 face (`inference.GRPCInferenceService`), served beside
//! `dealsift.v1` on the same port, so Triton and KServe clients (`tritonclient[grpc]`, the
//! KServe SDK) classify texts without our stubs. Texts travel as one BYTES tensor `TEXT`; the
//! answer is `PROBABILITIES` (FP32, one row of label scores per text) and `LABEL` (BYTES), or
//! the top labels as `"score:index:label"` strings when an output asks for `classification`.
//! Calls go through the same engine, limits, deadlines, API keys and metrics as `Classify`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use crate::engine::{Admission, Doc, Engine, Options};
use crate::proto::inference::{
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, model_metadata_response::TensorMetadata, InferParameter, ModelInferRequest,
    ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::proto::{self, DocumentResult, Label};
use crate::service::{call_id, deadline, tag, Limits, State};
use crate::telemetry::Rpc;
use crate::tokenize::LongText;

/// The input tensor: the texts, BYTES (UTF-8), shape `[N]` or `[N, 1]`.
pub const TEXT: &str = "TEXT";
/// Output: every label's score per text, FP32 `[N, labels]` in the model's label order.
pub const PROBABILITIES: &str = "PROBABILITIES";
/// Output: the label each text gets at the threshold, BYTES, shaped as `TEXT`.
pub const LABEL: &str = "LABEL";
/// Request parameters understood (anything else is refused, so a misspelling is not ignored).
const PARAMETERS: &str = "threshold (a number in [0, 1]), long_text (string: truncate, chunk-max or chunk-mean), timeout (int64 microseconds; 0: none)";
/// What `ModelInfer` waits for while the model loads.
const READY: &str = "ServerReady (or ModelReady) to say true";

#[derive(Clone)]
pub struct InferenceService {
    state: Arc<State>,
}

impl InferenceService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// The served engine, whatever its health (metadata stays readable while it is failed).
    fn loaded(&self) -> Result<Arc<Engine>, Status> {
        self.state.engine().ok_or_else(|| Status::unavailable(format!("model is still loading; wait for {READY} and retry")))
    }

    async fn answer_infer(&self, request: Request<ModelInferRequest>) -> Result<(ModelInferResponse, Vec<DocumentResult>), Status> {
        let arrived = Instant::now();
        let grpc_deadline = deadline(request.metadata(), arrived);
        let engine = self.state.ready_or_wait_for(READY)?;
        let limits = self.state.limits();
        let mut req = request.into_inner();
        check_model(&engine, &req.model_name, &req.model_version)?;
        let params = Parameters::parse(&req.parameters, &engine, limits)?;
        let outputs = requested_outputs(&req, engine.model.labels.len())?;
        let (docs, batch_shape) = documents(std::mem::take(&mut req.inputs), std::mem::take(&mut req.raw_input_contents), limits)?;
        // Triton's `timeout` counts from the request's arrival, as the gRPC deadline does.
        let timeout = params.timeout.and_then(|t| arrived.checked_add(t));
        let deadline = match (grpc_deadline, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let results = engine.classify(docs, params.options, deadline, Admission::FailFast).await?;
        let (outputs, raw) = outputs.iter().map(|o| o.tensor(&results, &engine, &batch_shape)).unzip();
        let response = ModelInferResponse {
            model_name: engine.model.model_id.clone(),
            model_version: engine.model.version.clone(),
            id: req.id,
            parameters: HashMap::new(),
            outputs,
            raw_output_contents: raw,
        };
        Ok((response, results))
    }
}

/// Whether `name` and `version` are the served model's (an empty version means "the served one").
fn is_served(engine: &Engine, name: &str, version: &str) -> bool {
    name == engine.model.model_id && (version.is_empty() || version == engine.model.version)
}

/// `NOT_FOUND` for a name or version other than the served model's, naming the one served.
fn check_model(engine: &Engine, name: &str, version: &str) -> Result<(), Status> {
    let model = &engine.model;
    if !is_served(engine, name, version) {
        let asked = if version.is_empty() { format!("'{name}'") } else { format!("'{name}' version '{version}'") };
        return Err(Status::not_found(format!(
            "model {asked} is not served here; this server serves '{}' version '{}'",
            model.model_id, model.version
        )));
    }
    Ok(())
}

struct Parameters {
    options: Options,
    timeout: Option<Duration>,
}

impl Parameters {
    fn parse(raw: &HashMap<String, InferParameter>, engine: &Engine, limits: &Limits) -> Result<Self, Status> {
        let mut out = Parameters { options: Options { threshold: engine.model.threshold, long_text: limits.default_long_text }, timeout: None };
        for (name, value) in raw {
            let value = value.parameter_choice.as_ref();
            let bad = |wanted: &str| Status::invalid_argument(format!("parameter {name} is {}; it must be {wanted}", describe(value)));
            match name.as_str() {
                "threshold" => {
                    out.options.threshold = match value {
                        Some(&ParameterChoice::DoubleParam(t)) if (0.0..=1.0).contains(&t) => t as f32,
                        // A client may send 0 or 1 as an integer.
                        Some(&ParameterChoice::Int64Param(t @ (0 | 1))) => t as f32,
                        _ => return Err(bad("a number in [0, 1]")),
                    }
                }
                "long_text" => {
                    out.options.long_text = match value {
                        Some(ParameterChoice::StringParam(mode)) => long_text(mode),
                        _ => None,
                    }
                    .ok_or_else(|| bad("a string: truncate, chunk-max or chunk-mean"))?
                }
                "timeout" => match value {
                    Some(&ParameterChoice::Int64Param(0)) => out.timeout = None,
                    Some(&ParameterChoice::Int64Param(us)) if us > 0 => out.timeout = Some(Duration::from_micros(us as u64)),
                    _ => return Err(bad("an int64 of microseconds (0: none)")),
                },
                _ => return Err(Status::invalid_argument(format!("unknown parameter {name:?}; the parameters understood are {PARAMETERS}"))),
            }
        }
        Ok(out)
    }
}

/// A parameter's value and type, for error messages.
fn describe(value: Option<&ParameterChoice>) -> String {
    match value {
        Some(ParameterChoice::BoolParam(v)) => format!("{v} (bool)"),
        Some(ParameterChoice::Int64Param(v)) => format!("{v} (int64)"),
        Some(ParameterChoice::StringParam(v)) => format!("{v:?} (string)"),
        Some(ParameterChoice::DoubleParam(v)) => format!("{v} (double)"),
        Some(ParameterChoice::Uint64Param(v)) => format!("{v} (uint64)"),
        None => "empty".into(),
    }
}

fn long_text(mode: &str) -> Option<LongText> {
    match mode {
        "truncate" => Some(LongText::Truncate),
        "chunk-max" => Some(LongText::ChunkMax),
        "chunk-mean" => Some(LongText::ChunkMean),
        _ => None,
    }
}

/// One requested output tensor.
enum Output {
    Probabilities,
    Label,
    /// The top `k` labels by score (the classification extension), in place of the named output.
    Classification { name: String, k: usize },
}

fn requested_outputs(req: &ModelInferRequest, labels: usize) -> Result<Vec<Output>, Status> {
    if req.outputs.is_empty() {
        return Ok(vec![Output::Probabilities, Output::Label]);
    }
    let mut out = Vec::with_capacity(req.outputs.len());
    for (i, o) in req.outputs.iter().enumerate() {
        if req.outputs[..i].iter().any(|earlier| earlier.name == o.name) {
            return Err(Status::invalid_argument(format!("output {} is requested twice", o.name)));
        }
        if o.name != PROBABILITIES && o.name != LABEL {
            return Err(Status::invalid_argument(format!(
                "unknown output {:?}; this model has {PROBABILITIES} (FP32 [N, {labels}]) and {LABEL} (BYTES)",
                o.name
            )));
        }
        let mut classification = None;
        for (name, value) in &o.parameters {
            match (name.as_str(), value.parameter_choice.as_ref()) {
                // As Triton: a k above the number of labels returns them all.
                ("classification", Some(&ParameterChoice::Int64Param(k))) if k >= 1 && o.name == PROBABILITIES => {
                    classification = Some((k as usize).min(labels))
                }
                ("classification", _) if o.name != PROBABILITIES => {
                    return Err(Status::invalid_argument(format!("output {}: classification applies to {PROBABILITIES} only", o.name)))
                }
                ("classification", value) => {
                    return Err(Status::invalid_argument(format!(
                        "output {} parameter classification is {}; it must be an int64 of at least 1 (the labels to return)",
                        o.name,
                        describe(value)
                    )))
                }
                _ => return Err(Status::invalid_argument(format!("output {}: unknown parameter {name:?}; only classification is understood", o.name))),
            }
        }
        out.push(match (classification, o.name.as_str()) {
            (Some(k), _) => Output::Classification { name: o.name.clone(), k },
            (None, PROBABILITIES) => Output::Probabilities,
            (None, _) => Output::Label,
        });
    }
    Ok(out)
}

impl Output {
    /// The tensor's description and its raw contents (BYTES elements length-prefixed).
    fn tensor(&self, results: &[DocumentResult], engine: &Engine, batch_shape: &[i64]) -> (InferOutputTensor, Vec<u8>) {
        let n = results.len() as i64;
        let (name, datatype, shape, raw) = match self {
            Output::Probabilities => {
                let raw = results.iter().flat_map(|r| r.scores.iter()).flat_map(|s| s.score.to_le_bytes()).collect();
                (PROBABILITIES.to_string(), "FP32", vec![n, engine.model.labels.len() as i64], raw)
            }
            Output::Label => (LABEL.to_string(), "BYTES", batch_shape.to_vec(), bytes_tensor(results.iter().map(|r| label_name(r, engine)))),
            Output::Classification { name, k } => {
                let top = results.iter().flat_map(|r| {
                    let mut ranked: Vec<(usize, &proto::LabelScore)> = r.scores.iter().enumerate().collect();
                    ranked.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
                    ranked.into_iter().take(*k).map(|(i, s)| format!("{:.6}:{i}:{}", s.score, s.label))
                });
                (name.clone(), "BYTES", vec![n, *k as i64], bytes_tensor(top))
            }
        };
        (InferOutputTensor { name, datatype: datatype.into(), shape, parameters: HashMap::new(), contents: None }, raw)
    }
}

/// The label a result got: the deal label, or else the best-scoring other label.
fn label_name<'a>(result: &'a DocumentResult, engine: &Engine) -> &'a str {
    let deal = engine.model.deal_index;
    let chosen = if result.label == Label::Deal as i32 {
        result.scores.get(deal)
    } else {
        result.scores.iter().enumerate().filter(|&(i, _)| i != deal).max_by(|a, b| a.1.score.total_cmp(&b.1.score)).map(|(_, s)| s)
    };
    chosen.map_or("", |s| s.label.as_str())
}

/// BYTES elements as the protocol's raw form: each a 4-byte little-endian length, then the bytes.
fn bytes_tensor<S: AsRef<[u8]>>(elements: impl Iterator<Item = S>) -> Vec<u8> {
    let mut raw = Vec::new();
    for e in elements {
        let e = e.as_ref();
        raw.extend_from_slice(&(e.len() as u32).to_le_bytes());
        raw.extend_from_slice(e);
    }
    raw
}

/// The documents of the request's one input tensor, and its shape (`[N]` or `[N, 1]`).
fn documents(mut inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>, limits: &Limits) -> Result<(Vec<Doc>, Vec<i64>), Status> {
    const EXPECTED: &str = "one input, TEXT: BYTES, shape [N] or [N, 1]";
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(Status::invalid_argument(format!("{} inputs {names:?}; this model takes {EXPECTED}", names.len())));
    }
    let input = inputs.remove(0);
    if input.name != TEXT {
        return Err(Status::invalid_argument(format!("input {:?}: the input's name must be TEXT; this model takes {EXPECTED}", input.name)));
    }
    if input.datatype != "BYTES" {
        return Err(Status::invalid_argument(format!("input TEXT is {}; this model takes {EXPECTED}", input.datatype)));
    }
    if let Some(name) = input.parameters.keys().next() {
        return Err(Status::invalid_argument(format!(
            "input TEXT parameter {name:?} is not supported: inputs take no parameters (shared memory is not served); send the texts in the request"
        )));
    }
    let n = match input.shape.as_slice() {
        &[n] | &[n, 1] if n >= 0 => n as usize,
        shape => return Err(Status::invalid_argument(format!("input TEXT has shape {shape:?}; this model takes {EXPECTED}"))),
    };
    if n == 0 {
        return Err(Status::invalid_argument("input TEXT has no elements; send at least one text"));
    }
    if n > limits.max_documents_per_request {
        return Err(Status::invalid_argument(format!(
            "{n} texts in one call; the limit is {} (server flag --max-documents-per-request): split the call",
            limits.max_documents_per_request
        )));
    }
    let elements: Vec<Vec<u8>> = match (raw.as_slice(), input.contents) {
        ([], Some(contents)) => contents.bytes_contents,
        ([], None) => return Err(Status::invalid_argument("input TEXT has no contents: set its contents.bytes_contents or raw_input_contents")),
        ([raw], None) => split_raw(raw, n)?.into_iter().map(<[u8]>::to_vec).collect(),
        ([_], Some(_)) => return Err(Status::invalid_argument("input TEXT has both contents and raw_input_contents; send one")),
        (raw, _) => return Err(Status::invalid_argument(format!("{} raw_input_contents for 1 input; send one", raw.len()))),
    };
    if elements.len() != n {
        return Err(Status::invalid_argument(format!("input TEXT has shape {:?} ({n} texts) but {} elements", input.shape, elements.len())));
    }
    let docs = elements.into_iter().enumerate().map(|(i, e)| text_document(i, e, limits)).collect::<Result<_, _>>()?;
    Ok((docs, input.shape))
}

/// Element `i` of TEXT as a document, if it is UTF-8 text within the size limit.
fn text_document(i: usize, element: Vec<u8>, limits: &Limits) -> Result<Doc, Status> {
    let text = String::from_utf8(element).map_err(|e| Status::invalid_argument(format!("{TEXT}[{i}] is not UTF-8: {}", e.utf8_error())))?;
    if text.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{TEXT}[{i}] is empty or whitespace; send the news text to classify")));
    }
    if text.len() > limits.max_document_bytes {
        return Err(Status::invalid_argument(format!(
            "{TEXT}[{i}] is {} bytes; the limit is {} bytes (server flag --max-document-bytes): send the lede or split the text",
            text.len(),
            limits.max_document_bytes
        )));
    }
    Ok(Doc { id: i.to_string(), title: None, text })
}

/// Splits a raw BYTES tensor into its elements (each a 4-byte little-endian length, then the
/// bytes), refusing it as soon as it holds more than the `n` its shape promised.
fn split_raw(mut raw: &[u8], n: usize) -> Result<Vec<&[u8]>, Status> {
    let mut elements = Vec::with_capacity(n);
    while !raw.is_empty() {
        if elements.len() == n {
            return Err(Status::invalid_argument(format!("raw_input_contents[0] holds more than the {n} elements of TEXT's shape")));
        }
        let cut = |what: &str| Status::invalid_argument(format!("raw_input_contents[0] ends inside element {}'s {what}", elements.len()));
        let (len, rest) = raw.split_first_chunk::<4>().ok_or_else(|| cut("length"))?;
        let (element, rest) = rest.split_at_checked(u32::from_le_bytes(*len) as usize).ok_or_else(|| cut("bytes"))?;
        elements.push(element);
        raw = rest;
    }
    Ok(elements)
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _request: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _request: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.ready_or_wait_for(READY).is_ok() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        // As Triton: a model not served is not ready (not an error).
        let req = request.into_inner();
        let served = self.state.engine().is_some_and(|engine| is_served(&engine, &req.name, &req.version));
        Ok(Response::new(ModelReadyResponse { ready: served && self.state.ready_or_wait_for(READY).is_ok() }))
    }

    async fn server_metadata(&self, _request: Request<ServerMetadataRequest>) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "dealsift".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["classification".into()],
        }))
    }

    async fn model_metadata(&self, request: Request<ModelMetadataRequest>) -> Result<Response<ModelMetadataResponse>, Status> {
        let engine = self.loaded()?;
        let req = request.into_inner();
        check_model(&engine, &req.name, &req.version)?;
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata { name: name.into(), datatype: datatype.into(), shape };
        Ok(Response::new(ModelMetadataResponse {
            name: engine.model.model_id.clone(),
            versions: vec![engine.model.version.clone()],
            platform: format!("dealsift_{}", engine.batcher().info().name),
            inputs: vec![tensor(TEXT, "BYTES", vec![-1])],
            outputs: vec![tensor(PROBABILITIES, "FP32", vec![-1, engine.model.labels.len() as i64]), tensor(LABEL, "BYTES", vec![-1])],
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        // Triton's clients name a call by the request's `id`; x-request-id, when sent, wins.
        let id = call_id(request.metadata(), Some(&request.get_ref().id));
        let call = self.state.metrics.start_request(Rpc::ModelInfer, id.clone());
        let answer = self.answer_infer(request).await;
        call.finish(answer.as_ref().map(|(_, results)| results.as_slice()));
        let mut answer = answer.map(|(response, _)| Response::new(response));
        tag(&mut answer, &id.request);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_tensors_round_trip_and_bad_ones_are_named() {
        let raw = bytes_tensor(["Acme buys Widget", "", "é"].iter());
        assert_eq!(split_raw(&raw, 3).unwrap(), [b"Acme buys Widget".as_slice(), b"", "é".as_bytes()]);
        assert!(split_raw(&raw[..2], 3).unwrap_err().message().contains("element 0's length"));
        assert!(split_raw(&raw[..10], 3).unwrap_err().message().contains("element 0's bytes"));
        assert!(split_raw(&raw, 2).unwrap_err().message().contains("more than the 2 elements"), "stops at the shape's count");
        assert!(split_raw(&[], 1).unwrap().is_empty());
    }

    /// Any bytes a client sends as a raw tensor, with any shape, give documents or an
    /// INVALID_ARGUMENT, never a panic.
    #[test]
    fn arbitrary_raw_tensors_never_panic() {
        use rand::{Rng, SeedableRng};
        let limits = Limits {
            max_documents_per_request: 8,
            max_document_bytes: 64,
            max_chunks_per_document: 1,
            max_stream_in_flight: 1,
            default_long_text: LongText::Truncate,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261128);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            // Well-formed elements (of random bytes, ASCII or not), then sometimes damaged.
            let count = rng.random_range(0..10);
            let elements: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    // Mostly short ASCII; now and then empty, over the byte limit, or not UTF-8.
                    let len = if rng.random_bool(0.95) { rng.random_range(1..60) } else { rng.random_range(0..80) };
                    (0..len).map(|_| if rng.random_bool(0.998) { rng.random_range(b'a'..=b'z') } else { rng.random() }).collect()
                })
                .collect();
            let mut raw = bytes_tensor(elements.iter());
            match rng.random_range(0..4) {
                0 => raw.truncate(rng.random_range(0..=raw.len())),
                1 => raw.extend((0..rng.random_range(1..8)).map(|_| rng.random::<u8>())),
                _ => {}
            }
            let n = if rng.random_bool(0.8) { count as i64 } else { rng.random_range(-2..12) };
            let shape = match rng.random_range(0..4) {
                0 => vec![n],
                1 => vec![n, 1],
                2 => vec![n, rng.random_range(0..3)],
                _ => vec![],
            };
            let input = InferInputTensor { name: TEXT.into(), datatype: "BYTES".into(), shape, ..Default::default() };
            match documents(vec![input], vec![raw], &limits) {
                Ok((docs, shape)) => {
                    assert_eq!(docs.len() as i64, shape[0]);
                    accepted += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
                    refused += 1;
                }
            }
        }
        assert!(accepted > 1000 && refused > 1000, "both outcomes exercised: {accepted} accepted, {refused} refused");
    }
}
