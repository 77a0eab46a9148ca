//! `dealsift classify`: a command-line client that prints one JSON line per document.

use std::io::{BufRead, Write};
use std::path::Path;

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
    scores: serde_json::Map<String, serde_json::Value>,
    token_count: u32,
    truncated: bool,
    chunks: u32,
}

fn output_line(r: &DocumentResult) -> OutputLine<'_> {
    OutputLine {
        id: &r.id,
        label: if r.label == Label::Deal as i32 { "deal" } else { "non_deal" },
        deal_probability: r.deal_probability,
        scores: r.scores.iter().map(|s| (s.label.clone(), serde_json::json!(s.score))).collect(),
        token_count: r.token_count,
        truncated: r.truncated,
        chunks: r.chunks,
    }
}

pub struct ClassifyArgs {
    pub addr: String,
    pub documents: Vec<Document>,
    pub batch_size: usize,
    pub threshold: Option<f32>,
    pub long_text: LongText,
    pub progress: bool,
}

/// Sends documents in calls of `batch_size` and writes results to `out` in input order.
pub async fn classify(args: ClassifyArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = DealClassifierClient::connect(args.addr.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.addr))?
        .max_decoding_message_size(64 << 20);
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
