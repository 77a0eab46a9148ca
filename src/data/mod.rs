//! Labelled data for training and evaluation, read from `../shared/data` (never copied
//! into the repository). Every example keeps the stable id of its source item.

pub mod funding;
pub mod headlines;
pub mod modern;
pub mod reuters;
pub mod twitter;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Where the shared data sets live: `$DEALSIFT_DATA_DIR`, else `../shared/data` beside the repository.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("DEALSIFT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Validation,
    Test,
}

#[derive(Debug, Clone)]
pub struct Example {
    /// Stable id of the source item (e.g. `reuters-14826`, `twitter-topic-valid-00012`, `wce-2024-01-03-011`).
    pub id: String,
    pub title: Option<String>,
    pub text: String,
    pub deal: bool,
    /// Deal subtype where the source has one (MA, STAKE, INVEST, IPO, CONTRACT, OTHER).
    pub subtype: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("label id {0} is in no shared data pool: is the data directory complete?")]
    UnknownLabelId(String),
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
    pub fn parse(path: &Path, message: impl Into<String>) -> Self {
        Self::Parse { path: path.display().to_string(), message: message.into() }
    }
}

/// Deterministic validation carve-out: `permille` of ids, chosen by a hash of the id alone,
/// so the split never depends on file order or on which other items exist.
pub fn in_validation(id: &str, permille: u64) -> bool {
    crate::fnv::hash(id) % 1000 < permille
}

/// The records of a JSON Lines file, one per line; a line that does not parse is an error
/// naming the file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, DataError> {
    let body = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    body.lines()
        .enumerate()
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| DataError::parse(path, format!("line {}: {e}", n + 1))))
        .collect()
}

/// Lower-cased alphanumerics, single-spaced: two items with the same key are one text.
pub fn dedup_key(ex: &Example) -> String {
    let mut key = String::new();
    for word in ex.title.iter().map(String::as_str).chain([ex.text.as_str()]).flat_map(str::split_whitespace) {
        let w: String = word.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect();
        if !w.is_empty() {
            if !key.is_empty() {
                key.push(' ');
            }
            key.push_str(&w);
        }
    }
    key
}

/// Drops from `set` every example whose text is in `seen` or earlier in `set`; adds the
/// survivors to `seen`. Call on evaluation sets first so training never sees their texts.
pub fn dedup(set: Vec<Example>, seen: &mut HashSet<String>) -> Vec<Example> {
    set.into_iter().filter(|ex| seen.insert(dedup_key(ex))).collect()
}

/// The named sets of one split.
pub type Sets = Vec<(&'static str, Vec<Example>)>;

/// All labelled data, split and de-duplicated: a text in a test set is never in
/// validation or training, and a validation text never in training. Training also has the
/// synthetic `funding` headlines (see [`funding`]) and the written 2012-2023 headlines (see
/// [`headlines`]).
pub struct Corpus {
    pub test: Sets,
    pub validation: Sets,
    pub train: Sets,
    /// Whole articles of the modern training items that have one ([`modern::articles`]): long
    /// modern prose for the lexical stage, which reads whole texts; not for the transformer,
    /// which reads the first window of each, about what the item's headline says.
    pub train_articles: Vec<Example>,
}

/// Permille of the Reuters and twitter training files carved out for validation.
pub const VALIDATION_PERMILLE: u64 = 100;

impl Corpus {
    /// Reuters ModApte (test = ModApte test), twitter topics (test = the public validation
    /// file; training rows our annotators relabelled take their label), and the modern
    /// labels (`labels`: one file per annotation round) with their committed split; plus the
    /// written headlines (see [`headlines`]): 2024-2026 ones as a test set, 2012-2023 ones
    /// split into training and validation by event group.
    pub fn load(data_dir: &Path, labels: &[PathBuf]) -> Result<Self, DataError> {
        let rows = modern::read_label_files(labels)?;
        let relabelled: std::collections::HashMap<&str, &modern::LabelRow> =
            rows.iter().filter(|r| r.id.starts_with("twitter-topic-")).map(|r| (r.id.as_str(), r)).collect();

        let reuters_dir = data_dir.join("reuters21578");
        let twitter_dir = data_dir.join("twitter-financial-news-topic");
        let (reuters_val, reuters_train): (Vec<_>, Vec<_>) =
            reuters::load(&reuters_dir, Split::Train)?.into_iter().partition(|e| in_validation(&e.id, VALIDATION_PERMILLE));
        let (twitter_val, twitter_train): (Vec<_>, Vec<_>) = twitter::load(&twitter_dir, Split::Train)?
            .into_iter()
            .map(|(mut ex, _)| {
                if let Some(row) = relabelled.get(ex.id.as_str()) {
                    ex.deal = row.label == "DEAL";
                    ex.subtype = Some(row.subtype.clone());
                }
                ex
            })
            .partition(|e| in_validation(&e.id, VALIDATION_PERMILLE));
        let pools = modern::read_pools(data_dir)?;
        let modern_of = |split| -> Result<Vec<Example>, DataError> {
            Ok(modern::examples(&rows, &pools, split)?.into_iter().filter(|e| !e.id.starts_with("twitter-topic-")).collect())
        };

        // Test sets are reported whole (the benchmarks' own counts); their texts are kept
        // out of validation and training.
        let twitter_test: Vec<Example> = twitter::load(&twitter_dir, Split::Test)?.into_iter().map(|(e, _)| e).collect();
        let test: Sets = vec![
            ("reuters", reuters::load(&reuters_dir, Split::Test)?),
            ("twitter-definition", twitter::by_definition(&twitter_test, &twitter::definition_labels_path())?),
            ("twitter", twitter_test),
            ("modern", modern_of(Split::Test)?),
            ("headlines", headlines::load(&headlines::default_path())?),
        ];
        let (headlines_val, headlines_train) = headlines::load_split(&headlines::training_paths())?;
        let mut seen: HashSet<String> = test.iter().flat_map(|(_, set)| set.iter().map(dedup_key)).collect();
        let mut take = |sets: Sets| -> Sets { sets.into_iter().map(|(name, set)| (name, dedup(set, &mut seen))).collect() };
        let validation = take(vec![
            ("reuters", reuters_val),
            ("twitter", twitter_val),
            ("modern", modern_of(Split::Validation)?),
            ("headlines", headlines_val),
        ]);
        let train = take(vec![
            ("reuters", reuters_train),
            ("twitter", twitter_train),
            ("modern", modern_of(Split::Train)?),
            ("funding", funding::load(data_dir)?),
            ("headlines", headlines_train),
        ]);
        // Only of items that stayed in training (not dropped as a held-out text's duplicate).
        let modern_train: HashSet<&str> =
            train.iter().filter(|(name, _)| *name == "modern").flat_map(|(_, set)| set.iter().map(|e| e.id.as_str())).collect();
        let train_articles = modern::articles(&rows, data_dir, Split::Train)?.into_iter().filter(|a| modern_train.contains(a.id.as_str())).collect();
        Ok(Self { test, validation, train, train_articles })
    }

    /// The validation sets of a model trained on `sources`: the pools' carve-outs always, since
    /// every model is measured on them; the written headlines' carve-out only when that source
    /// trains, so a model without it calibrates exactly as before the source existed.
    pub fn validation_for<'a>(&'a self, sources: &'a [String]) -> impl Iterator<Item = &'a (&'static str, Vec<Example>)> + 'a {
        self.validation.iter().filter(move |(name, _)| *name != "headlines" || sources.iter().any(|s| s == "headlines"))
    }
}
