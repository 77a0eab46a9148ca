#!/usr/bin/env python3
"""Round 2: choose more modern items to read, aimed at the deal kinds the model misses most
(funding rounds and financings, share sales and listings, large contracts), and deal them
into blind batches with a double-read sample.

As in round 1 (select_candidates.py), keyword matching only decides *what gets read*; every
label comes from an annotator reading the item against ../shared/deal-definition.md. Items
already labelled are skipped. Texts go to OUT_DIR (outside the repository).

Pools: uci-news-aggregator-2014 business headlines (Reuters/Businessweek 2014), Wikinews
economy and business headlines, and unread twitter-financial-news-sentiment tweets.

Usage: select_round2.py SHARED_DATA_DIR LABELS_FILE OUT_DIR
"""
import json, random, re, sys
from pathlib import Path

from select_candidates import deal_blind_batches

SEED = 20261127
BATCHES = 4
DOUBLE = 200  # items given to a second, independent annotator

# Kinds the model misses: financing, listings and share sales, contracts.
TARGETED = re.compile(
    r"\b(raise[sd]?|raising|funding|series [a-h]\b|seed round|venture|valuation|valued|financing|loan|"
    r"credit facility|bonds?|notes? offering|ipo|listing|lists|debut|go(es|ing)? public|offering|spac|"
    r"contract|supply|supplier|awarded|wins?|joint venture|licens\w*|backed|invest\w*)\b", re.I)
# Broad deal vocabulary (hard negatives and other deal kinds).
DEALISH = re.compile(
    r"\b(acqui\w*|merg\w*|takeover|buy-?out|buys?|bought|purchas\w*|stake|deal|agreement|partner\w*|"
    r"bid|offer\w*|sells?|sold|sale|divest\w*|spin-?off|capital)\b", re.I)


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main(shared, labels, out):
    shared, out = Path(shared), Path(out)
    done = {x["id"] for x in jsonl(labels)}
    rng = random.Random(SEED)
    chosen = []

    def take(items, targeted, broad, random_rest):
        items = [x for x in items if x["id"] not in done]
        t = [x for x in items if TARGETED.search(x["headline"])]
        b = [x for x in items if not TARGETED.search(x["headline"]) and DEALISH.search(x["headline"])]
        r = [x for x in items if not TARGETED.search(x["headline"]) and not DEALISH.search(x["headline"])]
        for group, n in ((t, targeted), (b, broad), (r, random_rest)):
            rng.shuffle(group)
            chosen.extend(group[:n])

    uci = [x for x in jsonl(shared / "uci-news-aggregator-2014/business_scitech_headlines.jsonl") if x["category"] == "business"]
    take(uci, 500, 250, 100)
    take(jsonl(shared / "wikinews-economy/economy_and_business.jsonl"), 250, 120, 60)
    take(jsonl(shared / "twitter-financial-news-sentiment/tweets.jsonl"), 260, 120, 60)

    deal_blind_batches([{"id": x["id"], "text": x["headline"].replace("&amp;", "&")} for x in chosen], BATCHES, DOUBLE, rng, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
