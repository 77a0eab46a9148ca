"""Compare dealsift's CPU backend with ONNX Runtime and PyTorch on the same weights.

Runs the shipped classifier (models/dealsift-minilm-l6) in ONNX Runtime (fp32 with the BERT
fusions, and dynamic int8) and in PyTorch (fp32 and bf16), and runs `dealsift bench backend`
in the same run, on the same shapes: full-length sequences (every position a real token,
attention mask all ones, token types zero) with dealsift's synthetic ids. For each engine,
sequence length and batch size it reports the median time per batch, sequences per second
and the ratio dealsift (fast kernels) / engine; above 1 means dealsift is faster. A sanity
line gives each Python engine's max |logit difference| from PyTorch fp32 on one batch per
sequence length.

Run from the repository root, after building dealsift (`cargo build --release`):

    python3 -m venv .venv && .venv/bin/pip install -r benches/requirements.txt && .venv/bin/python benches/compare.py

Options: --engines, --batch, --seq, --seconds, --iterations, --threads, --json FILE,
--dealsift PATH, --skip-dealsift; see --help. The ONNX files are exported once into
target/compare/ (--work) and again whenever the weights change.

The numbers depend on the machine, its load and the thread count: compare ratios only within
one run on one machine, never across runs or machines. Run it on an otherwise idle machine:
PyTorch's OpenMP threads slow down many times over when another process takes a core.
"""

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from onnx import TensorProto
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import BertForSequenceClassification

REPO = Path(__file__).resolve().parent.parent
PYTHON_ENGINES = ("ort-fp32", "ort-int8", "torch-fp32", "torch-bf16")
DEALSIFT_KERNELS = {"dealsift": "fast", "dealsift-reference": "reference"}
ALL_ENGINES = PYTHON_ENGINES + tuple(DEALSIFT_KERNELS)
DEFAULT_ENGINES = ("dealsift",) + PYTHON_ENGINES
BASELINE = "dealsift"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
WARMUP_RUNS = 3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated subset of {','.join(ALL_ENGINES)}")
    parser.add_argument("--batch", type=ints, default=[1, 8, 32], help="batch sizes")
    parser.add_argument("--seq", type=ints, default=[128, 256], help="sequence lengths (tokens, all real)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per shape, at least")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per shape, at least")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per engine")
    parser.add_argument("--model-dir", type=Path, default=REPO / "models/dealsift-minilm-l6")
    parser.add_argument("--work", type=Path, default=REPO / "target/compare", help="folder for the exported ONNX files")
    parser.add_argument("--dealsift", type=Path, default=default_dealsift(), help="dealsift binary (default: release if built, else debug)")
    parser.add_argument("--skip-dealsift", action="store_true", help="leave out the dealsift engines")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write all rows to FILE")
    args = parser.parse_args()
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(args.engines) - set(ALL_ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ALL_ENGINES)}")
    if args.skip_dealsift:
        args.engines = [e for e in args.engines if e not in DEALSIFT_KERNELS]
    if any(e in DEALSIFT_KERNELS for e in args.engines) and not args.dealsift.is_file():
        parser.error(f"no dealsift binary at {args.dealsift}: build it (cargo build --release), pass --dealsift PATH, or --skip-dealsift")
    return args


def default_dealsift():
    release = REPO / "target/release/dealsift"
    return release if release.is_file() else REPO / "target/debug/dealsift"


def synthetic_inputs(batch, seq):
    """dealsift's benchmark inputs: full-length rows, id 1000 + (i * 7919) % 20000 at flat index i."""
    ids = 1000 + (np.arange(batch * seq, dtype=np.int64) * 7919) % 20_000
    ids = ids.reshape(batch, seq)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def load_model(model_dir, **kwargs):
    return BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def export_onnx(model_dir, work):
    """The fused fp32 and the int8 ONNX files, exported again when missing or older than the weights."""
    fp32, int8 = work / "model-fp32.onnx", work / "model-int8.onnx"
    weights_time = (model_dir / "model.safetensors").stat().st_mtime
    if all(p.is_file() and p.stat().st_mtime >= weights_time for p in (fp32, int8)):
        return {"ort-fp32": fp32, "ort-int8": int8}
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "model-raw.onnx"
    print(f"exporting ONNX files to {work}", file=sys.stderr)
    # Eager attention: the BERT fusions match its graph, not SDPA's. A model of its own,
    # because the export leaves the module it traces in training mode.
    model = load_model(model_dir, attn_implementation="eager")
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {"logits": {0: "batch"}}
    example = tuple(torch.from_numpy(v) for v in synthetic_inputs(2, 16).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model), example, raw, input_names=list(INPUT_NAMES), output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    optimized = optimize_model(str(raw), model_type="bert", num_heads=model.config.num_attention_heads, hidden_size=model.config.hidden_size)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    print(f"fused operators: {fused}", file=sys.stderr)
    optimized.save_model_to_file(str(fp32))
    # Shape inference cannot type the outputs of the fused (com.microsoft) operators.
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return {"ort-fp32": fp32, "ort-int8": int8}


def ort_predictor(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(["logits"], inputs)[0]


def torch_predictor(model):
    def predict(inputs):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.float().numpy()
    return predict


def percentile(sorted_values, q):
    """Nearest-rank percentile, as dealsift computes it."""
    rank = min(max(int(np.ceil(q * len(sorted_values))), 1), len(sorted_values))
    return sorted_values[rank - 1]


def time_predictor(engine, predict, args):
    rows = []
    for seq in args.seq:
        for batch in args.batch:
            inputs = synthetic_inputs(batch, seq)
            for _ in range(WARMUP_RUNS):
                predict(inputs)
            times = []
            started = time.perf_counter()
            while len(times) < args.iterations or time.perf_counter() - started < args.seconds:
                t0 = time.perf_counter()
                predict(inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            median = percentile(times, 0.5)
            rows.append({"engine": engine, "batch": batch, "seq": seq, "iterations": len(times), "median_ms": median,
                         "p10_ms": percentile(times, 0.1), "p90_ms": percentile(times, 0.9), "sequences_per_s": batch / (median / 1e3)})
    return rows


def run_dealsift(engine, args):
    command = [str(args.dealsift), "bench", "backend", "--model-dir", str(args.model_dir), "--cpu-kernels", DEALSIFT_KERNELS[engine],
               "--batch", ",".join(map(str, args.batch)), "--seq", ",".join(map(str, args.seq)), "--seconds", str(args.seconds),
               "--iterations", str(args.iterations), "--threads", str(args.threads), "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({result.returncode}):\n{result.stderr.strip()}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [{"engine": engine, **{k: v for k, v in row.items() if k != "kernels"}} for row in rows]


def max_logit_diffs(predict, reference, args):
    """Max |logit - torch fp32 logit| on the largest batch, per sequence length."""
    batch = max(args.batch)
    return {seq: float(np.abs(predict(synthetic_inputs(batch, seq)) - reference[seq]).max()) for seq in args.seq}


def run_engines(args):
    rows, accuracy = [], {}
    python_engines = [e for e in args.engines if e in PYTHON_ENGINES]
    if python_engines:
        torch.set_num_threads(args.threads)
        model = load_model(args.model_dir)
        reference = {seq: torch_predictor(model)(synthetic_inputs(max(args.batch), seq)) for seq in args.seq}
    if any(e.startswith("ort-") for e in python_engines):
        onnx_files = export_onnx(args.model_dir, args.work)
    for engine in args.engines:
        print(f"timing {engine}", file=sys.stderr)
        if engine in DEALSIFT_KERNELS:
            rows += run_dealsift(engine, args)
            continue
        if engine.startswith("ort-"):
            predict = ort_predictor(onnx_files[engine], args.threads)
        else:
            predict = torch_predictor(model if engine == "torch-fp32" else copy.deepcopy(model).to(torch.bfloat16))
        rows += time_predictor(engine, predict, args)
        accuracy[engine] = max_logit_diffs(predict, reference, args)
    return rows, accuracy


def add_ratios(rows):
    baseline = {(r["seq"], r["batch"]): r["sequences_per_s"] for r in rows if r["engine"] == BASELINE}
    for row in rows:
        base = baseline.get((row["seq"], row["batch"]))
        row["dealsift_ratio"] = base / row["sequences_per_s"] if base else None


def print_report(rows, accuracy, args):
    order = {engine: i for i, engine in enumerate(args.engines)}
    print(f"{'engine':<19} {'seq':>4} {'batch':>5} {'iters':>5} {'median ms':>10} {'seq/s':>9} {'dealsift/engine':>15}")
    for r in sorted(rows, key=lambda r: (r["seq"], r["batch"], order[r["engine"]])):
        ratio = f"{r['dealsift_ratio']:.2f}" if r["dealsift_ratio"] else "-"
        print(f"{r['engine']:<19} {r['seq']:>4} {r['batch']:>5} {r['iterations']:>5} {r['median_ms']:>10.2f} {r['sequences_per_s']:>9.1f} {ratio:>15}")
    if accuracy:
        diffs = ", ".join(f"{e} " + " ".join(f"{d:.2e}@{s}" for s, d in per_seq.items()) for e, per_seq in accuracy.items())
        print(f"max |logit - torch-fp32 logit|, batch {max(args.batch)} @ seq: {diffs}")


def cpu_model():
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def environment(args):
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": ort.__version__, "dealsift": str(args.dealsift) if any(e in DEALSIFT_KERNELS for e in args.engines) else None}


def main():
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    env = environment(args)
    print(" ".join(f"{k}={v}" for k, v in env.items() if v), file=sys.stderr)
    if env["dealsift"] and "/debug/" in env["dealsift"]:
        print("note: a debug build of dealsift (its kernels are optimised, the rest is not); prefer the release build", file=sys.stderr)
    rows, accuracy = run_engines(args)
    add_ratios(rows)
    print_report(rows, accuracy, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows, "max_logit_diff": accuracy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
