//! The shipped default model, through the same engine the server runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dealsift::batcher::BatcherConfig;
use dealsift::engine::{Admission, Doc, Engine, Options};
use dealsift::proto::Label;
use dealsift::server::{load_cpu, EngineHooks, ModelSpec};
use dealsift::tokenize::LongText;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/dealsift-minilm-l6")
}

fn engine() -> Engine {
    let spec = ModelSpec { dir: shipped(), max_sequence_length: None, cpu_kernels: Default::default() };
    let batcher = BatcherConfig { max_batch_tokens: 8192, max_batch_size: 32, max_queue_sequences: 256, max_queue_delay: Duration::from_millis(1) };
    load_cpu(&spec, batcher, 16, EngineHooks::detached()).expect("the shipped model loads")
}

async fn deal_probability(engine: &Engine, text: &str, long_text: LongText) -> f32 {
    let doc = Doc { id: "x".into(), title: None, text: text.into() };
    let options = Options { threshold: engine.model.threshold, long_text };
    engine.classify(vec![doc], options, None, Admission::Wait).await.unwrap()[0].deal_probability
}

#[tokio::test]
async fn shipped_model_is_calibrated_and_versioned() {
    let engine = engine();
    let m = &engine.model;
    assert_eq!(m.model_id, "dealsift-minilm-l6");
    assert_eq!(m.labels, ["non_deal", "deal"]);
    assert!((0.05..=0.95).contains(&m.threshold), "threshold {}", m.threshold);
    assert!(m.temperature > 0.0);
    let size = std::fs::metadata(shipped().join("model.safetensors")).unwrap().len();
    assert!(size <= 50 << 20, "weights are {size} bytes");
}

#[tokio::test]
async fn shipped_model_separates_clear_cases() {
    let engine = engine();
    let deals = [
        "Microsoft agrees to acquire Activision Blizzard for $68.7 billion in cash",
        "Fintech startup Ramp raises $500 million in Series E funding led by Founders Fund",
        "Arm prices its IPO at $51 a share, valuing the chip designer at $54.5 billion",
    ];
    let others = [
        "Apple unveils new iPhone with faster chip and better camera",
        "Central bank holds interest rates steady amid inflation worries",
        "Heavy rain floods streets across the city as storms continue",
    ];
    for text in deals {
        let p = deal_probability(&engine, text, LongText::Truncate).await;
        assert!(p >= engine.model.threshold, "{text}: {p}");
    }
    for text in others {
        let p = deal_probability(&engine, text, LongText::Truncate).await;
        assert!(p < engine.model.threshold, "{text}: {p}");
    }
}

/// The article the product was conceived from (`../shared/seed-article.txt`) is a deal:
/// its first paragraph alone and the whole article, p >= 0.9.
#[tokio::test]
async fn seed_article_is_a_deal() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/seed-article.txt");
    let Ok(article) = std::fs::read_to_string(&path) else {
        eprintln!("SKIPPED: {} not found", path.display());
        return;
    };
    let engine = engine();
    let first = article.lines().next().unwrap();
    for (what, text, mode) in [
        ("first paragraph", first, LongText::Truncate),
        ("whole article, truncated", article.as_str(), LongText::Truncate),
        ("whole article, chunk-max", article.as_str(), LongText::ChunkMax),
    ] {
        let p = deal_probability(&engine, text, mode).await;
        assert!(p >= 0.9, "{what}: p = {p}");
        eprintln!("seed article, {what}: p = {p:.4}");
    }
    let result = engine
        .classify(vec![Doc { id: "seed".into(), title: None, text: article.clone() }], Options { threshold: engine.model.threshold, long_text: LongText::Truncate }, None, Admission::Wait)
        .await
        .unwrap();
    assert_eq!(result[0].label, Label::Deal as i32);
}
