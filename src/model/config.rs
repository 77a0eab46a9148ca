//! `config.json` of a Hugging Face-style model directory, plus dealsift's own
//! serving metadata kept under the `"dealsift"` key (ignored by `transformers`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::model::lexical::Vocabulary;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    /// Label names by class index; keys are decimal strings as `transformers` writes them.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    #[serde(default)]
    pub dealsift: ServingMeta,
    /// Everything else in the file, written back unchanged when the trainer saves a model.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What the server needs beyond the architecture: identity, calibration and decision rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServingMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Logits are divided by this before the softmax (temperature scaling, fit on validation data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Default decision threshold on the deal probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Name of the deal class in `id2label` (default: the label named "deal", any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deal_label: Option<String>,
    /// Window the model was trained for, special tokens included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
    /// How the whole-document lexical model (`lexical.safetensors`) joins the transformer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<LexicalMeta>,
}

/// For a text the stage joins (`joins`), the deal probability is
/// sigmoid(((1 - weight) * z_transformer + weight * z_lexical) / temperature), with z_transformer
/// the transformer's temperature-scaled deal log-odds (of its first window, or of the windows'
/// aggregate when chunking; the join is fit on first windows); other texts keep the
/// transformer's probability. All three numbers are fit on validation data; `threshold` is the
/// default for every text when the stage is served, so `dealsift.threshold` stays the
/// transformer's (what a server without this stage applies).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
// A field this build does not know would change how the stage must be served: refuse it.
#[serde(deny_unknown_fields)]
pub struct LexicalMeta {
    pub weight: f64,
    pub temperature: f64,
    pub threshold: f64,
    /// Absent in 1.7.0's config: long texts only.
    #[serde(default)]
    pub joins: Joins,
    /// The words the lexical model was trained on (absent: all words).
    #[serde(default)]
    pub vocabulary: Vocabulary,
}

/// Which texts the lexical stage joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Joins {
    /// Texts longer than the window (truncated, or read in several windows): the bag of words
    /// reads what the transformer cannot.
    #[default]
    LongTexts,
    /// Every text.
    AllTexts,
}

impl Joins {
    pub fn includes(self, longer_than_window: bool) -> bool {
        self == Joins::AllTexts || longer_than_window
    }
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_python") {
            return Err(ModelError::Invalid(format!(
                "hidden_act {:?} is not supported (expected gelu)",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::Invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        self.labels()?;
        self.deal_index()?;
        if let Some(l) = self.dealsift.lexical {
            if !((0.0..=1.0).contains(&l.weight) && l.temperature.is_finite() && l.temperature > 0.0 && (0.0..=1.0).contains(&l.threshold)) {
                return Err(ModelError::Invalid(format!(
                    "dealsift.lexical needs a weight and a threshold in [0, 1] and a temperature > 0, got {}, {} and {}",
                    l.weight, l.threshold, l.temperature
                )));
            }
            if self.num_labels() != 2 {
                return Err(ModelError::Invalid("dealsift.lexical needs a two-class (deal, non-deal) model".into()));
            }
        }
        Ok(())
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len().max(2)
    }

    /// Label names in class-index order.
    pub fn labels(&self) -> Result<Vec<String>, ModelError> {
        if self.id2label.is_empty() {
            return Err(ModelError::Invalid("config.json has no id2label".into()));
        }
        (0..self.id2label.len())
            .map(|i| {
                self.id2label.get(&i.to_string()).cloned().ok_or_else(|| {
                    ModelError::Invalid(format!("id2label must number classes 0..{}; {i} is missing", self.id2label.len()))
                })
            })
            .collect()
    }

    /// Class index of the deal label.
    pub fn deal_index(&self) -> Result<usize, ModelError> {
        let wanted = self.dealsift.deal_label.as_deref().unwrap_or("deal");
        self.labels()?
            .iter()
            .position(|l| l.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| ModelError::Invalid(format!("id2label has no label named {wanted:?} (set dealsift.deal_label)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_meta_reads_older_configs_and_refuses_unknown_fields() {
        // 1.7.0's config.json: no joins or vocabulary, so long texts and every word.
        let older: LexicalMeta = serde_json::from_str(r#"{"weight": 0.35, "temperature": 0.9, "threshold": 0.47}"#).unwrap();
        assert_eq!((older.joins, older.vocabulary), (Joins::LongTexts, Vocabulary::AllWords));
        let current: LexicalMeta =
            serde_json::from_str(r#"{"weight": 0.6, "temperature": 0.7, "threshold": 0.34, "joins": "all-texts", "vocabulary": "content-words"}"#).unwrap();
        assert_eq!((current.joins, current.vocabulary), (Joins::AllTexts, Vocabulary::ContentWords));
        assert!(serde_json::from_str::<LexicalMeta>(r#"{"weight": 0.6, "temperature": 0.7, "threshold": 0.34, "stemming": true}"#).is_err());
    }
}
