#!/usr/bin/env python3
"""Round 4: let the shipped model choose what gets read among every item no round has read yet.

Rounds 1-3 chose items by deal vocabulary, which misses deals phrased without it ("United orders
15 supersonic jets from Boom") and leaves about 12,000 twitter-topic training rows training with
their topic class's label. Here model 1.3.0 scores every unread item of every pool, and the items
it gives a deal probability of at least 0.02 are read (plus a random sample of the rest, to see
what that cut misses). The model only decides *what gets read*; every label comes from an
annotator reading the item against ../shared/deal-definition.md, blind to the score.

Usage:
  select_round4.py unread SHARED_DATA_DIR REPO_DATA_DIR UNREAD_JSONL
      writes every unread item as {"id", "text"}, for `dealsift classify -f UNREAD_JSONL > SCORES`
  select_round4.py select UNREAD_JSONL SCORES OUT_DIR
      chooses from the scores and deals the choice into blind batches
"""
import json, random, sys
from pathlib import Path

from select_candidates import deal_blind_batches, jsonl, labelled_ids, twitter_topic_train

SEED = 20261129
BATCHES = 8
DOUBLE = 240  # items given to a second, independent annotator
MIN_PROBABILITY = 0.02
BELOW_CUT_SAMPLE = 300


def unread(shared, repo_data, out):
    shared = Path(shared)
    done = labelled_ids(repo_data)
    pools = [
        jsonl(shared / "wiki-current-events/uncategorized_2021_2026.jsonl"),
        jsonl(shared / "wiki-current-events/business_sci_tech_2015_2021.jsonl"),
        jsonl(shared / "twitter-financial-news-sentiment/tweets.jsonl"),
        list(twitter_topic_train(shared / "twitter-financial-news-topic/topic_train.csv")),
        jsonl(shared / "uci-news-aggregator-2014/business_scitech_headlines.jsonl"),
        jsonl(shared / "wikinews-economy/economy_and_business.jsonl"),
    ]
    with open(out, "w", encoding="utf-8") as f:
        for pool in pools:
            for x in pool:
                if x["id"] not in done:
                    f.write(json.dumps({"id": x["id"], "text": x["headline"].replace("&amp;", "&")}, ensure_ascii=False) + "\n")


def select(unread_path, scores_path, out):
    items = jsonl(unread_path)
    score = {x["id"]: x["deal_probability"] for x in jsonl(scores_path)}
    assert len(score) == len(items), "score every unread item first"
    rng = random.Random(SEED)
    above = [x for x in items if score[x["id"]] >= MIN_PROBABILITY]
    below = [x for x in items if score[x["id"]] < MIN_PROBABILITY]
    chosen = above + rng.sample(below, BELOW_CUT_SAMPLE)
    print(f"{len(above)} items at p >= {MIN_PROBABILITY}, {BELOW_CUT_SAMPLE} of {len(below)} below")
    deal_blind_batches(chosen, BATCHES, DOUBLE, rng, Path(out))


if __name__ == "__main__":
    {"unread": unread, "select": select}[sys.argv[1]](*sys.argv[2:])
