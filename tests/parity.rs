//! The candle model and tokenizer against Hugging Face `transformers` / `tokenizers` on the
//! committed fixture (reference produced by tools/fixture/make_fixture.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dealsift::model::{BertClassifier, BertConfig};
use dealsift::tokenize::{LongText, TextEncoder};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    padded_batch: PaddedBatch,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    input_ids: Vec<u32>,
    logits: Vec<f32>,
}

#[derive(Deserialize)]
struct PaddedBatch {
    seq_len: usize,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
}

const TOLERANCE: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert")
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap()
}

fn model() -> BertClassifier {
    let cfg = BertConfig::from_file(&fixture().join("config.json")).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[fixture().join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
    BertClassifier::load(vb, &cfg).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn run(model: &BertClassifier, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let (rows, seq) = (ids.len(), ids[0].len());
    let ids = Tensor::from_vec(ids.concat(), (rows, seq), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask.concat(), (rows, seq), &Device::Cpu).unwrap();
    model.forward(&ids, &ids.zeros_like().unwrap(), &mask).unwrap().to_vec2().unwrap()
}

#[test]
fn single_sequence_logits_match_transformers() {
    let (reference, model) = (reference(), model());
    for case in &reference.cases {
        let got = run(&model, &[case.input_ids.clone()], &[vec![1; case.input_ids.len()]]);
        let diff = max_abs_diff(&got[0], &case.logits);
        assert!(diff <= TOLERANCE, "{}: max abs diff {diff} > {TOLERANCE} ({:?} vs {:?})", case.name, got[0], case.logits);
    }
}

#[test]
fn padded_batch_logits_match_transformers() {
    let (reference, model) = (reference(), model());
    let batch = &reference.padded_batch;
    assert!(batch.input_ids.iter().all(|r| r.len() == batch.seq_len));
    let got = run(&model, &batch.input_ids, &batch.attention_mask);
    for (row, (g, want)) in got.iter().zip(&batch.logits).enumerate() {
        let diff = max_abs_diff(g, want);
        assert!(diff <= TOLERANCE, "row {row}: max abs diff {diff}");
    }
}

#[test]
fn tokenizer_matches_hugging_face_tokenizers() {
    let encoder = TextEncoder::from_file(&fixture().join("tokenizer.json"), 512).unwrap();
    for case in reference().cases {
        let enc = encoder.encode(None, &case.text, LongText::Truncate, 1).unwrap();
        assert_eq!(enc.windows, vec![case.input_ids.clone()], "{}", case.name);
        assert_eq!(enc.token_count, case.input_ids.len() - 2);
        assert!(!enc.truncated);
    }
}

#[test]
fn long_text_is_truncated_or_chunked_within_the_window() {
    let encoder = TextEncoder::from_file(&fixture().join("tokenizer.json"), 64).unwrap();
    let long = reference().cases.into_iter().max_by_key(|c| c.input_ids.len()).unwrap();
    let content = &long.input_ids[1..long.input_ids.len() - 1];

    let truncated = encoder.encode(None, &long.text, LongText::Truncate, 16).unwrap();
    assert!(truncated.truncated);
    assert_eq!(truncated.windows.len(), 1);
    assert_eq!(truncated.windows[0][1..63], content[..62]);

    let chunked = encoder.encode(None, &long.text, LongText::ChunkMean, 16).unwrap();
    assert!(!chunked.truncated);
    assert!(chunked.windows.len() > 1 && chunked.windows.iter().all(|w| w.len() <= 64));
    // Every content token is read, windows overlap, and the last window ends the text.
    assert_eq!(chunked.windows.last().unwrap()[..].iter().rev().nth(1), content.last());
    assert_eq!(chunked.token_count, content.len());

    let capped = encoder.encode(None, &long.text, LongText::ChunkMax, 2).unwrap();
    assert_eq!(capped.windows.len(), 2);
    assert!(capped.truncated);
}
