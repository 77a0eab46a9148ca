//! Binary classification metrics, temperature scaling and threshold choice.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl Confusion {
    pub fn new(probs: &[f32], truth: &[bool], threshold: f32) -> Self {
        let mut c = Self::default();
        for (&p, &t) in probs.iter().zip(truth) {
            match (p >= threshold, t) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn_)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Area under the ROC curve: the chance a random deal outscores a random non-deal (ties count half).
pub fn roc_auc(probs: &[f32], truth: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    let (mut rank_sum, mut i) = (0.0f64, 0);
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && probs[order[j + 1]] == probs[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += (i..=j).filter(|&k| truth[order[k]]).count() as f64 * avg_rank;
        i = j + 1;
    }
    let pos = truth.iter().filter(|&&t| t).count() as f64;
    let neg = truth.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Deal probability from a two-class logit pair at `temperature`.
pub fn deal_probability(logits: &[f32], deal_index: usize, temperature: f64) -> f32 {
    crate::engine::softmax(logits, temperature)[deal_index]
}

/// Temperature minimising the negative log-likelihood (golden-section search on log T).
pub fn fit_temperature(logits: &[Vec<f32>], truth: &[bool], deal_index: usize) -> f64 {
    let nll = |log_t: f64| -> f64 {
        let t = log_t.exp();
        logits
            .iter()
            .zip(truth)
            .map(|(l, &y)| {
                let p = deal_probability(l, deal_index, t).clamp(1e-7, 1.0 - 1e-7) as f64;
                -(if y { p.ln() } else { (1.0 - p).ln() })
            })
            .sum()
    };
    let (mut a, mut b) = ((0.05f64).ln(), (20.0f64).ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..60 {
        let (c, d) = (b - g * (b - a), a + g * (b - a));
        if nll(c) < nll(d) {
            b = d;
        } else {
            a = c;
        }
    }
    ((a + b) / 2.0).exp()
}

/// The threshold in [0.05, 0.95] (steps of 0.01) maximising the mean F1 over the given sets.
pub fn best_threshold(sets: &[(&[f32], &[bool])]) -> (f32, f64) {
    (5..=95)
        .map(|k| k as f32 / 100.0)
        .map(|t| {
            let mean = sets.iter().map(|(p, y)| Confusion::new(p, y, t).f1()).sum::<f64>() / sets.len().max(1) as f64;
            (t, mean)
        })
        .fold((0.5, -1.0), |best, cur| if cur.1 > best.1 { cur } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_and_scores() {
        let c = Confusion::new(&[0.9, 0.8, 0.2, 0.6], &[true, false, true, false], 0.5);
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (1, 2, 0, 1));
        assert!((c.precision() - 1.0 / 3.0).abs() < 1e-12);
        assert!((c.recall() - 0.5).abs() < 1e-12);
        assert!((c.f1() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn auc_handles_ties_and_extremes() {
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), 0.0);
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), 0.5);
    }

    #[test]
    fn temperature_recovers_overconfidence() {
        // Logits scaled up 3x from calibrated ones: the fitted temperature is near 3.
        let mut logits = Vec::new();
        let mut truth = Vec::new();
        for i in 0..2000 {
            let z = (i as f32 / 2000.0) * 8.0 - 4.0;
            let p = 1.0 / (1.0 + (-z).exp());
            // Deterministic labels with the right frequency per bin.
            let y = ((i * 7919) % 1000) as f32 / 1000.0 < p;
            logits.push(vec![0.0, 3.0 * z]);
            truth.push(y);
        }
        let t = fit_temperature(&logits, &truth, 1);
        assert!((2.4..3.6).contains(&t), "temperature {t}");
    }
}
