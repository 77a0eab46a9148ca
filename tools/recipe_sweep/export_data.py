#!/usr/bin/env python3
"""Exports the labelled corpus exactly as the Rust readers build it (src/data/*.rs) to
tools/recipe_sweep/data.jsonl.gz: one JSON object per example
  {"set", "split", "id", "title", "text", "deal", "subtype"}
(`title` is only set for Reuters; the sweep joins it as src/tokenize.rs does: "{title}\n{text}").

Mirrors Corpus::load: validation carve-out by FNV-1a(id) % 1000 < 100 from the Reuters and
twitter training files, twitter training rows relabelled by data/modern-labels*.jsonl (every round),
modern examples from the committed split (twitter-topic-* ids excluded), the written headlines
(2024-2026: test; 2012-2023, all three rounds: validation by FNV-1a(event group) % 1000 < 200, else train), test sets whole,
and dedup (test keys first, then validation, then train) so no test text is in
validation/train and no validation text is in train. Non-deal caps are NOT applied here.

Usage (repo root): python3 tools/recipe_sweep/export_data.py [--data-dir ../shared/data]
"""
import argparse
import csv
import gzip
import json
import os
import re
import sys
import unicodedata
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VALIDATION_PERMILLE = 100
HEADLINES_VALIDATION_PERMILLE = 200  # headlines.rs VALIDATION_PERMILLE

# Rust's char::is_whitespace / str::split_whitespace use the Unicode White_Space property.
_RUST_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"
_WS_RE = re.compile("[" + re.escape(_RUST_WS) + "]+")


def split_whitespace(s):
    return [w for w in _WS_RE.split(s) if w]


def in_validation(id_, permille=VALIDATION_PERMILLE):
    h = 0xCBF29CE484222325
    for b in id_.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % 1000 < permille


def _is_alnum(c):
    # Rust char::is_alphanumeric = Alphabetic || Numeric (Nd, Nl, No). Python's isalpha covers
    # the L* categories; Rust's Alphabetic also has Nl and the Other_Alphabetic marks (Mn/Mc),
    # which unicodedata cannot tell apart. Such marks are rare here; the counts match Rust's.
    return c.isalpha() or unicodedata.category(c) in ("Nd", "Nl", "No")


def _rust_lower(c):
    # char::to_lowercase: full Unicode lowercase mapping (same as str.lower() per char, except
    # the final-sigma context rule, which Rust's per-char mapping does not apply).
    if c == "\u03a3":
        return "\u03c3"
    return c.lower()


def dedup_key(title, text):
    words = []
    for part in ([title] if title is not None else []) + [text]:
        for word in split_whitespace(part):
            w = "".join(_rust_lower(c) for c in word if _is_alnum(c))
            if w:
                words.append(w)
    return " ".join(words)


# ---------------------------------------------------------------- Reuters (reuters.rs)

def _attr(head, name):
    key = f'{name}="'
    i = head.find(key)
    if i < 0:
        return None
    rest = head[i + len(key):]
    return rest.split('"', 1)[0]


def _element(doc, tag):
    o = doc.find(f"<{tag}")
    if o < 0:
        return None
    gt = doc.find(">", o)
    if gt < 0:
        return None
    content = gt + 1
    e = doc.find(f"</{tag}>", content)
    if e < 0:
        return None
    return doc[content:e]


def _strip_tags(s):
    out, in_tag = [], False
    for c in s:
        if c == "<":
            in_tag = True
        elif c == ">" and in_tag:
            in_tag = False
        elif not in_tag:
            out.append(c)
    return "".join(out)


def _clean(s):
    d = (s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&#3;", "")
         .replace("&#22;", "").replace("&#5;", "").replace("&#30;", "").replace("&#31;", "").replace("&#127;", ""))
    d = "".join(" " if unicodedata.category(c) == "Cc" else c for c in d)
    text = " ".join(split_whitespace(d))
    while True:
        if text.endswith(" Reuter"):
            text = text[: -len(" Reuter")]
        elif text.endswith(" REUTER"):
            text = text[: -len(" REUTER")]
        else:
            break
    return text


def load_reuters(d, split):
    wanted = "TEST" if split == "test" else "TRAIN"
    out = []
    for n in range(22):
        path = os.path.join(d, f"reut2-{n:03d}.sgm")
        with open(path, "rb") as f:
            text = f.read().decode("latin-1")
        for doc in text.split("<REUTERS ")[1:]:
            head = doc.split(">", 1)[0]
            if _attr(head, "LEWISSPLIT") != wanted or _attr(head, "TOPICS") != "YES":
                continue
            newid = _attr(head, "NEWID")
            if newid is None:
                raise SystemExit(f"{path}: REUTERS element without NEWID")
            topics = _element(doc, "TOPICS") or ""
            deal = any(t.split("</D>", 1)[0] == "acq" for t in topics.split("<D>")[1:])
            title = _element(doc, "TITLE")
            title = _clean(title) if title is not None else None
            if title == "":
                title = None
            body = _element(doc, "BODY")
            if body is not None:
                body = _clean(body)
            elif title is None:
                body = _clean(_strip_tags(_element(doc, "TEXT") or ""))
            else:
                body = ""
            if title is not None and body == "":
                title, body = None, title
            out.append(dict(id=f"reuters-{newid}", title=title, text=body, deal=deal, subtype=None))
    return out


# ---------------------------------------------------------------- twitter (twitter.rs)

MA_INVESTMENTS, IPO = 13, 11


def load_twitter(d, split):
    file, tag = ("topic_valid.csv", "valid") if split == "test" else ("topic_train.csv", "train")
    path = os.path.join(d, file)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        for row, rec in enumerate(reader):
            if len(rec) != len(header):
                raise SystemExit(f"{path}: row {row + 1}: {len(rec)} fields")
            text, label = rec[0], rec[1]
            topic = int(label.strip())
            out.append((dict(id=f"twitter-topic-{tag}-{row + 1:05d}", title=None, text=text.replace("&amp;", "&"),
                             deal=topic in (MA_INVESTMENTS, IPO), subtype=None), topic))
    return out


# ---------------------------------------------------------------- modern (modern.rs)

def read_labels(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def read_pools(data_dir):
    texts = {}
    for file in ("wiki-current-events/uncategorized_2021_2026.jsonl",
                 "wiki-current-events/business_sci_tech_2015_2021.jsonl",
                 "twitter-financial-news-sentiment/tweets.jsonl",
                 "uci-news-aggregator-2014/business_scitech_headlines.jsonl",
                 "wikinews-economy/economy_and_business.jsonl"):
        with open(os.path.join(data_dir, file), encoding="utf-8") as f:
            for line in f:
                item = json.loads(line)
                texts[item["id"]] = item["headline"].replace("&amp;", "&")
    for ex, _ in load_twitter(os.path.join(data_dir, "twitter-financial-news-topic"), "train"):
        texts[ex["id"]] = ex["text"]
    return texts


def load_modern(rows, pools, split):
    out = []
    for r in rows:
        if r["split"] != split:
            continue
        if r["id"] not in pools:
            raise SystemExit(f"label id {r['id']} is not in the pools")
        out.append(dict(id=r["id"], title=None, text=pools[r["id"]], deal=r["label"] == "DEAL", subtype=r["subtype"]))
    return out


def load_headlines(path):
    """Written headlines (headlines.rs): the project's own texts, in the repository."""
    return [dict(id=r["id"], title=None, text=r["text"], deal=r["label"] == "DEAL", subtype=r["subtype"],
                 group=r.get("group", r["id"])) for r in read_labels(path)]


# ---------------------------------------------------------------- Corpus::load (mod.rs)

def load_corpus(data_dir, labels_paths):
    rows = [row for path in labels_paths for row in read_labels(path)]
    relabelled = {r["id"]: r for r in rows if r["id"].startswith("twitter-topic-")}
    rdir = os.path.join(data_dir, "reuters21578")
    tdir = os.path.join(data_dir, "twitter-financial-news-topic")

    r_all = load_reuters(rdir, "train")
    r_val = [e for e in r_all if in_validation(e["id"])]
    r_train = [e for e in r_all if not in_validation(e["id"])]
    t_all = []
    for ex, _ in load_twitter(tdir, "train"):
        row = relabelled.get(ex["id"])
        if row is not None:
            ex["deal"] = row["label"] == "DEAL"
            ex["subtype"] = row["subtype"]
        t_all.append(ex)
    t_val = [e for e in t_all if in_validation(e["id"])]
    t_train = [e for e in t_all if not in_validation(e["id"])]
    pools = read_pools(data_dir)

    def modern_of(split):
        return [e for e in load_modern(rows, pools, split) if not e["id"].startswith("twitter-topic-")]

    test = [("reuters", load_reuters(rdir, "test")),
            ("twitter", [e for e, _ in load_twitter(tdir, "test")]),
            ("modern", modern_of("test")),
            ("headlines", load_headlines(os.path.join(REPO, "data", "headlines-2024-2026.jsonl")))]
    seen = {dedup_key(e["title"], e["text"]) for _, s in test for e in s}

    def take(sets):
        out = []
        for name, s in sets:
            kept = []
            for e in s:
                k = dedup_key(e["title"], e["text"])
                if k not in seen:
                    seen.add(k)
                    kept.append(e)
            out.append((name, kept))
        return out

    h_all = [e for name in ("headlines-2015-2023.jsonl", "headlines-2012-2023-r2.jsonl", "headlines-2012-2023-r3.jsonl")  # headlines::training_paths
             for e in load_headlines(os.path.join(REPO, "data", name))]
    h_val = [e for e in h_all if in_validation(e["group"], HEADLINES_VALIDATION_PERMILLE)]
    h_train = [e for e in h_all if not in_validation(e["group"], HEADLINES_VALIDATION_PERMILLE)]
    validation = take([("reuters", r_val), ("twitter", t_val), ("modern", modern_of("validation")), ("headlines", h_val)])
    train = take([("reuters", r_train), ("twitter", t_train), ("modern", modern_of("train")), ("headlines", h_train)])
    return {"test": test, "validation": validation, "train": train}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("DEALSIFT_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
    ap.add_argument("--labels", action="append", help="labels file (repeatable; default: every round in data/)")
    ap.add_argument("--out", default=os.path.join(HERE, "data.jsonl.gz"))
    args = ap.parse_args()

    rounds = ["modern-labels.jsonl", "modern-labels-r2.jsonl", "modern-labels-r3.jsonl", "modern-labels-r4.jsonl"]
    corpus = load_corpus(args.data_dir, args.labels or [os.path.join(REPO, "data", r) for r in rounds])
    counts = Counter()
    n = 0
    with gzip.open(args.out, "wt", encoding="utf-8", compresslevel=9) as f:
        for split in ("train", "validation", "test"):
            for name, s in corpus[split]:
                for e in s:
                    rec = {"set": name, "split": split, "id": e["id"], "title": e["title"], "text": e["text"],
                           "deal": e["deal"], "subtype": e["subtype"]}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    counts[(name, split, e["deal"])] += 1
                    n += 1
    print(f"wrote {n} examples to {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
    print(f"{'set':8} {'split':10} {'total':>6} {'deals':>6} {'nondeal':>7}")
    for split in ("train", "validation", "test"):
        for name in ("reuters", "twitter", "modern", "headlines"):
            d, nd = counts[(name, split, True)], counts[(name, split, False)]
            print(f"{name:8} {split:10} {d + nd:6d} {d:6d} {nd:7d}")
    train = [(name, counts[(name, "train", True)] + counts[(name, "train", False)], counts[(name, "train", True)])
             for name in ("reuters", "twitter", "modern", "headlines")]
    # What `dealsift train --sources reuters,twitter,modern,headlines` logs as train_counts and
    # validation sizes with the four rounds (without `headlines`, the first three of each).
    expected = {"train_counts": [("reuters", 8475, 1477), ("twitter", 15289, 1196), ("modern", 9651, 1819),
                                 ("headlines", 3514, 1992)],
                "validation": {"reuters": 960, "twitter": 1698, "modern": 1247, "headlines": 811},
                "reuters_test": (3299, 719), "twitter_test": 4117}
    ok = train == expected["train_counts"]
    for name, size in expected["validation"].items():
        ok &= counts[(name, "validation", True)] + counts[(name, "validation", False)] == size
    ok &= (counts[("reuters", "test", True)] + counts[("reuters", "test", False)], counts[("reuters", "test", True)]) == expected["reuters_test"]
    ok &= counts[("twitter", "test", True)] + counts[("twitter", "test", False)] == expected["twitter_test"]
    print("matches the Rust counts:", "YES" if ok else "NO", expected)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
