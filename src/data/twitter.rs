//! twitter-financial-news-topic (CSV: text,label). Deal = "M&A | Investments" (13) or "IPO" (11).

use std::path::Path;

use super::{DataError, Example, Split};

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
