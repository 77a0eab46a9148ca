"""Classify texts with NVIDIA's Triton client (KServe v2 over gRPC), no dealsift stubs needed.

    pip install "tritonclient[grpc]" numpy
    python3 examples/python/triton_client.py --url 127.0.0.1:50051 "Google agrees to buy Wiz for $32 billion"
"""
import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:50051", help="dealsift's gRPC address (host:port)")
    parser.add_argument("--api-key-file", help="file whose first key line is sent as `authorization: Bearer <key>`")
    parser.add_argument("--model", default="dealsift-minilm-l6", help="the served model's id (GetModelInfo, or the server's log)")
    parser.add_argument("--top", type=int, default=0, help="ask for the top K labels (the classification extension) instead of the deal probability")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()
    if args.top < 0:
        parser.error("--top is a number of labels, 1 or more (0: the deal probability only)")
    try:
        classify(args)
    except InferenceServerException as e:
        print(f"RPC failed: {e.status()}: {e.message()}", file=sys.stderr)
        sys.exit(1)


def classify(args):
    headers = {}
    if args.api_key_file:
        key = next(line.strip() for line in open(args.api_key_file) if line.strip() and not line.startswith("#"))
        headers["authorization"] = f"Bearer {key}"
    client = grpcclient.InferenceServerClient(url=args.url)
    if not client.is_model_ready(args.model, headers=headers):
        raise SystemExit(f"model {args.model} is not served, or not ready yet (the served id is in GetModelInfo and the server log)")

    texts = np.array([t.encode() for t in args.texts], dtype=np.object_).reshape(-1, 1)
    text = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
    text.set_data_from_numpy(texts)
    # "score:index:label" strings, best first: every label (a count above the labels returns
    # them all), so the deal score is found by its label's name, not its position.
    outputs = [grpcclient.InferRequestedOutput("LABEL"), grpcclient.InferRequestedOutput("PROBABILITIES", class_count=args.top or 1000)]
    result = client.infer(args.model, [text], outputs=outputs, headers=headers)
    for t, label, ranked in zip(args.texts, result.as_numpy("LABEL").reshape(-1), result.as_numpy("PROBABILITIES")):
        ranked = [r.decode() for r in ranked]
        if args.top:
            shown = " ".join(ranked)
        else:
            deal = next(float(r.split(":")[0]) for r in ranked if r.split(":", 2)[2] == "deal")
            shown = f"deal={deal:.3f}"
        print(f"{label.decode():9} {shown}  {t}")


if __name__ == "__main__":
    main()
