//! The project's own labels for modern news items (`data/modern-labels*.jsonl`, see
//! `data/DATA_CARD.md`), joined by stable id to the texts in `../shared/data`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DataError, Example, Split};

/// The committed labels file of round 1 (the only one with a test split).
pub fn default_labels_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/modern-labels.jsonl")
}

/// The later rounds' files (`modern-labels-r2.jsonl`, ...): train and validation items only.
const LATER_ROUNDS: [&str; 3] = ["r2", "r3", "r4"];

/// Every committed labels file, in round order: what training and evaluation read by default.
pub fn default_label_paths() -> Vec<PathBuf> {
    let round1 = default_labels_path();
    let later = LATER_ROUNDS.iter().map(|r| round1.with_file_name(format!("modern-labels-{r}.jsonl")));
    std::iter::once(round1.clone()).chain(later).collect()
}

#[derive(Debug, Clone, Deserialize)]
pub struct LabelRow {
    pub id: String,
    pub label: String,
    pub subtype: String,
    pub annotator: String,
    pub round: String,
    pub split: String,
}

impl LabelRow {
    pub fn split(&self) -> Option<Split> {
        match self.split.as_str() {
            "train" => Some(Split::Train),
            "validation" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

pub fn read_labels(path: &Path) -> Result<Vec<LabelRow>, DataError> {
    super::read_jsonl(path)
}

/// The rows of several labels files. An id labelled in two files is an error: which label
/// would win is not obvious.
pub fn read_label_files(paths: &[PathBuf]) -> Result<Vec<LabelRow>, DataError> {
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for path in paths {
        for row in read_labels(path)? {
            if !seen.insert(row.id.clone()) {
                return Err(DataError::parse(path, format!("id {} is labelled in an earlier file too", row.id)));
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Texts of every pool item the labels may refer to, by id.
pub fn read_pools(data_dir: &Path) -> Result<HashMap<String, String>, DataError> {
    #[derive(Deserialize)]
    struct Item {
        id: String,
        headline: String,
    }
    let mut texts = HashMap::new();
    for file in [
        "wiki-current-events/uncategorized_2021_2026.jsonl",
        "wiki-current-events/business_sci_tech_2015_2021.jsonl",
        "twitter-financial-news-sentiment/tweets.jsonl",
        "uci-news-aggregator-2014/business_scitech_headlines.jsonl",
        ARTICLES,
    ] {
        for item in super::read_jsonl::<Item>(&data_dir.join(file))? {
            texts.insert(item.id, item.headline.replace("&amp;", "&"));
        }
    }
    for (ex, _) in super::twitter::load(&data_dir.join("twitter-financial-news-topic"), Split::Train)? {
        texts.insert(ex.id, ex.text);
    }
    Ok(texts)
}

/// The pool that holds whole articles (headline and body) beside its headlines.
const ARTICLES: &str = "wikinews-economy/economy_and_business.jsonl";

/// The whole articles (headline as title, body as text) of the Wikinews items labelled in
/// `split`, each with its item's label. The label was given to the headline; an article whose
/// headline reports a deal reports it, and one whose headline does not seldom does (its body may
/// mention a deal in passing), so this is weaker supervision than the headlines'. Articles with
/// an empty body are skipped.
pub fn articles(rows: &[LabelRow], data_dir: &Path, split: Split) -> Result<Vec<Example>, DataError> {
    #[derive(Deserialize)]
    struct Article {
        id: String,
        headline: String,
        text: Option<String>,
    }
    let labelled: HashMap<&str, &LabelRow> = rows.iter().filter(|r| r.split() == Some(split)).map(|r| (r.id.as_str(), r)).collect();
    Ok(super::read_jsonl::<Article>(&data_dir.join(ARTICLES))?
        .into_iter()
        .filter_map(|a| {
            let row = labelled.get(a.id.as_str())?;
            let text = a.text.filter(|t| !t.trim().is_empty())?.replace("&amp;", "&").replace("&quot;", "\"");
            let title = Some(a.headline.replace("&amp;", "&"));
            Some(Example { id: a.id, title, text, deal: row.label == "DEAL", subtype: Some(row.subtype.clone()) })
        })
        .collect())
}

/// The labelled examples of `split`, texts taken from `pools` (see [`read_pools`]). Fails if
/// a label's id is not in the pools.
pub fn examples(rows: &[LabelRow], pools: &HashMap<String, String>, split: Split) -> Result<Vec<Example>, DataError> {
    rows.iter()
        .filter(|row| row.split() == Some(split))
        .map(|row| {
            let text = pools.get(&row.id).ok_or_else(|| DataError::UnknownLabelId(row.id.clone()))?;
            Ok(Example { id: row.id.clone(), title: None, text: text.clone(), deal: row.label == "DEAL", subtype: Some(row.subtype.clone()) })
        })
        .collect()
}
