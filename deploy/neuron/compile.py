#!/usr/bin/env python3
"""Compile a dealsift model directory into NEFFs for AWS Neuron and write neuron/manifest.json.

`dealsift serve --backend neuron` loads one NEFF per (batch, sequence) bucket on every
visible NeuronCore and pads each batch to the smallest bucket that holds it; the manifest
tells it which NEFF is which, what the inputs are, and what the NEFFs were compiled from.

Each bucket is traced with torch_neuronx.trace (example inputs are int32: the compiler
mangles int64 inputs into int32 pairs) into its own compiler workdir, from which the NEFF is
copied. Needs torch-neuronx, neuronx-cc and transformers (the Neuron DLAMI's PyTorch venv);
compiling needs no Neuron device. See deploy/neuron/README.md.

    python deploy/neuron/compile.py --model-dir models/dealsift-minilm-l6
    python deploy/neuron/compile.py --model-dir models/dealsift-minilm-l6 --plan   # no compiler needed
"""

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_BUCKETS = "1x32,8x32,32x32,1x64,8x64,32x64,1x128,8x128,32x128"
# AWS's published BERT numbers on trn1 use matmul autocast to bf16 with the transformer model
# type; --auto-cast none keeps fp32 throughout (slower, closer to the CPU logits).
COMPILER_FLAGS = ["--target", "trn1", "--model-type", "transformer"]
AUTO_CAST = {"matmult": ["--auto-cast", "matmult", "--auto-cast-type", "bf16"], "none": ["--auto-cast", "none"]}
NEFF_HEADER_BYTES = 1024


def parse_buckets(text):
    buckets = []
    for item in text.split(","):
        batch, sep, seq = item.strip().lower().partition("x")
        if not sep or not batch.isdigit() or not seq.isdigit() or int(batch) < 1 or int(seq) < 1:
            raise SystemExit(f"bucket {item!r}: expected BATCHxSEQ, e.g. 8x128")
        if (int(batch), int(seq)) in buckets:
            raise SystemExit(f"bucket {item!r} is listed twice")
        buckets.append((int(batch), int(seq)))
    return sorted(buckets)


def model_version(model_dir):
    """The version dealsift reports for the directory: config.json's dealsift.version, or the
    first 12 hex digits of the weights' SHA-256 (ModelDir::open in src/engine.rs)."""
    config = json.loads((model_dir / "config.json").read_text())
    version = (config.get("dealsift") or {}).get("version")
    if version:
        return version
    digest = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def command_output(*argv):
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def describe_neff(path):
    """Best effort: the input/output variables listed in the NEFF's sg00/def.json (a NEFF is a
    1024-byte header followed by a tarball). For the log only; the server checks sizes."""
    try:
        data = path.read_bytes()[NEFF_HEADER_BYTES:]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("def.json"))
            definition = json.load(tar.extractfile(member))
        variables = definition.get("var", {})
        return {kind: sorted(name for name, v in variables.items() if v.get("type") == kind) for kind in ("input", "output")}
    except Exception as e:  # the format is not documented; never fail the build on it
        return f"not inspected ({type(e).__name__}: {e})"


def logits_module(model):
    """The classifier as a module that takes (input_ids, attention_mask) and returns the logits
    alone; token_type_ids are zeros (dealsift sends single-segment text)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            token_type_ids = torch.zeros_like(input_ids)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=False)[0]

    return Logits(model).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face-style dealsift model directory")
    parser.add_argument("--out", type=Path, help="where the NEFFs and manifest.json go (default: MODEL_DIR/neuron)")
    parser.add_argument("--workdir", type=Path, help="compiler workdirs and traced .pt files (default: target/neuron-work/MODEL)")
    parser.add_argument("--buckets", default=DEFAULT_BUCKETS, help=f"BATCHxSEQ list (default {DEFAULT_BUCKETS})")
    parser.add_argument("--auto-cast", choices=sorted(AUTO_CAST), default="matmult", help="neuronx-cc autocast (default matmult, to bf16)")
    parser.add_argument("--sdk-version", help="Neuron SDK release, recorded in the manifest (e.g. 2.28.0)")
    parser.add_argument("--plan", action="store_true", help="print the manifest that would be written, without compiling")
    args = parser.parse_args()

    model_dir = args.model_dir.resolve()
    out = (args.out or model_dir / "neuron").resolve()
    workdir = (args.workdir or ROOT / "target" / "neuron-work" / model_dir.name).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    labels = len(config.get("id2label") or {})
    if labels < 1:
        raise SystemExit(f"{model_dir}/config.json has no id2label")
    buckets = parse_buckets(args.buckets)
    longest = config.get("max_position_embeddings", 512)
    if any(seq > longest for _, seq in buckets):
        raise SystemExit(f"buckets longer than max_position_embeddings ({longest}) cannot be traced")
    flags = COMPILER_FLAGS + AUTO_CAST[args.auto_cast]

    manifest = {
        "format": 1,
        "target": "trn1",
        "sdk_version": args.sdk_version or "unknown",
        "runtime_lib_version": command_output("dpkg-query", "-W", "-f=${Version}", "aws-neuronx-runtime-lib") or "unknown",
        "compiler_version": command_output("neuronx-cc", "--version") or "unknown",
        "compiler_flags": flags,
        "model_version": model_version(model_dir),
        "inputs": [
            {"name": "input0", "role": "input_ids", "dtype": "int32"},
            {"name": "input1", "role": "attention_mask", "dtype": "int32"},
        ],
        "output": {"name": "output0", "dtype": "float32", "labels": labels},
        "buckets": [{"batch": b, "seq": s, "neff": f"b{b}_s{s}.neff"} for b, s in buckets],
    }
    if args.plan:
        print(json.dumps(manifest, indent=2))
        return

    import torch
    import torch_neuronx
    import transformers

    manifest["torch_neuronx_version"] = torch_neuronx.__version__
    manifest["torch_version"] = torch.__version__
    manifest["transformers_version"] = transformers.__version__
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, torchscript=True)
    wrapper = logits_module(model)
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    for batch, seq in buckets:
        name = f"b{batch}_s{seq}"
        bucket_work = workdir / name
        shutil.rmtree(bucket_work, ignore_errors=True)
        example = (torch.zeros((batch, seq), dtype=torch.int32), torch.ones((batch, seq), dtype=torch.int32))
        started = time.monotonic()
        traced = torch_neuronx.trace(wrapper, example, compiler_workdir=str(bucket_work), compiler_args=flags)
        torch.jit.save(traced, str(workdir / f"{name}.pt"))
        neffs = sorted(bucket_work.rglob("*.neff"))
        if len(neffs) != 1:
            raise SystemExit(f"{bucket_work}: expected one NEFF, found {[str(n) for n in neffs]}")
        shutil.copyfile(neffs[0], out / f"{name}.neff")
        print(f"{name}: {time.monotonic() - started:.0f}s, {neffs[0].stat().st_size / 2**20:.1f} MiB, io {describe_neff(neffs[0])}", file=sys.stderr)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out / 'manifest.json'} and {len(buckets)} NEFFs; traced modules for parity.py are in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
