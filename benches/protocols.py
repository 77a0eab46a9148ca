"""Compare a running dealsift server's two gRPC faces on the same work: `Classify` (dealsift.v1,
grpcio stubs) and the KServe v2 `ModelInfer` (tritonclient), alternating rounds.

Each round is a closed loop: --concurrency threads, each sending --docs-per-call documents of the
workload (`dealsift bench workload`) per call, for --seconds. Both faces send the same texts
(truncated to the model window, the server default), so the difference is the protocols and
their Python clients. Prints documents per second per round and the v2 / Classify ratio of the
round means; compare ratios within one run only.

    cargo run --release -- bench workload
    cargo run --release -- serve &
    python3 -m venv .venv && .venv/bin/pip install grpcio grpcio-tools "tritonclient[grpc]" numpy
    .venv/bin/python -m grpc_tools.protoc -I proto --python_out=examples/python --grpc_python_out=examples/python proto/dealsift/v1/dealsift.proto
    .venv/bin/python benches/protocols.py --url 127.0.0.1:50051
"""

import argparse
import json
import os
import sys
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "python"))
from dealsift.v1 import dealsift_pb2, dealsift_pb2_grpc  # noqa: E402


def classify_caller(url):
    stub = dealsift_pb2_grpc.DealClassifierStub(grpc.insecure_channel(url))

    def call(texts):
        docs = [dealsift_pb2.Document(id=str(i), text=t) for i, t in enumerate(texts)]
        return len(stub.Classify(dealsift_pb2.ClassifyRequest(documents=docs), timeout=60).results)

    return call


def v2_caller(url, model):
    client = triton.InferenceServerClient(url=url)

    def call(texts):
        array = np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1)
        tensor = triton.InferInput("TEXT", list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        result = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("PROBABILITIES")], client_timeout=60)
        return len(result.as_numpy("PROBABILITIES"))

    return call


def round_docs_per_s(make_caller, texts, concurrency, per_call, seconds):
    """Documents answered per second by `concurrency` closed-loop callers over `seconds`."""
    done, stop = [0] * concurrency, time.monotonic() + seconds

    def worker(k):
        call, i = make_caller(), k * per_call
        while time.monotonic() < stop:
            batch = [texts[(i + j) % len(texts)] for j in range(per_call)]
            done[k] += call(batch)
            i += concurrency * per_call

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:50051")
    parser.add_argument("--model", default="dealsift-minilm-l6")
    parser.add_argument("--workload", default="target/bench/workload.jsonl")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--docs-per-call", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per face, alternated")
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in open(args.workload)]
    faces = {"Classify": lambda: classify_caller(args.url), "ModelInfer (v2)": lambda: v2_caller(args.url, args.model)}
    results = {name: [] for name in faces}
    for _ in range(args.rounds):
        for name, make in faces.items():
            rate = round_docs_per_s(make, texts, args.concurrency, args.docs_per_call, args.seconds)
            results[name].append(rate)
            print(f"{name:16} {rate:7.1f} docs/s", flush=True)
    means = {name: sum(r) / len(r) for name, r in results.items()}
    print(f"ModelInfer / Classify: {means['ModelInfer (v2)'] / means['Classify']:.3f} (means of {args.rounds} rounds each)")


if __name__ == "__main__":
    main()
