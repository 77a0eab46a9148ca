//! `dealsift eval`: scores the test sets through the serving pipeline (in process, or a
//! running server over gRPC) and reports precision, recall, F1, accuracy, ROC-AUC, the
//! confusion matrix and the worst errors.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::Example;
use crate::engine::{Admission, Doc, Engine, Options};
use crate::metrics::{roc_auc, Confusion};
use crate::proto::{ClassifyOptions, ClassifyRequest, Document};
use crate::tokenize::LongText;

/// Where documents are scored.
pub enum Scorer {
    Local(Box<Engine>),
    Remote(Box<crate::client::Client>),
}

const CALL_SIZE: usize = 64;

impl Scorer {
    /// Deal probabilities, in input order, with `long_text` deciding texts past the window.
    pub async fn score(&mut self, examples: &[Example], long_text: LongText) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(CALL_SIZE) {
            match self {
                Scorer::Local(engine) => {
                    let docs = chunk.iter().map(|e| Doc { id: e.id.clone(), title: e.title.clone(), text: e.text.clone() }).collect();
                    let options = Options { threshold: engine.model.threshold, long_text };
                    let results = engine.classify(docs, options, None, Admission::Wait).await?;
                    out.extend(results.iter().map(|r| r.deal_probability));
                }
                Scorer::Remote(client) => {
                    let documents = chunk.iter().map(|e| Document { id: e.id.clone(), title: e.title.clone(), text: e.text.clone() }).collect();
                    let request = ClassifyRequest {
                        documents,
                        options: Some(ClassifyOptions { threshold: None, long_text: crate::proto::LongText::from(long_text) as i32 }),
                    };
                    let response = client.classify(request).await.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
                    out.extend(response.into_inner().results.iter().map(|r| r.deal_probability));
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorCase {
    pub id: String,
    pub deal_probability: f32,
    pub truth: bool,
    pub subtype: Option<String>,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct SetEval {
    pub name: String,
    pub examples: usize,
    pub deals: usize,
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub accuracy: f64,
    pub roc_auc: f64,
    pub confusion: Confusion,
    /// Recall per deal subtype (sets with subtypes only).
    pub recall_by_subtype: BTreeMap<String, (usize, usize)>,
    pub false_positives: Vec<ErrorCase>,
    pub false_negatives: Vec<ErrorCase>,
}

pub fn evaluate(name: &str, examples: &[Example], probs: &[f32], threshold: f32, worst: usize) -> SetEval {
    let truth: Vec<bool> = examples.iter().map(|e| e.deal).collect();
    let c = Confusion::new(probs, &truth, threshold);
    let mut recall_by_subtype = BTreeMap::new();
    for (ex, &p) in examples.iter().zip(probs) {
        if let (true, Some(s)) = (ex.deal, &ex.subtype) {
            let entry = recall_by_subtype.entry(s.clone()).or_insert((0, 0));
            entry.1 += 1;
            if p >= threshold {
                entry.0 += 1;
            }
        }
    }
    let case = |i: usize| ErrorCase {
        id: examples[i].id.clone(),
        deal_probability: probs[i],
        truth: truth[i],
        subtype: examples[i].subtype.clone(),
        text: snippet(&examples[i]),
    };
    let mut fps: Vec<usize> = (0..examples.len()).filter(|&i| !truth[i] && probs[i] >= threshold).collect();
    fps.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut fns: Vec<usize> = (0..examples.len()).filter(|&i| truth[i] && probs[i] < threshold).collect();
    fns.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    SetEval {
        name: name.to_string(),
        examples: examples.len(),
        deals: truth.iter().filter(|&&t| t).count(),
        threshold,
        precision: c.precision(),
        recall: c.recall(),
        f1: c.f1(),
        accuracy: c.accuracy(),
        roc_auc: roc_auc(probs, &truth),
        confusion: c,
        recall_by_subtype,
        false_positives: fps.into_iter().take(worst).map(case).collect(),
        false_negatives: fns.into_iter().take(worst).map(case).collect(),
    }
}

fn snippet(ex: &Example) -> String {
    let full = match &ex.title {
        Some(t) => format!("{t} | {}", ex.text),
        None => ex.text.clone(),
    };
    let mut s: String = full.chars().take(160).collect();
    if s.len() < full.len() {
        s.push('…');
    }
    s
}

/// A human-readable report of one set.
pub fn render(e: &SetEval) -> String {
    let c = &e.confusion;
    let mut out = format!(
        "== {} ({} documents, {} deals, threshold {:.2})\n   precision {:.4}  recall {:.4}  F1 {:.4}  accuracy {:.4}  ROC-AUC {:.4}\n   confusion: TP {}  FP {}  FN {}  TN {}\n",
        e.name, e.examples, e.deals, e.threshold, e.precision, e.recall, e.f1, e.accuracy, e.roc_auc, c.tp, c.fp, c.fn_, c.tn
    );
    if !e.recall_by_subtype.is_empty() {
        let parts: Vec<String> = e.recall_by_subtype.iter().map(|(s, (hit, n))| format!("{s} {hit}/{n}")).collect();
        out += &format!("   recall by subtype: {}\n", parts.join(", "));
    }
    for (title, cases) in [("worst false positives", &e.false_positives), ("worst false negatives", &e.false_negatives)] {
        if !cases.is_empty() {
            out += &format!("   {title}:\n");
            for c in cases {
                out += &format!("     {:.3} {} {}\n", c.deal_probability, c.id, c.text);
            }
        }
    }
    out
}
