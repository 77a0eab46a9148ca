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

use crate::engine::{Admission, Engine, Options};
use crate::proto::inference::{
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata, InferParameter, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::proto::{self, DocumentResult, Label};
use crate::service::{deadline, document, request_id, tag, Limits, State};
use crate::telemetry::Rpc;
use crate::tokenize::LongText;

/// The input tensor: the texts, BYTES (UTF-8), shape `[N]` or `[N, 1]`.
pub const TEXT: &str = "TEXT";
/// Output: every label's score per text, FP32 `[N, labels]` in the model's label order.
pub const PROBABILITIES: &str = "PROBABILITIES";
/// Output: the label each text gets at the threshold, BYTES, shaped as `TEXT`.
pub const LABEL: &str = "LABEL";
/// Request parameters understood (anything else is refused, so a misspelling is not ignored).
const PARAMETERS: &str = "threshold (double), long_text (string: truncate, chunk-max or chunk-mean), timeout (int64 microseconds)";

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
        self.state.engine().ok_or_else(|| Status::unavailable("model is still loading; wait for ServerReady and retry"))
    }

    async fn answer_infer(&self, request: Request<ModelInferRequest>) -> Result<(ModelInferResponse, Vec<DocumentResult>), Status> {
        let grpc_deadline = deadline(request.metadata(), Instant::now());
        let engine = self.state.ready()?;
        let limits = self.state.limits();
        let req = request.into_inner();
        check_model(&engine, &req.model_name, &req.model_version)?;
        let params = Parameters::parse(&req.parameters, &engine, limits)?;
        let outputs = requested_outputs(&req, engine.model.labels.len())?;
        let (texts, batch_shape) = texts(&req, limits)?;
        let docs = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| document(proto::Document { id: i.to_string(), title: None, text }, &format!("{TEXT}[{i}]"), limits))
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = match (grpc_deadline, params.timeout.map(|t| Instant::now() + t)) {
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

/// Refuses a name or version other than the served model's (an empty version means "served").
fn check_model(engine: &Engine, name: &str, version: &str) -> Result<(), Status> {
    let model = &engine.model;
    if name != model.model_id || !(version.is_empty() || version == model.version) {
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
            let bad = || Status::invalid_argument(format!("parameter {name} is {}; the parameters understood are {PARAMETERS}", describe(value)));
            match name.as_str() {
                "threshold" => match value {
                    Some(&ParameterChoice::DoubleParam(t)) if (0.0..=1.0).contains(&t) => out.options.threshold = t as f32,
                    _ => return Err(bad()),
                },
                "long_text" => {
                    out.options.long_text = match value {
                        Some(ParameterChoice::StringParam(mode)) => long_text(mode),
                        _ => None,
                    }
                    .ok_or_else(bad)?
                }
                "timeout" => match value {
                    Some(&ParameterChoice::Int64Param(us)) if us > 0 => out.timeout = Some(Duration::from_micros(us as u64)),
                    _ => return Err(bad()),
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
                ("classification", Some(&ParameterChoice::Int64Param(k))) if (1..=labels as i64).contains(&k) => classification = Some(k as usize),
                ("classification", value) => {
                    return Err(Status::invalid_argument(format!(
                        "output {} parameter classification is {}; it must be an int64 from 1 to {labels} (the labels to return)",
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
fn bytes_tensor<S: AsRef<str>>(elements: impl Iterator<Item = S>) -> Vec<u8> {
    let mut raw = Vec::new();
    for e in elements {
        let e = e.as_ref().as_bytes();
        raw.extend_from_slice(&(e.len() as u32).to_le_bytes());
        raw.extend_from_slice(e);
    }
    raw
}

/// The texts of the request's one input tensor, and its shape (`[N]` or `[N, 1]`).
fn texts(req: &ModelInferRequest, limits: &Limits) -> Result<(Vec<String>, Vec<i64>), Status> {
    const EXPECTED: &str = "one input, TEXT: BYTES, shape [N] or [N, 1]";
    let [input] = req.inputs.as_slice() else {
        let names: Vec<&str> = req.inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(Status::invalid_argument(format!("{} inputs {names:?}; this model takes {EXPECTED}", names.len())));
    };
    if input.name != TEXT || input.datatype != "BYTES" {
        return Err(Status::invalid_argument(format!("input {:?} is {}; this model takes {EXPECTED}", input.name, input.datatype)));
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
    let elements: Vec<Vec<u8>> = match (req.raw_input_contents.as_slice(), &input.contents) {
        ([], Some(contents)) => contents.bytes_contents.clone(),
        ([], None) => return Err(Status::invalid_argument("input TEXT has no contents: set its contents.bytes_contents or raw_input_contents")),
        ([raw], None) => split_raw(raw)?,
        ([_], Some(_)) => return Err(Status::invalid_argument("input TEXT has both contents and raw_input_contents; send one")),
        (raw, _) => return Err(Status::invalid_argument(format!("{} raw_input_contents for 1 input; send one", raw.len()))),
    };
    if elements.len() != n {
        return Err(Status::invalid_argument(format!("input TEXT has shape {:?} ({n} texts) but {} elements", input.shape, elements.len())));
    }
    let texts = elements
        .into_iter()
        .enumerate()
        .map(|(i, e)| String::from_utf8(e).map_err(|e| Status::invalid_argument(format!("{TEXT}[{i}] is not UTF-8: {e}"))))
        .collect::<Result<_, _>>()?;
    Ok((texts, input.shape.clone()))
}

/// Splits a raw BYTES tensor into its elements (each a 4-byte little-endian length, then the bytes).
fn split_raw(mut raw: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
    let mut elements = Vec::new();
    while !raw.is_empty() {
        let cut = |what: &str| Status::invalid_argument(format!("raw_input_contents[0] ends inside element {}'s {what}", elements.len()));
        let (len, rest) = raw.split_first_chunk::<4>().ok_or_else(|| cut("length"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let (element, rest) = rest.split_at_checked(len).ok_or_else(|| cut("bytes"))?;
        elements.push(element.to_vec());
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
        Ok(Response::new(ServerReadyResponse { ready: self.state.ready().is_ok() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let Some(engine) = self.state.engine() else { return Ok(Response::new(ModelReadyResponse { ready: false })) };
        let req = request.into_inner();
        check_model(&engine, &req.name, &req.version)?;
        Ok(Response::new(ModelReadyResponse { ready: self.state.ready().is_ok() }))
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
        let request_id = request_id(request.metadata());
        let call = self.state.metrics.start_request(Rpc::ModelInfer, request_id.clone());
        let answer = self.answer_infer(request).await;
        call.finish(answer.as_ref().map(|(_, results)| results.as_slice()));
        let mut answer = answer.map(|(response, _)| Response::new(response));
        tag(&mut answer, &request_id);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_tensors_round_trip_and_truncation_is_named() {
        let raw = bytes_tensor(["Acme buys Widget", "", "é"].iter());
        assert_eq!(split_raw(&raw).unwrap(), vec![b"Acme buys Widget".to_vec(), Vec::new(), "é".as_bytes().to_vec()]);
        assert!(split_raw(&raw[..2]).unwrap_err().message().contains("element 0's length"));
        assert!(split_raw(&raw[..10]).unwrap_err().message().contains("element 0's bytes"));
        assert!(split_raw(&[]).unwrap().is_empty());
    }
}
