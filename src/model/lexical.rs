//! A bag-of-words logistic regression that reads the whole document, combined with the
//! transformer's calibrated logit (`engine::combine`) on the texts `dealsift.lexical.joins` names.
//!
//! Why: by default the transformer reads the first window only (128 tokens), so a newswire story
//! whose lead is about something else hides its deal; a linear model over words and word pairs
//! reads all of it, cheaply (microseconds per document), and is a second, differently wrong
//! opinion on short texts too.
//! Features are hashed unigrams and bigrams of lower-cased words (runs of Unicode letters and
//! digits, two characters or more; function words dropped first under
//! [`Vocabulary::ContentWords`]), weighted 1 + ln(tf) times a smoothed IDF and L2-normalised;
//! buckets seen in fewer than two training documents get IDF 0, so words the model has no
//! weight for do not dilute the ones it has (at serving time as in training). The same code
//! computes the features when training and serving; the weights, IDFs and bias are stored.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::fnv;

/// File name inside a model directory.
pub const FILE: &str = "lexical.safetensors";

/// Number of hash buckets the trainer uses (2^18: 2 MB of f32 weights and IDFs).
pub const DEFAULT_BUCKETS: usize = 1 << 18;

/// A sparse feature vector: (bucket, value), buckets ascending and distinct.
type Features = Vec<(u32, f32)>;

/// Which words become features (recorded in `dealsift.lexical.vocabulary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vocabulary {
    /// Every word (1.7.0's stage).
    #[default]
    AllWords,
    /// Without the function words of [`FUNCTION_WORDS`]: they mark a text's genre (long
    /// newswire prose) rather than a deal, and taught the model that any paragraph of prose
    /// leans non-deal (MODEL_CARD.md).
    ContentWords,
}

/// English articles, pronouns, auxiliaries, prepositions, conjunctions and a few adverbs,
/// sorted. Deliberately not here: negations ("not", "no"), particles of phrasal verbs that name
/// deals ("buy out", "take over", "snap up", "spin off"), "us" (the U.S.) and "may" (the month).
pub const FUNCTION_WORDS: [&str; 143] = [
    "about", "above", "across", "after", "again", "against", "all", "also", "although", "am", "among", "an", "and",
    "another", "any", "are", "around", "as", "at", "be", "because", "been", "before", "behind", "being", "below",
    "between", "beyond", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "during", "each",
    "either", "every", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself",
    "him", "himself", "his", "how", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "might", "mine",
    "must", "my", "myself", "near", "neither", "of", "on", "once", "only", "onto", "or", "other", "our", "ours",
    "ourselves", "own", "per", "same", "shall", "she", "should", "since", "so", "some", "such", "than", "that", "the",
    "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "though", "through",
    "to", "too", "toward", "towards", "under", "unless", "until", "upon", "very", "via", "was", "we", "were", "what",
    "whatever", "when", "where", "whether", "which", "while", "who", "whoever", "whom", "whose", "why", "will",
    "with", "within", "without", "would", "yet", "you", "your", "yours", "yourself", "yourselves",
];

/// How the stage turns a text into features, and how its logistic regression is fit.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Recipe {
    pub buckets: usize,
    pub vocabulary: Vocabulary,
    /// Loss weight of the deal class relative to non-deal.
    pub deal_weight: f64,
    /// Inverse L2 strength (as scikit-learn's `C`): larger fits the training data more closely.
    pub c: f64,
}

#[derive(Debug, Clone)]
pub struct LexicalModel {
    weights: Vec<f32>,
    idf: Vec<f32>,
    bias: f32,
    vocabulary: Vocabulary,
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

/// Lower-cased words of two characters or more (letters and digits; everything else separates),
/// without the function words when `vocabulary` says so.
fn words(text: &str, vocabulary: Vocabulary) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().nth(1).is_some())
        .map(str::to_lowercase)
        .filter(|w| vocabulary == Vocabulary::AllWords || FUNCTION_WORDS.binary_search(&w.as_str()).is_err())
        .collect()
}

/// Raw term counts per bucket of the document's unigrams and bigrams (the title, when given,
/// is read before the body, as the transformer reads it). A dropped function word does not
/// break a pair: "stake in Acme" pairs "stake" with "acme".
fn term_counts(title: Option<&str>, text: &str, buckets: usize, vocabulary: Vocabulary) -> Features {
    let mut tokens = title.map(|t| words(t, vocabulary)).unwrap_or_default();
    tokens.extend(words(text, vocabulary));
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
        let x = weigh(&term_counts(title, text, self.buckets(), self.vocabulary), &self.idf);
        self.bias + x.iter().map(|&(b, v)| v * self.weights[b as usize]).sum::<f32>()
    }

    /// Loads the weights of a model whose features were made with `vocabulary`.
    pub fn load(path: &Path, vocabulary: Vocabulary) -> Result<Self, ModelError> {
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
        Ok(Self { weights, idf, bias: bias[0], vocabulary })
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

    /// Fits the model on `texts` (title, body) by L-BFGS on the class-weighted, L2-regularised
    /// log loss: sum of weight_i * loss_i + |w|^2 / (2 * c), the bias unregularised.
    /// Deterministic: one thread, fixed order.
    pub fn fit(texts: &[(Option<&str>, &str)], deal: &[bool], recipe: &Recipe) -> Result<(Self, FitStats), ModelError> {
        let Recipe { buckets, vocabulary, deal_weight, c } = *recipe;
        if texts.len() != deal.len() || !deal.contains(&true) || !deal.contains(&false) {
            return Err(ModelError::Invalid(format!(
                "the lexical model needs one label per document and both classes; got {} documents, {} labels, {} deals",
                texts.len(),
                deal.len(),
                deal.iter().filter(|&&d| d).count()
            )));
        }
        if buckets == 0 {
            return Err(ModelError::Invalid("the lexical model needs at least one hash bucket".into()));
        }
        let docs: Vec<Features> = texts.iter().map(|&(title, text)| term_counts(title, text, buckets, vocabulary)).collect();
        let n = docs.len() as f64;
        let mut df = vec![0u32; buckets];
        for d in &docs {
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
        let weights = theta[..buckets].iter().map(|&v| v as f32).collect();
        Ok((Self { weights, idf, bias: theta[buckets] as f32, vocabulary }, stats))
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
        let a = term_counts(Some("Acme to BUY"), "Widgets, a unit!", DEFAULT_BUCKETS, Vocabulary::AllWords);
        let b = term_counts(None, "acme to buy widgets a unit", DEFAULT_BUCKETS, Vocabulary::AllWords);
        // Punctuation, case and the title boundary do not matter; one-letter words are dropped,
        // so both read: acme to buy widgets unit (5 words, 4 pairs).
        assert_eq!(a, b);
        assert_eq!(a.iter().map(|(_, c)| c).sum::<f32>(), 9.0);
    }

    #[test]
    fn content_words_drop_function_words_and_pair_across_them() {
        let content = |t| term_counts(None, t, DEFAULT_BUCKETS, Vocabulary::ContentWords);
        // "to" and "the" go; "buy" and "acme" then make a pair, as in "buy Acme".
        assert_eq!(content("Widget Co to buy the Acme unit"), content("widget co buy acme unit"));
        // Negations and deal particles stay.
        assert_ne!(content("not in talks to buy out"), content("talks buy"));
        assert!(FUNCTION_WORDS.windows(2).all(|w| w[0] < w[1]), "sorted, for binary search");
        assert!(FUNCTION_WORDS.iter().all(|w| w.len() > 1 && *w == w.to_lowercase()), "as `words` makes them");
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
        let recipe = Recipe { buckets: 1 << 12, vocabulary: Vocabulary::ContentWords, deal_weight: 1.0, c: 10.0 };
        let docs: Vec<(Option<&str>, &str)> = texts.iter().map(|&(t, _)| (None, t)).collect();
        let truth: Vec<bool> = texts.iter().map(|(_, y)| *y).collect();
        let (model, stats) = LexicalModel::fit(&docs, &truth, &recipe).unwrap();
        assert!(stats.converged, "{stats:?}");
        for (text, deal) in texts {
            assert_eq!(model.logit(None, text) > 0.0, deal, "{text}: {}", model.logit(None, text));
        }
        let dir = std::env::temp_dir().join(format!("dealsift-lexical-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        model.save(&dir.join(FILE)).unwrap();
        let loaded = LexicalModel::load(&dir.join(FILE), Vocabulary::ContentWords).unwrap();
        assert_eq!(loaded.logit(None, texts[0].0), model.logit(None, texts[0].0));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(LexicalModel::fit(&docs, &[true; 6], &recipe).is_err(), "one class only");
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
