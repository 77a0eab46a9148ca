#!/usr/bin/env python3
"""Merge annotators' label files and the adjudication into the committed labels file.

Usage: merge_labels.py ANNOT_DIR OUT_DIR
  ANNOT_DIR: batches/ (batch_N.jsonl, double_ids.txt), out/ (batch_N.labels.jsonl),
             adjudicated.jsonl (optional)
  OUT_DIR:   writes modern-labels.jsonl (one final label per id, with its split) and
             double-annotation.jsonl (both independent labels of the double-read sample).

Split: twitter-topic-train items follow the twitter validation carve-out (FNV-1a hash of
the id, as in src/data/mod.rs); every other item is assigned test / validation / train,
stratified by subtype with a fixed seed. Only ids and labels are written, never texts.
"""
import json, random, sys
from collections import defaultdict
from pathlib import Path

SEED = 20261126
TEST_FRACTION = 0.2
MIN_TEST_PER_DEAL_SUBTYPE = 60  # so each subtype's recall is measured on >= 50 items
MAX_TEST_FRACTION = 0.4
VALIDATION_FRACTION = 0.1
VALIDATION_PERMILLE = 100


def fnv1a(s):
    h = 0xcbf29ce484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def main(annot, out):
    annot, out = Path(annot), Path(out)
    reads = defaultdict(list)  # id -> [(annotator, label, subtype)]
    for b in range(7):
        for line in open(annot / "out" / f"batch_{b}.labels.jsonl", encoding="utf-8"):
            x = json.loads(line)
            reads[x["id"]].append((f"a{b + 1}", x["label"], x["subtype"]))
    adjudicated = {}
    adj_path = annot / "adjudicated.jsonl"
    if adj_path.exists():
        for line in open(adj_path, encoding="utf-8"):
            x = json.loads(line)
            adjudicated[x["id"]] = x
    double = [l.strip() for l in open(annot / "batches" / "double_ids.txt") if l.strip()]

    final = {}
    for id_, rs in reads.items():
        annotator, label, subtype = rs[0]
        rnd = "r1"
        if len(rs) == 2 and rs[0][1:] == rs[1][1:]:
            annotator, rnd = f"{rs[0][0]}+{rs[1][0]}", "double-agreed"
        if id_ in adjudicated:
            a = adjudicated[id_]
            label, subtype, annotator, rnd = a["label"], a["subtype"], "adjudicator", f"adjudicated:{a.get('kind', '')}"
        final[id_] = {"id": id_, "label": label, "subtype": subtype, "annotator": annotator, "round": rnd}

    rng = random.Random(SEED)
    strata = defaultdict(list)
    for id_, row in sorted(final.items()):
        if id_.startswith("twitter-topic-"):
            row["split"] = "validation" if fnv1a(id_) % 1000 < VALIDATION_PERMILLE else "train"
        else:
            strata[row["subtype"]].append(id_)
    for subtype, ids in sorted(strata.items()):
        rng.shuffle(ids)
        n_test = round(len(ids) * TEST_FRACTION)
        if subtype != "OTHER":
            n_test = min(max(n_test, MIN_TEST_PER_DEAL_SUBTYPE), int(len(ids) * MAX_TEST_FRACTION))
        n_val = round(len(ids) * VALIDATION_FRACTION)
        for k, id_ in enumerate(ids):
            final[id_]["split"] = "test" if k < n_test else "validation" if k < n_test + n_val else "train"

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "modern-labels.jsonl", "w", encoding="utf-8") as f:
        for id_ in sorted(final):
            f.write(json.dumps(final[id_]) + "\n")
    with open(out / "double-annotation.jsonl", "w", encoding="utf-8") as f:
        for id_ in sorted(double):
            rs = reads[id_]
            f.write(json.dumps({"id": id_, "first": {"annotator": rs[0][0], "label": rs[0][1], "subtype": rs[0][2]},
                                "second": {"annotator": rs[1][0], "label": rs[1][1], "subtype": rs[1][2]}}) + "\n")
    counts = defaultdict(lambda: defaultdict(int))
    for row in final.values():
        counts[row["split"]][row["subtype"]] += 1
    print(json.dumps({k: dict(v) for k, v in counts.items()}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
