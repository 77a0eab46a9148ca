#!/usr/bin/env python3
"""Second, blind read of the whole modern test split, and its adjudication.

Round 1 double-read a random sample only; the test split decides whether the model meets its
bars, so every test item was read again by an annotator who saw neither the round-1 label nor
any model score (`select` deals the items into batches). `apply` compares the two reads,
requires an adjudicated label for every disagreement (decided by the guide), writes both reads
to `test-second-reads.jsonl`, and updates the test rows of `modern-labels.jsonl` where the
adjudication changed them (`round` becomes `r1:test-reread-adjudicated:<kind>`).

Usage:
  reread_test.py select CORPUS_JSONL OUT_DIR      (CORPUS_JSONL: `dealsift export-corpus` output)
  reread_test.py apply OUT_DIR FIRST_ANNOTATOR_NUMBER DATA_DIR
      OUT_DIR: batch_N.jsonl, out/batch_N.labels.jsonl, adjudicated.jsonl
"""
import json, random, sys
from pathlib import Path

from append_round import kappa, read_batches

SEED = 20261130
BATCHES = 4


def select(corpus, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [json.loads(l) for l in open(corpus, encoding="utf-8")]
    test = [{"id": r["id"], "text": f"{r['title']}\n{r['text']}" if r.get("title") else r["text"]}
            for r in items if r["set"] == "modern" and r["split"] == "test"]
    random.Random(SEED).shuffle(test)
    for b in range(BATCHES):
        with open(out / f"batch_{b}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in test[b::BATCHES])
    print(f"{len(test)} test items in {BATCHES} batches")


def apply(out, first_annotator, data_dir):
    out, data_dir = Path(out), Path(data_dir)
    labels_path = data_dir / "modern-labels.jsonl"
    rows = [json.loads(l) for l in open(labels_path)]
    first = {r["id"]: r for r in rows if r["split"] == "test"}
    reads = read_batches(out, first_annotator)
    assert set(reads) == set(first) and all(len(r) == 1 for r in reads.values()), "every test item must be read again, once"
    second = {i: dict(zip(("annotator", "label", "subtype"), r[0])) for i, r in reads.items()}
    ids = sorted(first)
    label_agree, label_kappa = kappa([(first[i]["label"], second[i]["label"]) for i in ids])
    sub_agree, sub_kappa = kappa([(first[i]["subtype"], second[i]["subtype"]) for i in ids])
    print(f"{len(ids)} test items: label agreement {label_agree:.4f} kappa {label_kappa:.3f}; "
          f"subtype agreement {sub_agree:.4f} kappa {sub_kappa:.3f}")
    adjudicated = {x["id"]: x for x in map(json.loads, open(out / "adjudicated.jsonl"))}
    disagree = {i for i in ids if (first[i]["label"], first[i]["subtype"]) != (second[i]["label"], second[i]["subtype"])}
    missing = [i for i in disagree if i not in adjudicated]
    if missing:
        sys.exit(f"adjudicate these {len(missing)} disagreements first: {sorted(missing)}")
    with open(data_dir / "test-second-reads.jsonl", "w", encoding="utf-8") as f:
        for i in ids:
            r1 = {k: first[i][k] for k in ("annotator", "label", "subtype")}
            f.write(json.dumps({"id": i, "first": r1, "second": second[i]}) + "\n")
    changed = 0
    for r in rows:
        a = adjudicated.get(r["id"])
        if r["split"] == "test" and r["id"] in disagree and (a["label"], a["subtype"]) != (r["label"], r["subtype"]):
            r.update(label=a["label"], subtype=a["subtype"], annotator="adjudicator",
                     round=f"r1:test-reread-adjudicated:{a['kind']}")
            changed += 1
    with open(labels_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(disagree)} disagreements adjudicated; {changed} test labels changed")


if __name__ == "__main__":
    {"select": select, "apply": apply}[sys.argv[1]](*sys.argv[2:])
