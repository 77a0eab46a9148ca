//! Data readers against the shared data sets' documented counts, and the committed modern
//! labels against the pools they are keyed to. Skipped (with a message) where
//! `../shared/data` is absent, as in a user's clone; CI always has it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use dealsift::data::{self, funding, modern, reuters, twitter, Split};

fn data_dir() -> Option<PathBuf> {
    let dir = data::default_data_dir();
    if dir.join("reuters21578").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: {} not found (set DEALSIFT_DATA_DIR to the shared data sets)", dir.display());
        None
    }
}

#[test]
fn reuters_modapte_split_matches_the_documented_counts() {
    let Some(dir) = data_dir() else { return };
    let train = reuters::load(&dir.join("reuters21578"), Split::Train).unwrap();
    let test = reuters::load(&dir.join("reuters21578"), Split::Test).unwrap();
    assert_eq!(train.len(), 9603);
    assert_eq!(test.len(), 3299);
    assert_eq!(train.iter().filter(|e| e.deal).count(), 1650);
    assert_eq!(test.iter().filter(|e| e.deal).count(), 719);
    assert!(test.iter().all(|e| !e.text.trim().is_empty()), "every test document has text");
    let unclean = test.iter().find(|e| e.text.contains("&lt;") || e.text.ends_with(" Reuter") || e.text.ends_with(" REUTER"));
    assert!(unclean.is_none(), "entities or sign-off left in {:?}", unclean.map(|e| (&e.id, &e.text[e.text.len().saturating_sub(80)..])));
}

#[test]
fn twitter_topic_files_match_the_documented_counts() {
    let Some(dir) = data_dir() else { return };
    let dir = dir.join("twitter-financial-news-topic");
    let train = twitter::load(&dir, Split::Train).unwrap();
    let test = twitter::load(&dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (16990, 4117));
    let count = |set: &[(data::Example, u32)], topic| set.iter().filter(|(_, t)| *t == topic).count();
    assert_eq!((count(&train, twitter::MA_INVESTMENTS), count(&test, twitter::MA_INVESTMENTS)), (471, 116));
    assert_eq!((count(&train, twitter::IPO), count(&test, twitter::IPO)), (44, 14));
    assert_eq!(test.iter().filter(|(e, _)| e.deal).count(), 130);
}

#[test]
fn every_modern_label_joins_to_a_pool_item() {
    let Some(dir) = data_dir() else { return };
    let pools = modern::read_pools(&dir).unwrap();
    let rows: Vec<_> = modern::default_label_paths().iter().flat_map(|p| modern::read_labels(p).unwrap()).collect();
    let missing: Vec<_> = rows.iter().filter(|r| !pools.contains_key(&r.id)).map(|r| r.id.as_str()).collect();
    assert!(missing.is_empty(), "{} label ids not in ../shared/data, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
}

#[test]
fn modern_labels_are_well_formed_and_meet_the_quotas() {
    let rows = modern::read_labels(&modern::default_labels_path()).unwrap();
    let ids: HashSet<_> = rows.iter().map(|r| &r.id).collect();
    assert_eq!(ids.len(), rows.len(), "one label per id");
    let mut subtypes: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        assert!(matches!(r.label.as_str(), "DEAL" | "NONDEAL"), "{}", r.id);
        assert_eq!(r.label == "NONDEAL", r.subtype == "OTHER", "{}: {} {}", r.id, r.label, r.subtype);
        assert!(r.split().is_some(), "{}: split {}", r.id, r.split);
        *subtypes.entry(r.subtype.as_str()).or_default() += 1;
    }
    assert!(rows.len() >= 6000);
    assert!(rows.iter().filter(|r| r.label == "DEAL").count() >= 1500);
    for s in ["MA", "INVEST", "IPO", "CONTRACT"] {
        assert!(subtypes[s] >= 150, "{s}: {}", subtypes[s]);
    }
    let test: Vec<_> = rows.iter().filter(|r| r.split == "test").collect();
    assert!(test.len() >= 1000);
    assert!(test.iter().all(|r| !r.id.starts_with("twitter-topic-")), "the modern test split holds modern pool items only");
}

/// Later rounds are well formed, label only new ids, and never join the test split (so test
/// results stay comparable across models).
#[test]
fn later_round_labels_are_new_well_formed_and_kept_out_of_test() {
    let paths = modern::default_label_paths();
    let mut seen: HashSet<String> = modern::read_labels(&paths[0]).unwrap().into_iter().map(|r| r.id).collect();
    for path in &paths[1..] {
        let rows = modern::read_labels(path).unwrap();
        assert!(rows.len() >= 1000, "{}: {} rows", path.display(), rows.len());
        for r in &rows {
            assert!(seen.insert(r.id.clone()), "{} is labelled in an earlier round or twice", r.id);
            assert_eq!(r.label == "NONDEAL", r.subtype == "OTHER", "{}: {} {}", r.id, r.label, r.subtype);
            assert!(matches!(r.split(), Some(Split::Train | Split::Validation)), "{}: split {}", r.id, r.split);
        }
    }
}

#[test]
fn corpus_keeps_test_texts_out_of_training() {
    let Some(dir) = data_dir() else { return };
    let corpus = data::Corpus::load(&dir, &modern::default_label_paths()).unwrap();
    let test_keys: HashSet<String> = corpus.test.iter().flat_map(|(_, s)| s.iter().map(data::dedup_key)).collect();
    for (name, set) in corpus.train.iter().chain(&corpus.validation) {
        let leaked = set.iter().filter(|e| test_keys.contains(&data::dedup_key(e))).count();
        assert_eq!(leaked, 0, "{name}: {leaked} test texts in training or validation");
    }
    let sizes: Vec<_> = corpus.test.iter().map(|(n, s)| (*n, s.len())).collect();
    assert_eq!(&sizes[..3], [("reuters", 3299), ("twitter-definition", 4117), ("twitter", 4117)]);
    let (by_topic, by_definition) = (&corpus.test[2].1, &corpus.test[1].1);
    assert!(by_topic.iter().zip(by_definition).all(|(t, d)| t.id == d.id && t.text == d.text), "the same rows in the same order");
    // The written headlines validate only a model they train, so models without them calibrate
    // on the same sets as before they existed.
    let validated = |sources: &[&str]| -> Vec<&str> {
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        corpus.validation_for(&sources).map(|(name, _)| *name).collect()
    };
    assert_eq!(validated(&["reuters", "twitter", "modern"]), ["reuters", "twitter", "modern"]);
    assert_eq!(validated(&["reuters", "twitter", "modern", "headlines"]), ["reuters", "twitter", "modern", "headlines"]);

    // The lexical stage's articles are the whole texts of modern training items, with their labels.
    let modern_train: std::collections::HashMap<&str, bool> =
        corpus.train.iter().filter(|(n, _)| *n == "modern").flat_map(|(_, s)| s.iter().map(|e| (e.id.as_str(), e.deal))).collect();
    assert!(corpus.train_articles.len() > 500, "{} articles", corpus.train_articles.len());
    for article in &corpus.train_articles {
        assert!(article.id.starts_with("wikinews-econ-") && !article.text.trim().is_empty(), "{}", article.id);
        assert_eq!(modern_train.get(article.id.as_str()), Some(&article.deal), "{}: a modern training item, same label", article.id);
    }
}

#[derive(serde::Deserialize)]
struct Read {
    label: String,
    subtype: String,
}

#[derive(serde::Deserialize)]
struct Pair {
    id: String,
    first: Read,
    second: Read,
}

fn read_pairs(file: &str) -> Vec<Pair> {
    let path = modern::default_labels_path().with_file_name(file);
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Cohen's kappa of two reads of the same items, on the label and on the subtype.
fn kappas(pairs: &[Pair]) -> (f64, f64) {
    let kappa = |read: &dyn Fn(&Pair) -> (&str, &str)| {
        let n = pairs.len() as f64;
        let mut observed = 0.0;
        let (mut ca, mut cb): (HashMap<&str, f64>, HashMap<&str, f64>) = Default::default();
        for (x, y) in pairs.iter().map(read) {
            observed += f64::from(u8::from(x == y)) / n;
            *ca.entry(x).or_default() += 1.0;
            *cb.entry(y).or_default() += 1.0;
        }
        let expected: f64 = ca.iter().map(|(k, v)| v * cb.get(k).copied().unwrap_or(0.0)).sum::<f64>() / (n * n);
        (observed - expected) / (1.0 - expected)
    };
    (
        kappa(&|p: &Pair| (p.first.label.as_str(), p.second.label.as_str())),
        kappa(&|p: &Pair| (p.first.subtype.as_str(), p.second.subtype.as_str())),
    )
}

/// Cohen's kappa of the independent double annotation (binary label and subtype).
#[test]
fn double_annotation_agreement_is_at_least_0_85() {
    let pairs = read_pairs("double-annotation.jsonl");
    assert!(pairs.len() >= 400);
    let (binary, subtype) = kappas(&pairs);
    eprintln!("kappa: label {binary:.3}, subtype {subtype:.3} over {} items", pairs.len());
    assert!(binary >= 0.85 && subtype >= 0.85, "kappa label {binary:.3}, subtype {subtype:.3}");
}

/// Every modern test item was read a second time, blind; the reads agree, and a test label
/// differs from its first read only where an adjudication changed it.
#[test]
fn every_test_item_has_a_second_read_and_disagreements_are_adjudicated() {
    let pairs = read_pairs("test-second-reads.jsonl");
    let rows = modern::read_labels(&modern::default_labels_path()).unwrap();
    let test: HashMap<&str, &modern::LabelRow> = rows.iter().filter(|r| r.split() == Some(Split::Test)).map(|r| (r.id.as_str(), r)).collect();
    assert_eq!(pairs.len(), test.len());
    for p in &pairs {
        let row = test.get(p.id.as_str()).unwrap_or_else(|| panic!("{} is not a test item", p.id));
        let kept = (row.label.as_str(), row.subtype.as_str()) == (p.first.label.as_str(), p.first.subtype.as_str());
        assert!(kept || row.round.starts_with("r1:test-reread-adjudicated:"), "{}: changed without adjudication", p.id);
    }
    let (binary, subtype) = kappas(&pairs);
    assert!(binary >= 0.85 && subtype >= 0.85, "kappa label {binary:.3}, subtype {subtype:.3}");
}

/// The synthetic funding source: one deal and one non-deal headline per usable record, every
/// template filled, ids unique, and the same set on every call.
#[test]
fn funding_headlines_pair_a_deal_with_a_non_deal_per_record() {
    let Some(dir) = data_dir() else { return };
    let set = funding::load(&dir).unwrap();
    assert!(set.len() >= 5000, "only {} headlines from 3,044 records", set.len());
    let deals = set.iter().filter(|e| e.deal).count();
    assert_eq!(deals * 2, set.len(), "one deal per record");
    for pair in set.chunks(2) {
        let record = pair[0].id.strip_suffix("-deal").expect("deal first");
        assert_eq!(pair[1].id, format!("{record}-other"));
        assert!(pair[0].deal && !pair[1].deal);
        assert_eq!((pair[0].subtype.as_deref(), pair[1].subtype.as_deref()), (Some("INVEST"), Some("OTHER")));
    }
    let ids: HashSet<&str> = set.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), set.len());
    let unfilled = set.iter().find(|e| e.text.contains(['{', '}', '\\']) || e.text.split_whitespace().any(|w| w == "nan") || e.text.trim().len() < 15);
    assert!(unfilled.is_none(), "{unfilled:?}");
    let again = funding::load(&dir).unwrap();
    assert!(set.iter().zip(&again).all(|(a, b)| a.id == b.id && a.text == b.text), "deterministic");
}

/// Both written-headline files: two judgments per row (the test set: two blind reads; the
/// training set: a blind read and the writer's own label) that agree (kappa), and a label that
/// differs from agreeing judgments never and from disagreeing ones only by adjudication.
fn check_headline_judgments(path: &std::path::Path, min_rows: usize) -> Vec<data::headlines::HeadlineRow> {
    let rows = data::headlines::read_rows(path).unwrap();
    let pairs = read_pairs(path.file_name().unwrap().to_str().unwrap());
    assert!(rows.len() >= min_rows, "{} headlines", rows.len());
    assert_eq!(rows.iter().map(|r| &r.id).collect::<HashSet<_>>().len(), rows.len(), "one row per id");
    for (row, pair) in rows.iter().zip(&pairs) {
        assert!(matches!(row.label.as_str(), "DEAL" | "NONDEAL"), "{}", row.id);
        assert_eq!(row.label == "NONDEAL", row.subtype == "OTHER", "{}: {} {}", row.id, row.label, row.subtype);
        let agreed = (pair.first.label.as_str(), pair.first.subtype.as_str()) == (pair.second.label.as_str(), pair.second.subtype.as_str());
        let as_read = (row.label.as_str(), row.subtype.as_str()) == (pair.first.label.as_str(), pair.first.subtype.as_str());
        assert!(if agreed { as_read } else { row.annotator.ends_with("+adjudicated") }, "{}: label without agreement or adjudication", row.id);
    }
    let (binary, subtype) = kappas(&pairs);
    assert!(binary >= 0.85 && subtype >= 0.85, "kappa label {binary:.3}, subtype {subtype:.3}");
    rows
}

/// (`corpus_keeps_test_texts_out_of_training` keeps the test set's texts out of training.)
#[test]
fn headlines_are_read_twice_and_disagreements_adjudicated() {
    check_headline_judgments(&data::headlines::default_path(), 400);
}

/// Round 3 was written in the pools' styles, so `headlines.py` also kept it away from the pools'
/// held-out texts: none of its items shares half its words with a modern or twitter validation
/// or test text (which would flatter the validation figures that choose a model, or leak a
/// test event).
#[test]
fn round_3_items_are_kept_apart_from_the_pools_held_out_texts() {
    let Some(dir) = data_dir() else { return };
    let corpus = data::Corpus::load(&dir, &modern::default_label_paths()).unwrap();
    let held_out: Vec<(&str, HashSet<String>)> = corpus
        .validation
        .iter()
        .chain(&corpus.test)
        .filter(|(name, _)| matches!(*name, "modern" | "twitter"))
        .flat_map(|(_, set)| set.iter().map(|e| (e.id.as_str(), word_set(&e.text))))
        .collect();
    // An inverted index: only texts sharing a word with an item can be close to it.
    let mut postings: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (_, words)) in held_out.iter().enumerate() {
        words.iter().for_each(|w| postings.entry(w.as_str()).or_default().push(i));
    }
    let rows = data::headlines::read_rows(&data::headlines::training_paths()[2]).unwrap();
    for row in &rows {
        let own = word_set(&row.text);
        let mut shared: HashMap<usize, usize> = HashMap::new();
        own.iter().flat_map(|w| postings.get(w.as_str()).into_iter().flatten()).for_each(|&i| *shared.entry(i).or_default() += 1);
        if let Some((&i, _)) = shared.iter().find(|&(&i, &n)| jaccard_at_least(n, own.len(), held_out[i].1.len(), 1, 2)) {
            panic!("{} shares half its words with {}", row.id, held_out[i].0);
        }
    }
}

/// A headline's words as `tools/annotate/headlines.py` splits them (`\W+`, lower case), so the
/// checks below apply the rules that tool applied.
fn word_set(text: &str) -> HashSet<String> {
    text.to_lowercase().split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// Whether two word sets' Jaccard similarity reaches `numerator / denominator`.
fn share_at_least(a: &HashSet<String>, b: &HashSet<String>, numerator: usize, denominator: usize) -> bool {
    jaccard_at_least(a.intersection(b).count(), a.len(), b.len(), numerator, denominator)
}

/// The same test from the sets' sizes and the number of words they share.
fn jaccard_at_least(shared: usize, a_len: usize, b_len: usize, numerator: usize, denominator: usize) -> bool {
    shared * denominator >= numerator * (a_len + b_len - shared)
}

/// Training headlines (all rounds): judged twice, of events before the test years, none
/// sharing half its words with a test headline, and split into validation and training by
/// event groups that span the rounds.
#[test]
fn training_headlines_are_judged_twice_and_kept_apart_from_the_test_events() {
    let paths = data::headlines::training_paths();
    let mut rows = check_headline_judgments(&paths[0], 1000);
    rows.extend(check_headline_judgments(&paths[1], 1500));
    rows.extend(check_headline_judgments(&paths[2], 1100));
    let tests: Vec<_> = data::headlines::read_rows(&data::headlines::default_path()).unwrap().iter().map(|r| word_set(&r.text)).collect();
    for row in &rows {
        assert!(row.month.as_str() < "2024", "{}: {} is a test year", row.id, row.month);
        let own = word_set(&row.text);
        let close = tests.iter().find(|t| share_at_least(&own, t, 1, 2));
        assert!(close.is_none(), "{} shares half its words with a test headline", row.id);
    }
    let (validation, training) = data::headlines::load_split(&paths).unwrap();
    assert_eq!(validation.len() + training.len(), rows.len());
    assert_eq!(rows.iter().map(|r| &r.id).collect::<HashSet<_>>().len(), rows.len(), "one row per id across the rounds");
    // The split follows the group, so what keeps an event on one side is the grouping itself:
    // no validation headline shares 40% of its words (headlines.py's rule) with a training one.
    let group: HashMap<&str, &str> = rows.iter().map(|r| (r.id.as_str(), r.group.as_deref().expect("training rows carry their event group"))).collect();
    let training_words: Vec<_> = training.iter().map(|e| (e.id.as_str(), word_set(&e.text))).collect();
    for held_out in &validation {
        let own = word_set(&held_out.text);
        for (id, other) in &training_words {
            assert!(!share_at_least(&own, other, 2, 5), "{} (validation, group {}) and {id} (training, group {}) share 40% of their words", held_out.id, group[held_out.id.as_str()], group[id]);
        }
    }
    let share = validation.len() as f64 / rows.len() as f64;
    assert!((0.15..=0.25).contains(&share), "{} of {} headlines in validation", validation.len(), rows.len());
}
