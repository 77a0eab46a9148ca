//! twitter-financial-news-topic (CSV: text,label). Deal = "M&A | Investments" (13) or "IPO" (11).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{modern, DataError, Example, Split};

pub const MA_INVESTMENTS: u32 = 13;
pub const IPO: u32 = 11;

/// `topic_train.csv` (Train) or `topic_valid.csv` (Test: the public validation split is our
/// test set). Ids: `twitter-topic-{train|valid}-<1-based data row, 5 digits>`.
pub fn load(dir: &Path, split: Split) -> Result<Vec<(Example, u32)>, DataError> {
    let (file, tag) = match split {
        Split::Test => ("topic_valid.csv", "valid"),
        _ => ("topic_train.csv", "train"),
    };
    let path = dir.join(file);
    let mut reader = csv::Reader::from_path(&path).map_err(|e| DataError::parse(&path, e.to_string()))?;
    let mut out = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| DataError::parse(&path, e.to_string()))?;
        let (Some(text), Some(label)) = (record.get(0), record.get(1)) else {
            return Err(DataError::parse(&path, format!("row {}: expected text,label", row + 1)));
        };
        let topic: u32 = label.trim().parse().map_err(|_| DataError::parse(&path, format!("row {}: label {label:?}", row + 1)))?;
        let id = format!("twitter-topic-{tag}-{:05}", row + 1);
        let text = text.replace("&amp;", "&");
        out.push((Example { id, title: None, text, deal: topic == MA_INVESTMENTS || topic == IPO, subtype: None }, topic));
    }
    Ok(out)
}

/// Our annotators' labels, by the deal definition, for every row of `topic_valid.csv` (see
/// `data/DATA_CARD.md`): the twitter test set judged by the concept rather than by its topic
/// class. Evaluation only; never trained on or used for calibration.
pub fn definition_labels_path() -> PathBuf {
    modern::default_labels_path().with_file_name("twitter-valid-labels.jsonl")
}

/// The twitter test set with each row's label and subtype taken from `labels` instead of its
/// topic class. The labels must cover exactly the set's rows.
pub fn by_definition(test: &[Example], labels: &Path) -> Result<Vec<Example>, DataError> {
    let rows: HashMap<String, modern::LabelRow> = modern::read_labels(labels)?.into_iter().map(|r| (r.id.clone(), r)).collect();
    if rows.len() != test.len() {
        return Err(DataError::parse(labels, format!("{} labels for {} twitter test rows", rows.len(), test.len())));
    }
    test.iter()
        .map(|ex| {
            let row = rows.get(&ex.id).ok_or_else(|| DataError::parse(labels, format!("no label for {}", ex.id)))?;
            Ok(Example { deal: row.label == "DEAL", subtype: Some(row.subtype.clone()), ..ex.clone() })
        })
        .collect()
}
