//! API keys for the classifier RPCs (dealsift's and the KServe v2 face's): a caller sends
//! `authorization: Bearer <key>`, and the server accepts any key listed in `--api-key-file`.
//! Health, reflection and the v2 liveness and readiness calls stay open, so probes and tooling
//! need no key. Only SHA-256 digests of the keys are kept, and a presented
//! key is compared with every one in constant time: neither its length nor how much of it
//! matched shows in the timing. Keys never reach logs or error messages.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::proto::inference::grpc_inference_service_server;
use crate::service::{call_id, tag_status};
use crate::telemetry::Metrics;

/// Shorter keys are refused at start: a key is a secret, not a password to remember.
pub const MIN_KEY_LENGTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("--api-key-file {path}: {reason}")]
    File { path: String, reason: String },
}

/// The accepted keys, as digests, and the file they came from.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// The keys of a key file, with their line numbers (from 1): lines trimmed, blank ones and
/// `#` comments skipped. The server reads every key; a client sends the first.
pub fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#')).map(|(n, l)| (n + 1, l))
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// One key per line; blank lines and lines starting with `#` are skipped, so a file can
    /// hold the old and the new key while clients move over.
    pub fn from_file(path: &Path) -> Result<Self, ApiKeyError> {
        let error = |reason: String| ApiKeyError::File { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Ok(Self { file: Some(path.to_path_buf()), ..Self::parse(&text).map_err(error)? })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (n, key) in key_lines(text) {
            if key.len() < MIN_KEY_LENGTH || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a key is at least {MIN_KEY_LENGTH} printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)",
                    n
                ));
            }
            digests.push(digest(key.as_bytes()));
        }
        if digests.is_empty() {
            return Err("no key in the file (one per line; # starts a comment)".into());
        }
        Ok(Self { digests, file: None })
    }

    pub fn count(&self) -> usize {
        self.digests.len()
    }

    /// `UNAUTHENTICATED` unless the call carries `authorization: Bearer <an accepted key>`.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let header = headers
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing API key: send the metadata header `authorization: Bearer <key>`"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <key>`"))?;
        let presented = digest(key.as_bytes());
        let accepted = self.digests.iter().fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&presented));
        if bool::from(accepted) {
            Ok(())
        } else {
            Err(Status::unauthenticated("API key not accepted"))
        }
    }
}

/// The server's gate, a layer over every service: with keys, a call to a guarded RPC
/// ([`needs_key`]) without an accepted key is refused with `UNAUTHENTICATED` (and counted) from
/// its headers alone, before its body is read; without keys, every call passes. Its clones share
/// the keys, which [`KeyCheck::reload`] replaces while serving.
#[derive(Clone)]
pub struct KeyCheck {
    keys: Arc<RwLock<Option<Arc<ApiKeys>>>>,
    metrics: Arc<Metrics>,
}

impl KeyCheck {
    pub fn new(keys: Option<ApiKeys>, metrics: Arc<Metrics>) -> Self {
        Self { keys: Arc::new(RwLock::new(keys.map(Arc::new))), metrics }
    }

    fn current(&self) -> Option<Arc<ApiKeys>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the keys' file again and, if it is valid, checks calls against it from now on;
    /// otherwise the current keys stay. `None` when the keys did not come from a file.
    pub fn reload(&self) -> Option<Result<usize, ApiKeyError>> {
        let file = self.current()?.file.clone()?;
        Some(ApiKeys::from_file(&file).map(|keys| {
            let count = keys.count();
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(keys));
            count
        }))
    }
}

/// Whether a call to `path` (`/package.Service/Method`) needs a key: every path but the open
/// ones, health, reflection and the v2 probes. Deny by default, so a path the router might
/// read differently (or a service added later) is never open by accident.
fn needs_key(path: &str) -> bool {
    const OPEN_SERVICES: [&str; 3] = [
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
        tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
    ];
    const OPEN_V2_PROBES: [&str; 3] = ["ServerLive", "ServerReady", "ModelReady"];
    let open = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((grpc_inference_service_server::SERVICE_NAME, method)) => OPEN_V2_PROBES.contains(&method),
        Some((service, method)) => OPEN_SERVICES.contains(&service) && !method.is_empty() && !method.contains('/'),
        None => false,
    };
    !open
}

impl<S> tower_layer::Layer<S> for KeyCheck {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { inner, check: self.clone() }
    }
}

/// A service behind [`KeyCheck`].
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    check: KeyCheck,
}

impl<S, B> tower_service::Service<http::Request<B>> for Guarded<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(keys) = self.check.current().filter(|_| needs_key(request.uri().path())) {
            if let Err(mut status) = keys.check(request.headers()) {
                self.check.metrics.refused_unauthenticated();
                let id = call_id(&MetadataMap::from_headers(request.headers().clone()), None);
                tracing::debug!(
                    path = request.uri().path(),
                    request_id = &*id.request,
                    trace_id = id.trace.as_deref(),
                    reason = status.message(),
                    "refused: no accepted API key"
                );
                tag_status(&mut status, &id.request);
                return Either::Right(futures::future::ready(Ok(status.into_http())));
            }
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const A: &str = "0123456789abcdef0123";
    const B: &str = "fedcba9876543210fedc";

    fn with_header(value: &str) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn the_file_lists_keys_with_comments_and_blank_lines() {
        let keys = ApiKeys::parse(&format!("# current\n{A}\n\n  {B}  \n")).unwrap();
        assert_eq!(keys.count(), 2);
        for key in [A, B] {
            keys.check(&with_header(&format!("Bearer {key}"))).unwrap();
        }
        keys.check(&with_header(&format!("bearer {A}"))).unwrap();
        assert!(!format!("{keys:?}").contains(A), "Debug never shows a key");
    }

    #[test]
    fn weak_or_missing_keys_are_refused_at_start() {
        assert!(ApiKeys::parse("short\n").unwrap_err().contains("line 1: a key is at least 16"));
        assert!(ApiKeys::parse(&format!("{A}\nwith a space in it 12345\n")).unwrap_err().starts_with("line 2"));
        assert!(ApiKeys::parse("0123456789abcdéf0123\n").unwrap_err().contains("printable ASCII"));
        assert!(ApiKeys::parse("# only a comment\n\n").unwrap_err().contains("no key"));
    }

    #[test]
    fn classifier_rpcs_need_a_key_and_probes_do_not() {
        for path in [
            "/dealsift.v1.DealClassifier/Classify",
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ModelStreamInfer",
            "/inference.GRPCInferenceService/ServerLive/x",
            "//dealsift.v1.DealClassifier/Classify",
            "/grpc.health.v1.Health/Check/x",
            "/grpc.health.v1.Health",
            "/unknown.Service/Call",
            "/",
            "",
        ] {
            assert!(needs_key(path), "{path}");
        }
        for path in [
            "/inference.GRPCInferenceService/ServerReady",
            "/inference.GRPCInferenceService/ModelReady",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!needs_key(path), "{path}");
        }
    }

    #[test]
    fn calls_without_an_accepted_key_are_unauthenticated() {
        let keys = ApiKeys::parse(A).unwrap();
        for (metadata, says) in [
            (http::HeaderMap::new(), "missing API key"),
            (with_header(A), "must be `Bearer <key>`"),
            (with_header(&format!("Basic {A}")), "must be `Bearer <key>`"),
            (with_header(&format!("Bearer {B}")), "not accepted"),
            (with_header(&format!("Bearer {}", &A[..A.len() - 1])), "not accepted"),
        ] {
            let status = keys.check(&metadata).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            assert!(status.message().contains(says), "{}", status.message());
            assert!(!status.message().contains(B) && !status.message().contains(&A[..8]), "no key in the message");
        }
    }
}
