//! `dealsift train`: fine-tunes a pretrained BERT encoder into the deal classifier with
//! candle (AdamW, warmup + linear decay, class weighting), calibrates it on validation
//! data, and writes a Hugging Face-style model directory the server loads unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::{Batch, Bucket};
use crate::data::{Corpus, Example};
use crate::metrics::{best_threshold, fit_temperature, roc_auc, Confusion};
use crate::model::config::{Joins, LexicalMeta};
use crate::model::{lexical, BertClassifier, BertConfig, Kernels, LexicalModel};
use crate::tokenize::{LongText, TextEncoder};

/// Files copied from the base model directory into the trained one.
const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"];

#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub base_model: PathBuf,
    pub out_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Modern labels files, one per annotation round.
    pub labels: Vec<PathBuf>,
    /// Training sources used (of reuters, twitter, modern, funding, headlines); validation has
    /// every pool's carve-out, and the headlines' when they train (`Corpus::validation_for`).
    pub sources: Vec<String>,
    pub model_id: String,
    pub version: String,
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Training window in tokens (special tokens included); also the served window.
    pub max_len: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    pub max_grad_norm: f64,
    /// Loss weight of the deal class relative to non-deal.
    pub deal_weight: f64,
    /// Non-deal examples per epoch drawn from a training source (deals are always all kept).
    pub per_source_limit: Vec<(String, usize)>,
    /// Encoder layers (from the bottom) kept frozen, with the embeddings.
    pub frozen_layers: usize,
    /// Stop after this many steps (smoke tests); None trains every epoch fully.
    pub max_steps: Option<usize>,
    /// The whole-document lexical model fit after the transformer (None: transformer only).
    pub lexical: Option<LexicalConfig>,
}

/// The lexical stage (`model::lexical`): a logistic regression over hashed words and word pairs
/// of the training sources' full texts, joined to the transformer on the texts `joins` names by
/// a weight chosen on validation.
#[derive(Debug, Clone, Serialize)]
pub struct LexicalConfig {
    #[serde(flatten)]
    pub recipe: lexical::Recipe,
    pub joins: Joins,
    /// Also train on the whole articles of the modern training items (`Corpus::train_articles`)
    /// when the modern source trains.
    pub articles: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// A tokenized example: its first window, its label.
struct Item {
    ids: Vec<u32>,
    deal: bool,
    /// The text did not fit the window (what `Joins::LongTexts` joins to the lexical stage).
    longer_than_window: bool,
}

#[derive(Debug, Serialize)]
pub struct SetReport {
    pub name: String,
    pub examples: usize,
    pub deals: usize,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    pub roc_auc: f64,
}

#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub train_examples: Vec<(String, usize, usize)>,
    pub steps: usize,
    pub seconds: f64,
    pub temperature: f64,
    pub threshold: f32,
    pub validation: Vec<SetReport>,
    pub loss_curve: Vec<(usize, f32)>,
    /// The lexical stage, fit after the transformer is saved (its own `lexical_report.json`).
    #[serde(skip)]
    pub lexical: Option<LexicalReport>,
}

#[derive(Debug, Serialize)]
pub struct LexicalReport {
    pub config: LexicalConfig,
    /// Training texts, the articles among them.
    pub train_examples: usize,
    pub train_articles: usize,
    pub fit: lexical::FitStats,
    pub seconds: f64,
    /// The transformer's share of the combined log-odds is 1 - weight.
    pub weight: f64,
    pub temperature: f64,
    pub threshold: f32,
    /// Mean validation F1 at the best threshold, for every weight tried (0 = transformer alone).
    pub weights_tried: Vec<(f64, f64)>,
    /// The lexical model alone at 0.5, and the combination at its threshold.
    pub lexical_alone: Vec<SetReport>,
    pub validation: Vec<SetReport>,
}

/// Trains, calibrates and writes the model directory. Returns the report also written
/// there as `training_report.json`.
pub fn train(cfg: TrainConfig) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    let config_json = read_base_config(&cfg.base_model)?;
    let bert_cfg: BertConfig = serde_json::from_value(config_json.clone()).map_err(|e| TrainError::Invalid(format!("base config: {e}")))?;
    let encoder = TextEncoder::from_file(&cfg.base_model.join("tokenizer.json"), cfg.max_len)?;

    tracing::info!(data = %cfg.data_dir.display(), "loading data");
    let corpus = Corpus::load(&cfg.data_dir, &cfg.labels)?;
    check_sources(&corpus, cfg.sources.iter().chain(cfg.per_source_limit.iter().map(|(name, _)| name)))?;
    let mut train_items = Vec::new();
    let mut train_counts = Vec::new();
    for (name, set) in corpus.train.iter().filter(|(name, _)| cfg.sources.iter().any(|s| s == name)) {
        let limit = cfg.per_source_limit.iter().find(|(n, _)| n == name).map(|(_, l)| *l);
        let mut set: Vec<&Example> = set.iter().collect();
        if let Some(limit) = limit {
            // Keep every deal; subsample non-deals (seeded) down to the limit.
            let (mut deals, mut others): (Vec<_>, Vec<_>) = set.into_iter().partition(|e| e.deal);
            others.shuffle(&mut rng);
            others.truncate(limit);
            deals.extend(others);
            set = deals;
        }
        train_counts.push((name.to_string(), set.len(), set.iter().filter(|e| e.deal).count()));
        train_items.extend(tokenize(&encoder, set.into_iter())?);
    }
    let validation: Vec<(&str, Vec<Item>)> = corpus
        .validation_for(&cfg.sources)
        .map(|(name, set)| Ok((*name, tokenize(&encoder, set.iter())?)))
        .collect::<Result<_, TrainError>>()?;
    tracing::info!(?train_counts, validation = ?validation.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>(), "data ready");

    let varmap = trainable_vars(&cfg.base_model, &bert_cfg, &mut rng, &device)?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut model = BertClassifier::load(vb, &bert_cfg)?.freeze_below(cfg.frozen_layers);
    let trainable = trainable_subset(&varmap, cfg.frozen_layers)?;
    let mut optimizer = AdamW::new(
        trainable.clone(),
        ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() },
    )?;

    let batches_per_epoch = train_items.len().div_ceil(cfg.batch_size);
    let total_steps = (batches_per_epoch * cfg.epochs).min(cfg.max_steps.unwrap_or(usize::MAX));
    let warmup = ((total_steps as f64) * cfg.warmup_fraction).ceil() as usize;
    let bar = progress(total_steps as u64);
    let mut step = 0;
    let mut loss_curve = Vec::new();
    let mut ema = None::<f32>;
    for epoch in 0..cfg.epochs {
        model.set_kernels(Kernels::Differentiable);
        for batch in length_batches(&train_items, cfg.batch_size, &mut rng) {
            if step == total_steps {
                break;
            }
            let lr = cfg.learning_rate * schedule(step, warmup, total_steps);
            optimizer.set_learning_rate(lr);
            let (ids, mask, labels, weights) = batch_tensors(&train_items, &batch, cfg.pad_id(&bert_cfg), cfg.deal_weight, &device)?;
            let logits = model.forward(&ids, &ids.zeros_like()?, &mask)?;
            let loss = weighted_cross_entropy(&logits, &labels, &weights)?;
            let mut grads = loss.backward()?;
            clip_gradients(&trainable, &mut grads, cfg.max_grad_norm)?;
            optimizer.step(&grads)?;
            let l = loss.to_scalar::<f32>()?;
            let smoothed = ema.map_or(l, |e| 0.98 * e + 0.02 * l);
            ema = Some(smoothed);
            step += 1;
            if step % 20 == 0 || step == total_steps {
                loss_curve.push((step, smoothed));
            }
            bar.set_message(format!("epoch {} loss {smoothed:.4} lr {lr:.2e}", epoch + 1));
            bar.inc(1);
            if step % 50 == 0 {
                // The bar is hidden when stderr is not a terminal; logs carry progress there.
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(step, total_steps, loss = smoothed, lr, elapsed_s = secs as u64, "training");
            }
        }
        model.set_kernels(Kernels::Fused);
        if epoch + 1 == cfg.epochs || step == total_steps {
            break;
        }
        let logits = validation_logits(&model, &validation, cfg.pad_id(&bert_cfg), &device)?;
        for r in reports(&validation, &logits, 1.0, 0.5) {
            bar.println(format!(
                "epoch {} validation {}: F1 {:.4} P {:.4} R {:.4} AUC {:.4} (n={}, deals={})",
                epoch + 1,
                r.name,
                r.f1,
                r.precision,
                r.recall,
                r.roc_auc,
                r.examples,
                r.deals
            ));
        }
    }
    bar.finish_and_clear();

    // Calibration and threshold: validation data only.
    model.set_kernels(Kernels::Fused);
    let val_logits = validation_logits(&model, &validation, cfg.pad_id(&bert_cfg), &device)?;
    let all_logits: Vec<Vec<f32>> = val_logits.iter().flat_map(|l| l.iter().cloned()).collect();
    let all_truth: Vec<bool> = validation.iter().flat_map(|(_, items)| items.iter().map(|i| i.deal)).collect();
    let deal_index = 1;
    let temperature = fit_temperature(&all_logits, &all_truth, deal_index);
    let probs: Vec<(Vec<f32>, Vec<bool>)> = val_logits
        .iter()
        .zip(&validation)
        .map(|(logits, (_, items))| {
            (
                logits.iter().map(|l| crate::metrics::deal_probability(l, deal_index, temperature)).collect(),
                items.iter().map(|i| i.deal).collect(),
            )
        })
        .collect();
    let sets: Vec<(&[f32], &[bool])> = probs.iter().map(|(p, y)| (p.as_slice(), y.as_slice())).collect();
    let (threshold, _) = best_threshold(&sets);
    let validation_report = reports(&validation, &val_logits, temperature, threshold);
    tracing::info!(temperature, threshold, "calibrated on validation");

    let mut report = TrainReport {
        config: cfg.clone(),
        train_examples: train_counts,
        steps: step,
        seconds: started.elapsed().as_secs_f64(),
        temperature,
        threshold,
        validation: validation_report,
        loss_curve,
        lexical: None,
    };
    save(&cfg, &varmap, config_json, &report)?;
    if let Some(lc) = &cfg.lexical {
        report.lexical = Some(lexical_stage(&cfg.out_dir, &corpus, &cfg.sources, lc, None)?);
    }
    Ok(report)
}

impl TrainConfig {
    fn pad_id(&self, cfg: &BertConfig) -> u32 {
        cfg.pad_token_id
    }
}

fn progress(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {bar:30} {pos}/{len} steps eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn read_base_config(dir: &Path) -> Result<serde_json::Value, TrainError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    let obj = v.as_object_mut().ok_or_else(|| TrainError::Invalid("config.json is not an object".into()))?;
    obj.insert("id2label".into(), serde_json::json!({"0": "non_deal", "1": "deal"}));
    obj.insert("label2id".into(), serde_json::json!({"non_deal": 0, "deal": 1}));
    obj.insert("architectures".into(), serde_json::json!(["BertForSequenceClassification"]));
    obj.insert("problem_type".into(), serde_json::json!("single_label_classification"));
    Ok(v)
}

fn tokenize<'a>(encoder: &TextEncoder, set: impl Iterator<Item = &'a Example>) -> Result<Vec<Item>, TrainError> {
    set.map(|ex| {
        let enc = encoder.encode(ex.title.as_deref(), &ex.text, LongText::Truncate, 1)?;
        let longer_than_window = enc.longer_than_window();
        Ok(Item { ids: enc.windows.into_iter().next().unwrap_or_default(), deal: ex.deal, longer_than_window })
    })
    .collect()
}

/// Base weights as trainable variables under Hugging Face classification names
/// (`bert.` prefix), plus a seeded classifier head.
fn trainable_vars(base: &Path, cfg: &BertConfig, rng: &mut StdRng, device: &Device) -> Result<VarMap, TrainError> {
    let weights = candle_core::safetensors::load(base.join("model.safetensors"), device)?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| TrainError::Invalid("varmap lock poisoned".into()))?;
        for (name, tensor) in weights {
            if name.ends_with("position_ids") || name.starts_with("classifier.") {
                continue;
            }
            let name = if name.starts_with("bert.") { name } else { format!("bert.{name}") };
            data.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
        }
        let (h, labels) = (cfg.hidden_size, 2);
        // N(0, 0.02) as in BERT's initializer, from the seeded generator.
        let normal: Vec<f32> = (0..labels * h).map(|_| gaussian(rng) * 0.02).collect();
        data.insert("classifier.weight".into(), Var::from_tensor(&Tensor::from_vec(normal, (labels, h), device)?)?);
        data.insert("classifier.bias".into(), Var::from_tensor(&Tensor::zeros(labels, DType::F32, device)?)?);
    }
    Ok(varmap)
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Linear warmup, then linear decay to zero.
fn schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Batches of similar length (less padding): shuffle, sort within pools of 50 batches,
/// cut, shuffle the batches.
fn length_batches(items: &[Item], batch_size: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(rng);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| items[i].ids.len());
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

type BatchTensors = (Tensor, Tensor, Tensor, Tensor);

fn batch_tensors(items: &[Item], batch: &[usize], pad_id: u32, deal_weight: f64, device: &Device) -> Result<BatchTensors, TrainError> {
    let seq = batch.iter().map(|&i| items[i].ids.len()).max().unwrap_or(1);
    let shape = Bucket { batch: batch.len(), seq };
    let packed = Batch::pack(batch.iter().map(|&i| items[i].ids.as_slice()), shape, pad_id);
    let labels: Vec<u32> = batch.iter().map(|&i| items[i].deal as u32).collect();
    let weights: Vec<f32> = batch.iter().map(|&i| if items[i].deal { deal_weight as f32 } else { 1.0 }).collect();
    Ok((
        Tensor::from_vec(packed.input_ids, (batch.len(), seq), device)?,
        Tensor::from_vec(packed.attention_mask, (batch.len(), seq), device)?,
        Tensor::from_vec(labels, batch.len(), device)?,
        Tensor::from_vec(weights, batch.len(), device)?,
    ))
}

fn weighted_cross_entropy(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.mul(weights)?.sum_all()?.neg()? / weights.sum_all()?.to_scalar::<f32>()? as f64
}

/// Variables the optimizer updates: everything above the frozen layers (the embeddings
/// and the bottom `frozen_layers` encoder layers stay as pretrained).
fn trainable_subset(varmap: &VarMap, frozen_layers: usize) -> Result<Vec<Var>, TrainError> {
    let data = varmap.data().lock().map_err(|_| TrainError::Invalid("varmap lock poisoned".into()))?;
    let frozen = |name: &str| {
        name.starts_with("bert.embeddings.")
            || name
                .strip_prefix("bert.encoder.layer.")
                .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                .is_some_and(|layer| layer < frozen_layers)
    };
    let mut names: Vec<&String> = data.keys().filter(|n| !frozen(n)).collect();
    names.sort();
    Ok(names.into_iter().map(|n| data[n].clone()).collect())
}

fn clip_gradients(vars: &[Var], grads: &mut candle_core::backprop::GradStore, max_norm: f64) -> Result<(), TrainError> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(())
}

/// Logits of every validation item, per set, in item order.
fn validation_logits(model: &BertClassifier, sets: &[(&str, Vec<Item>)], pad_id: u32, device: &Device) -> Result<Vec<Vec<Vec<f32>>>, TrainError> {
    let mut all = Vec::new();
    for (_, items) in sets {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].ids.len());
        let mut logits = vec![Vec::new(); items.len()];
        for chunk in order.chunks(64) {
            let (ids, mask, _, _) = batch_tensors(items, chunk, pad_id, 1.0, device)?;
            let out = model.forward(&ids, &ids.zeros_like()?, &mask)?.detach().to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(out) {
                logits[i] = row;
            }
        }
        all.push(logits);
    }
    Ok(all)
}

fn reports(sets: &[(&str, Vec<Item>)], logits: &[Vec<Vec<f32>>], temperature: f64, threshold: f32) -> Vec<SetReport> {
    sets.iter()
        .zip(logits)
        .map(|((name, items), logits)| {
            let probs: Vec<f32> = logits.iter().map(|l| crate::metrics::deal_probability(l, 1, temperature)).collect();
            let truth: Vec<bool> = items.iter().map(|i| i.deal).collect();
            set_report(name, &probs, &truth, threshold)
        })
        .collect()
}

fn set_report(name: &str, probs: &[f32], truth: &[bool], threshold: f32) -> SetReport {
    let c = Confusion::new(probs, truth, threshold);
    SetReport {
        name: name.to_string(),
        examples: truth.len(),
        deals: truth.iter().filter(|&&t| t).count(),
        f1: c.f1(),
        precision: c.precision(),
        recall: c.recall(),
        roc_auc: roc_auc(probs, truth),
    }
}

/// Writes f16 weights, config with calibration, tokenizer files and the report.
fn save(cfg: &TrainConfig, varmap: &VarMap, mut config_json: serde_json::Value, report: &TrainReport) -> Result<(), TrainError> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(io(&cfg.out_dir))?;
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().map_err(|_| TrainError::Invalid("varmap lock poisoned".into()))?;
        data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F16)?))).collect::<candle_core::Result<_>>()?
    };
    let weights = cfg.out_dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    // Readable by the service's user, whoever trained it.
    let file = std::fs::File::open(&weights).map_err(io(&weights))?;
    let mut perms = file.metadata().map_err(io(&weights))?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&weights, perms).map_err(io(&weights))?;
    if let Some(obj) = config_json.as_object_mut() {
        obj.insert("torch_dtype".into(), serde_json::json!("float16"));
        obj.insert(
            "dealsift".into(),
            serde_json::json!({
                "model_id": cfg.model_id,
                "version": cfg.version,
                "temperature": report.temperature,
                "threshold": report.threshold,
                "deal_label": "deal",
                "max_sequence_length": cfg.max_len,
            }),
        );
    }
    write_json(&cfg.out_dir.join("config.json"), &config_json)?;
    // A lexical stage fit to an earlier transformer in this directory no longer applies.
    for stale in [lexical::FILE, "lexical_report.json"] {
        let path = cfg.out_dir.join(stale);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    for file in TOKENIZER_FILES {
        let from = cfg.base_model.join(file);
        if from.is_file() {
            let to = cfg.out_dir.join(file);
            if *file == "tokenizer.json" {
                // Padding and truncation off: windows are made by the server (and by callers).
                let text = std::fs::read_to_string(&from).map_err(io(&from))?;
                let mut tok: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", from.display())))?;
                tok["padding"] = serde_json::Value::Null;
                tok["truncation"] = serde_json::Value::Null;
                let compact = serde_json::to_string(&tok).map_err(|e| TrainError::Invalid(e.to_string()))?;
                std::fs::write(&to, compact).map_err(io(&to))?;
            } else {
                std::fs::copy(&from, &to).map_err(io(&from))?;
            }
        }
    }
    write_json(&cfg.out_dir.join("training_report.json"), &serde_json::to_value(report).map_err(|e| TrainError::Invalid(e.to_string()))?)
}

fn check_sources<'a>(corpus: &Corpus, mut named: impl Iterator<Item = &'a String>) -> Result<(), TrainError> {
    let known: Vec<&str> = corpus.train.iter().map(|(name, _)| *name).collect();
    match named.find(|name| !known.contains(&name.as_str())) {
        Some(unknown) => Err(TrainError::Invalid(format!("unknown training source {unknown:?}; the sources are {}", known.join(", ")))),
        None => Ok(()),
    }
}

/// The lexical stage on its own, for a model directory trained earlier: see `lexical_stage`;
/// `version` names the result.
pub fn add_lexical(model_dir: &Path, data_dir: &Path, labels: &[PathBuf], sources: &[String], lc: &LexicalConfig, version: &str) -> Result<LexicalReport, TrainError> {
    let corpus = Corpus::load(data_dir, labels)?;
    check_sources(&corpus, sources.iter())?;
    lexical_stage(model_dir, &corpus, sources, lc, Some(version))
}

/// Fits the lexical model on `sources`' training texts and how it joins the transformer saved in
/// `model_dir`, scored as served (its float16 weights, its temperature), so that `train` and
/// `train --lexical-only` on the same transformer write the same stage; writes
/// `lexical.safetensors`, `config.json` (with `version`, if given) and `lexical_report.json`.
fn lexical_stage(model_dir: &Path, corpus: &Corpus, sources: &[String], lc: &LexicalConfig, version: Option<&str>) -> Result<LexicalReport, TrainError> {
    let dir = crate::engine::ModelDir::open(model_dir, None)?;
    let encoder = TextEncoder::from_file(&model_dir.join("tokenizer.json"), dir.window)?;
    let weights = model_dir.join("model.safetensors");
    // SAFETY: the file is mapped read-only and not modified while this runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
    let model = BertClassifier::load(vb, &dir.config)?;
    let examples: Vec<(&str, &[Example])> = corpus.validation_for(sources).map(|(n, s)| (*n, s.as_slice())).collect();
    let validation: Vec<(&str, Vec<Item>)> =
        examples.iter().map(|(name, set)| Ok((*name, tokenize(&encoder, set.iter())?))).collect::<Result<_, TrainError>>()?;
    let logits = validation_logits(&model, &validation, dir.config.pad_token_id, &Device::Cpu)?;
    let transformer: Vec<Vec<f32>> = logits
        .iter()
        .map(|set| set.iter().map(|l| crate::metrics::deal_probability(l, dir.deal_index, dir.temperature)).collect())
        .collect();
    let joined: Vec<Vec<bool>> =
        validation.iter().map(|(_, items)| items.iter().map(|i| lc.joins.includes(i.longer_than_window)).collect()).collect();
    let (lexical, report) = fit_lexical(corpus, sources, &examples, &transformer, &joined, lc)?;
    write_lexical(model_dir, &lexical, &report, version)?;
    Ok(report)
}

/// Joined validation texts of each class needed to fit the join's temperature (below it, 1).
const MIN_PER_CLASS_FOR_TEMPERATURE: usize = 10;

/// Fits the lexical model and chooses how it joins the transformer on the validation texts
/// `joined` marks (`engine::combine`): the weight (0 to 1 in steps of 0.05) maximising the mean
/// validation F1 at its best threshold, then the temperature that calibrates the joined log-odds
/// of those texts, then the threshold again on the calibrated probabilities of every text.
/// `transformer` holds the transformer's calibrated first-window probabilities per set.
fn fit_lexical(
    corpus: &Corpus,
    sources: &[String],
    validation: &[(&str, &[Example])],
    transformer: &[Vec<f32>],
    joined_texts: &[Vec<bool>],
    lc: &LexicalConfig,
) -> Result<(LexicalModel, LexicalReport), TrainError> {
    let started = Instant::now();
    let articles: &[Example] = if lc.articles && sources.iter().any(|s| s == "modern") { &corpus.train_articles } else { &[] };
    let train: Vec<&Example> = corpus
        .train
        .iter()
        .filter(|(name, _)| sources.iter().any(|s| s == name))
        .flat_map(|(_, set)| set.iter())
        .chain(articles)
        .collect();
    let texts: Vec<(Option<&str>, &str)> = train.iter().map(|e| (e.title.as_deref(), e.text.as_str())).collect();
    let truth: Vec<bool> = train.iter().map(|e| e.deal).collect();
    tracing::info!(examples = train.len(), articles = articles.len(), buckets = lc.recipe.buckets, "fitting the lexical model");
    let (model, fit) = LexicalModel::fit(&texts, &truth, &lc.recipe)?;
    let lexical_logits: Vec<Vec<f32>> =
        validation.iter().map(|(_, set)| set.iter().map(|e| model.logit(e.title.as_deref(), &e.text)).collect()).collect();
    let truths: Vec<Vec<bool>> = validation.iter().map(|(_, set)| set.iter().map(|e| e.deal).collect()).collect();
    // As the engine serves it: only the texts the stage joins have a lexical logit.
    let join_logits: Vec<Vec<Option<f32>>> =
        lexical_logits.iter().zip(joined_texts).map(|(l, joins)| l.iter().zip(joins).map(|(&z, &j)| j.then_some(z)).collect()).collect();
    let joined = |how: &LexicalMeta| -> Vec<Vec<f32>> {
        transformer
            .iter()
            .zip(&join_logits)
            .map(|(t, l)| t.iter().zip(l).map(|(&p, &z)| crate::engine::joined_probability(p, z, how)).collect())
            .collect()
    };
    // (threshold, mean F1) at the threshold maximising the mean F1 over the sets.
    let best_mean_f1 = |probs: &[Vec<f32>]| {
        let sets: Vec<(&[f32], &[bool])> = probs.iter().zip(&truths).map(|(p, y)| (p.as_slice(), y.as_slice())).collect();
        best_threshold(&sets)
    };
    let meta = |weight, temperature| LexicalMeta { weight, temperature, threshold: 0.5, joins: lc.joins, vocabulary: lc.recipe.vocabulary };
    let uncalibrated = |weight| meta(weight, 1.0);
    let weights_tried: Vec<(f64, f64)> =
        (0..=20).map(|k| k as f64 / 20.0).map(|weight| (weight, best_mean_f1(&joined(&uncalibrated(weight))).1)).collect();
    let weight = weights_tried.iter().fold((0.0, -1.0), |best, &cur| if cur.1 > best.1 { cur } else { best }).0;
    // Calibrate the joined log-odds of the joined texts: as a two-class logit pair [0, z], softmax is sigmoid(z).
    let raw = joined(&uncalibrated(weight));
    let joined_pairs: Vec<(f32, bool)> = raw
        .iter()
        .flatten()
        .zip(truths.iter().flatten())
        .zip(joined_texts.iter().flatten())
        .filter(|(_, &j)| j)
        .map(|((&p, &y), _)| (p, y))
        .collect();
    let logit_pairs: Vec<Vec<f32>> = joined_pairs.iter().map(|&(p, _)| vec![0.0, crate::engine::log_odds(p) as f32]).collect();
    let joined_truth: Vec<bool> = joined_pairs.iter().map(|&(_, y)| y).collect();
    let deals = joined_truth.iter().filter(|&&y| y).count();
    let temperature = if deals.min(joined_truth.len() - deals) >= MIN_PER_CLASS_FOR_TEMPERATURE {
        fit_temperature(&logit_pairs, &joined_truth, 1)
    } else {
        tracing::warn!(joined_texts = joined_truth.len(), deals, "too few joined validation texts of each class to fit the join's temperature: using 1");
        1.0
    };
    let probs = joined(&meta(weight, temperature));
    let (threshold, _) = best_mean_f1(&probs);
    let report_of = |probs: &[Vec<f32>], threshold: f32| -> Vec<SetReport> {
        validation.iter().zip(probs).zip(&truths).map(|(((name, _), p), y)| set_report(name, p, y, threshold)).collect()
    };
    let alone: Vec<Vec<f32>> = lexical_logits.iter().map(|l| l.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect()).collect();
    let report = LexicalReport {
        config: lc.clone(),
        train_examples: train.len(),
        train_articles: articles.len(),
        fit,
        seconds: started.elapsed().as_secs_f64(),
        weight,
        temperature,
        threshold,
        weights_tried,
        lexical_alone: report_of(&alone, 0.5),
        validation: report_of(&probs, threshold),
    };
    tracing::info!(weight, temperature, threshold, "lexical model joined on validation");
    Ok((model, report))
}

/// Writes the lexical model, records how it joins (weight, temperature, threshold; and `version`
/// if given) in `config.json`, and writes the stage's report.
fn write_lexical(dir: &Path, model: &LexicalModel, report: &LexicalReport, version: Option<&str>) -> Result<(), TrainError> {
    model.save(&dir.join(lexical::FILE))?;
    let path = dir.join("config.json");
    let mut config = read_base_config(dir)?;
    let meta = config
        .get_mut("dealsift")
        .and_then(|m| m.as_object_mut())
        .ok_or_else(|| TrainError::Invalid(format!("{}: no \"dealsift\" section", path.display())))?;
    meta.insert(
        "lexical".into(),
        serde_json::to_value(LexicalMeta {
            weight: report.weight,
            temperature: report.temperature,
            threshold: report.threshold as f64,
            joins: report.config.joins,
            vocabulary: report.config.recipe.vocabulary,
        })
        .map_err(|e| TrainError::Invalid(e.to_string()))?,
    );
    if let Some(version) = version {
        meta.insert("version".into(), serde_json::json!(version));
    }
    write_json(&path, &config)?;
    write_json(&dir.join("lexical_report.json"), &serde_json::to_value(report).map_err(|e| TrainError::Invalid(e.to_string()))?)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(io(path))
}
