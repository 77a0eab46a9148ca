#!/usr/bin/env python3
"""Write a later annotation round (e.g. round 2, select_round2.py) as its own labels file.

Usage: append_round.py ROUND_DIR ROUND_NAME FIRST_ANNOTATOR_NUMBER DATA_DIR [EVAL_FILE]
  ROUND_DIR: batch_N.jsonl + double_ids.txt (from the selection script), out/batch_N.labels.jsonl
             (one per annotator), adjudicated.jsonl (optional: {"id", "label", "subtype", "kind"})
  DATA_DIR:  the repository's data/: writes modern-labels-<ROUND_NAME>.jsonl (items not in an earlier
             round's modern-labels*.jsonl) and appends the double reads to double-annotation.jsonl

EVAL_FILE (e.g. twitter-valid-labels.jsonl, from select_twitter_valid.py): write the round there
instead, every row in split `test`: labels of a test set, for evaluation only.

New items never join the test split, so earlier test results stay comparable: they go to
validation by the same FNV-1a rule as the Reuters and twitter carve-outs (10%), else train.
Prints the round's agreement on its double-read sample. Only ids and labels are written.
"""
import json, sys
from collections import Counter, defaultdict
from pathlib import Path

from merge_labels import fnv1a  # the same validation rule as round 1

VALIDATION_PERMILLE = 100


def kappa(pairs):
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[k] * second[k] for k in first) / (n * n)
    return observed, (observed - expected) / (1 - expected)


def read_batches(round_dir, first_annotator):
    """Every annotator's reads: {id: [(annotator, label, subtype), ...]}. batch_N.jsonl is read by
    annotator a<first_annotator + N>, whose labels are out/batch_N.labels.jsonl (checked)."""
    reads = defaultdict(list)
    batches = sorted(Path(round_dir).glob("batch_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    for b, batch in enumerate(batches):
        annotator = f"a{int(first_annotator) + b}"
        ids = [json.loads(l)["id"] for l in open(batch)]
        labels = [json.loads(l) for l in open(Path(round_dir) / "out" / f"{batch.stem}.labels.jsonl")]
        assert [x["id"] for x in labels] == ids, f"{batch.name}: labels do not match the batch's ids"
        for x in labels:
            assert (x["label"] == "NONDEAL") == (x["subtype"] == "OTHER"), x
            assert x["subtype"] in {"MA", "STAKE", "INVEST", "IPO", "CONTRACT", "OTHER"}, x
            reads[x["id"]].append((annotator, x["label"], x["subtype"]))
    return reads


def main(round_dir, round_name, first_annotator, data_dir, eval_file=None):
    round_dir, data_dir = Path(round_dir), Path(data_dir)
    out_name = eval_file or f"modern-labels-{round_name}.jsonl"
    existing = {json.loads(l)["id"] for p in data_dir.glob("modern-labels*.jsonl") if p.name != out_name for l in open(p)}
    reads = read_batches(round_dir, first_annotator)
    adjudicated = {}
    if (round_dir / "adjudicated.jsonl").exists():
        adjudicated = {x["id"]: x for x in map(json.loads, open(round_dir / "adjudicated.jsonl"))}
    double = [l.strip() for l in open(round_dir / "double_ids.txt") if l.strip()]

    pairs = [(reads[i][0], reads[i][1]) for i in double]
    label_agree, label_kappa = kappa([(a[1], b[1]) for a, b in pairs])
    subtype_agree, subtype_kappa = kappa([(a[2], b[2]) for a, b in pairs])
    print(f"double-read {len(pairs)}: label agreement {label_agree:.3f} kappa {label_kappa:.3f}; "
          f"subtype agreement {subtype_agree:.3f} kappa {subtype_kappa:.3f}")
    disagreements = [i for i, (a, b) in zip(double, pairs) if a[1:] != b[1:]]
    missing = [i for i in disagreements if i not in adjudicated]
    if missing:
        sys.exit(f"adjudicate these {len(missing)} disagreements first (adjudicated.jsonl): {missing}")

    rows = []
    for id_, rs in reads.items():
        if id_ in existing:
            continue
        annotator, label, subtype = rs[0]
        rnd = round_name
        if len(rs) == 2 and rs[0][1:] == rs[1][1:]:
            annotator, rnd = f"{rs[0][0]}+{rs[1][0]}", f"{round_name}:double-agreed"
        if id_ in adjudicated:
            a = adjudicated[id_]
            label, subtype, annotator, rnd = a["label"], a["subtype"], "adjudicator", f"{round_name}:adjudicated:{a.get('kind', '')}"
        split = "test" if eval_file else "validation" if fnv1a(id_) % 1000 < VALIDATION_PERMILLE else "train"
        rows.append({"id": id_, "label": label, "subtype": subtype, "annotator": annotator, "round": rnd, "split": split})
    with open(data_dir / out_name, "w", encoding="utf-8") as f:
        for row in sorted(rows, key=lambda r: r["id"]):
            f.write(json.dumps(row) + "\n")
    with open(data_dir / "double-annotation.jsonl", "a", encoding="utf-8") as f:
        for id_, (a, b) in sorted(zip(double, pairs)):
            f.write(json.dumps({"id": id_, "first": {"annotator": a[0], "label": a[1], "subtype": a[2]},
                                "second": {"annotator": b[0], "label": b[1], "subtype": b[2]}}) + "\n")
    counts = Counter((r["split"], r["subtype"]) for r in rows)
    print(f"wrote {len(rows)} labels:", dict(sorted(counts.items())))


if __name__ == "__main__":
    main(*sys.argv[1:6])
