#!/usr/bin/env python3
"""The headlines test set: publisher-style headlines of 2024-2026 events, read twice, blind.

Why: every labelled pool in ../shared is editor-written summaries, tweets or 2014 headlines, while
the model is judged on real 2024-2026 publisher headlines, funding rounds the most common. Writers
(w-a: startup and AI financing, w-b: M&A and capital markets, w-c: technology, industry and
government contracts) wrote headlines of events they remember, in their own words, deals and hard
non-deals mixed; their intended label is kept only to be compared. Two annotators then read every
headline blind against ../shared/deal-definition.md (tools/annotate/GUIDE.md), and disagreements
are adjudicated. The set is for evaluation only: never trained on, never used for calibration or
the threshold. Unlike the pools, its texts are the project's own and live in the repository.

Usage:
  headlines.py prepare WRITER_DIR OUT_DIR   writer-*.jsonl -> items.jsonl + blind batches (all double)
  headlines.py apply OUT_DIR REPO_DATA_DIR  reads + adjudicated.jsonl -> REPO_DATA_DIR/headlines-2024-2026.jsonl
"""
import json, random, re, sys
from collections import Counter
from pathlib import Path

from append_round import kappa, read_batches
from select_candidates import deal_blind_batches, jsonl

SEED = 20261127
BATCHES = 4
FIRST_ANNOTATOR = 40
OUT_NAME = "headlines-2024-2026.jsonl"


def normalised(text):
    return re.sub(r"\W+", " ", text.lower()).strip()


def prepare(writer_dir, out):
    items, seen = [], set()
    for path in sorted(Path(writer_dir).glob("writer-*.jsonl")):
        writer = "w-" + path.stem.split("-")[1]
        for x in jsonl(path):
            key = normalised(x["text"])
            if key in seen:
                continue
            seen.add(key)
            items.append({"text": x["text"].strip(), "month": x["month"], "writer": writer,
                          "writer_label": x["intended"]})
    rng = random.Random(SEED)
    rng.shuffle(items)
    for n, x in enumerate(items, start=1):
        x["id"] = f"headline-{n:04d}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    deal_blind_batches([{"id": x["id"], "text": x["text"]} for x in items], BATCHES, len(items), rng, out)


def apply(out, repo_data):
    out = Path(out)
    items = jsonl(out / "items.jsonl")
    reads = read_batches(out, FIRST_ANNOTATOR)
    adjudicated = {x["id"]: x for x in jsonl(out / "adjudicated.jsonl")} if (out / "adjudicated.jsonl").exists() else {}
    pairs = [(reads[x["id"]][0], reads[x["id"]][1]) for x in items]
    label_agree, label_kappa = kappa([(a[1], b[1]) for a, b in pairs])
    subtype_agree, subtype_kappa = kappa([(a[2], b[2]) for a, b in pairs])
    print(f"{len(pairs)} headlines read twice: label agreement {label_agree:.3f} kappa {label_kappa:.3f}; "
          f"subtype agreement {subtype_agree:.3f} kappa {subtype_kappa:.3f}")
    missing = [x["id"] for x, (a, b) in zip(items, pairs) if a[1:] != b[1:] and x["id"] not in adjudicated]
    if missing:
        sys.exit(f"adjudicate these {len(missing)} disagreements first (adjudicated.jsonl): {missing}")
    rows = []
    for x, (a, b) in zip(items, pairs):
        label, subtype, annotator = a[1], a[2], f"{a[0]}+{b[0]}"
        if x["id"] in adjudicated:
            label, subtype, annotator = adjudicated[x["id"]]["label"], adjudicated[x["id"]]["subtype"], f"{annotator}+adjudicated"
        rows.append({"id": x["id"], "text": x["text"], "month": x["month"], "label": label, "subtype": subtype,
                     "annotator": annotator, "first": {"label": a[1], "subtype": a[2]},
                     "second": {"label": b[1], "subtype": b[2]}, "writer": x["writer"], "writer_label": x["writer_label"]})
    rows.sort(key=lambda r: r["id"])
    with open(Path(repo_data) / OUT_NAME, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    writer_agree, writer_kappa = kappa([(r["writer_label"], r["label"]) for r in rows])
    print(f"{len(rows)} rows, deals by subtype {dict(Counter(r['subtype'] for r in rows))}; "
          f"writers' intended label against the final one: agreement {writer_agree:.3f} kappa {writer_kappa:.3f}")


if __name__ == "__main__":
    {"prepare": prepare, "apply": apply}[sys.argv[1]](*sys.argv[2:])
