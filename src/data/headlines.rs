//! Publisher-style headlines written for this project and read blind against the deal
//! definition (`tools/annotate/headlines.py`, `data/DATA_CARD.md`): the kind of text users
//! send, which no shared pool has. Their texts are the project's own, so unlike the pools
//! they live in the repository. Two files, split by the years of the events:
//! - `headlines-2024-2026.jsonl`, the headlines test set: read twice each; evaluation only.
//! - `headlines-2015-2023.jsonl`, `headlines-2012-2023-r2.jsonl` and `headlines-2012-2023-r3.jsonl`,
//!   three rounds of training items of older events (so no test event is trained on; round 3
//!   writes in the pools' styles: portal sentences, tweets, aggregator headlines): read once each
//!   beside the writer's own label; a validation share is carved out by the hash of each item's
//!   group (items of all rounds sharing 40% of their words), so near-identical wordings of one
//!   event never sit on both sides.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{in_validation, read_jsonl, DataError, Example};

#[derive(Debug, Deserialize)]
pub struct HeadlineRow {
    pub id: String,
    pub text: String,
    /// When the event happened (`YYYY-MM`), as the writer remembered it.
    pub month: String,
    pub label: String,
    pub subtype: String,
    /// The two judges (`a40+a41`, or a reader and the writer, `a44+w-1`), with
    /// `+adjudicated` where they disagreed.
    pub annotator: String,
    /// Training headlines: the first id of its group (headlines sharing 40% of their words).
    pub group: Option<String>,
}

/// Per mille of the training headlines carved out for validation: more than the pools'
/// share, because the set is small and it is the closest the validation split comes to the
/// headlines users send.
pub const VALIDATION_PERMILLE: u64 = 200;

pub fn default_path() -> PathBuf {
    super::modern::default_labels_path().with_file_name("headlines-2024-2026.jsonl")
}

/// The training rounds' files; their groups were computed over all of them together.
pub fn training_paths() -> [PathBuf; 3] {
    ["headlines-2015-2023.jsonl", "headlines-2012-2023-r2.jsonl", "headlines-2012-2023-r3.jsonl"].map(|name| default_path().with_file_name(name))
}

pub fn read_rows(path: &Path) -> Result<Vec<HeadlineRow>, DataError> {
    read_jsonl(path)
}

fn example(row: HeadlineRow) -> Example {
    Example { id: row.id, title: None, text: row.text, deal: row.label == "DEAL", subtype: Some(row.subtype) }
}

pub fn load(path: &Path) -> Result<Vec<Example>, DataError> {
    Ok(read_rows(path)?.into_iter().map(example).collect())
}

/// The training headlines of `paths` as (validation, training), split by group. A group is
/// named by its first id, so unlike the pools' split this one depends on the files: a new
/// round can merge groups and move rows across.
pub fn load_split(paths: &[PathBuf]) -> Result<(Vec<Example>, Vec<Example>), DataError> {
    let mut rows = Vec::new();
    for path in paths {
        rows.extend(read_rows(path)?);
    }
    let (validation, training): (Vec<_>, Vec<_>) =
        rows.into_iter().partition(|row| in_validation(row.group.as_deref().unwrap_or(&row.id), VALIDATION_PERMILLE));
    Ok((validation.into_iter().map(example).collect(), training.into_iter().map(example).collect()))
}
