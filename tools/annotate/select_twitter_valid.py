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
import csv, random, sys
from pathlib import Path

from select_candidates import deal_blind_batches

SEED = 20261129
BATCHES = 8
DOUBLE = 240


def main(shared, out):
    with open(Path(shared) / "twitter-financial-news-topic" / "topic_valid.csv", encoding="utf-8", newline="") as f:
        items = [{"id": f"twitter-topic-valid-{n:05d}", "text": row["text"].replace("&amp;", "&")}
                 for n, row in enumerate(csv.DictReader(f), start=1)]
    deal_blind_batches(items, BATCHES, DOUBLE, random.Random(SEED), Path(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
