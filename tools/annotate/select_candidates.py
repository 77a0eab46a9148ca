#!/usr/bin/env python3
"""Choose which modern news items annotators read, and deal them into blind batches.

Keyword matching here only decides *what gets read* (to find enough deals and hard
negatives in pools where deals are rare); every label comes from an annotator reading
the item against ../shared/deal-definition.md. Texts are written outside the repository
(batches are working files); only labels keyed by the pools' stable ids are committed.

Usage: select_candidates.py SHARED_DATA_DIR OUT_DIR
"""
import csv, json, random, re, sys
from pathlib import Path

SEED = 20261126
BATCHES = 7
DOUBLE = 480  # items given to a second, independent annotator (>= 400 after losses)

# Pre-screen: broad deal vocabulary. Used to choose items to read, never to label them.
DEALISH = re.compile(
    r"\b(acqui\w*|merg\w*|takeover|buy-?out|buys?|bought|purchas\w*|stake|invest\w*|funding|"
    r"raises?|raised|series [a-h]\b|seed round|ipo|listing|lists|debut|spac|joint venture|deal|"
    r"agreement|contract|partner\w*|valuation|valued|bid|offer\w*|sells?|sold|divest\w*|spin-?off)\b",
    re.I)
ANALYST_RATING = re.compile(r"\b(upgraded|downgraded|initiated|reiterated|price target)\b", re.I)


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def labelled_ids(repo_data):
    """Ids that any committed round of modern labels already holds."""
    return {x["id"] for p in sorted(Path(repo_data).glob("modern-labels*.jsonl")) for x in jsonl(p)}


def deal_blind_batches(items, n_batches, n_double, rng, out):
    """Shuffle `items` ({"id", "text"}) into `n_batches` batch_N.jsonl files under `out`; the first
    `n_double` items after the shuffle also go, blind, into a second batch (double_ids.txt)."""
    rng.shuffle(items)
    double = items[:n_double]
    batches = [items[i::n_batches] for i in range(n_batches)]
    for i, item in enumerate(double):  # item i sits in batch i % n_batches
        batches[(i % n_batches + 1 + i % (n_batches - 1)) % n_batches].append(item)
    out.mkdir(parents=True, exist_ok=True)
    for b, batch in enumerate(batches):
        rng.shuffle(batch)
        with open(out / f"batch_{b}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": x["id"], "text": x["text"]}, ensure_ascii=False) + "\n" for x in batch)
    (out / "double_ids.txt").write_text("".join(x["id"] + "\n" for x in double))
    print(f"{len(items)} items, {n_double} double-read, batches {[len(b) for b in batches]}")


def twitter_topic_train(path):
    """Rows of topic_train.csv; id = twitter-topic-train-<1-based data row>."""
    with open(path, encoding="utf-8", newline="") as f:
        for row_no, row in enumerate(csv.DictReader(f), start=1):
            yield {"id": f"twitter-topic-train-{row_no:05d}", "headline": row["text"],
                   "topic": int(row["label"])}


def main(shared, out):
    shared, out = Path(shared), Path(out)
    rng = random.Random(SEED)
    picked = {}

    def take(items, why):
        for it in items:
            picked.setdefault(it["id"], {"id": it["id"], "text": it["headline"], "pool": why})

    wce = shared / "wiki-current-events"
    unc = jsonl(wce / "uncategorized_2021_2026.jsonl")
    take([x for x in unc if x.get("biz_keyword_hit") or DEALISH.search(x["headline"])], "wce-2021-2026")
    biz = jsonl(wce / "business_sci_tech_2015_2021.jsonl")
    take([x for x in biz if x["category"] == "business_and_economy" or DEALISH.search(x["headline"])],
         "wce-2015-2021")

    tweets = jsonl(shared / "twitter-financial-news-sentiment" / "tweets.jsonl")
    hits = [x for x in tweets if DEALISH.search(x["headline"]) and not ANALYST_RATING.search(x["headline"])]
    take(hits, "tfns-prescreened")
    rest = [x for x in tweets if x["id"] not in picked]
    take(rng.sample(rest, 400), "tfns-random")

    topic = list(twitter_topic_train(shared / "twitter-financial-news-topic" / "topic_train.csv"))
    # 13 = M&A | Investments, 11 = IPO, 2 = Company | Product News (the hard negatives and hidden deals).
    take([x for x in topic if x["topic"] in (11, 13)], "twitter-topic-deal-classes")
    take([x for x in topic if x["topic"] == 2 and DEALISH.search(x["headline"])], "twitter-topic-company-news")

    items = sorted(picked.values(), key=lambda x: x["id"])
    rng.shuffle(items)
    batches = [items[i::BATCHES] for i in range(BATCHES)]
    # Second, blind annotation: each sampled item goes to the next batch over.
    double = rng.sample(range(len(items)), DOUBLE)
    for k in double:
        first = k % BATCHES
        batches[(first + 1) % BATCHES].append(dict(items[k], second_read=True))
    out.mkdir(parents=True, exist_ok=True)
    for b, batch in enumerate(batches):
        rng.shuffle(batch)
        with open(out / f"batch_{b}.jsonl", "w", encoding="utf-8") as f:
            for it in batch:
                f.write(json.dumps({"id": it["id"], "text": it["text"]}, ensure_ascii=False) + "\n")
    with open(out / "double_ids.txt", "w") as f:
        f.write("\n".join(sorted(items[k]["id"] for k in double)) + "\n")
    pools = {}
    for it in items:
        pools[it["pool"]] = pools.get(it["pool"], 0) + 1
    print(json.dumps({"items": len(items), "double": DOUBLE, "pools": pools,
                      "batch_sizes": [len(b) for b in batches]}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
