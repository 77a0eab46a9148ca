//! The KServe v2 face (`inference.GRPCInferenceService`) end to end: a real server on port 0,
//! driven by the generated v2 client as Triton's and KServe's clients drive it.

mod common;

use std::collections::HashMap;

use common::*;
use dealsift::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use dealsift::proto::inference::infer_parameter::ParameterChoice;
use dealsift::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use dealsift::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest,
    ServerMetadataRequest, ServerReadyRequest,
};
use tonic::transport::Channel;
use tonic::Code;

const MODEL: &str = "tiny-bert";

async fn v2_client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel().await)
}

/// Elements in the protocol's raw BYTES form: a 4-byte little-endian length, then the bytes.
fn raw_bytes(elements: &[&[u8]]) -> Vec<u8> {
    elements.iter().flat_map(|e| (e.len() as u32).to_le_bytes().into_iter().chain(e.iter().copied())).collect()
}

fn split_raw(mut raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let len = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
        out.push(String::from_utf8(raw[4..4 + len].to_vec()).unwrap());
        raw = &raw[4 + len..];
    }
    out
}

/// `texts` as tritonclient sends them: shape [N, 1], raw contents.
fn infer_request(texts: &[&str]) -> ModelInferRequest {
    let elements: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    ModelInferRequest {
        model_name: MODEL.into(),
        id: "call-1".into(),
        inputs: vec![InferInputTensor { name: "TEXT".into(), datatype: "BYTES".into(), shape: vec![texts.len() as i64, 1], ..Default::default() }],
        raw_input_contents: vec![raw_bytes(&elements)],
        ..Default::default()
    }
}

fn param(choice: ParameterChoice) -> InferParameter {
    InferParameter { parameter_choice: Some(choice) }
}

fn output(name: &str, classification: Option<i64>) -> InferRequestedOutputTensor {
    let parameters = classification.map(|k| HashMap::from([("classification".to_string(), param(ParameterChoice::Int64Param(k)))]));
    InferRequestedOutputTensor { name: name.into(), parameters: parameters.unwrap_or_default() }
}

/// The named output's shape and raw contents.
fn tensor<'a>(response: &'a ModelInferResponse, name: &str) -> (&'a [i64], &'a [u8]) {
    let i = response.outputs.iter().position(|o| o.name == name).unwrap_or_else(|| panic!("no output {name}"));
    (&response.outputs[i].shape, &response.raw_output_contents[i])
}

fn floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[tokio::test]
async fn v2_clients_get_what_classify_gives() {
    let server = TestServer::ready().await;
    let mut v2 = v2_client(&server).await;
    assert!(v2.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(v2.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    assert!(v2.model_ready(ModelReadyRequest { name: MODEL.into(), version: String::new() }).await.unwrap().into_inner().ready);
    for (name, version) in [("other", ""), (MODEL, "0.0.1")] {
        let ready = v2.model_ready(ModelReadyRequest { name: name.into(), version: version.into() }).await.unwrap().into_inner().ready;
        assert!(!ready, "a model not served is not ready (as Triton says it)");
        let err = v2.model_metadata(ModelMetadataRequest { name: name.into(), version: version.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("serves 'tiny-bert'"), "{}", err.message());
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: "inference.GRPCInferenceService".into() }).await.unwrap();
    assert_eq!(status.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let meta = v2.server_metadata(ServerMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!((meta.name.as_str(), meta.extensions.as_slice()), ("dealsift", ["classification".to_string()].as_slice()));
    let meta = v2.model_metadata(ModelMetadataRequest { name: MODEL.into(), version: String::new() }).await.unwrap().into_inner();
    let tensors = |t: &[dealsift::proto::inference::model_metadata_response::TensorMetadata]| {
        t.iter().map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone())).collect::<Vec<_>>()
    };
    assert_eq!(tensors(&meta.inputs), [("TEXT".into(), "BYTES".into(), vec![-1])]);
    assert_eq!(tensors(&meta.outputs), [("PROBABILITIES".into(), "FP32".into(), vec![-1, 2]), ("LABEL".into(), "BYTES".into(), vec![-1])]);
    let version = meta.versions[0].clone();

    let classify = server.client().await.classify(request(HEADLINES.iter().map(|t| doc("", t)).collect())).await.unwrap().into_inner();
    let mut call = tonic::Request::new(infer_request(HEADLINES));
    call.metadata_mut().insert("x-request-id", "v2-call".parse().unwrap());
    let response = v2.model_infer(call).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "v2-call");
    let response = response.into_inner();
    assert_eq!((response.model_name.as_str(), response.model_version.as_str(), response.id.as_str()), (MODEL, version.as_str(), "call-1"));
    let (shape, raw) = tensor(&response, "PROBABILITIES");
    assert_eq!(shape, [8, 2]);
    let (shape, labels) = tensor(&response, "LABEL");
    assert_eq!(shape, [8, 1], "LABEL is shaped as TEXT was");
    for ((scores, label), expected) in floats(raw).chunks(2).zip(split_raw(labels)).zip(&classify.results) {
        let want: Vec<f32> = expected.scores.iter().map(|s| s.score).collect();
        assert!(scores.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{scores:?} against Classify's {want:?}");
        let want_label = if expected.label == dealsift::proto::Label::Deal as i32 { "deal" } else { "non_deal" };
        assert_eq!(label, want_label);
    }

    // Typed contents and shape [N]; a threshold of 0 makes every text a deal; the top labels
    // (k above the label count returns them all, as Triton does).
    let mut typed = infer_request(&HEADLINES[..3]);
    typed.raw_input_contents.clear();
    typed.inputs[0].shape = vec![3];
    typed.inputs[0].contents = Some(InferTensorContents { bytes_contents: HEADLINES[..3].iter().map(|t| t.as_bytes().to_vec()).collect(), ..Default::default() });
    typed.parameters.insert("threshold".into(), param(ParameterChoice::DoubleParam(0.0)));
    typed.outputs = vec![output("LABEL", None), output("PROBABILITIES", Some(5))];
    let response = v2.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(response.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["LABEL", "PROBABILITIES"], "in the order asked");
    let (shape, labels) = tensor(&response, "LABEL");
    assert_eq!((shape, split_raw(labels)), ([3].as_slice(), vec!["deal".to_string(); 3]));
    let (shape, top) = tensor(&response, "PROBABILITIES");
    assert_eq!(shape, [3, 2]);
    for (entries, expected) in split_raw(top).chunks(2).zip(&classify.results) {
        let mut ranked: Vec<(usize, &dealsift::proto::LabelScore)> = expected.scores.iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
        for (entry, (index, want)) in entries.iter().zip(ranked) {
            let (score, rest) = entry.split_once(':').unwrap();
            assert_eq!(rest, format!("{index}:{}", want.label), "score:index:label, best first");
            assert!((score.parse::<f32>().unwrap() - want.score).abs() < 1e-5);
        }
    }
    // Classify's deals, the first ModelInfer's (the same), and the 3 made deals by threshold 0.
    let deals = classify.results.iter().filter(|r| r.label == dealsift::proto::Label::Deal as i32).count();
    let documents = format!("dealsift_documents_total{{label=\"deal\"}} {}", 2 * deals + 3);
    server.assert_metric_lines(&["dealsift_requests_total{rpc=\"ModelInfer\",code=\"OK\"} 2", &documents]).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_v2_requests_say_what_to_fix() {
    let server = TestServer::ready().await;
    let mut v2 = v2_client(&server).await;
    let too_many: Vec<&str> = vec!["Acme buys Widget"; 65];
    let with = |change: &dyn Fn(&mut ModelInferRequest)| {
        let mut req = infer_request(&HEADLINES[..2]);
        change(&mut req);
        req
    };
    let cases: Vec<(ModelInferRequest, Code, &str)> = vec![
        (with(&|r| r.model_name = "other".into()), Code::NotFound, "model 'other' is not served here; this server serves 'tiny-bert'"),
        (with(&|r| r.model_version = "0.0.1".into()), Code::NotFound, "'tiny-bert' version '0.0.1' is not served"),
        (with(&|r| r.inputs[0].name = "TEXTS".into()), Code::InvalidArgument, "input \"TEXTS\": the input's name must be TEXT"),
        (with(&|r| r.inputs[0].datatype = "FP32".into()), Code::InvalidArgument, "input TEXT is FP32"),
        (with(&|r| r.inputs.push(r.inputs[0].clone())), Code::InvalidArgument, "2 inputs [\"TEXT\", \"TEXT\"]"),
        (with(&|r| r.inputs[0].shape = vec![1, 2]), Code::InvalidArgument, "shape [1, 2]"),
        (with(&|r| r.inputs[0].shape = vec![3, 1]), Code::InvalidArgument, "(3 texts) but 2 elements"),
        (with(&|r| r.inputs[0].shape = vec![0]), Code::InvalidArgument, "no elements"),
        (with(&|r| r.raw_input_contents[0].truncate(10)), Code::InvalidArgument, "ends inside element 0's bytes"),
        (with(&|r| r.raw_input_contents.push(Vec::new())), Code::InvalidArgument, "2 raw_input_contents for 1 input"),
        (with(&|r| r.raw_input_contents.clear()), Code::InvalidArgument, "no contents"),
        (with(&|r| r.inputs[0].contents = Some(Default::default())), Code::InvalidArgument, "both contents and raw_input_contents"),
        (with(&|r| r.raw_input_contents[0] = raw_bytes(&[b"ok", b"\xff"])), Code::InvalidArgument, "TEXT[1] is not UTF-8"),
        (with(&|r| r.raw_input_contents[0] = raw_bytes(&[b"ok", b"  "])), Code::InvalidArgument, "TEXT[1] is empty or whitespace"),
        (with(&|r| r.raw_input_contents[0] = raw_bytes(&[b"ok", b"ok", b"ok"])), Code::InvalidArgument, "holds more than the 2 elements"),
        (with(&|r| r.raw_input_contents[0] = raw_bytes(&[b"ok", &[b'x'; 4097]])), Code::InvalidArgument, "TEXT[1] is 4097 bytes; the limit is 4096"),
        (
            with(&|r| _ = r.inputs[0].parameters.insert("shared_memory_region".into(), param(ParameterChoice::StringParam("r".into())))),
            Code::InvalidArgument,
            "\"shared_memory_region\" is not supported: inputs take no parameters (shared memory is not served)",
        ),
        (infer_request(&too_many), Code::InvalidArgument, "65 texts in one call; the limit is 64"),
        (
            with(&|r| _ = r.parameters.insert("treshold".into(), param(ParameterChoice::DoubleParam(0.5)))),
            Code::InvalidArgument,
            "unknown parameter \"treshold\"; the parameters understood are threshold",
        ),
        (with(&|r| _ = r.parameters.insert("threshold".into(), param(ParameterChoice::DoubleParam(1.5)))), Code::InvalidArgument, "threshold is 1.5 (double); it must be a number in [0, 1]"),
        (with(&|r| _ = r.parameters.insert("threshold".into(), param(ParameterChoice::Int64Param(2)))), Code::InvalidArgument, "threshold is 2 (int64)"),
        (with(&|r| _ = r.parameters.insert("timeout".into(), param(ParameterChoice::Int64Param(-5)))), Code::InvalidArgument, "timeout is -5 (int64); it must be an int64 of microseconds"),
        (
            with(&|r| _ = r.parameters.insert("long_text".into(), param(ParameterChoice::StringParam("sideways".into())))),
            Code::InvalidArgument,
            "long_text is \"sideways\" (string)",
        ),
        (with(&|r| r.outputs = vec![output("SCORES", None)]), Code::InvalidArgument, "unknown output \"SCORES\""),
        (with(&|r| r.outputs = vec![output("LABEL", None), output("LABEL", None)]), Code::InvalidArgument, "LABEL is requested twice"),
        (with(&|r| r.outputs = vec![output("PROBABILITIES", Some(0))]), Code::InvalidArgument, "classification is 0 (int64); it must be an int64 of at least 1"),
        (with(&|r| r.outputs = vec![output("LABEL", Some(1))]), Code::InvalidArgument, "output LABEL: classification applies to PROBABILITIES only"),
    ];
    let invalid = cases.iter().filter(|(_, code, _)| *code == Code::InvalidArgument).count();
    for (req, code, says) in cases {
        let err = v2.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{:?} does not say {says:?}", err.message());
    }
    server.assert_metric_lines(&[&format!("dealsift_requests_total{{rpc=\"ModelInfer\",code=\"INVALID_ARGUMENT\"}} {invalid}")]).await;
    // A Triton timeout (microseconds) shorter than the work ends the call with DEADLINE_EXCEEDED;
    // 0 is no timeout.
    let mut hurried = infer_request(HEADLINES);
    hurried.parameters.insert("timeout".into(), param(ParameterChoice::Int64Param(1)));
    let err = v2.model_infer(hurried).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let mut unhurried = infer_request(HEADLINES);
    unhurried.parameters.insert("timeout".into(), param(ParameterChoice::Int64Param(0)));
    v2.model_infer(unhurried).await.unwrap();
    // Errors carry the request id too: x-request-id, else the request's own id.
    let mut call = tonic::Request::new(with(&|r| r.model_name = "other".into()));
    call.metadata_mut().insert("x-request-id", "v2-bad".parse().unwrap());
    assert_eq!(v2.model_infer(call).await.unwrap_err().metadata().get("x-request-id").unwrap(), "v2-bad");
    let err = v2.model_infer(with(&|r| r.model_name = "other".into())).await.unwrap_err();
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "call-1");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn while_loading_v2_says_not_ready_and_to_wait() {
    let config = config();
    let (go_tx, gated) = gated_loader(&config);
    let server = TestServer::start(config, gated).await;
    let mut v2 = v2_client(&server).await;
    assert!(v2.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live, "live while loading");
    assert!(!v2.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    assert!(!v2.model_ready(ModelReadyRequest { name: MODEL.into(), version: String::new() }).await.unwrap().into_inner().ready);
    let err = v2.model_infer(infer_request(&HEADLINES[..1])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("still loading; wait for ServerReady"), "{}", err.message());
    let err = v2.model_metadata(ModelMetadataRequest { name: MODEL.into(), version: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    go_tx.send(()).unwrap();
    eventually("ServerReady says true", || {
        let mut v2 = v2.clone();
        async move { v2.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready }
    })
    .await;
    v2.model_infer(infer_request(&HEADLINES[..1])).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_guard_the_v2_face_too() {
    let key = "0123456789abcdef-v2";
    let dir = std::env::temp_dir().join(format!("dealsift-v2-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keys"), format!("{key}\n")).unwrap();
    let mut config = config();
    config.api_keys = Some(dealsift::auth::ApiKeys::from_file(&dir.join("keys")).unwrap());
    let server = TestServer::ready_with(config, plain).await;
    let mut v2 = v2_client(&server).await;
    // Probes stay open, as grpc.health does.
    assert!(v2.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(v2.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    assert!(v2.model_ready(ModelReadyRequest { name: MODEL.into(), version: String::new() }).await.unwrap().into_inner().ready);
    let mut anonymous = tonic::Request::new(infer_request(&HEADLINES[..1]));
    anonymous.metadata_mut().insert("x-request-id", "anon-1".parse().unwrap());
    let err = v2.model_infer(anonymous).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "anon-1", "a refusal names the call too");
    // Reflection stays open for tools.
    use tonic_reflection::pb::v1::{server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, ServerReflectionRequest};
    let list = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    reflection.server_reflection_info(futures::stream::iter([list])).await.unwrap().into_inner().message().await.unwrap().unwrap();
    for err in [
        v2.server_metadata(ServerMetadataRequest {}).await.unwrap_err(),
        v2.model_metadata(ModelMetadataRequest { name: MODEL.into(), version: String::new() }).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    server.assert_metric_lines(&["dealsift_unauthenticated_requests_total 3"]).await;
    let mut req = tonic::Request::new(infer_request(&HEADLINES[..1]));
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    assert_eq!(v2.model_infer(req).await.unwrap().into_inner().outputs.len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_backend_is_not_ready_on_the_v2_face() {
    let fatal = || dealsift::error::BackendError::Fatal("device lost".into());
    let server = TestServer::ready_with(config(), move |cpu| Box::new(Failing { inner: cpu, error: fatal(), pass: 1 })).await;
    let mut v2 = v2_client(&server).await;
    let err = v2.model_infer(infer_request(&HEADLINES[..1])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("device lost"), "{}", err.message());
    eventually("ServerReady says false", || {
        let mut v2 = v2.clone();
        async move { !v2.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready }
    })
    .await;
    assert!(!v2.model_ready(ModelReadyRequest { name: MODEL.into(), version: String::new() }).await.unwrap().into_inner().ready);
    assert!(v2.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live, "still live: a reload can bring it back");
    let err = v2.model_infer(infer_request(&HEADLINES[..1])).await.unwrap_err();
    assert!(err.message().contains("restart or a model reload"), "{}", err.message());
    // Metadata stays readable, to see what is (not) being served.
    v2.model_metadata(ModelMetadataRequest { name: MODEL.into(), version: String::new() }).await.unwrap();
    server.stop().await.unwrap();
}
