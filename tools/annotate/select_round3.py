#!/usr/bin/env python3
"""Round 3: read the twitter-topic training rows that the public topic labels call non-deals but
whose text carries deal, contract or financing vocabulary, plus the last unread financing and
contract items of the other pools, and deal them into blind batches with a double-read sample.

Why: unread twitter-topic rows train as non-deals by their topic class ("Company | Product News",
"Treasuries | Corporate Debt", "Legal | Regulation", ...), so a contract award or a bond issue
read by nobody teaches the model that such items are not deals. Model 1.2.0 recalls contracts
worst. As in rounds 1 and 2, keyword matching only decides *what gets read*; every label comes
from an annotator reading the item against ../shared/deal-definition.md.

Usage: select_round3.py SHARED_DATA_DIR REPO_DATA_DIR OUT_DIR
"""
import random, re, sys
from pathlib import Path

from select_candidates import ANALYST_RATING, DEALISH, deal_blind_batches, jsonl, labelled_ids, twitter_topic_train

SEED = 20261128
BATCHES = 8
DOUBLE = 240  # items given to a second, independent annotator

# Contract and financing vocabulary that DEALISH lacks.
CONTRACT_OR_FINANCING = re.compile(
    r"\b(awarded|awards?|wins?|won|inks?|order(s|ed)?|suppl(y|ies|ier)|licens\w*|financing|loan|"
    r"credit facility|bonds?|notes|private placement|capital|funding|raise[sd]?|raising)\b", re.I)


def main(shared, repo_data, out):
    shared, repo_data, out = Path(shared), Path(repo_data), Path(out)
    done = labelled_ids(repo_data)
    rng = random.Random(SEED)

    def screened(items):
        return [x for x in items if x["id"] not in done and not ANALYST_RATING.search(x["headline"])
                and (DEALISH.search(x["headline"]) or CONTRACT_OR_FINANCING.search(x["headline"]))]

    topic = list(twitter_topic_train(shared / "twitter-financial-news-topic" / "topic_train.csv"))
    chosen = screened(topic)
    # Unscreened company news: hidden deals the vocabulary misses.
    rest = [x for x in topic if x["topic"] == 2 and x["id"] not in done and x not in chosen]
    chosen += rng.sample(rest, 150)
    tweets = jsonl(shared / "twitter-financial-news-sentiment" / "tweets.jsonl")
    chosen += [x for x in screened(tweets) if CONTRACT_OR_FINANCING.search(x["headline"])]
    uci = [x for x in jsonl(shared / "uci-news-aggregator-2014/business_scitech_headlines.jsonl")
           if x["category"] == "business"]
    chosen += [x for x in screened(uci) if CONTRACT_OR_FINANCING.search(x["headline"])]

    deal_blind_batches([{"id": x["id"], "text": x["headline"].replace("&amp;", "&")} for x in chosen], BATCHES, DOUBLE, rng, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
