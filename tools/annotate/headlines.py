#!/usr/bin/env python3
"""Publisher-style headlines written for this project, read blind against the deal definition.

Sets, told apart by their years:
- test (headlines-2024-2026.jsonl): 2024-2026 events, every headline read twice, blind. For
  evaluation only: never trained on, never used for calibration or the threshold.
- training (headlines-2015-2023.jsonl): 2015-2023 events (older, so no event of the test years
  is trained on), six writers by deal kind (their brief: headlines-writers.md), each headline read once, blind; the writer's own
  label is the second judgment, and where the two differ the headline is adjudicated. Corpus::load
  carves 20% of its groups of near-identical headlines out for validation.
- training-r2 (headlines-2012-2023-r2.jsonl): a second round of training headlines, 2012-2023, by
  eight more writers (w-7..w-14), read the same way; its groups are formed together with round 1's.
- training-r3 (headlines-2012-2023-r3.jsonl): a third round by six writers (w-15..w-20) in the
  styles of the labelled pools (portal sentences, tweets, aggregator headlines), mostly contracts
  and money for companies, read the same way and grouped with the other rounds.

Why: every labelled pool in ../shared is editor-written summaries, tweets or 2014 headlines, while
the model is judged on real 2024-2026 publisher headlines, funding rounds the most common. Writers
(test: w-a financing, w-b M&A and capital markets, w-c contracts; training: w-1..w-14) wrote
headlines of events they remember, in their own words, deals and hard non-deals mixed. Annotators
read them blind against ../shared/deal-definition.md (tools/annotate/GUIDE.md): two per test
headline, whose writer's label is only compared; one per training headline, beside its writer's
label. Unlike the pools, the texts are the project's own and live in the repository.

Usage:
  headlines.py prepare SET WRITER_DIR OUT_DIR [CORPUS]  writer-*.jsonl -> items.jsonl + blind batches
  headlines.py apply SET OUT_DIR REPO_DATA_DIR  reads + adjudicated.jsonl -> REPO_DATA_DIR/<the set's file>
SET is test, training, training-r2 or training-r3 (each round extends the earlier ones: prepare
it after they are applied). training-r3 also needs CORPUS, a `dealsift export-corpus` file, whose
validation and test texts its items must not come within half their words of.
Applying a training round regroups every training round in REPO_DATA_DIR together.
"""
import gzip, json, random, re, sys
from collections import Counter
from pathlib import Path

from append_round import kappa, read_batches
from select_candidates import deal_blind_batches, jsonl

SETS = {
    # reads: blind reads per headline (a training headline's second judgment is its writer's).
    "test": dict(seed=20261127, batches=4, first_annotator=40, out_name="headlines-2024-2026.jsonl",
                 id_prefix="headline-", reads=2),
    "training": dict(seed=20261128, batches=6, first_annotator=44, out_name="headlines-2015-2023.jsonl",
                     id_prefix="headline-2015-2023-", reads=1),
    # Round 2 of the training headlines: it drops duplicates of round 1's, and its groups are
    # computed together with round 1's, whose file it rewrites (only the group fields change),
    # so no event straddles the split.
    "training-r2": dict(seed=20261129, batches=8, first_annotator=50, out_name="headlines-2012-2023-r2.jsonl",
                        id_prefix="headline-r2-", reads=1, joins=("training",), late=("writer-9",)),
    # Round 3: portal sentences, tweets and aggregator headlines (the labelled pools' styles),
    # mostly contracts and financing; it also stays away from the pools' validation and test texts.
    "training-r3": dict(seed=20261130, batches=6, first_annotator=59, out_name="headlines-2012-2023-r3.jsonl",
                        id_prefix="headline-r3-", reads=1, joins=("training", "training-r2"), avoid_pools=True),
}


TEST_FILE = Path(__file__).resolve().parents[2] / "data" / "headlines-2024-2026.jsonl"


def normalised(text):
    return re.sub(r"\W+", " ", text.lower()).strip()


def word_set(text):
    return set(normalised(text).split())


def jaccard(a, b):
    return len(a & b) / len(a | b)


def event_groups(rows, threshold=0.4):
    """{id: group id}: headlines sharing 40% of their words (Jaccard), chained, form one group,
    named by its first id. Writers often wrote the same famous event, so the validation split
    is carved by group: near-identical wordings never sit on both sides (looser paraphrases can)."""
    words = [word_set(r["text"]) for r in rows]
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if jaccard(words[i], words[j]) >= threshold:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    return {r["id"]: rows[root(i)]["id"] for i, r in enumerate(rows)}


def too_close_to_test(set_name, corpus=None):
    """For the training set: a predicate that is true of a headline of the test years or one
    sharing half its words (Jaccard) with a test headline, so no test event is trained on; with
    `corpus` (a `dealsift export-corpus` file), also with any validation or test text of the
    modern and twitter pools (the styles round 3 imitates), so the written items neither leak a
    test event nor flatter the validation sets that choose a model."""
    if set_name == "test":
        return lambda x: False
    tests = [word_set(r["text"]) for r in jsonl(TEST_FILE)]
    if corpus:
        opener = gzip.open if str(corpus).endswith(".gz") else open
        with opener(corpus, "rt", encoding="utf-8") as f:
            held_out = [json.loads(line) for line in f]
        tests += [word_set(r["text"]) for r in held_out if r["split"] != "train" and r["set"] in ("modern", "twitter")]

    def close(x):
        words = word_set(x["text"])
        return x["month"] >= "2024" or any(jaccard(words, t) >= 0.5 for t in tests)
    return close


def joined_rows(spec):
    """The final rows of the sets this one extends (earlier training rounds), or none."""
    return [r for name in spec.get("joins", ()) for r in jsonl(TEST_FILE.with_name(SETS[name]["out_name"]))]


def other_rounds(set_name, repo_data):
    """{set name: final rows} of the other training rounds already in `repo_data`: every round's
    groups are formed over all of them, so applying any round (in any order) gives the same groups."""
    return {name: jsonl(Path(repo_data) / spec["out_name"]) for name, spec in SETS.items()
            if spec["reads"] == 1 and name != set_name and (Path(repo_data) / spec["out_name"]).exists()}


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_writers(paths, spec, seen, close):
    """The writers' headlines, less duplicates (of each other or of `seen`) and those `close` drops."""
    items, dropped = [], 0
    for path in paths:
        writer = "w-" + path.stem.split("-")[1]
        for x in jsonl(path):
            key = normalised(x["text"])
            if key in seen:
                continue
            seen.add(key)
            if close(x):
                dropped += 1
                continue
            item = {"text": x["text"].strip(), "month": x["month"], "writer": writer, "writer_label": x["intended"]}
            if spec["reads"] == 1:  # the writer's subtype is a training headline's second judgment
                item["writer_subtype"] = x["subtype"]
            items.append(item)
    if dropped:
        print(f"{dropped} headlines dropped: of the test years, or sharing half their words with a held-out text")
    return items


def prepare(set_name, writer_dir, out, corpus=None):
    """Writer files -> items.jsonl and blind batches. `corpus` is a `dealsift export-corpus`
    file, needed by sets with `avoid_pools`. Late writers (the spec's `late`, whose files came
    after the batches went out) are numbered after the others and read in one extra batch,
    leaving the others' ids unchanged."""
    spec = SETS[set_name]
    if spec.get("avoid_pools") and not corpus:
        sys.exit(f"{set_name} needs a `dealsift export-corpus` file to stay away from the pools' held-out texts")
    close, late = too_close_to_test(set_name, corpus), spec.get("late", ())
    seen = {normalised(r["text"]) for r in joined_rows(spec)}
    paths = sorted(Path(writer_dir).glob("writer-*.jsonl"))
    items = read_writers([p for p in paths if p.stem not in late], spec, seen, close)
    rng = random.Random(spec["seed"])
    rng.shuffle(items)
    for n, x in enumerate(items, start=1):
        x["id"] = f"{spec['id_prefix']}{n:04d}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_double = len(items) if spec["reads"] == 2 else 0
    deal_blind_batches([{"id": x["id"], "text": x["text"]} for x in items], spec["batches"], n_double, rng, out)
    extra = read_writers([p for p in paths if p.stem in late], spec, seen, close)
    if extra:
        rng.shuffle(extra)
        for n, x in enumerate(extra, start=len(items) + 1):
            x["id"] = f"{spec['id_prefix']}{n:04d}"
        write_rows(out / f"batch_{spec['batches']}.jsonl", [{"id": x["id"], "text": x["text"]} for x in extra])
        print(f"{len(extra)} late items in batch_{spec['batches']}")
        items += extra
    write_rows(out / "items.jsonl", items)


def apply(set_name, out, repo_data):
    spec = SETS[set_name]
    out = Path(out)
    items = jsonl(out / "items.jsonl")
    reads = read_batches(out, spec["first_annotator"])
    adjudicated = {x["id"]: x for x in jsonl(out / "adjudicated.jsonl")} if (out / "adjudicated.jsonl").exists() else {}
    if spec["reads"] == 2:
        pairs = [(reads[x["id"]][0], reads[x["id"]][1]) for x in items]
    else:
        pairs = [(reads[x["id"]][0], (x["writer"], x["writer_label"], x["writer_subtype"])) for x in items]
    label_agree, label_kappa = kappa([(a[1], b[1]) for a, b in pairs])
    subtype_agree, subtype_kappa = kappa([(a[2], b[2]) for a, b in pairs])
    print(f"{len(pairs)} headlines, two judgments each: label agreement {label_agree:.3f} kappa {label_kappa:.3f}; "
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
    if spec["reads"] == 1:
        others = other_rounds(set_name, repo_data)
        everything = rows + [r for other in others.values() for r in other]
        groups = event_groups(sorted(everything, key=lambda r: r["id"]))
        for r in rows:
            r["group"] = groups[r["id"]]
        print(f"{len(set(groups.values()))} event groups over {len(everything)} headlines")
        for name, other in others.items():
            moved = sum(r["group"] != groups[r["id"]] for r in other)
            for r in other:
                r["group"] = groups[r["id"]]
            write_rows(Path(repo_data) / SETS[name]["out_name"], other)
            print(f"{moved} of {len(other)} {name} headlines changed group")
    write_rows(Path(repo_data) / spec["out_name"], rows)
    writer_agree, writer_kappa = kappa([(r["writer_label"], r["label"]) for r in rows])
    print(f"{len(rows)} rows, deals by subtype {dict(Counter(r['subtype'] for r in rows))}; "
          f"writers' intended label against the final one: agreement {writer_agree:.3f} kappa {writer_kappa:.3f}")


if __name__ == "__main__":
    {"prepare": prepare, "apply": apply}[sys.argv[1]](*sys.argv[2:])
