//! The headlines test set (`data/headlines-2024-2026.jsonl`): publisher-style headlines of
//! 2024-2026 events, written for this project and read twice, blind, against the deal
//! definition (`tools/annotate/headlines.py`, `data/DATA_CARD.md`). It stands in for the
//! headlines users send, which no shared pool has. Evaluation only; its texts are the
//! project's own, so unlike the pools they live in the repository.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{read_jsonl, DataError, Example};

#[derive(Debug, Deserialize)]
pub struct HeadlineRow {
    pub id: String,
    pub text: String,
    pub label: String,
    pub subtype: String,
    /// The two readers (`a40+a41`), with `+adjudicated` where they disagreed.
    pub annotator: String,
}

pub fn default_path() -> PathBuf {
    super::modern::default_labels_path().with_file_name("headlines-2024-2026.jsonl")
}

pub fn read_rows(path: &Path) -> Result<Vec<HeadlineRow>, DataError> {
    read_jsonl(path)
}

pub fn load(path: &Path) -> Result<Vec<Example>, DataError> {
    Ok(read_rows(path)?
        .into_iter()
        .map(|row| Example { id: row.id, title: None, text: row.text, deal: row.label == "DEAL", subtype: Some(row.subtype) })
        .collect())
}
