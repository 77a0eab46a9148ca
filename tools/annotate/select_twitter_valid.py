#!/usr/bin/env python3
"""Deal every row of the twitter-topic validation file (the public twitter test set) into blind
batches, so annotators can label it by ../shared/deal-definition.md.

Why: that test set's deal label is its topic class ("M&A | Investments" or "IPO"), which is
narrower than the definition (contracts, bond issues, share offerings and stakes sit in other
classes). Labelling every row by the definition measures the model against the concept as well
as against the topic labels. These labels are for evaluation only: never trained on, never used
for calibration or the threshold. Annotators see the text only, not the topic class.

Usage: select_twitter_valid.py SHARED_DATA_DIR OUT_DIR
"""
import csv, json, random, sys
from pathlib import Path

SEED = 20261129
BATCHES = 8
DOUBLE = 240


def main(shared, out):
    out = Path(out)
    with open(Path(shared) / "twitter-financial-news-topic" / "topic_valid.csv", encoding="utf-8", newline="") as f:
        items = [{"id": f"twitter-topic-valid-{n:05d}", "text": row["text"].replace("&amp;", "&")}
                 for n, row in enumerate(csv.DictReader(f), start=1)]
    rng = random.Random(SEED)
    rng.shuffle(items)
    double = items[:DOUBLE]
    batches = [items[i::BATCHES] for i in range(BATCHES)]
    for i, item in enumerate(double):
        batches[(i % BATCHES + 1 + i % (BATCHES - 1)) % BATCHES].append(item)
    out.mkdir(parents=True, exist_ok=True)
    for b, batch in enumerate(batches):
        rng.shuffle(batch)
        with open(out / f"batch_{b}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in batch)
    (out / "double_ids.txt").write_text("".join(x["id"] + "\n" for x in double))
    print(f"{len(items)} items, {DOUBLE} double-read, batches {[len(b) for b in batches]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
