#!/usr/bin/env python3
"""Independent check of a running dealsift server's accuracy: reads labelled examples with its
own Python readers (tools/recipe_sweep/export_data.py writes them), classifies them over gRPC
at the server's default threshold, and computes precision, recall, F1 and ROC-AUC itself.

    python3 tools/recipe_sweep/export_data.py                  # texts from ../shared/data
    python3 examples/python/evaluate.py 127.0.0.1:50051 tools/recipe_sweep/data.jsonl.gz

Stubs as for classify.py (see its header).
"""

import gzip
import json
import sys
from collections import defaultdict

import grpc

from dealsift.v1 import dealsift_pb2, dealsift_pb2_grpc

CALL_SIZE = 64


def roc_auc(scores, truth):
    """Probability that a random deal outscores a random non-deal (ties count half)."""
    ranked = sorted(zip(scores, truth))
    positives = sum(truth)
    negatives = len(truth) - positives
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2
        rank_sum += mean_rank * sum(t for _, t in ranked[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def counts_and_f1(scores, truth, threshold):
    """TP, FP, FN, precision, recall and F1 of labelling a deal where score >= threshold."""
    predicted = [s >= threshold for s in scores]
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return tp, fp, fn, precision, recall, f1


def main():
    address, path = sys.argv[1], sys.argv[2]
    sets = defaultdict(list)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            x = json.loads(line)
            if x["split"] == "test":
                sets[x["set"]].append(x)
    stub = dealsift_pb2_grpc.DealClassifierStub(grpc.insecure_channel(address))
    info = stub.GetModelInfo(dealsift_pb2.GetModelInfoRequest())
    print(f"model {info.model_id} {info.model_version}, threshold {info.default_threshold:.2f}")
    for name, examples in sorted(sets.items()):
        scores = []
        for start in range(0, len(examples), CALL_SIZE):
            chunk = examples[start:start + CALL_SIZE]
            docs = [dealsift_pb2.Document(id=x["id"], text=x["text"], title=x.get("title") or None) for x in chunk]
            response = stub.Classify(dealsift_pb2.ClassifyRequest(documents=docs), timeout=120)
            scores.extend(r.deal_probability for r in response.results)
        truth = [bool(x["deal"]) for x in examples]
        tp, fp, fn, precision, recall, f1 = counts_and_f1(scores, truth, info.default_threshold)
        print(f"{name}: n {len(examples)} deals {sum(truth)}  P {precision:.4f} R {recall:.4f} F1 {f1:.4f} "
              f"AUC {roc_auc(scores, truth):.4f}  (TP {tp} FP {fp} FN {fn})")


if __name__ == "__main__":
    main()
