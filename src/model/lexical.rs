//! A bag-of-words logistic regression that reads the whole document, combined with the
//! transformer's calibrated logit for texts longer than the window (`engine::combine`).
//!
//! Why: by default the transformer reads the first window only (128 tokens), so a newswire story
//! whose lead is about something else hides its deal; a linear model over words and word pairs
//! reads all of it, cheaply (microseconds per document). Texts that fit the window are left to
//! the transformer: on a single paragraph of modern prose the bag of words is mostly prior.
//! Features are hashed unigrams and bigrams of lower-cased words (runs of Unicode letters and
//! digits, two characters or more), weighted 1 + ln(tf) times a smoothed IDF and L2-normalised;
//! buckets seen in fewer than two training documents get IDF 0, so words the model has no
//! weight for do not dilute the ones it has (at serving time as in training). The same code
//! computes the features when training and serving; the weights, IDFs and bias are stored.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::ModelError;
use crate::fnv;

/// File name inside a model directory.
pub const FILE: &str = "lexical.safetensors";

/// Number of hash buckets the trainer uses (2^18: 2 MB of f32 weights and IDFs).
pub const DEFAULT_BUCKETS: usize = 1 << 18;

/// A sparse feature vector: (bucket, value), buckets ascending and distinct.
pub type Features = Vec<(u32, f32)>;

#[derive(Debug, Clone)]
pub struct LexicalModel {
    weights: Vec<f32>,
    idf: Vec<f32>,
    bias: f32,
}

/// Buckets in fewer training documents than this get IDF 0 (scikit-learn's `min_df`).
const MIN_DOCUMENT_FREQUENCY: u32 = 2;

/// How the fit ended, for the training report.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FitStats {
    pub iterations: usize,
    /// Largest absolute gradient component at the end (0 at the exact optimum).
    pub gradient_max: f64,
    pub converged: bool,
}

/// Lower-cased words of two characters or more (letters and digits; everything else separates).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().nth(1).is_some())
        .map(str::to_lowercase)
        .collect()
}

/// Raw term counts per bucket of the document's unigrams and bigrams (the title, when given,
/// is read before the body, as the transformer reads it).
pub fn term_counts(title: Option<&str>, text: &str, buckets: usize) -> Features {
    let mut tokens = title.map(words).unwrap_or_default();
    tokens.extend(words(text));
    let mut counts: HashMap<u32, f32> = HashMap::new();
    let mut previous: Option<u64> = None;
    for w in &tokens {
        let unigram = fnv::hash(w);
        *counts.entry((unigram % buckets as u64) as u32).or_default() += 1.0;
        if let Some(prev) = previous {
            let bigram = fnv::extend(fnv::extend(prev, [b' ']), w.bytes());
            *counts.entry((bigram % buckets as u64) as u32).or_default() += 1.0;
        }
        previous = Some(unigram);
    }
    let mut out: Features = counts.into_iter().collect();
    out.sort_unstable_by_key(|&(b, _)| b);
    out
}

/// 1 + ln(tf) times IDF, L2-normalised.
fn weigh(counts: &Features, idf: &[f32]) -> Features {
    let mut out: Features = counts.iter().map(|&(b, c)| (b, (1.0 + c.ln()) * idf[b as usize])).collect();
    let norm = out.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|(_, v)| *v /= norm);
    }
    out
}

impl LexicalModel {
    pub fn buckets(&self) -> usize {
        self.weights.len()
    }

    /// The model's logit (log-odds of a deal) for one document.
    pub fn logit(&self, title: Option<&str>, text: &str) -> f32 {
        let x = weigh(&term_counts(title, text, self.buckets()), &self.idf);
        self.bias + x.iter().map(|&(b, v)| v * self.weights[b as usize]).sum::<f32>()
    }

    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        let get = |name: &str| -> Result<Vec<f32>, ModelError> {
            let t = tensors.get(name).ok_or_else(|| ModelError::Invalid(format!("{}: no tensor {name:?}", path.display())))?;
            Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (weights, idf, bias) = (get("lexical.weight")?, get("lexical.idf")?, get("lexical.bias")?);
        if weights.is_empty() || weights.len() != idf.len() || bias.len() != 1 {
            return Err(ModelError::Invalid(format!(
                "{}: expected weight and idf of one length and one bias, got {}, {} and {}",
                path.display(),
                weights.len(),
                idf.len(),
                bias.len()
            )));
        }
        if weights.iter().chain(&idf).chain(&bias).any(|v| !v.is_finite()) {
            return Err(ModelError::Invalid(format!("{}: non-finite values", path.display())));
        }
        Ok(Self { weights, idf, bias: bias[0] })
    }

    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let n = self.buckets();
        let tensors = HashMap::from([
            ("lexical.weight".to_string(), Tensor::from_slice(&self.weights, n, &Device::Cpu)?),
            ("lexical.idf".to_string(), Tensor::from_slice(&self.idf, n, &Device::Cpu)?),
            ("lexical.bias".to_string(), Tensor::from_slice(&[self.bias], 1, &Device::Cpu)?),
        ]);
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Fits the model on term counts (from [`term_counts`] with the same `buckets`) by L-BFGS
    /// on the class-weighted, L2-regularised log loss: sum of weight_i * loss_i + |w|^2 / (2 * c),
    /// the bias unregularised. Deterministic: one thread, fixed order.
    pub fn fit(docs: &[Features], deal: &[bool], buckets: usize, deal_weight: f64, c: f64) -> Result<(Self, FitStats), ModelError> {
        if docs.len() != deal.len() || !deal.contains(&true) || !deal.contains(&false) {
            return Err(ModelError::Invalid(format!(
                "the lexical model needs one label per document and both classes; got {} documents, {} labels, {} deals",
                docs.len(),
                deal.len(),
                deal.iter().filter(|&&d| d).count()
            )));
        }
        if let Some(&(b, _)) = docs.iter().flatten().find(|&&(b, _)| b as usize >= buckets) {
            return Err(ModelError::Invalid(format!("feature bucket {b} is outside the model's {buckets} buckets")));
        }
        let n = docs.len() as f64;
        let mut df = vec![0u32; buckets];
        for d in docs {
            d.iter().for_each(|&(b, _)| df[b as usize] += 1);
        }
        let idf: Vec<f32> = df
            .iter()
            .map(|&f| if f < MIN_DOCUMENT_FREQUENCY { 0.0 } else { (((1.0 + n) / (1.0 + f as f64)).ln() + 1.0) as f32 })
            .collect();
        let xs: Vec<Features> = docs.iter().map(|d| weigh(d, &idf)).collect();
        let sample_weight: Vec<f64> = deal.iter().map(|&y| if y { deal_weight } else { 1.0 }).collect();
        // Parameters: buckets weights, then the (unregularised) bias.
        let objective = |theta: &[f64], grad: &mut [f64]| -> f64 {
            let (w, b) = theta.split_at(buckets);
            grad.iter_mut().for_each(|g| *g = 0.0);
            let mut loss = 0.0;
            for ((x, &y), &s) in xs.iter().zip(deal).zip(&sample_weight) {
                let m = b[0] + x.iter().map(|&(k, v)| v as f64 * w[k as usize]).sum::<f64>();
                let signed = if y { m } else { -m };
                // log(1 + exp(-signed)), stable for both signs.
                loss += s * (if signed > 0.0 { (-signed).exp().ln_1p() } else { -signed + signed.exp().ln_1p() });
                let residual = s * (1.0 / (1.0 + (-m).exp()) - if y { 1.0 } else { 0.0 });
                x.iter().for_each(|&(k, v)| grad[k as usize] += residual * v as f64);
                grad[buckets] += residual;
            }
            for (g, &wk) in grad[..buckets].iter_mut().zip(w) {
                *g += wk / c;
            }
            loss + w.iter().map(|v| v * v).sum::<f64>() / (2.0 * c)
        };
        let (theta, stats) = lbfgs(objective, buckets + 1, 1000);
        Ok((Self { weights: theta[..buckets].iter().map(|&v| v as f32).collect(), idf, bias: theta[buckets] as f32 }, stats))
    }
}

/// Minimises a smooth convex function by L-BFGS (memory 10, backtracking Armijo line search),
/// from zero, until the gradient or the improvement is negligible, the line search fails (the
/// last accepted point is kept), or `max_iter` is reached.
fn lbfgs(mut f: impl FnMut(&[f64], &mut [f64]) -> f64, dim: usize, max_iter: usize) -> (Vec<f64>, FitStats) {
    const MEMORY: usize = 10;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = vec![0.0; dim];
    let mut g = vec![0.0; dim];
    let mut fx = f(&x, &mut g);
    let mut history: Vec<(Vec<f64>, Vec<f64>, f64)> = Vec::new(); // (s, y, 1 / y.s)
    let (mut x_new, mut g_new) = (vec![0.0; dim], vec![0.0; dim]);
    let gradient_max = |g: &[f64]| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        iterations += 1;
        // Two-loop recursion: direction = -H g.
        let mut d: Vec<f64> = g.iter().map(|v| -v).collect();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &d);
            d.iter_mut().zip(y).for_each(|(di, yi)| *di -= a * yi);
            alphas.push(a);
        }
        let gamma = history.last().map_or(1.0 / dot(&g, &g).sqrt().max(1e-12), |(s, y, _)| dot(s, y) / dot(y, y));
        d.iter_mut().for_each(|di| *di *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &d);
            d.iter_mut().zip(s).for_each(|(di, si)| *di += (a - b) * si);
        }
        let slope = dot(&g, &d);
        if slope >= 0.0 {
            break;
        }
        let mut step = 1.0;
        let f_new = loop {
            x_new.iter_mut().zip(&x).zip(&d).for_each(|((n, xi), di)| *n = xi + step * di);
            let f_new = f(&x_new, &mut g_new);
            if f_new <= fx + 1e-4 * step * slope {
                break Some(f_new);
            }
            if step < 1e-10 {
                break None;
            }
            step *= 0.5;
        };
        let Some(f_new) = f_new else { break };
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        let improvement = fx - f_new;
        std::mem::swap(&mut x, &mut x_new);
        std::mem::swap(&mut g, &mut g_new);
        fx = f_new;
        if sy > 1e-12 {
            if history.len() == MEMORY {
                history.remove(0);
            }
            history.push((s, y, 1.0 / sy));
        }
        if gradient_max(&g) < 1e-5 || improvement.abs() < 1e-10 * fx.abs().max(1.0) {
            converged = true;
            break;
        }
    }
    let stats = FitStats { iterations, gradient_max: gradient_max(&g), converged };
    (x, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_stable_words_and_pairs() {
        let a = term_counts(Some("Acme to BUY"), "Widgets, a unit!", DEFAULT_BUCKETS);
        let b = term_counts(None, "acme to buy widgets a unit", DEFAULT_BUCKETS);
        // Punctuation, case and the title boundary do not matter; one-letter words are dropped,
        // so both read: acme to buy widgets unit (5 words, 4 pairs).
        assert_eq!(a, b);
        assert_eq!(a.iter().map(|(_, c)| c).sum::<f32>(), 9.0);
    }

    #[test]
    fn fit_separates_a_toy_corpus_and_round_trips() {
        // Words in a single document get IDF 0, so each class's words recur.
        let texts = [
            ("Acme to buy Widget Co for $2 billion", true),
            ("Bank agrees to buy rival lender", true),
            ("Startup to buy app maker", true),
            ("Acme quarterly profit rises", false),
            ("Bank profit falls after weak results", false),
            ("Startup profit rises on demand", false),
        ];
        let buckets = 1 << 12;
        let docs: Vec<Features> = texts.iter().map(|(t, _)| term_counts(None, t, buckets)).collect();
        let truth: Vec<bool> = texts.iter().map(|(_, y)| *y).collect();
        let (model, stats) = LexicalModel::fit(&docs, &truth, buckets, 1.0, 10.0).unwrap();
        assert!(stats.converged, "{stats:?}");
        for (text, deal) in texts {
            assert_eq!(model.logit(None, text) > 0.0, deal, "{text}: {}", model.logit(None, text));
        }
        let dir = std::env::temp_dir().join(format!("dealsift-lexical-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        model.save(&dir.join(FILE)).unwrap();
        let loaded = LexicalModel::load(&dir.join(FILE)).unwrap();
        assert_eq!(loaded.logit(None, texts[0].0), model.logit(None, texts[0].0));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(LexicalModel::fit(&docs, &[true; 6], buckets, 1.0, 10.0).is_err(), "one class only");
    }

    #[test]
    fn lbfgs_finds_the_minimum_of_a_quadratic() {
        // f(x) = sum_i (i + 1) * (x_i - i)^2, minimised at x_i = i.
        let (x, stats) = lbfgs(
            |x, g| {
                let mut f = 0.0;
                for (i, (xi, gi)) in x.iter().zip(g.iter_mut()).enumerate() {
                    let (a, d) = ((i + 1) as f64, xi - i as f64);
                    f += a * d * d;
                    *gi = 2.0 * a * d;
                }
                f
            },
            5,
            200,
        );
        assert!(stats.converged, "{stats:?}");
        for (i, xi) in x.iter().enumerate() {
            assert!((xi - i as f64).abs() < 1e-4, "x[{i}] = {xi}");
        }
    }
}
