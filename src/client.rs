//! `dealsift classify`: a command-line client that prints one JSON line per document.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use serde::{Deserialize, Serialize};

use crate::proto::deal_classifier_client::DealClassifierClient;
use crate::proto::{ClassifyOptions, ClassifyRequest, Document, DocumentResult, Label, LongText};

/// A document read from a JSONL file (`title` optional, `id` defaults to the line number).
#[derive(Debug, Deserialize)]
struct InputLine {
    #[serde(default)]
    id: Option<serde_json::Value>,
    text: String,
    #[serde(default)]
    title: Option<String>,
}

/// Reads documents from a `.jsonl` file (objects with `text`, optional `id` and `title`)
/// or any other file as plain text, one document per non-empty line.
pub fn read_documents(path: &Path) -> anyhow::Result<Vec<Document>> {
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
    let mut docs = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let line_no = n + 1;
        docs.push(if jsonl {
            let parsed: InputLine = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{}:{line_no}: expected {{\"text\": ...}}: {e}", path.display()))?;
            let id = match parsed.id {
                Some(serde_json::Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => line_no.to_string(),
            };
            Document { id, text: parsed.text, title: parsed.title }
        } else {
            Document { id: line_no.to_string(), text: line, title: None }
        });
    }
    Ok(docs)
}

#[derive(Serialize)]
struct OutputLine<'a> {
    id: &'a str,
    label: &'static str,
    deal_probability: f32,
    /// f32 as f32 (`0.99856746`), not widened to f64 digits.
    scores: std::collections::BTreeMap<&'a str, f32>,
    token_count: u32,
    truncated: bool,
    chunks: u32,
}

fn output_line(r: &DocumentResult) -> OutputLine<'_> {
    OutputLine {
        id: &r.id,
        label: if r.label == Label::Deal as i32 { "deal" } else { "non_deal" },
        deal_probability: r.deal_probability,
        scores: r.scores.iter().map(|s| (s.label.as_str(), s.score)).collect(),
        token_count: r.token_count,
        truncated: r.truncated,
        chunks: r.chunks,
    }
}

/// How a client proves the server and itself. TLS, for an `https://` server: the server's
/// certificate is checked against `ca` (default: the system's roots); `identity` (certificate,
/// key; PEM) answers a server that asks for client certificates. `api_key_file`: its first
/// key is sent as `authorization: Bearer <key>` (see `crate::auth`).
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
    pub api_key_file: Option<PathBuf>,
}

/// A classifier client that sends the API key, if any, with every call.
pub type Client = DealClassifierClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <key>` to each request when it has a key.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Bearer {
    fn from_file(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(Self(None)) };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
        let (_, key) = crate::auth::key_lines(&text).next().with_context(|| format!("--api-key-file {}: no key in the file", path.display()))?;
        let value = format!("Bearer {key}").parse().map_err(|_| anyhow::anyhow!("--api-key-file {}: the key is not printable ASCII", path.display()))?;
        Ok(Self(Some(value)))
    }
}

/// A classifier client for `url` (see [`connect`]), sending `auth`'s API key if it has one.
pub async fn classifier(url: &str, auth: &ClientAuth) -> anyhow::Result<Client> {
    let bearer = Bearer::from_file(auth.api_key_file.as_deref())?;
    let channel = connect(url, auth).await?;
    Ok(DealClassifierClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// A channel to `url`: plaintext for `http://` (or a bare `host:port`, as grpcurl and the Python
/// clients take it), TLS for `https://`.
pub async fn connect(url: &str, tls: &ClientAuth) -> anyhow::Result<Channel> {
    let with_scheme;
    let url = if url.contains("://") {
        url
    } else {
        // A key must not go out in clear text because a scheme was left out.
        anyhow::ensure!(
            tls.api_key_file.is_none() && tls.ca.is_none() && tls.identity.is_none(),
            "{url} has no scheme: write https://{url} (TLS), or http://{url} to send in clear text"
        );
        with_scheme = format!("http://{url}");
        &with_scheme
    };
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut endpoint = Endpoint::from_shared(url.to_string()).with_context(|| format!("{url} is not a server URL (http://host:port or https://host:port)"))?;
    if url.starts_with("https://") {
        let mut config = match &tls.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(config).context("TLS client configuration")?;
    } else {
        anyhow::ensure!(tls.ca.is_none() && tls.identity.is_none(), "TLS options need an https:// server URL, not {url}");
    }
    endpoint.connect().await.with_context(|| format!("cannot connect to {url}"))
}

pub struct ClassifyArgs {
    pub addr: String,
    pub auth: ClientAuth,
    pub documents: Vec<Document>,
    pub batch_size: usize,
    pub threshold: Option<f32>,
    pub long_text: LongText,
    pub progress: bool,
}

/// Sends documents in calls of `batch_size` and writes results to `out` in input order.
pub async fn classify(args: ClassifyArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = classifier(&args.addr, &args.auth).await?;
    let bar = if args.progress {
        let bar = indicatif::ProgressBar::new(args.documents.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} docs {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let options = ClassifyOptions { threshold: args.threshold, long_text: args.long_text as i32 };
    for chunk in args.documents.chunks(args.batch_size.max(1)) {
        let request = ClassifyRequest { documents: chunk.to_vec(), options: Some(options) };
        let response = client.classify(request).await.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        for result in &response.get_ref().results {
            serde_json::to_writer(&mut *out, &output_line(result))?;
            out.write_all(b"\n")?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
