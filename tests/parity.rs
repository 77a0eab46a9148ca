//! Both CPU model implementations (the fast encoder and the candle reference) and the
//! tokenizer against Hugging Face `transformers` / `tokenizers` on the committed fixture
//! (reference produced by tools/fixture/make_fixture.py).

use std::path::{Path, PathBuf};

use dealsift::backend::cpu::{CpuBackend, CpuKernels};
use dealsift::backend::{Backend, Batch};
use dealsift::model::BertConfig;
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

const KERNELS: [CpuKernels; 2] = [CpuKernels::Fast, CpuKernels::Reference];

fn model(kernels: CpuKernels) -> CpuBackend {
    let cfg = BertConfig::from_file(&fixture().join("config.json")).unwrap();
    CpuBackend::load(&fixture(), &cfg, 64, 512, kernels).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn run(model: &mut CpuBackend, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let batch = Batch { input_ids: ids.concat(), attention_mask: mask.concat(), rows: ids.len(), seq: ids[0].len() };
    model.predict(&batch).unwrap()
}

#[test]
fn single_sequence_logits_match_transformers() {
    let reference = reference();
    for kernels in KERNELS {
        let mut model = model(kernels);
        for case in &reference.cases {
            let got = run(&mut model, std::slice::from_ref(&case.input_ids), &[vec![1; case.input_ids.len()]]);
            let diff = max_abs_diff(&got[0], &case.logits);
            assert!(diff <= TOLERANCE, "{kernels:?} {}: max abs diff {diff} > {TOLERANCE} ({:?} vs {:?})", case.name, got[0], case.logits);
        }
    }
}

#[test]
fn padded_batch_logits_match_transformers() {
    let reference = reference();
    let batch = &reference.padded_batch;
    assert!(batch.input_ids.iter().all(|r| r.len() == batch.seq_len));
    for kernels in KERNELS {
        let got = run(&mut model(kernels), &batch.input_ids, &batch.attention_mask);
        for (row, (g, want)) in got.iter().zip(&batch.logits).enumerate() {
            let diff = max_abs_diff(g, want);
            assert!(diff <= TOLERANCE, "{kernels:?} row {row}: max abs diff {diff}");
        }
    }
}

/// The fast encoder skips padding and computes the last layer for [CLS] only: on a mixed
/// batch (lengths 1 to 300, bucket-filler rows) it must still agree with the reference,
/// and a reused workspace must not leak state between calls of different shapes.
#[test]
fn fast_encoder_matches_reference_on_mixed_batches() {
    let (mut fast, mut reference) = (model(CpuKernels::Fast), model(CpuKernels::Reference));
    let lengths = [1usize, 2, 7, 64, 300, 33, 5, 128, 1];
    let seq = 300;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (row, &len) in lengths.iter().enumerate() {
        let tokens: Vec<u32> = (0..seq).map(|i| if i < len { 101 + ((i * 7919 + row * 104_729) % 30_000) as u32 } else { 0 }).collect();
        ids.push(tokens);
        mask.push((0..seq).map(|i| u32::from(i < len)).collect::<Vec<u32>>());
    }
    for _ in 0..2 {
        let (got, want) = (run(&mut fast, &ids, &mask), run(&mut reference, &ids, &mask));
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = max_abs_diff(g, w);
            assert!(diff <= 1e-5, "row {row} (length {}): max abs diff {diff}", lengths[row]);
        }
        let small = run(&mut fast, &ids[..2].iter().map(|r| r[..8].to_vec()).collect::<Vec<_>>(), &mask[..2].iter().map(|r| r[..8].to_vec()).collect::<Vec<_>>());
        assert!(max_abs_diff(&small[0], &want[0]) <= 1e-5 && max_abs_diff(&small[1], &want[1]) <= 1e-5);
    }
}

#[test]
fn fast_encoder_rejects_malformed_batches() {
    let mut fast = model(CpuKernels::Fast);
    let holes = Batch { input_ids: vec![101, 7, 102, 0], attention_mask: vec![1, 0, 1, 0], rows: 1, seq: 4 };
    let message = fast.predict(&holes).unwrap_err().to_string();
    assert!(message.contains("ones then zeros"), "{message}");
    let oov = Batch { input_ids: vec![101, 40_000], attention_mask: vec![1, 1], rows: 1, seq: 2 };
    assert!(fast.predict(&oov).unwrap_err().to_string().contains("outside the vocabulary"));
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
