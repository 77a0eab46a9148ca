//! The gRPC service end to end: a real server on port 0, driven by generated clients.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dealsift::error::BackendError;
use dealsift::proto::{classify_stream_response::Outcome, ClassifyOptions, ClassifyStreamRequest, GetModelInfoRequest, Label};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn classifies_one_and_many_documents() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;

    let one = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap().into_inner();
    assert_eq!(one.results.len(), 1);
    assert_eq!(one.model_id, "tiny-bert");
    assert!(!one.model_version.is_empty());
    let r = &one.results[0];
    assert_eq!(r.id, "a");
    assert!((0.0..=1.0).contains(&r.deal_probability));
    let labels: Vec<_> = r.scores.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["non_deal", "deal"]);
    assert!((r.scores.iter().map(|s| s.score).sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(r.scores[1].score, r.deal_probability);
    let expected = if r.deal_probability >= 0.5 { Label::Deal } else { Label::NonDeal };
    assert_eq!(r.label, expected as i32);
    assert!(r.token_count > 5 && r.chunks == 1 && !r.truncated);
    assert!(r.timing.is_some());

    let docs = HEADLINES.iter().enumerate().map(|(i, t)| doc(&format!("d{i}"), t)).collect();
    let many = client.classify(request(docs)).await.unwrap().into_inner();
    let ids: Vec<_> = many.results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batched_result_equals_single_result() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    let docs: Vec<_> = HEADLINES.iter().enumerate().map(|(i, t)| doc(&i.to_string(), t)).collect();
    let batched = client.classify(request(docs.clone())).await.unwrap().into_inner().results;
    for (d, b) in docs.into_iter().zip(&batched) {
        let single = client.classify(request(vec![d])).await.unwrap().into_inner().results.remove(0);
        assert!((single.deal_probability - b.deal_probability).abs() < 1e-5, "{}: {} vs {}", b.id, single.deal_probability, b.deal_probability);
        assert_eq!(single.label, b.label);
        assert_eq!(single.token_count, b.token_count);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn threshold_decides_the_label() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    for (threshold, label) in [(0.0, Label::Deal), (1.0, Label::NonDeal)] {
        let mut req = request(vec![doc("x", HEADLINES[2])]);
        req.options = Some(ClassifyOptions { threshold: Some(threshold), long_text: 0 });
        let r = client.classify(req).await.unwrap().into_inner().results.remove(0);
        // A probability of exactly 1.0 is impossible for a softmax over finite logits.
        assert_eq!(r.label, label as i32, "threshold {threshold}, p {}", r.deal_probability);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn long_text_truncates_or_chunks() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    let long = HEADLINES.join(". ").repeat(3);
    let mut results = Vec::new();
    for mode in 1..=3 {
        let mut req = request(vec![doc("long", &long)]);
        req.options = Some(ClassifyOptions { threshold: None, long_text: mode });
        results.push(client.classify(req).await.unwrap().into_inner().results.remove(0));
    }
    let (truncated, chunk_max, chunk_mean) = (&results[0], &results[1], &results[2]);
    assert!(truncated.truncated && truncated.chunks == 1);
    assert!(chunk_max.chunks > 1 && !chunk_max.truncated);
    assert_eq!(chunk_max.chunks, chunk_mean.chunks);
    assert!(chunk_max.deal_probability >= chunk_mean.deal_probability - 1e-6);
    assert_eq!(truncated.token_count, chunk_max.token_count);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stream_answers_in_request_order() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    // Mixed lengths so the batcher reorders work internally.
    let items: Vec<_> = (0..60)
        .map(|i| {
            let text = HEADLINES[i % HEADLINES.len()].repeat(1 + (i * 7) % 5);
            ClassifyStreamRequest { document: Some(doc(&format!("s{i}"), &text)), options: None }
        })
        .collect();
    let mut bad = items.clone();
    bad[10].document = Some(doc("s10", "   "));
    let responses: Vec<_> = {
        use futures::StreamExt;
        let out = client.classify_stream(futures::stream::iter(bad)).await.unwrap().into_inner();
        out.collect::<Vec<_>>().await
    };
    assert_eq!(responses.len(), 60);
    for (i, r) in responses.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.id, format!("s{i}"));
        match r.outcome.unwrap() {
            Outcome::Result(res) => assert_eq!(res.id, format!("s{i}")),
            Outcome::Error(e) => {
                assert_eq!(i, 10, "only the blank item fails");
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_goes_from_not_serving_to_serving() {
    let config = config();
    let (go_tx, gated) = gated_loader(&config);
    let server = TestServer::start(config, gated).await;
    assert_eq!(server.health().await, ServingStatus::NotServing);
    let (status, _, body) = server.http_get("/health").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 503 Service Unavailable", "NOT_SERVING\n"));
    let err = server.client().await.classify(request(vec![doc("a", "text")])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("loading"), "{}", err.message());

    go_tx.send(()).unwrap();
    server.wait_serving().await;
    let (status, _, body) = server.http_get("/health").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "SERVING\n"));
    let info = server.client().await.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.labels, ["non_deal", "deal"]);
    assert_eq!(info.backend, "cpu");
    assert_eq!(info.max_sequence_length, 128);
    assert_eq!(info.executors, 1);
    assert!(!info.lexical_stage && !info.lexical_joins_all_texts, "the fixture has no lexical stage");
    assert_eq!(info.limits.unwrap().max_documents_per_request, 64);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest};
    let server = TestServer::ready().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = client.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else { panic!("unexpected reply") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in ["dealsift.v1.DealClassifier", "inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_with_a_fix() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    let too_many = (0..65).map(|i| doc(&i.to_string(), "text")).collect();
    let cases: Vec<(&str, dealsift::proto::ClassifyRequest, &str)> = vec![
        ("no documents", request(vec![]), "at least one document"),
        ("empty text", request(vec![doc("a", "")]), "documents[0].text is empty"),
        ("whitespace text", request(vec![doc("a", "ok"), doc("b", " \n\t ")]), "documents[1].text is empty"),
        ("too many documents", request(too_many), "limit is 64"),
        ("text over the byte limit", request(vec![doc("a", &"x".repeat(5000))]), "--max-document-bytes"),
        ("threshold above 1", with_options(Some(1.5), 0), "within [0, 1]"),
        ("threshold below 0", with_options(Some(-0.1), 0), "within [0, 1]"),
        ("threshold NaN", with_options(Some(f32::NAN), 0), "within [0, 1]"),
        ("unknown long_text", with_options(None, 9), "not a LongText value"),
    ];
    for (what, req, hint) in cases {
        let err = client.classify(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(hint), "{what}: message {:?} lacks {hint:?}", err.message());
    }
    // The server is still healthy and answering.
    client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
    server.stop().await.unwrap();
}

/// Compressed calls (gzip, deflate) are answered, and compressed if the client asks; a message
/// over the limit is refused, and so is a small one that inflates past it (not inflated).
#[tokio::test]
async fn compressed_calls_are_answered_and_inflation_is_bounded() {
    use tonic::codec::CompressionEncoding;
    let server = TestServer::ready().await;
    let plain = server.client().await.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap().into_inner();
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut client = server.client().await.send_compressed(encoding).accept_compressed(encoding);
        let answer = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
        let expected = match encoding {
            CompressionEncoding::Gzip => "gzip",
            _ => "deflate",
        };
        assert_eq!(answer.metadata().get("grpc-encoding").and_then(|v| v.to_str().ok()), Some(expected));
        let without_timing = |results: Vec<dealsift::proto::DocumentResult>| {
            results.into_iter().map(|r| dealsift::proto::DocumentResult { timing: None, ..r }).collect::<Vec<_>>()
        };
        assert_eq!(without_timing(answer.into_inner().results), without_timing(plain.results.clone()));
    }
    // 5 MB of text compresses to a few kB; the server's message limit is 4 MiB.
    let err = server.client().await.classify(request(vec![doc("a", &"x".repeat(5 << 20))])).await.expect_err("over the message limit");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let mut client = server.client().await.send_compressed(CompressionEncoding::Gzip);
    let err = client.classify(request(vec![doc("a", &"x".repeat(5 << 20))])).await.expect_err("over the message limit once inflated");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("size limit"), "{err:?}");
    server.stop().await.unwrap();
}

/// With a certificate and key the gRPC port speaks only TLS; with a client CA as well, it
/// answers only clients presenting a certificate that CA signed. A key that is not the
/// certificate's stops the server before it serves.
#[tokio::test]
async fn tls_and_mutual_tls() {
    use dealsift::client::{connect, ClientAuth};
    use dealsift::proto::deal_classifier_client::DealClassifierClient;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let pem = |name: &str| fixture_dir().with_file_name("tls").join(name);
    let trusted = ClientAuth { ca: Some(pem("ca.pem")), identity: None, ..Default::default() };
    let with_certificate = ClientAuth { identity: Some((pem("client.pem"), pem("client.key"))), ..trusted.clone() };
    for client_ca in [None, Some(pem("ca.pem"))] {
        let mut config = config();
        config.tls = Some(dealsift::server::tls_config(&pem("server.pem"), &pem("server.key"), client_ca.as_deref(), Duration::from_secs(10)).unwrap());
        let load = loader(&config, plain);
        let server = TestServer::start(config, load).await;
        let url = format!("https://127.0.0.1:{}", server.addr.port());
        let client_tls = if client_ca.is_some() { &with_certificate } else { &trusted };
        let channel = connect(&url, client_tls).await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        for _ in 0..500 {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answer = DealClassifierClient::new(channel).classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
        assert_eq!(answer.into_inner().results.len(), 1);
        // Plaintext gets no answer; nor does a client without a certificate when one is required.
        let mut refused = vec![format!("http://127.0.0.1:{}", server.addr.port())];
        if client_ca.is_some() {
            refused.push(url.clone());
        }
        for target in refused {
            let tls = if target.starts_with("https") { trusted.clone() } else { ClientAuth::default() };
            if let Ok(channel) = connect(&target, &tls).await {
                let answer = DealClassifierClient::new(channel).classify(request(vec![doc("a", HEADLINES[0])])).await;
                assert!(answer.is_err(), "{target} answered a client it should refuse");
            }
        }
        server.stop().await.unwrap();
    }
    let mut config = config();
    // The key of another certificate.
    config.tls = Some(dealsift::server::tls_config(&pem("server.pem"), &pem("client.key"), None, Duration::from_secs(10)).unwrap());
    let load = loader(&config, plain);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = dealsift::server::run(listener, None, load, config, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("--tls-key"), "{err}");
}

/// With `--api-key-file`, the classifier RPCs answer only calls carrying a listed key;
/// health and reflection stay open for probes and tools, and refusals are counted. A reload
/// (SIGHUP) reads the file again, keeping the current keys if it is not valid.
#[tokio::test]
async fn api_keys_guard_the_classifier_rpcs() {
    use dealsift::client::{classifier, ClientAuth};
    let (old, new) = ("0123456789abcdef-old", "0123456789abcdef-new");
    let dir = std::env::temp_dir().join(format!("dealsift-api-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server_keys = key_file("server", &format!("# rotating: both accepted\n{old}\n{new}\n"));
    let reload = Arc::new(tokio::sync::Notify::new());
    let mut config = config();
    config.api_keys = Some(dealsift::auth::ApiKeys::from_file(&server_keys).unwrap());
    config.reload = Some(reload.clone());
    let load = loader(&config, plain);
    let server = TestServer::start(config, load).await;
    server.wait_serving().await;

    for key in [old, new] {
        let auth = ClientAuth { api_key_file: Some(key_file("client", &format!("{key}\n"))), ..Default::default() };
        let mut client = classifier(&server.url(), &auth).await.unwrap();
        assert_eq!(client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap().into_inner().results.len(), 1);
        client.get_model_info(GetModelInfoRequest {}).await.unwrap();
        let item = ClassifyStreamRequest { document: Some(doc("s", HEADLINES[0])), options: None };
        let mut stream = client.classify_stream(futures::stream::iter([item])).await.unwrap().into_inner();
        assert!(matches!(stream.message().await.unwrap().unwrap().outcome, Some(Outcome::Result(_))));
    }
    let wrong = ClientAuth { api_key_file: Some(key_file("client", "0123456789abcdef-bad\n")), ..Default::default() };
    for (auth, says) in [(ClientAuth::default(), "missing API key"), (wrong, "not accepted")] {
        let mut client = classifier(&server.url(), &auth).await.unwrap();
        let err = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
        let err = client.get_model_info(GetModelInfoRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let item = ClassifyStreamRequest { document: Some(doc("s", HEADLINES[0])), options: None };
        let err = client.classify_stream(futures::stream::iter([item])).await.expect_err("a stream is refused at its start");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Refused on its headers: a body over --max-message-bytes is never read.
    let mut anonymous = classifier(&server.url(), &ClientAuth::default()).await.unwrap();
    let err = anonymous.classify(request(vec![doc("big", &"x".repeat(5 << 20))])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(server.health().await, ServingStatus::Serving, "health needs no key");
    server
        .assert_metric_lines(&[
            "dealsift_unauthenticated_requests_total 7",
            "dealsift_requests_total{rpc=\"Classify\",code=\"OK\"} 2",
        ])
        .await;

    // Rotation: the old key leaves the file, and a reload drops it.
    let client_with = |key: &str| ClientAuth { api_key_file: Some(key_file("client", &format!("{key}\n"))), ..Default::default() };
    key_file("server", &format!("{new}\n"));
    reload.notify_one();
    eventually("the key file is read again", || async { server.scrape().await.2.lines().any(|l| l == "dealsift_api_key_reloads_total{result=\"ok\"} 1") }).await;
    let err = classifier(&server.url(), &client_with(old)).await.unwrap().classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    classifier(&server.url(), &client_with(new)).await.unwrap().classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
    // A file that is not valid keeps the keys in force.
    key_file("server", "short\n");
    reload.notify_one();
    eventually("the bad key file is counted", || async { server.scrape().await.2.lines().any(|l| l == "dealsift_api_key_reloads_total{result=\"failed\"} 1") }).await;
    classifier(&server.url(), &client_with(new)).await.unwrap().classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With keepalive on, the server pings each connection and closes one whose peer never
/// answers: here a raw HTTP/2 peer that sends its preface and settings, then stays silent.
/// The server's first SETTINGS frame announces the limit on concurrent calls.
#[tokio::test]
async fn keepalive_and_stream_limit_reach_the_http2_peer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = config();
    config.keepalive = Some(dealsift::server::Keepalive { interval: Duration::from_millis(200), timeout: Duration::from_millis(200) });
    config.max_concurrent_streams = 7;
    let load = loader(&config, plain);
    let server = TestServer::start(config, load).await;
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Client preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a connection whose peer never answered its pings");
    // Walk the frames the server sent: 9-byte headers, a 24-bit length and a type.
    let (mut at, mut types, mut settings) = (0, Vec::new(), Vec::new());
    while at + 9 <= received.len() {
        let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
        types.push(received[at + 3]);
        if received[at + 3] == 4 && settings.is_empty() {
            // SETTINGS: 6-byte entries, a 16-bit identifier and a 32-bit value.
            for entry in received[at + 9..(at + 9 + length).min(received.len())].chunks_exact(6) {
                settings.push((u16::from_be_bytes([entry[0], entry[1]]), u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]])));
            }
        }
        at += 9 + length;
    }
    assert!(types.contains(&6), "a PING frame (type 6) was sent: {types:?}");
    assert!(settings.contains(&(3, 7)), "SETTINGS_MAX_CONCURRENT_STREAMS (3) = 7 in {settings:?}");
    server.stop().await.unwrap();
}

/// `x-request-id` names a request in the server's logs and comes back in the response's
/// metadata, errors included; a call without one (or with an unusable one) gets a fresh id.
#[tokio::test]
async fn responses_carry_the_request_id() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    let with_id = |mut req: dealsift::proto::ClassifyRequest, id: &str| {
        let mut req = tonic::Request::new(std::mem::take(&mut req));
        req.metadata_mut().insert("x-request-id", id.parse().unwrap());
        req
    };
    let id_of = |metadata: &tonic::metadata::MetadataMap| metadata.get("x-request-id").map(|v| v.to_str().unwrap().to_string());

    let answer = client.classify(with_id(request(vec![doc("a", HEADLINES[0])]), "trace-42")).await.unwrap();
    assert_eq!(id_of(answer.metadata()).as_deref(), Some("trace-42"));
    let err = client.classify(with_id(request(vec![]), "trace-43")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(id_of(err.metadata()).as_deref(), Some("trace-43"));
    let mut stream_request = tonic::Request::new(futures::stream::iter([ClassifyStreamRequest { document: Some(doc("s", HEADLINES[0])), options: None }]));
    stream_request.metadata_mut().insert("x-request-id", "trace-44".parse().unwrap());
    let answer = client.classify_stream(stream_request).await.unwrap();
    assert_eq!(id_of(answer.metadata()).as_deref(), Some("trace-44"));

    let made: Vec<String> = futures::future::join_all((0..2).map(|_| {
        let mut client = client.clone();
        async move { id_of(client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap().metadata()).expect("an id is made") }
    }))
    .await;
    assert_ne!(made[0], made[1], "each call gets its own id");
    let too_long = "x".repeat(200);
    let answer = client.classify(with_id(request(vec![doc("a", HEADLINES[0])]), &too_long)).await.unwrap();
    assert_ne!(id_of(answer.metadata()).as_deref(), Some(too_long.as_str()), "an id over 128 characters is replaced");
    server.stop().await.unwrap();
}

fn with_options(threshold: Option<f32>, long_text: i32) -> dealsift::proto::ClassifyRequest {
    let mut req = request(vec![doc("a", HEADLINES[0])]);
    req.options = Some(ClassifyOptions { threshold, long_text });
    req
}

#[tokio::test]
async fn deadline_shorter_than_queue_wait_is_deadline_exceeded() {
    let rows = Arc::new(AtomicUsize::new(0));
    let counter = rows.clone();
    // The server answers 10% (50 ms) before the client's own 500 ms timer would cancel the call.
    let server = TestServer::ready_with(config(), move |cpu| Box::new(Slow { inner: cpu, delay: Duration::from_millis(1500), rows: counter.clone() })).await;
    let mut busy = server.client().await;
    let blocker = tokio::spawn(async move { busy.classify(request(vec![doc("busy", HEADLINES[0])])).await });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut req = tonic::Request::new(request(vec![doc("late", HEADLINES[1])]));
    req.set_timeout(Duration::from_millis(500));
    let err = server.client().await.classify(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    blocker.await.unwrap().unwrap();
    // The expired document was dropped before compute: only the warm-up and the blocker ran.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rows.load(Ordering::SeqCst), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn full_queue_is_resource_exhausted() {
    let mut config = config();
    config.batcher.max_queue_sequences = 4;
    let rows = Arc::new(AtomicUsize::new(0));
    let server = TestServer::ready_with(config, move |cpu| Box::new(Slow { inner: cpu, delay: Duration::from_millis(300), rows: rows.clone() })).await;
    let docs = |n: usize| (0..n).map(|i| doc(&i.to_string(), HEADLINES[i])).collect::<Vec<_>>();
    let mut first = server.client().await;
    let held = tokio::spawn(async move { first.classify(request(docs(3))).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = server.client().await.classify(request(docs(3))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry"), "{}", err.message());
    assert_eq!(held.await.unwrap().unwrap().into_inner().results.len(), 3);
    // More windows than the queue could ever hold is the caller's to fix.
    let err = server.client().await.classify(request(docs(5))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn work_of_a_client_that_went_away_is_dropped() {
    let rows = Arc::new(AtomicUsize::new(0));
    let counter = rows.clone();
    let server = TestServer::ready_with(config(), move |cpu| Box::new(Slow { inner: cpu, delay: Duration::from_millis(300), rows: counter.clone() })).await;
    let mut busy = server.client().await;
    let blocker = tokio::spawn(async move { busy.classify(request(vec![doc("busy", HEADLINES[0])])).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut gone = server.client().await;
    let abandoned = tokio::spawn(async move { gone.classify(request(vec![doc("gone", HEADLINES[1])])).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    abandoned.abort();
    blocker.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rows.load(Ordering::SeqCst), 2, "warm-up and blocker only");
    server.assert_metric_lines(&["dealsift_dropped_sequences_total 1", "dealsift_requests_total{rpc=\"Classify\",code=\"CANCELLED\"} 1"]).await;
    server.stop().await.unwrap();
}

/// `GET /metrics` counts requests by RPC and status code, documents, tokens and batches.
#[tokio::test]
async fn metrics_count_requests_documents_and_batches() {
    let server = TestServer::ready().await;
    let mut client = server.client().await;
    client.classify(request(HEADLINES[..3].iter().map(|t| doc("a", t)).collect())).await.unwrap();
    client.classify(request(vec![])).await.expect_err("no documents");
    let items = [HEADLINES[3], " "].map(|t| ClassifyStreamRequest { document: Some(doc("s", t)), options: None });
    {
        use futures::StreamExt;
        let out = client.classify_stream(futures::stream::iter(items)).await.unwrap().into_inner();
        assert_eq!(out.collect::<Vec<_>>().await.len(), 2);
    }
    let (status, content_type, body) = server.scrape().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    // The value of the sample `name` (metric and labels), 0 when it has not been recorded.
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(value("dealsift_requests_total{rpc=\"Classify\",code=\"OK\"}"), 1.0, "{body}");
    assert_eq!(value("dealsift_requests_total{rpc=\"Classify\",code=\"INVALID_ARGUMENT\"}"), 1.0);
    assert_eq!(value("dealsift_requests_total{rpc=\"ClassifyStream\",code=\"OK\"}"), 1.0);
    assert_eq!(value("dealsift_requests_total{rpc=\"ClassifyStream\",code=\"INVALID_ARGUMENT\"}"), 1.0);
    assert_eq!(value("dealsift_request_duration_seconds_count{rpc=\"Classify\"}"), 2.0);
    assert_eq!(value("dealsift_documents_total{label=\"deal\"}") + value("dealsift_documents_total{label=\"non_deal\"}"), 4.0);
    assert_eq!(value("dealsift_document_tokens_count"), 4.0);
    assert_eq!(value("dealsift_document_stage_duration_seconds_count{stage=\"inference\"}"), 4.0);
    // Every computed window: the warm-up's and the four documents'.
    assert_eq!(value("dealsift_batch_rows_sum"), 5.0);
    assert_eq!(value("dealsift_queued_sequences"), 0.0);
    assert_eq!(value("dealsift_ready"), 1.0);
    assert!(body.contains("dealsift_model_info{model_id=\"tiny-bert\""), "{body}");
    // `run` returns only once the metrics endpoint has stopped too.
    server.stop().await.unwrap();
}

#[tokio::test]
async fn two_hundred_concurrent_requests_are_all_answered() {
    let server = TestServer::ready().await;
    let client = server.client().await;
    let calls = (0..200).map(|i| {
        let mut client = client.clone();
        async move {
            let text = format!("{} ({i})", HEADLINES[i % HEADLINES.len()]);
            client.classify(request(vec![doc(&i.to_string(), &text)])).await.map(|r| r.into_inner().results.remove(0).id)
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a.unwrap(), i.to_string());
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn backend_failure_marks_not_serving_and_is_unavailable() {
    let server = TestServer::ready_with(config(), |cpu| {
        Box::new(Failing { inner: cpu, error: BackendError::Fatal("device lost".into()), pass: 1 })
    })
    .await;
    let mut client = server.client().await;
    let err = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("device lost"));
    for _ in 0..100 {
        if server.health().await == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.health().await, ServingStatus::NotServing);
    let err = client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let item = ClassifyStreamRequest { document: Some(doc("s", HEADLINES[0])), options: None };
    let err = client.classify_stream(futures::stream::iter([item])).await.expect_err("a stream is refused too");
    assert_eq!(err.code(), Code::Unavailable);
    // The failure shows in the metrics: every refusal counted, the failed batch, readiness 0.
    server
        .assert_metric_lines(&[
            "dealsift_requests_total{rpc=\"Classify\",code=\"UNAVAILABLE\"} 2",
            "dealsift_requests_total{rpc=\"ClassifyStream\",code=\"UNAVAILABLE\"} 1",
            "dealsift_batch_failures_total 1",
            "dealsift_batch_rows_count 1",
            "dealsift_ready 0",
        ])
        .await;
    assert_eq!(server.http_get("/health").await.0, "HTTP/1.1 503 Service Unavailable");
    server.stop().await.unwrap();
}

/// What SIGHUP does: the directory's new version serves from the next request, a request
/// already admitted finishes on the model it started on, whose backend is then freed; a
/// reload that fails leaves the current model serving.
#[tokio::test]
async fn reload_swaps_the_model_and_a_failed_reload_keeps_the_current_one() {
    let dir = fixture_copy("reload");
    let dropped = Arc::new(AtomicUsize::new(0));
    let reload = Arc::new(tokio::sync::Notify::new());
    let mut config = config();
    config.reload = Some(reload.clone());
    let load = {
        let (dir, batcher, dropped) = (dir.clone(), config.batcher.clone(), dropped.clone());
        move |hooks| {
            let model = dealsift::engine::ModelDir::open(&dir, Some(128))?;
            let cpu = dealsift::backend::cpu::CpuBackend::load(&dir, &model.config, batcher.max_batch_size, model.window, Default::default())?;
            let slow = Slow { inner: cpu, delay: Duration::from_millis(300), rows: Arc::new(AtomicUsize::new(0)) };
            dealsift::server::start_engine(model, vec![Box::new(Counted { inner: Box::new(slow), dropped: dropped.clone() })], batcher.clone(), 8, hooks)
        }
    };
    let server = TestServer::start(config, load).await;
    server.wait_serving().await;
    let mut client = server.client().await;
    let first = client.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner().model_version;
    assert_ne!(first, "2.0.0");

    let mut in_flight_client = client.clone();
    let in_flight = tokio::spawn(async move { in_flight_client.classify(request(vec![doc("a", HEADLINES[0])])).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let set_config = |text: String| std::fs::write(dir.join("config.json"), text).unwrap();
    let original = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut next: serde_json::Value = serde_json::from_str(&original).unwrap();
    next["dealsift"]["version"] = "2.0.0".into();
    next["dealsift"]["model_id"] = "tiny-bert".into();
    set_config(next.to_string());
    reload.notify_one();
    assert_eq!(in_flight.await.unwrap().unwrap().into_inner().model_version, first, "admitted before the swap: answered by the first model");
    eventually("GetModelInfo reports 2.0.0", || {
        let mut client = client.clone();
        async move { client.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner().model_version == "2.0.0" }
    })
    .await;
    let answer = client.classify(request(vec![doc("b", HEADLINES[1])])).await.unwrap().into_inner();
    assert_eq!(answer.model_version, "2.0.0");
    eventually("the first model's backend is freed", || {
        let dropped = dropped.clone();
        async move { dropped.load(Ordering::SeqCst) == 1 }
    })
    .await;
    server
        .assert_metric_lines(&[
            "dealsift_model_reloads_total{result=\"ok\"} 1",
            "dealsift_model_info{model_id=\"tiny-bert\",version=\"2.0.0\",backend=\"cpu\"} 1",
            "dealsift_ready 1",
        ])
        .await;

    set_config("{ not json".into());
    reload.notify_one();
    eventually("the failed reload is counted", || async { server.scrape().await.2.lines().any(|l| l == "dealsift_model_reloads_total{result=\"failed\"} 1") }).await;
    assert_eq!(server.health().await, ServingStatus::Serving);
    let answer = client.classify(request(vec![doc("c", HEADLINES[2])])).await.unwrap().into_inner();
    assert_eq!(answer.model_version, "2.0.0", "the current model keeps serving");
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Reloads whose model fails: at its warm-up (the served model is unaffected, even by the
/// failed engine's report of a device error), or later (NOT_SERVING, until the next reload
/// brings a healthy model).
#[tokio::test]
async fn a_failing_reload_or_backend_leaves_health_consistent() {
    let reload = Arc::new(tokio::sync::Notify::new());
    let mut config = config();
    config.reload = Some(reload.clone());
    let loads = AtomicUsize::new(0);
    let fatal = || BackendError::Fatal("device lost".into());
    let load = loader(&config, move |cpu| -> Box<dyn dealsift::backend::Backend> {
        match loads.fetch_add(1, Ordering::SeqCst) {
            1 => Box::new(Failing { inner: cpu, error: fatal(), pass: 0 }),
            2 => Box::new(Failing { inner: cpu, error: fatal(), pass: 1 }),
            _ => Box::new(cpu),
        }
    });
    let server = TestServer::start(config, load).await;
    server.wait_serving().await;
    let mut client = server.client().await;
    let reloads = |result: &'static str, n: usize| {
        let line = format!("dealsift_model_reloads_total{{result=\"{result}\"}} {n}");
        let server = &server;
        move || {
            let line = line.clone();
            async move { server.scrape().await.2.lines().any(|l| l == line) }
        }
    };

    // Load 1 fails its warm-up with a device error.
    reload.notify_one();
    eventually("the failed reload is counted", reloads("failed", 1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.health().await, ServingStatus::Serving, "a device error of a model never served changes nothing");
    client.classify(request(vec![doc("a", HEADLINES[0])])).await.unwrap();

    // Load 2 serves, then fails.
    reload.notify_one();
    eventually("the reload is counted", reloads("ok", 1)).await;
    let err = client.classify(request(vec![doc("b", HEADLINES[0])])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eventually("health is NOT_SERVING", || async { server.health().await == ServingStatus::NotServing }).await;
    let err = client.classify(request(vec![doc("c", HEADLINES[0])])).await.unwrap_err();
    assert!(err.message().contains("reload (SIGHUP)"), "{}", err.message());
    server.assert_metric_lines(&["dealsift_ready 0"]).await;

    // Load 3 is healthy.
    reload.notify_one();
    server.wait_serving().await;
    client.classify(request(vec![doc("d", HEADLINES[1])])).await.unwrap();
    server.assert_metric_lines(&["dealsift_model_reloads_total{result=\"ok\"} 2", "dealsift_ready 1"]).await;
    assert_eq!(server.http_get("/health").await.0, "HTTP/1.1 200 OK");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work() {
    let rows = Arc::new(AtomicUsize::new(0));
    let server = TestServer::ready_with(config(), move |cpu| Box::new(Slow { inner: cpu, delay: Duration::from_millis(300), rows: rows.clone() })).await;
    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move { client.classify(request(vec![doc("a", HEADLINES[0])])).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.stop().await.unwrap();
    assert_eq!(in_flight.await.unwrap().unwrap().into_inner().results.len(), 1);
}

#[tokio::test]
async fn missing_model_fails_the_server_with_a_clear_error() {
    let mut config = config();
    config.limits.max_documents_per_request = 1;
    let load = |_hook| dealsift::engine::ModelDir::open(std::path::Path::new("/nonexistent/model"), None).map(|_| unreachable!());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = dealsift::server::run(listener, None, load, config, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model/config.json"), "{err}");
}

/// The load generator (`dealsift bench load`) against a real server: every call answered,
/// documents counted, latency percentiles ordered, server timings collected. No timing is
/// asserted.
#[tokio::test]
async fn load_generator_drives_the_server_closed_and_open_loop() {
    use dealsift::bench::{run_load, Pace, Target};
    let server = TestServer::ready().await;
    let target = Target::Grpc(Box::new(dealsift::client::classifier(&server.url(), &Default::default()).await.unwrap()));
    let docs = Arc::new((0..10).map(|i| doc(&i.to_string(), &"shares of the company rose ".repeat(i + 1))).collect::<Vec<_>>());
    for pace in [Pace::Closed { concurrency: 3 }, Pace::Open { calls_per_s: 40.0 }] {
        let report = run_load(&target, docs.clone(), 4, pace, Duration::from_millis(100), Duration::from_millis(500)).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.calls > 0 && report.documents == 4 * report.calls, "{report:?}");
        let l = &report.latency_ms;
        assert!(0.0 < l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
        assert!(report.server_inference_us > 0.0 && report.tokens_per_s > 0.0);
    }
    server.stop().await.unwrap();
}

/// A model directory with a lexical stage (`dealsift.lexical` and `lexical.safetensors`) is
/// served as configured: the probability of a text the stage joins (with `long-texts`, those
/// longer than the window; with `all-texts`, every one) is `engine::combine` of the transformer's
/// own (from the same directory without the stage) and the lexical logit, any other text keeps
/// the transformer's, in every long-text mode (truncated, or read in several windows), and the
/// stage's threshold decides the label, and `GetModelInfo` says which texts are joined; without
/// its weights file the directory is refused by name.
#[tokio::test]
async fn lexical_stage_is_served_as_configured() {
    use dealsift::engine::{combine, Admission, Doc, ModelDir, Options};
    use dealsift::model::config::{Joins, LexicalMeta};
    use dealsift::model::lexical::{Recipe, Vocabulary, FILE};
    use dealsift::model::LexicalModel;
    use dealsift::tokenize::LongText;
    let long_deal = "Acme agrees to buy Widget Co. ".repeat(40);
    let long_other = "Bank profit falls. ".repeat(60);
    let texts = ["Acme agrees to buy Widget Co", "Acme profit rises", "Bank to buy rival", "Bank profit falls", &long_deal, &long_other];
    let score = |dir: std::path::PathBuf, long_text: LongText| async move {
        let model = ModelDir::open(&dir, Some(128)).unwrap();
        let threshold = model.threshold;
        let cpu = dealsift::backend::cpu::CpuBackend::load(&dir, &model.config, 8, model.window, Default::default()).unwrap();
        let engine = dealsift::server::start_engine(model, vec![Box::new(cpu)], config().batcher, 8, dealsift::server::EngineHooks::detached()).unwrap();
        let docs = texts.iter().map(|t| Doc { id: t.to_string(), title: None, text: t.to_string() }).collect();
        let options = Options { threshold, long_text };
        let results = engine.classify(docs, options, None, Admission::Wait).await.unwrap();
        engine.shutdown();
        (results, threshold)
    };

    let dir = fixture_copy("lexical-stage");
    let recipe = Recipe { buckets: 1 << 10, vocabulary: Vocabulary::ContentWords, deal_weight: 1.0, c: 10.0 };
    let write_meta = |how: &LexicalMeta| {
        let mut model_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        model_config["dealsift"]["lexical"] = serde_json::to_value(how).unwrap();
        std::fs::write(dir.join("config.json"), model_config.to_string()).unwrap();
    };
    let long_texts = LexicalMeta { weight: 0.5, temperature: 2.0, threshold: 0.4, joins: Joins::LongTexts, vocabulary: recipe.vocabulary };
    write_meta(&long_texts);
    let missing = ModelDir::open(&dir, Some(128)).unwrap_err().to_string();
    assert!(missing.contains(FILE) && missing.contains("remove dealsift.lexical"), "{missing}");

    let docs: Vec<(Option<&str>, &str)> = texts.iter().map(|&t| (None, t)).collect();
    let (lexical, _) = LexicalModel::fit(&docs, &[true, false, true, false, true, false], &recipe).unwrap();
    lexical.save(&dir.join(FILE)).unwrap();
    for how in [long_texts, LexicalMeta { joins: Joins::AllTexts, ..long_texts }] {
        write_meta(&how);
        for mode in [LongText::Truncate, LongText::ChunkMax] {
            let (alone, _) = score(fixture_dir(), mode).await;
            let (joined, threshold) = score(dir.clone(), mode).await;
            assert_eq!(threshold, 0.4, "the stage's threshold is the default");
            for ((text, alone), joined) in texts.iter().zip(&alone).zip(&joined) {
                let long = alone.truncated || alone.chunks > 1;
                assert_eq!(long, text.len() > 100, "{mode:?}, {text}: only the repeated texts exceed the window");
                let expected = if how.joins.includes(long) { combine(alone.deal_probability, lexical.logit(None, text), &how) } else { alone.deal_probability };
                assert!((joined.deal_probability - expected).abs() < 1e-5, "{how:?}, {mode:?}, {text}: {} against {expected}", joined.deal_probability);
                assert_eq!(joined.label == Label::Deal as i32, joined.deal_probability >= 0.4, "{text}");
                let total: f32 = joined.scores.iter().map(|s| s.score).sum();
                assert!((total - 1.0).abs() < 1e-5, "{text}: scores sum to {total}");
            }
        }
    }
    // The directory now joins every text: GetModelInfo says so.
    let load = {
        let (dir, batcher) = (dir.clone(), config().batcher);
        move |hooks| {
            let model = ModelDir::open(&dir, Some(128))?;
            let cpu = dealsift::backend::cpu::CpuBackend::load(&dir, &model.config, batcher.max_batch_size, model.window, Default::default())?;
            dealsift::server::start_engine(model, vec![Box::new(cpu)], batcher.clone(), 8, hooks)
        }
    };
    let server = TestServer::start(config(), load).await;
    server.wait_serving().await;
    let info = server.client().await.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
    assert!(info.lexical_stage && info.lexical_joins_all_texts, "{info:?}");
    assert_eq!(info.default_threshold, 0.4);
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
