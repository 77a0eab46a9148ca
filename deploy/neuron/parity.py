#!/usr/bin/env python3
"""Check that the model on Neuron answers like the CPU reference, on a sample of documents.

Two checks, run on the Trn1 after compile.py (deploy/neuron/README.md, step 5):

  server  Both dealsift servers, `--backend neuron` and `--backend cpu`, classify the same
          documents through `dealsift classify`; per-document deal probabilities and labels are
          compared. This covers what ships: tokenizer, batching and bucket padding, the libnrt
          binding (input order, int32 layout, output reading) and the compiled NEFFs.
  trace   The traced modules compile.py saved are run through torch-neuronx and their logits
          compared with transformers on the CPU, bucket by bucket: the compiler's numerics
          alone, without dealsift.

    python deploy/neuron/parity.py server --neuron 127.0.0.1:50051 --cpu 127.0.0.1:50052
    python deploy/neuron/parity.py trace --model-dir models/dealsift-minilm-l6

Tolerances default by the manifest's autocast: bf16 matmuls move probabilities by up to a few
hundredths, fp32 (--auto-cast none) by far less. Exits 1 when a tolerance is exceeded.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# (max |probability difference|, min label agreement, max |logit difference|) by autocast.
TOLERANCES = {"matmult": (0.03, 0.99, 0.15), "none": (1e-3, 1.0, 5e-3)}


def autocast(model_dir):
    flags = json.loads((model_dir / "neuron" / "manifest.json").read_text()).get("compiler_flags", [])
    return flags[flags.index("--auto-cast") + 1] if "--auto-cast" in flags[:-1] else "none"


def classify(dealsift, addr, docs):
    run = subprocess.run([dealsift, "classify", "--server", f"http://{addr}", "--file", str(docs)], check=True, capture_output=True, text=True)
    return {r["id"]: r for r in map(json.loads, run.stdout.splitlines())}


def check_server(args):
    max_diff, min_agreement, _ = TOLERANCES[autocast(args.model_dir)]
    max_diff = args.max_prob_diff if args.max_prob_diff is not None else max_diff
    neuron, cpu = classify(args.dealsift, args.neuron, args.docs), classify(args.dealsift, args.cpu, args.docs)
    if neuron.keys() != cpu.keys():
        raise SystemExit(f"the servers answered different documents: {sorted(neuron.keys() ^ cpu.keys())[:5]}")
    diffs = sorted(((abs(neuron[i]["deal_probability"] - cpu[i]["deal_probability"]), i) for i in cpu), reverse=True)
    agree = sum(neuron[i]["label"] == cpu[i]["label"] for i in cpu) / len(cpu)
    print(f"{len(cpu)} documents: max |p_neuron - p_cpu| {diffs[0][0]:.5f} (limit {max_diff}), "
          f"mean {sum(d for d, _ in diffs) / len(diffs):.5f}, label agreement {agree:.4f} (limit {min_agreement})")
    for d, i in diffs[:5]:
        print(f"  {i}: neuron {neuron[i]['deal_probability']:.4f} cpu {cpu[i]['deal_probability']:.4f} (diff {d:.4f}, {cpu[i]['token_count']} tokens)")
    return diffs[0][0] <= max_diff and agree >= min_agreement


def check_trace(args):
    import torch
    import torch_neuronx  # noqa: F401  (registers the Neuron ops torch.jit.load needs)
    import transformers

    _, _, max_logit_diff = TOLERANCES[autocast(args.model_dir)]
    max_logit_diff = args.max_logit_diff if args.max_logit_diff is not None else max_logit_diff
    manifest = json.loads((args.model_dir / "neuron" / "manifest.json").read_text())
    workdir = args.workdir or ROOT / "target" / "neuron-work" / args.model_dir.resolve().name
    texts = [json.loads(line)["text"] for line in args.docs.read_text().splitlines() if line.strip()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model_dir).eval()
    ok = True
    for bucket in manifest["buckets"]:
        batch, seq = bucket["batch"], bucket["seq"]
        traced = torch.jit.load(str(workdir / f"b{batch}_s{seq}.pt"))
        worst = 0.0
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            enc = tokenizer(chunk, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
            ids, mask = enc["input_ids"].to(torch.int32), enc["attention_mask"].to(torch.int32)
            rows = ids.shape[0]
            if rows < batch:  # pad rows as dealsift does: pad ids, mask 1 at position 0
                pad_ids = torch.full((batch - rows, seq), tokenizer.pad_token_id, dtype=torch.int32)
                pad_mask = torch.zeros((batch - rows, seq), dtype=torch.int32)
                pad_mask[:, 0] = 1
                ids, mask = torch.cat([ids, pad_ids]), torch.cat([mask, pad_mask])
            with torch.no_grad():
                got = traced(ids, mask)[:rows]
                want = model(input_ids=ids[:rows].long(), attention_mask=mask[:rows].long()).logits
            worst = max(worst, (got - want).abs().max().item())
        print(f"b{batch}_s{seq}: max |logit difference| {worst:.5f} (limit {max_logit_diff})")
        ok &= worst <= max_logit_diff
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["server", "trace"])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "dealsift-minilm-l6")
    parser.add_argument("--docs", type=Path, default=HERE / "sample.jsonl", help="JSONL documents ({id, text})")
    parser.add_argument("--neuron", default="127.0.0.1:50051", help="address of `dealsift serve --backend neuron`")
    parser.add_argument("--cpu", default="127.0.0.1:50052", help="address of `dealsift serve --backend cpu`")
    parser.add_argument("--dealsift", default=str(ROOT / "target" / "release" / "dealsift"), help="dealsift binary")
    parser.add_argument("--workdir", type=Path, help="compile.py's workdir with the traced .pt files")
    parser.add_argument("--max-prob-diff", type=float, help="override the tolerance on deal probabilities")
    parser.add_argument("--max-logit-diff", type=float, help="override the tolerance on logits (trace)")
    args = parser.parse_args()
    ok = check_server(args) if args.check == "server" else check_trace(args)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
