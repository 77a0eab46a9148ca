#!/usr/bin/env python3
"""Prose check of a running dealsift server: the ledes (first sentences) of the Wikinews
articles whose headlines are labelled in the modern *validation* split, each with its headline's
label, classified over gRPC at the server's default threshold. Every training text of the
shipped models is a headline, tweet, sentence or 1987 newswire story, so this is the check of
how a model reads a paragraph of modern prose (MODEL_CARD.md, "The lexical stage on every text").

    python3 tools/prose_check/prose_check.py 127.0.0.1:50051 [../shared/data]

Stubs as for examples/python/classify.py (see its header).
"""

import glob
import json
import os
import sys

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python"))
from dealsift.v1 import dealsift_pb2, dealsift_pb2_grpc  # noqa: E402
from evaluate import counts_and_f1  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def ledes(data_dir):
    labels = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "modern-labels*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if row["id"].startswith("wikinews-") and row["split"] == "validation":
                labels[row["id"]] = row["label"] == "DEAL"
    items = []
    for line in open(os.path.join(data_dir, "wikinews-economy", "economy_and_business.jsonl"), encoding="utf-8"):
        article = json.loads(line)
        lede = (article.get("summary") or "").strip()
        if article["id"] in labels and lede:
            items.append((article["id"], lede, labels[article["id"]]))
    return items


def main():
    address = sys.argv[1]
    data_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "..", "shared", "data")
    items = ledes(data_dir)
    stub = dealsift_pb2_grpc.DealClassifierStub(grpc.insecure_channel(address))
    info = stub.GetModelInfo(dealsift_pb2.GetModelInfoRequest())
    docs = [dealsift_pb2.Document(id=i, text=t) for i, t, _ in items]
    response = stub.Classify(dealsift_pb2.ClassifyRequest(documents=docs), timeout=300)
    scores = [r.deal_probability for r in response.results]
    truth = [deal for _, _, deal in items]
    for (item_id, _, deal), score in zip(items, scores):
        if (score >= info.default_threshold) != deal:
            print(f"  {'missed' if deal else 'false positive'}: {item_id} p {score:.3f}")
    tp, fp, fn, precision, recall, f1 = counts_and_f1(scores, truth, info.default_threshold)
    print(f"model {info.model_id} {info.model_version}, threshold {info.default_threshold:.2f}: "
          f"{len(items)} ledes, {tp + fn} deals: P {precision:.3f} R {recall:.3f} F1 {f1:.3f} (TP {tp} FP {fp} FN {fn})")


if __name__ == "__main__":
    main()
