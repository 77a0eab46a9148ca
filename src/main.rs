//! The `dealsift` command: `serve` runs the gRPC service, `classify` is its client.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dealsift::backend::neuron::{self, NeuronOptions};
use dealsift::backend::cpu::CpuKernels;
use dealsift::bench;
use dealsift::batcher::BatcherConfig;
use dealsift::model::config::Joins;
use dealsift::model::lexical::{Recipe, Vocabulary};
use dealsift::server::{self, ModelSpec, ServerConfig};
use dealsift::service::Limits;
use dealsift::tokenize::LongText;

/// candle allocates a fresh buffer for every tensor op; glibc serves large ones with
/// mmap/munmap, so each training step would re-fault its activations. mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys names only some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process instead of returning it to the OS after 10 ms (mimalloc's
/// default): training frees and reallocates the same ~100 MB of activations every step, and
/// re-faulting (zeroing) those pages cost a fifth of the step time. An explicit
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
fn retain_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an allocator option; mimalloc documents it as safe at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// The model shipped in this repository, loaded when no --model-dir is given.
const DEFAULT_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/dealsift-minilm-l6");

#[derive(Parser)]
#[command(name = "dealsift", version, about = "Does this news text report a deal? A gRPC classification service.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service.
    Serve(ServeArgs),
    /// Classify texts or a file through a running service; prints JSON lines.
    Classify(ClassifyCli),
    /// Fine-tune the deal classifier from a pretrained encoder (see models/*/MODEL_CARD.md).
    Train(TrainArgs),
    /// Score the test sets and report precision, recall, F1, ROC-AUC and the worst errors.
    Eval(EvalArgs),
    /// Benchmarks: the backend in process, a realistic workload, a load generator.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write the corpus that train and eval build (every split and source, texts included) as
    /// JSON lines, for experiments outside Rust (tools/recipe_sweep). Keep it out of the repository.
    ExportCorpus(ExportCorpusArgs),
}

#[derive(Parser)]
struct ExportCorpusArgs {
    #[arg(long, env = "DEALSIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Modern labels files (repeatable; default: every round in data/).
    #[arg(long)]
    labels: Vec<PathBuf>,
    /// Output file (JSON lines: set, split, id, title, text, deal, subtype).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the CPU backend alone over a grid of batch sizes and sequence lengths.
    Backend(BenchBackendArgs),
    /// Write the realistic workload (Reuters test bodies + twitter validation texts) as JSONL.
    Workload(BenchWorkloadArgs),
    /// Drive a running server (--server) or the same pipeline in process with documents.
    Load(BenchLoadArgs),
}

#[derive(Parser)]
struct BenchBackendArgs {
    #[arg(long, env = "DEALSIFT_MODEL_DIR", default_value = DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    #[arg(long, value_enum, default_value = "fast")]
    cpu_kernels: CpuKernelsArg,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Sequence lengths (tokens, all real).
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    seq: Vec<usize>,
    /// Seconds per shape, at least.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Timed calls per shape, at least.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// CPU threads (default: all cores).
    #[arg(long, env = "DEALSIFT_THREADS")]
    threads: Option<usize>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchWorkloadArgs {
    #[arg(long, env = "DEALSIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Output file (holds data set texts: keep it out of the repository).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Parser)]
struct BenchLoadArgs {
    /// Server to load; without it the model runs in process behind the same engine.
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    auth: ClientArgs,
    /// Model for the in-process run.
    #[arg(long, env = "DEALSIFT_MODEL_DIR", default_value = DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    /// Documents (JSONL with "text", or plain lines); default: the file `bench workload` writes.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Concurrent callers (closed loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Calls per second (open loop) instead of a closed loop.
    #[arg(long, conflicts_with = "sweep")]
    rate: Option<f64>,
    /// Closed loop first to find the maximum, then open loop at 50% and 90% of it.
    #[arg(long)]
    sweep: bool,
    /// Documents per call.
    #[arg(long, default_value_t = 8)]
    docs_per_call: usize,
    /// Seconds measured (per run).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// CPU threads for the in-process model (default: all cores).
    #[arg(long, env = "DEALSIFT_THREADS")]
    threads: Option<usize>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct TrainArgs {
    /// Pretrained encoder directory (tools/fetch_base_model.sh puts all-MiniLM-L6-v2 here).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/base-model/all-MiniLM-L6-v2"))]
    base_model: PathBuf,
    /// Output model directory.
    #[arg(long, default_value = DEFAULT_MODEL_DIR)]
    out: PathBuf,
    /// Shared data sets (Reuters-21578, twitter topics, modern pools).
    #[arg(long, env = "DEALSIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Modern labels files (repeatable; default: every round in data/).
    #[arg(long)]
    labels: Vec<PathBuf>,
    /// Training sources: reuters, twitter, modern, headlines (the written 2012-2023 training
    /// headlines, data/DATA_CARD.md; they validate on their carve-out too), and funding, off by
    /// default (synthetic funding-round headlines; no gain on the real validation or test data).
    #[arg(long, value_delimiter = ',', default_value = "reuters,twitter,modern,headlines")]
    sources: Vec<String>,
    #[arg(long, default_value_t = 20261126)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Window in tokens, special tokens included (also what the server reads by default).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long, default_value_t = 1.5e-4)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.06)]
    warmup_fraction: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Loss weight of deal examples (class imbalance).
    #[arg(long, default_value_t = 2.0)]
    deal_weight: f64,
    /// Cap a training source's non-deal examples (all its deals are kept): SOURCE=N
    /// (reuters, twitter, modern). Repeatable.
    #[arg(long = "limit", value_parser = parse_limit)]
    limits: Vec<(String, usize)>,
    /// Bottom encoder layers kept frozen (with the embeddings) for a faster backward pass.
    #[arg(long, default_value_t = 2)]
    frozen_layers: usize,
    /// Stop after this many steps (smoke tests).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value = "dealsift-minilm-l6")]
    model_id: String,
    #[arg(long, default_value = "1.8.0")]
    version: String,
    /// CPU threads (default: all cores).
    #[arg(long, env = "DEALSIFT_THREADS")]
    threads: Option<usize>,
    /// Inverse L2 strength of the whole-document lexical model (see models/*/MODEL_CARD.md).
    #[arg(long, default_value_t = 8.0)]
    lexical_c: f64,
    /// Hash buckets of the lexical model's words and word pairs.
    #[arg(long, default_value_t = dealsift::model::lexical::DEFAULT_BUCKETS)]
    lexical_buckets: usize,
    /// Which texts the lexical stage joins (1.7.0: long-texts).
    #[arg(long, value_enum, default_value = "all-texts")]
    lexical_joins: JoinsArg,
    /// Which words the lexical model reads (1.7.0: all-words).
    #[arg(long, value_enum, default_value = "content-words")]
    lexical_vocabulary: VocabularyArg,
    /// Also train the lexical model on the whole Wikinews articles of the labelled modern
    /// training items, when the modern source trains (1.7.0: false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    lexical_articles: bool,
    /// Train the transformer alone, without the lexical stage (see the model card's "Model").
    #[arg(long)]
    no_lexical: bool,
    /// Keep the transformer already in --out and fit only the lexical model and how it joins
    /// (minutes instead of an hour); --version names the result. Rewrites --out's config.json,
    /// so --out must be given (a copy of a model, not the shipped one by accident).
    #[arg(long, conflicts_with = "no_lexical")]
    lexical_only: bool,
}

fn parse_limit(s: &str) -> Result<(String, usize), String> {
    let (name, n) = s.split_once('=').ok_or("expected SOURCE=N")?;
    Ok((name.to_string(), n.parse().map_err(|e| format!("{n}: {e}"))?))
}

#[derive(Parser)]
struct EvalArgs {
    /// Model directory, scored in process (ignored with --server).
    #[arg(long, env = "DEALSIFT_MODEL_DIR", default_value = DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    /// Score through a running server instead (e.g. http://127.0.0.1:50051).
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    auth: ClientArgs,
    #[arg(long, env = "DEALSIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Modern labels files (repeatable; default: every round in data/).
    #[arg(long)]
    labels: Vec<PathBuf>,
    /// Sets to score (twitter-definition: the twitter test rows labelled by the deal definition;
    /// headlines: 2024-2026 publisher-style headlines, or with --validation the carve-out of
    /// the 2012-2023 training headlines; see data/DATA_CARD.md).
    #[arg(long, value_delimiter = ',', default_value = "reuters,twitter,twitter-definition,modern,headlines")]
    sets: Vec<String>,
    /// Score the validation split instead of the test sets (to inspect calibration and the
    /// threshold on the data they were chosen on).
    #[arg(long)]
    validation: bool,
    /// Decision threshold (default: the model's calibrated one).
    #[arg(long)]
    threshold: Option<f32>,
    /// Worst errors listed per set.
    #[arg(long, default_value_t = 10)]
    worst: usize,
    /// Texts longer than the model window: truncated, as in training, or scored by windows.
    #[arg(long, value_enum, default_value = "truncate")]
    long_text: LongTextArg,
    /// Also write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write every document's deal probability here, as JSON lines (set, id, deal,
    /// subtype, deal_probability), for error analysis and comparing models item by item.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LongTextArg {
    Truncate,
    ChunkMax,
    ChunkMean,
}

impl From<LongTextArg> for LongText {
    fn from(v: LongTextArg) -> Self {
        match v {
            LongTextArg::Truncate => LongText::Truncate,
            LongTextArg::ChunkMax => LongText::ChunkMax,
            LongTextArg::ChunkMean => LongText::ChunkMean,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum JoinsArg {
    /// Texts longer than the window (the transformer reads the rest of shorter ones).
    LongTexts,
    /// Every text.
    AllTexts,
}

impl From<JoinsArg> for Joins {
    fn from(v: JoinsArg) -> Self {
        match v {
            JoinsArg::LongTexts => Joins::LongTexts,
            JoinsArg::AllTexts => Joins::AllTexts,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum VocabularyArg {
    AllWords,
    /// Without English function words (articles, pronouns, auxiliaries, prepositions, ...).
    ContentWords,
}

impl From<VocabularyArg> for Vocabulary {
    fn from(v: VocabularyArg) -> Self {
        match v {
            VocabularyArg::AllWords => Vocabulary::AllWords,
            VocabularyArg::ContentWords => Vocabulary::ContentWords,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// The candle model on the CPU.
    Cpu,
    /// AWS Neuron (Trainium): the model's compiled NEFFs (neuron/manifest.json) through libnrt.
    Neuron,
}

#[derive(Clone, Copy, ValueEnum)]
enum CpuKernelsArg {
    /// Token-packed batches and fused, vectorised f32 kernels.
    Fast,
    /// The candle model (the accuracy reference; slower).
    Reference,
}

impl From<CpuKernelsArg> for CpuKernels {
    fn from(v: CpuKernelsArg) -> Self {
        match v {
            CpuKernelsArg::Fast => CpuKernels::Fast,
            CpuKernelsArg::Reference => CpuKernels::Reference,
        }
    }
}

#[derive(Parser)]
struct ServeArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "DEALSIFT_MODEL_DIR", default_value = DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "DEALSIFT_ADDR", default_value = "0.0.0.0:50051")]
    addr: SocketAddr,
    /// PEM certificate chain for TLS on the gRPC port (with --tls-key); without it, plaintext.
    #[arg(long, env = "DEALSIFT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DEALSIFT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate: only clients presenting a certificate it signed are answered (mutual TLS).
    #[arg(long, env = "DEALSIFT_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Seconds a connection may take to finish its TLS handshake before it is closed.
    #[arg(long, env = "DEALSIFT_TLS_HANDSHAKE_TIMEOUT_S", default_value_t = 10)]
    tls_handshake_timeout_s: u64,
    /// File of API keys, one per line: every RPC then requires `authorization: Bearer <key>`
    /// except health, reflection and the KServe v2 probes. Use it with TLS.
    #[arg(long, env = "DEALSIFT_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Where Prometheus metrics are served (plain HTTP, GET /metrics); `off` disables them.
    #[arg(long, env = "DEALSIFT_METRICS_ADDR", default_value = "0.0.0.0:9464", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// Compute backend.
    #[arg(long, env = "DEALSIFT_BACKEND", value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// CPU implementation of the model (--backend cpu).
    #[arg(long, env = "DEALSIFT_CPU_KERNELS", value_enum, default_value = "fast")]
    cpu_kernels: CpuKernelsArg,
    /// CPU threads for the model's math (default: all cores).
    #[arg(long, env = "DEALSIFT_THREADS")]
    threads: Option<usize>,
    /// Folder holding the Neuron runtime library, libnrt.so.1 (--backend neuron).
    #[arg(long, env = "DEALSIFT_NEURON_LIB_DIR", default_value = dealsift::backend::neuron::DEFAULT_LIB_DIR)]
    neuron_lib_dir: PathBuf,
    /// Seconds one Neuron execution may take before it fails (sets NEURON_RT_EXEC_TIMEOUT).
    #[arg(long, env = "DEALSIFT_NEURON_EXEC_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    neuron_exec_timeout_s: u32,
    /// Cap on the model window in tokens (default: what the model was trained for).
    #[arg(long, env = "DEALSIFT_MAX_SEQUENCE_LENGTH")]
    max_sequence_length: Option<usize>,
    /// Padded tokens (rows x longest row) per batch.
    #[arg(long, env = "DEALSIFT_MAX_BATCH_TOKENS", default_value_t = 8192)]
    max_batch_tokens: usize,
    /// Sequences per batch.
    #[arg(long, env = "DEALSIFT_MAX_BATCH_SIZE", default_value_t = 64)]
    max_batch_size: usize,
    /// Sequences waiting in the queue before unary calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEALSIFT_MAX_QUEUE_SEQUENCES", default_value_t = 4096)]
    max_queue_sequences: usize,
    /// Microseconds the oldest queued sequence may wait for a fuller batch.
    #[arg(long, env = "DEALSIFT_MAX_QUEUE_DELAY_US", default_value_t = 2000)]
    max_queue_delay_us: u64,
    /// Documents per Classify call.
    #[arg(long, env = "DEALSIFT_MAX_DOCUMENTS_PER_REQUEST", default_value_t = 256)]
    max_documents_per_request: usize,
    /// Bytes of title + text per document.
    #[arg(long, env = "DEALSIFT_MAX_DOCUMENT_BYTES", default_value_t = 65536)]
    max_document_bytes: usize,
    /// Windows per document when chunking long texts; the rest is flagged truncated.
    #[arg(long, env = "DEALSIFT_MAX_CHUNKS_PER_DOCUMENT", default_value_t = 16)]
    max_chunks_per_document: usize,
    /// Unanswered messages per ClassifyStream before the server stops reading it.
    #[arg(long, env = "DEALSIFT_MAX_STREAM_IN_FLIGHT", default_value_t = 64)]
    max_stream_in_flight: usize,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "DEALSIFT_MAX_MESSAGE_BYTES", default_value_t = 32 << 20)]
    max_message_bytes: usize,
    /// Calls in progress at once on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client's further calls wait on its side until one ends.
    #[arg(long, env = "DEALSIFT_MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Seconds without traffic on a connection before an HTTP/2 ping (keeps idle streams alive
    /// through load balancers, finds vanished clients); below the balancer's idle timeout; 0: off.
    #[arg(long, env = "DEALSIFT_KEEPALIVE_INTERVAL_S", default_value_t = 30)]
    keepalive_interval_s: u64,
    /// Seconds a ping may wait for its answer before the connection is closed.
    #[arg(long, env = "DEALSIFT_KEEPALIVE_TIMEOUT_S", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_timeout_s: u64,
    /// Default handling of texts longer than the model window.
    #[arg(long, env = "DEALSIFT_LONG_TEXT", value_enum, default_value = "truncate")]
    long_text: LongTextArg,
}

#[derive(Parser)]
struct ClassifyCli {
    /// Texts to classify (each one document).
    texts: Vec<String>,
    #[command(flatten)]
    auth: ClientArgs,
    /// A file of documents: JSONL ({"id", "title", "text"}) or plain text, one per line.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Server address.
    #[arg(long, env = "DEALSIFT_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Decision threshold on the deal probability (default: the model's).
    #[arg(long)]
    threshold: Option<f32>,
    /// Texts longer than the model window (default: the server's).
    #[arg(long, value_enum)]
    long_text: Option<LongTextArg>,
    /// Documents per call.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

impl ServeArgs {
    fn batcher(&self) -> BatcherConfig {
        BatcherConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_size: self.max_batch_size,
            max_queue_sequences: self.max_queue_sequences,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
        }
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes the message already quotes
/// (our error types embed their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

fn run() -> anyhow::Result<()> {
    retain_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEALSIFT_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: escape codes in a log file or a collector get in the way.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Classify(args) => classify(args),
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::ExportCorpus(args) => export_corpus(args),
        Command::Bench(command) => bench(command),
    }
}

/// Sizes the CPU kernels' thread pool (rayon reads the variable on first use), while the
/// process still has one thread.
fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Backend(args) => {
            set_threads(args.threads);
            let kernels: CpuKernels = args.cpu_kernels.into();
            let rows = bench::backend_grid(&args.model_dir, kernels, &args.batch, &args.seq, Duration::from_secs_f64(args.seconds), args.iterations)?;
            if !args.json {
                let simd = *dealsift_cpu_encoder::kernels::SIMD;
                println!("threads {}, row kernels {simd:?}", rayon::current_num_threads());
                println!("kernels    batch  seq  iters  median ms  p10 ms  p90 ms   seq/s");
            }
            for r in rows {
                if args.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("{:<9} {:>6} {:>4} {:>6} {:>10.1} {:>7.1} {:>7.1} {:>7.1}", r.kernels, r.batch, r.seq, r.iterations, r.median_ms, r.p10_ms, r.p90_ms, r.sequences_per_s);
                }
            }
            Ok(())
        }
        BenchCommand::Workload(args) => {
            let data_dir = args.data_dir.unwrap_or_else(dealsift::data::default_data_dir);
            let out = args.out.unwrap_or_else(bench::default_workload_path);
            let n = bench::write_workload(&data_dir, &out)?;
            println!("wrote {n} documents to {}", out.display());
            Ok(())
        }
        BenchCommand::Load(args) => {
            set_threads(args.threads);
            let workload = args.workload.clone().unwrap_or_else(bench::default_workload_path);
            let docs = std::sync::Arc::new(bench::read_workload(&workload).with_context(|| "no workload: run `dealsift bench workload` or pass --workload")?);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let batcher = ServeArgs::parse_from(["serve"]).batcher();
                let target = bench::Target::open(args.server.as_deref(), &args.auth.client(), &args.model_dir, batcher).await?;
                let (warmup, duration) = (Duration::from_secs_f64(args.warmup), Duration::from_secs_f64(args.duration));
                let mut paces = vec![match args.rate {
                    Some(calls_per_s) => bench::Pace::Open { calls_per_s },
                    None => bench::Pace::Closed { concurrency: args.concurrency },
                }];
                let mut i = 0;
                while i < paces.len() {
                    let report = bench::run_load(&target, docs.clone(), args.docs_per_call, paces[i], warmup, duration).await?;
                    if args.json {
                        println!("{}", serde_json::to_string(&report)?);
                    } else {
                        print!("{}", bench::render_load(&report));
                    }
                    if args.sweep && i == 0 {
                        let max_calls = report.calls as f64 / report.seconds;
                        paces.extend([0.5, 0.9].map(|f| bench::Pace::Open { calls_per_s: f * max_calls }));
                    }
                    i += 1;
                }
                Ok(())
            })
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    set_threads(args.threads);
    let neuron = NeuronOptions { lib_dir: args.neuron_lib_dir.clone(), exec_timeout_s: args.neuron_exec_timeout_s };
    if matches!(args.backend, BackendArg::Neuron) {
        // libnrt reads it at nrt_init; set here, while the process has a single thread.
        std::env::set_var(neuron::EXEC_TIMEOUT_ENV, neuron.exec_timeout_s.to_string());
    }
    let batcher = args.batcher();
    let limits = Limits {
        max_documents_per_request: args.max_documents_per_request,
        max_document_bytes: args.max_document_bytes,
        max_chunks_per_document: args.max_chunks_per_document,
        max_stream_in_flight: args.max_stream_in_flight,
        default_long_text: args.long_text.into(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let handshake_timeout = Duration::from_secs(args.tls_handshake_timeout_s);
            Some(server::tls_config(cert, key, args.tls_client_ca.as_deref(), handshake_timeout)?)
        }
        _ => None,
    };
    let api_keys = args.api_key_file.as_deref().map(dealsift::auth::ApiKeys::from_file).transpose()?;
    if api_keys.is_some() && tls.is_none() {
        tracing::warn!("API keys without TLS travel in clear text: add --tls-cert and --tls-key, or terminate TLS in front of the server");
    }
    let api_key_count = api_keys.as_ref().map_or(0, |k| k.count());
    let reload = Arc::new(tokio::sync::Notify::new());
    let config = ServerConfig {
        batcher: batcher.clone(),
        limits,
        max_message_bytes: args.max_message_bytes,
        max_concurrent_streams: args.max_concurrent_streams,
        keepalive: (args.keepalive_interval_s > 0)
            .then(|| server::Keepalive { interval: Duration::from_secs(args.keepalive_interval_s), timeout: Duration::from_secs(args.keepalive_timeout_s) }),
        tls,
        reload: Some(reload.clone()),
        api_keys,
    };
    let spec = ModelSpec { dir: args.model_dir.clone(), max_sequence_length: args.max_sequence_length, cpu_kernels: args.cpu_kernels.into() };
    let max_chunks = args.max_chunks_per_document;
    let runtime = tokio::runtime::Runtime::new()?;
    let served = runtime.block_on(async move {
        // First: from here on SIGHUP reloads instead of ending the process.
        reload_on_hangup(reload)?;
        let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("cannot listen on {}", args.addr))?;
        let tls = match (&args.tls_cert, &args.tls_client_ca) {
            (None, _) => "off",
            (Some(_), None) => "on",
            (Some(_), Some(_)) => "mutual",
        };
        tracing::info!(addr = %listener.local_addr()?, tls, api_keys = api_key_count, model_dir = %spec.dir.display(), "listening; loading model");
        let metrics_listener = match args.metrics_addr.0 {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics (--metrics-addr; 'off' disables)"))?;
                tracing::info!(addr = %l.local_addr()?, "HTTP: Prometheus metrics on GET /metrics, health on GET /health");
                Some(l)
            }
            None => None,
        };
        let load = move |hooks| match args.backend {
            BackendArg::Cpu => server::load_cpu(&spec, batcher.clone(), max_chunks, hooks),
            BackendArg::Neuron => server::load_neuron(&spec, &neuron, batcher.clone(), max_chunks, hooks),
        };
        server::run(listener, metrics_listener, load, config, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    });
    // A model load still running (a reload cut short by shutdown) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// How the client commands reach a server: TLS (for an https:// server) and an API key.
#[derive(clap::Args)]
struct ClientArgs {
    /// PEM CA certificate the server's certificate must chain to (default: the system's roots).
    #[arg(long, requires = "server")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (with --tls-key).
    #[arg(long, requires_all = ["tls_key", "server"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File whose first key line (as in the server's --api-key-file) is sent as
    /// `authorization: Bearer <key>` (with --server).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
}

impl ClientArgs {
    fn client(&self) -> dealsift::client::ClientAuth {
        let identity = self.tls_cert.clone().zip(self.tls_key.clone());
        dealsift::client::ClientAuth { ca: self.tls_ca.clone(), identity, api_key_file: self.api_key_file.clone() }
    }
}

/// `--metrics-addr`: an address, or none for `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(value: &str) -> Result<MetricsAddr, String> {
    if value == "off" {
        return Ok(MetricsAddr(None));
    }
    value.parse().map(|a| MetricsAddr(Some(a))).map_err(|e| format!("{e}: give an address such as 0.0.0.0:9464, or off"))
}

/// SIGHUP reloads the model from `--model-dir` (the server's `reload` notification).
#[cfg(unix)]
fn reload_on_hangup(reload: Arc<tokio::sync::Notify>) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the model from --model-dir");
            reload.notify_one();
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_hangup(_reload: Arc<tokio::sync::Notify>) -> anyhow::Result<()> {
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn classify(args: ClassifyCli) -> anyhow::Result<()> {
    let mut documents: Vec<_> = args
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| dealsift::proto::Document { id: (i + 1).to_string(), text: t.clone(), title: None })
        .collect();
    let progress = args.file.is_some();
    if let Some(path) = &args.file {
        documents.extend(dealsift::client::read_documents(path)?);
    }
    anyhow::ensure!(!documents.is_empty(), "nothing to classify: pass texts or --file");
    let long_text = args
        .long_text
        .map_or(dealsift::proto::LongText::Unspecified, |mode| LongText::from(mode).into());
    let request = dealsift::client::ClassifyArgs {
        addr: args.server,
        auth: args.auth.client(),
        documents,
        batch_size: args.batch_size,
        threshold: args.threshold,
        long_text,
        progress,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    runtime.block_on(dealsift::client::classify(request, &mut out))?;
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    set_threads(args.threads);
    anyhow::ensure!(args.lexical_c > 0.0 && args.lexical_buckets > 0, "--lexical-c and --lexical-buckets must be positive");
    let lexical = dealsift::train::LexicalConfig {
        recipe: Recipe { buckets: args.lexical_buckets, vocabulary: args.lexical_vocabulary.into(), deal_weight: args.deal_weight, c: args.lexical_c },
        joins: args.lexical_joins.into(),
        articles: args.lexical_articles,
    };
    let data_dir = args.data_dir.unwrap_or_else(dealsift::data::default_data_dir);
    if args.lexical_only {
        anyhow::ensure!(
            args.out != std::path::Path::new(DEFAULT_MODEL_DIR),
            "--lexical-only rewrites the model directory's config.json: copy the model and pass the copy as --out"
        );
        let report = dealsift::train::add_lexical(&args.out, &data_dir, &label_files(args.labels), &args.sources, &lexical, &args.version)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    anyhow::ensure!(
        args.base_model.join("model.safetensors").is_file(),
        "no base model at {}: run tools/fetch_base_model.sh first",
        args.base_model.display()
    );
    let config = dealsift::train::TrainConfig {
        base_model: args.base_model,
        out_dir: args.out,
        data_dir,
        labels: label_files(args.labels),
        sources: args.sources,
        model_id: args.model_id,
        version: args.version,
        seed: args.seed,
        epochs: args.epochs,
        batch_size: args.batch_size,
        max_len: args.max_len,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        warmup_fraction: args.warmup_fraction,
        max_grad_norm: args.max_grad_norm,
        deal_weight: args.deal_weight,
        per_source_limit: args.limits,
        frozen_layers: args.frozen_layers,
        max_steps: args.max_steps,
        lexical: (!args.no_lexical).then_some(lexical),
    };
    let report = dealsift::train::train(config)?;
    println!("{}", serde_json::to_string_pretty(&report.validation)?);
    if let Some(lexical) = &report.lexical {
        println!("joined with the lexical model (weight {:.2}):\n{}", lexical.weight, serde_json::to_string_pretty(&lexical.validation)?);
    }
    println!("temperature {:.4} threshold {:.2} steps {} in {:.0}s", report.temperature, report.threshold, report.steps, report.seconds);
    Ok(())
}

fn export_corpus(args: ExportCorpusArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let data_dir = args.data_dir.unwrap_or_else(dealsift::data::default_data_dir);
    let corpus = dealsift::data::Corpus::load(&data_dir, &label_files(args.labels))?;
    let file = std::fs::File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (split, sets) in [("train", &corpus.train), ("validation", &corpus.validation), ("test", &corpus.test)] {
        for (name, set) in sets {
            for e in set {
                let record = serde_json::json!({
                    "set": name, "split": split, "id": e.id, "title": e.title, "text": e.text, "deal": e.deal, "subtype": e.subtype,
                });
                writeln!(out, "{record}")?;
            }
            tracing::info!(split, set = name, examples = set.len(), deals = set.iter().filter(|e| e.deal).count(), "exported");
        }
    }
    out.flush()?;
    Ok(())
}

/// The labels files given, or every committed round.
fn label_files(given: Vec<PathBuf>) -> Vec<PathBuf> {
    if given.is_empty() {
        dealsift::data::modern::default_label_paths()
    } else {
        given
    }
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(dealsift::data::default_data_dir);
    let labels = label_files(args.labels);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (mut scorer, default_threshold) = match &args.server {
            Some(url) => {
                let mut client = dealsift::client::classifier(url, &args.auth.client()).await?;
                let info = client.get_model_info(dealsift::proto::GetModelInfoRequest {}).await?.into_inner();
                (dealsift::eval::Scorer::Remote(Box::new(client)), info.default_threshold)
            }
            None => {
                anyhow::ensure!(args.auth.api_key_file.is_none(), "--api-key-file is for a server: add --server");
                let spec = ModelSpec { dir: args.model_dir.clone(), max_sequence_length: None, cpu_kernels: CpuKernels::Fast };
                let batcher = ServeArgs::parse_from(["serve"]).batcher();
                let engine = server::load_cpu(&spec, batcher, 16, server::EngineHooks::detached())?;
                let threshold = engine.model.threshold;
                (dealsift::eval::Scorer::Local(Box::new(engine)), threshold)
            }
        };
        let threshold = args.threshold.unwrap_or(default_threshold);
        let corpus = dealsift::data::Corpus::load(&data_dir, &labels)?;
        let mut reports = Vec::new();
        let mut predictions = match &args.predictions {
            Some(path) => Some((
                std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?),
                path,
            )),
            None => None,
        };
        let sets = if args.validation { &corpus.validation } else { &corpus.test };
        for (name, set) in sets {
            if !args.sets.iter().any(|s| s == name) {
                continue;
            }
            let started = std::time::Instant::now();
            let probs = scorer.score(set, args.long_text.into()).await?;
            if let Some((out, path)) = predictions.as_mut() {
                for (example, p) in set.iter().zip(&probs) {
                    let row = serde_json::json!({"set": name, "id": example.id, "deal": example.deal,
                                                 "subtype": example.subtype, "deal_probability": p});
                    writeln!(out, "{row}").with_context(|| format!("cannot write {}", path.display()))?;
                }
            }
            let report = dealsift::eval::evaluate(name, set, &probs, threshold, args.worst);
            print!("{}", dealsift::eval::render(&report));
            println!("   ({:.1}s)", started.elapsed().as_secs_f64());
            reports.push(report);
        }
        if let Some((mut out, path)) = predictions {
            out.flush().with_context(|| format!("cannot write {}", path.display()))?;
        }
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
        }
        Ok(())
    })
}
