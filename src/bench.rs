//! `dealsift bench`: benchmarks, never timed tests. Three tools:
//! - `backend`: the backend alone, in process, over a grid of batch sizes and lengths;
//! - `workload`: a realistic document mix written from the Reuters test bodies (long) and
//!   the twitter validation texts (short), read from `../shared/data`;
//! - `load`: a load generator over those documents, against a running server (gRPC) or the
//!   same pipeline in process, closed loop (fixed concurrency) or open loop (fixed rate),
//!   reporting throughput, latency percentiles, errors and the server-side time split.
//!
//! This is command-line code (an edge): errors are `anyhow`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::backend::cpu::{CpuBackend, CpuKernels};
use crate::backend::{Backend, Batch};
use crate::batcher::BatcherConfig;
use crate::client::ClientAuth;
use crate::engine::{Admission, Doc, Engine, ModelDir, Options};
use crate::proto::{ClassifyOptions, ClassifyRequest, Document, Timing};
use crate::server::{self, ModelSpec};
use crate::tokenize::LongText;

/// One timed shape of the backend grid.
#[derive(Debug, Serialize)]
pub struct GridRow {
    pub kernels: String,
    pub batch: usize,
    pub seq: usize,
    pub iterations: usize,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub sequences_per_s: f64,
}

/// Times `predict` on full-length batches (every position a real token, as in a batch of
/// long documents): warm-up calls, then at least `min_iterations` and `min_time`.
pub fn backend_grid(
    model_dir: &Path,
    kernels: CpuKernels,
    batches: &[usize],
    seqs: &[usize],
    min_time: Duration,
    min_iterations: usize,
) -> anyhow::Result<Vec<GridRow>> {
    let model = ModelDir::open(model_dir, None)?;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let max_seq = seqs.iter().copied().max().unwrap_or(1);
    let mut backend = CpuBackend::load(model_dir, &model.config, max_batch, max_seq, kernels)?;
    let mut rows = Vec::new();
    for &seq in seqs {
        for &batch in batches {
            let ids: Vec<u32> = (0..batch * seq).map(|i| 1000 + ((i * 7919) % 20_000) as u32).collect();
            let input = Batch { input_ids: ids, attention_mask: vec![1; batch * seq], rows: batch, seq };
            for _ in 0..2 {
                backend.predict(&input)?;
            }
            let mut times = Vec::new();
            let started = Instant::now();
            while times.len() < min_iterations || started.elapsed() < min_time {
                let t0 = Instant::now();
                backend.predict(&input)?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let median_ms = percentile(&times, 0.5);
            rows.push(GridRow {
                kernels: format!("{kernels:?}").to_lowercase(),
                batch,
                seq,
                iterations: times.len(),
                median_ms,
                p10_ms: percentile(&times, 0.1),
                p90_ms: percentile(&times, 0.9),
                sequences_per_s: batch as f64 / (median_ms / 1e3),
            });
        }
    }
    Ok(rows)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes the realistic workload: every non-empty Reuters ModApte test document (title +
/// body) and every twitter validation text, shuffled together with a fixed seed.
pub fn write_workload(data_dir: &Path, out: &Path) -> anyhow::Result<usize> {
    use crate::data::{reuters, twitter, Split};
    let mut docs: Vec<serde_json::Value> = Vec::new();
    for ex in reuters::load(&data_dir.join("reuters21578"), Split::Test)? {
        if !ex.text.trim().is_empty() {
            docs.push(serde_json::json!({ "id": ex.id, "title": ex.title, "text": ex.text }));
        }
    }
    for (ex, _) in twitter::load(&data_dir.join("twitter-financial-news-topic"), Split::Test)? {
        docs.push(serde_json::json!({ "id": ex.id, "text": ex.text }));
    }
    docs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(20261126));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let lines: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    std::fs::write(out, lines.join("\n") + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    Ok(docs.len())
}

/// What the load generator drives.
#[derive(Clone)]
pub enum Target {
    Grpc(Box<crate::client::Client>),
    InProcess(Arc<Engine>),
}

impl Target {
    /// Connects to a server, or loads the model in process with the server's defaults.
    pub async fn open(server: Option<&str>, auth: &ClientAuth, model_dir: &Path, batcher: BatcherConfig) -> anyhow::Result<Self> {
        match server {
            Some(url) => Ok(Self::Grpc(Box::new(crate::client::classifier(url, auth).await?))),
            None => {
                anyhow::ensure!(auth.api_key_file.is_none(), "--api-key-file is for a server: add --server");
                let spec = ModelSpec { dir: model_dir.to_path_buf(), max_sequence_length: None, cpu_kernels: CpuKernels::Fast };
                let engine = tokio::task::spawn_blocking(move || server::load_cpu(&spec, batcher, 16, server::EngineHooks::detached())).await??;
                Ok(Self::InProcess(Arc::new(engine)))
            }
        }
    }

    /// One call; per-document server timings and token counts, or the status code name.
    async fn call(&mut self, docs: &[Document]) -> Result<Vec<(Timing, u32)>, String> {
        match self {
            Target::Grpc(client) => {
                let request = ClassifyRequest {
                    documents: docs.to_vec(),
                    options: Some(ClassifyOptions { threshold: None, long_text: crate::proto::LongText::Truncate as i32 }),
                };
                let response = client.classify(request).await.map_err(|s| format!("{:?}", s.code()))?;
                Ok(response.into_inner().results.into_iter().map(|r| (r.timing.unwrap_or_default(), r.token_count)).collect())
            }
            Target::InProcess(engine) => {
                let docs = docs.iter().map(|d| Doc { id: d.id.clone(), title: d.title.clone(), text: d.text.clone() }).collect();
                let options = Options { threshold: engine.model.threshold, long_text: LongText::Truncate };
                let results = engine.classify(docs, options, None, Admission::FailFast).await.map_err(|e| match e {
                    crate::engine::EngineError::QueueFull(_) => "ResourceExhausted".to_string(),
                    other => other.to_string(),
                })?;
                Ok(results.into_iter().map(|r| (r.timing.unwrap_or_default(), r.token_count)).collect())
            }
        }
    }
}

/// How calls are issued.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Pace {
    /// `n` callers, each sending its next call when the last one returns.
    Closed { concurrency: usize },
    /// Calls started at a fixed rate whatever the answers (latency counts from the
    /// scheduled start, so a stalled server shows up in the percentiles).
    Open { calls_per_s: f64 },
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub pace: Pace,
    pub docs_per_call: usize,
    pub seconds: f64,
    pub calls: usize,
    pub documents: usize,
    pub documents_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_ms: Latency,
    pub errors: BTreeMap<String, usize>,
    /// Mean per document, microseconds, as the server reports it.
    pub server_tokenize_us: f64,
    pub server_queue_us: f64,
    pub server_inference_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    documents: usize,
    tokens: u64,
    tokenize_us: u64,
    queue_us: u64,
    inference_us: u64,
    errors: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, latency: Duration, outcome: Result<Vec<(Timing, u32)>, String>) {
        match outcome {
            Ok(results) => {
                self.latencies_ms.push(latency.as_secs_f64() * 1e3);
                self.documents += results.len();
                for (t, tokens) in results {
                    self.tokens += tokens as u64;
                    self.tokenize_us += t.tokenize_us;
                    self.queue_us += t.queue_us;
                    self.inference_us += t.inference_us;
                }
            }
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_ms.extend(other.latencies_ms);
        self.documents += other.documents;
        self.tokens += other.tokens;
        self.tokenize_us += other.tokenize_us;
        self.queue_us += other.queue_us;
        self.inference_us += other.inference_us;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// Runs `warmup` (not counted), then `duration` of load. Calls take consecutive slices
/// of `docs`, wrapping around.
pub async fn run_load(target: &Target, docs: Arc<Vec<Document>>, docs_per_call: usize, pace: Pace, warmup: Duration, duration: Duration) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!docs.is_empty() && docs_per_call > 0, "need documents and at least one per call");
    let next = Arc::new(AtomicUsize::new(0));
    let take = {
        let docs = docs.clone();
        move |next: &AtomicUsize| -> Vec<Document> {
            let start = next.fetch_add(docs_per_call, Ordering::Relaxed);
            (start..start + docs_per_call).map(|i| docs[i % docs.len()].clone()).collect()
        }
    };
    let begin = Instant::now() + warmup;
    let end = begin + duration;
    let mut tasks = tokio::task::JoinSet::new();
    match pace {
        Pace::Closed { concurrency } => {
            for _ in 0..concurrency.max(1) {
                let (mut target, next, take) = (target.clone(), next.clone(), take.clone());
                tasks.spawn(async move {
                    let mut tally = Tally::default();
                    while Instant::now() < end {
                        let batch = take(&next);
                        let started = Instant::now();
                        let outcome = target.call(&batch).await;
                        if started >= begin && Instant::now() <= end {
                            tally.add(started.elapsed(), outcome);
                        }
                    }
                    tally
                });
            }
        }
        Pace::Open { calls_per_s } => {
            anyhow::ensure!(calls_per_s > 0.0, "the call rate must be positive");
            let interval = Duration::from_secs_f64(1.0 / calls_per_s);
            let mut scheduled = Instant::now();
            while scheduled < end {
                tokio::time::sleep_until(scheduled.into()).await;
                let (mut target, batch) = (target.clone(), take(&next));
                let due = scheduled;
                tasks.spawn(async move {
                    let mut tally = Tally::default();
                    let outcome = target.call(&batch).await;
                    if due >= begin {
                        tally.add(due.elapsed(), outcome);
                    }
                    tally
                });
                scheduled += interval;
            }
        }
    }
    let mut tally = Tally::default();
    while let Some(t) = tasks.join_next().await {
        tally.merge(t?);
    }
    let seconds = duration.as_secs_f64();
    tally.latencies_ms.sort_by(f64::total_cmp);
    let per_doc = |us: u64| if tally.documents == 0 { 0.0 } else { us as f64 / tally.documents as f64 };
    Ok(LoadReport {
        pace,
        docs_per_call,
        seconds,
        calls: tally.latencies_ms.len(),
        documents: tally.documents,
        documents_per_s: tally.documents as f64 / seconds,
        tokens_per_s: tally.tokens as f64 / seconds,
        latency_ms: Latency {
            p50: percentile(&tally.latencies_ms, 0.5),
            p90: percentile(&tally.latencies_ms, 0.9),
            p99: percentile(&tally.latencies_ms, 0.99),
            max: tally.latencies_ms.last().copied().unwrap_or(0.0),
        },
        errors: tally.errors.clone(),
        server_tokenize_us: per_doc(tally.tokenize_us),
        server_queue_us: per_doc(tally.queue_us),
        server_inference_us: per_doc(tally.inference_us),
    })
}

pub fn render_load(r: &LoadReport) -> String {
    let pace = match r.pace {
        Pace::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
        Pace::Open { calls_per_s } => format!("open loop, {calls_per_s:.1} calls/s"),
    };
    let errors = if r.errors.is_empty() { "none".to_string() } else { format!("{:?}", r.errors) };
    format!(
        "{pace}, {} docs/call, {:.0}s: {:.1} docs/s ({:.0} tokens/s), {} calls; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}; errors {errors}; server per doc: tokenize {:.0} us, queue {:.0} us, inference {:.0} us\n",
        r.docs_per_call,
        r.seconds,
        r.documents_per_s,
        r.tokens_per_s,
        r.calls,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.latency_ms.max,
        r.server_tokenize_us,
        r.server_queue_us,
        r.server_inference_us,
    )
}

/// The documents of a workload file (see [`write_workload`]) or any `classify --file` input.
pub fn read_workload(path: &Path) -> anyhow::Result<Vec<Document>> {
    let docs = crate::client::read_documents(path)?;
    anyhow::ensure!(!docs.is_empty(), "{}: no documents", path.display());
    Ok(docs)
}

/// Default workload location (under target/, never committed: it holds data set texts).
pub fn default_workload_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/workload.jsonl")
}
