#!/usr/bin/env python3
"""Fine-tuning recipe sweep for dealsift's deal classifier (all-MiniLM-L6-v2), mirroring the
Rust trainer (src/train.rs) as closely as PyTorch allows, for one GPU.

Per config (a fresh model each): training set = train split of reuters/twitter/modern with the
non-deal caps (seeded, applied once), tokenized like src/tokenize.rs ("{title}\\n{text}",
[CLS] + first max_len-2 content tokens + [SEP]); BertForSequenceClassification (tanh pooler
over [CLS] + fresh N(0,0.02) linear head), no dropout (the candle model has none; --dropout
to change); AdamW (betas 0.9/0.999, eps 1e-8, wd 0.01 on every trainable tensor), linear
warmup (ceil 6% of steps) then linear decay to 0, batch 32 in length-sorted pools of 50
batches, weighted CE (deal weight 2.0, normalised by the weight sum), grad-norm clip 1.0;
embeddings + bottom N encoder layers frozen. Then temperature (NLL, golden section on log T in
[0.05, 20]) and threshold (0.05..0.95 step 0.01, max mean F1 over the validation sets: every
pool's carve-out, the written headlines' only for configs trained on them, as
Corpus::validation_for) on validation only, as src/metrics.rs does; test sets are only scored at that threshold.

Data: tools/recipe_sweep/data.jsonl.gz (from tools/recipe_sweep/export_data.py). Base: tools/recipe_sweep/base (float16 weights,
loaded as float32). Results: one line per config on stdout, and JSON lines appended to
$OUT/sweep.jsonl when OUT is set.

  PYTHONUNBUFFERED=1 python3 tools/recipe_sweep/sweep.py                        # all configs A..G
  python3 tools/recipe_sweep/sweep.py --configs A,B --limit 200 --max-steps 10  # smoke test
"""
import argparse
import gzip
import json
import math
import os
import re
import sys
import time

T0 = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = ("reuters", "twitter", "modern")  # trained on by default, validated and tested
SOURCES = SETS + ("funding",)  # trained on: + the synthetic funding headlines (src/data/funding.rs)
WRITTEN = SETS + ("headlines",)  # trained on: + the written training headlines (src/data/headlines.rs; both rounds since round 2)
SUBTYPES = ("MA", "STAKE", "INVEST", "IPO", "CONTRACT")
DEFAULT_CAPS = {"reuters": 3000, "twitter": 6000}

# name: (epochs, frozen layers, learning rate, max_len, non-deal caps)
CONFIGS = {
    "A": dict(epochs=3, frozen=2, lr=1.5e-4, max_len=128, caps=DEFAULT_CAPS),
    "B": dict(epochs=3, frozen=0, lr=5e-5, max_len=128, caps=DEFAULT_CAPS),
    "C": dict(epochs=5, frozen=0, lr=5e-5, max_len=128, caps=DEFAULT_CAPS),
    "D": dict(epochs=3, frozen=0, lr=1e-4, max_len=128, caps=DEFAULT_CAPS),
    "E": dict(epochs=3, frozen=0, lr=5e-5, max_len=256, caps=DEFAULT_CAPS),
    "F": dict(epochs=8, frozen=0, lr=5e-5, max_len=128, caps=DEFAULT_CAPS),
    "G": dict(epochs=3, frozen=0, lr=5e-5, max_len=128, caps={}),
    # Round 2 of the modern labels is in the data from here on (export with `dealsift export-corpus`).
    "H": dict(epochs=3, frozen=0, lr=5e-5, max_len=128, caps={}, sources=SETS),
    "I": dict(epochs=3, frozen=0, lr=5e-5, max_len=128, caps={}, sources=SOURCES),
    "J": dict(epochs=2, frozen=0, lr=5e-5, max_len=128, caps={}, sources=SOURCES),
    "K": dict(epochs=3, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SOURCES),
    "L": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SOURCES),
    "M": dict(epochs=2, frozen=0, lr=5e-5, max_len=128, caps={}, sources=SETS),
    "N": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS),
    "O": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={"reuters": 5000}, sources=SETS),
    # Round 4 of the modern labels is in the data from here on; P is the shipped 1.3.0 recipe (N).
    "P": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS),
    "Q": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS, strip_links=True),
    "R": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS, repeat={"modern": 2}),
    "S": dict(epochs=3, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS),
    "U": dict(epochs=2, frozen=0, lr=1e-4, max_len=128, caps={}, sources=SETS),
    "V": dict(epochs=3, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=SETS, repeat={"modern": 2}, strip_links=True),
    # The written 2015-2023 headlines are in the data from here on: their carve-out is reported
    # for every config and, as Corpus::validation_for does, calibrates only configs trained on them.
    "W": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=WRITTEN),
    "X": dict(epochs=2, frozen=2, lr=1.5e-4, max_len=128, caps={}, sources=WRITTEN, repeat={"headlines": 3}),
}

LINK = re.compile(r"(https?://|www\.)\S*")

# Rust's str::trim / split_whitespace: the Unicode White_Space property.
RUST_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------ metrics.rs

def confusion(probs, truth, thr):
    pred = probs >= thr
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    tn = int(np.sum(~pred & ~truth))
    return tp, fp, fn, tn


def ratio(a, b):
    return a / b if b else 0.0


def prf(probs, truth, thr):
    tp, fp, fn, tn = confusion(probs, truth, thr)
    return ratio(2 * tp, 2 * tp + fp + fn), ratio(tp, tp + fp), ratio(tp, tp + fn)


def roc_auc(probs, truth):
    pos = int(truth.sum())
    neg = len(truth) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(probs, kind="stable")
    sp = probs[order]
    ranks = np.empty(len(probs), dtype=np.float64)
    n = len(sp)
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2.0 + 1.0
    rank_sum = ranks[truth].sum()
    return float((rank_sum - pos * (pos + 1) / 2.0) / (pos * neg))


def deal_prob(logits, temperature):
    """engine::softmax in f64, deal column, as f32."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e[:, 1] / e.sum(axis=1)).astype(np.float32)


def fit_temperature(logits, truth):
    lo, hi = np.float32(1e-7), np.float32(1.0 - 1e-7)

    def nll(log_t):
        p = np.clip(deal_prob(logits, math.exp(log_t)), lo, hi).astype(np.float64)
        return float(-np.where(truth, np.log(p), np.log(1.0 - p)).sum())

    a, b = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2.0)


def best_threshold(sets):
    best = (np.float32(0.5), -1.0)
    for k in range(5, 96):
        t = np.float32(k) / np.float32(100)
        mean = sum(prf(p, y, t)[0] for p, y in sets) / max(len(sets), 1)
        if mean > best[1]:
            best = (t, mean)
    return float(best[0]), best[1]


# ------------------------------------------------------------------------------ data

def load_data(path, limit, seed):
    groups = {}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            groups.setdefault((r["set"], r["split"]), []).append(r)
    if limit:
        rng = np.random.default_rng(seed)
        for k, v in groups.items():
            if len(v) > limit:
                idx = np.sort(rng.permutation(len(v))[:limit])
                groups[k] = [v[i] for i in idx]
    return groups


class Encoder:
    """src/tokenize.rs TextEncoder with LongText::Truncate."""

    def __init__(self, tokenizer_json, strip_links=False):
        from tokenizers import Tokenizer

        self.strip_links = strip_links
        self.tok = Tokenizer.from_file(tokenizer_json)
        self.tok.no_padding()
        self.tok.no_truncation()
        probe = self.tok.encode("a", add_special_tokens=True)
        ids, special = probe.ids, probe.special_tokens_mask
        lead = next(i for i, s in enumerate(special) if s != 1)
        trail = next(i for i, s in enumerate(reversed(special)) if s != 1)
        self.prefix, self.suffix = list(ids[:lead]), list(ids[len(ids) - trail:])

    def joined(self, r):
        t = (r.get("title") or "").strip(RUST_WS)
        text = f"{t}\n{r['text']}" if t else r["text"]
        return " ".join(LINK.sub(" ", text).split()) if self.strip_links else text

    def content_ids(self, records):
        encs = self.tok.encode_batch([self.joined(r) for r in records], add_special_tokens=False)
        return [e.ids for e in encs]

    def windows(self, content, max_len):
        room = max_len - len(self.prefix) - len(self.suffix)
        return [self.prefix + ids[:room] + self.suffix for ids in content]


def cap_train(records, caps, seed, repeat=None):
    """train.rs: keep every deal, shuffle non-deals (seeded) and keep the first `cap`; a source
    in `repeat` ({source: times}) is then listed that many times per epoch."""
    out = {}
    rng = np.random.default_rng(seed)
    for name in records:
        recs = records[name]
        cap = caps.get(name)
        if cap is None:
            out[name] = list(range(len(recs)))
            continue
        deals = [i for i, r in enumerate(recs) if r["deal"]]
        others = [i for i, r in enumerate(recs) if not r["deal"]]
        perm = rng.permutation(len(others))
        out[name] = deals + [others[j] for j in perm[:cap]]
    for name, times in (repeat or {}).items():
        out[name] = out[name] * times
    return out


def length_batches(lengths, batch_size, rng):
    """train.rs length_batches: shuffle, sort within pools of 50 batches, cut, shuffle batches."""
    order = rng.permutation(len(lengths))
    batches = []
    pool_size = batch_size * 50
    for s in range(0, len(order), pool_size):
        pool = order[s:s + pool_size]
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        batches.extend(pool[i:i + batch_size] for i in range(0, len(pool), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def pad(windows, idx, pad_id, device):
    seq = max(len(windows[i]) for i in idx)
    ids = np.full((len(idx), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), seq), dtype=np.int64)
    for row, i in enumerate(idx):
        w = windows[i]
        ids[row, :len(w)] = w
        mask[row, :len(w)] = 1
    ids = torch.from_numpy(ids)
    mask = torch.from_numpy(mask)
    if device.type == "cuda":
        ids, mask = ids.pin_memory(), mask.pin_memory()
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


# ------------------------------------------------------------------------------ model

def build_model(args, cfg, seed, device, verbose):
    import transformers
    from transformers import BertForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    d = args.dropout
    model, info = BertForSequenceClassification.from_pretrained(
        args.base, num_labels=2, dtype=torch.float32, output_loading_info=True,
        hidden_dropout_prob=d, attention_probs_dropout_prob=d, classifier_dropout=d,
    )
    model = model.float()
    if verbose:
        log("loading info:", {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in info.items() if v})
        missing = set(info.get("missing_keys", []))
        if missing - {"classifier.weight", "classifier.bias"}:
            raise SystemExit(f"base checkpoint lacks {sorted(missing)} (pooler expected in it)")
    # Fresh head exactly like the Rust trainer: N(0, 0.02) weight, zero bias.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
        model.classifier.bias.zero_()
    for name, p in model.named_parameters():
        frozen = name.startswith("bert.embeddings.")
        if name.startswith("bert.encoder.layer."):
            frozen = int(name.split(".")[3]) < cfg["frozen"]
        p.requires_grad_(not frozen)
    return model.to(device)


@torch.no_grad()
def predict(model, windows, pad_id, device, amp, batch=256):
    model.eval()
    order = np.argsort([len(w) for w in windows], kind="stable")
    out = np.zeros((len(windows), 2), dtype=np.float32)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        ids, mask = pad(windows, idx, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
        out[idx] = logits.float().cpu().numpy()
    model.train()
    return out


def calibrate(val_logits, val_truth, sets):
    """Temperature and threshold on the validation sets `sets`; probabilities for every set given."""
    all_l = np.concatenate([val_logits[n] for n in sets])
    all_y = np.concatenate([val_truth[n] for n in sets])
    temperature = fit_temperature(all_l, all_y)
    probs = {n: deal_prob(val_logits[n], temperature) for n in val_logits}
    thr, mean_f1 = best_threshold([(probs[n], val_truth[n]) for n in sets])
    return temperature, thr, mean_f1, probs


def calibration_sets(cfg, reported):
    """Corpus::validation_for: every pool's carve-out, the headlines' only when they train."""
    return tuple(n for n in reported if n != "headlines" or "headlines" in cfg.get("sources", SETS))


def run_config(name, cfg, data, content, enc, args, device, verbose):
    t_start = time.time()
    amp = not args.no_amp
    seed = args.seed
    pad_id = args.pad_id
    ml = cfg["max_len"]
    content = content["strip_links" if cfg.get("strip_links") else "plain"]
    win = {k: enc.windows(v, ml) for k, v in content.items()}

    # Training set (caps applied once, as train.rs does).
    train_recs = {n: data.get((n, "train"), []) for n in cfg.get("sources", SETS)}
    keep = cap_train(train_recs, cfg["caps"], seed, cfg.get("repeat"))
    train_w, train_y, train_counts = [], [], []
    for n in train_recs:
        for i in keep[n]:
            train_w.append(win[(n, "train")][i])
            train_y.append(train_recs[n][i]["deal"])
        train_counts.append((n, len(keep[n]), int(sum(train_recs[n][i]["deal"] for i in keep[n]))))
    train_y = np.array(train_y, dtype=np.int64)
    lengths = np.array([len(w) for w in train_w])
    reported = args.reported
    calibrated = calibration_sets(cfg, reported)
    val_truth = {n: np.array([r["deal"] for r in data[(n, "validation")]], dtype=bool) for n in reported}
    test_truth = {n: np.array([r["deal"] for r in data[(n, "test")]], dtype=bool) for n in reported}

    model = build_model(args, cfg, seed, device, verbose)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    class_w = torch.tensor([1.0, args.deal_weight], device=device)
    labels_all = torch.from_numpy(train_y)

    bs = args.batch_size
    per_epoch = math.ceil(len(train_w) / bs)
    total = per_epoch * cfg["epochs"]
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = math.ceil(total * args.warmup)
    rng = np.random.default_rng(seed)
    step = 0
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    loss_curve, epochs_val = [], []
    padded_tokens = 0
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_train = time.time()
    for epoch in range(cfg["epochs"]):
        for idx in length_batches(lengths, bs, rng):
            if step == total:
                break
            lr = cfg["lr"] * ((step + 1) / warmup if step < warmup else (total - step) / max(total - warmup, 1))
            for g in opt.param_groups:
                g["lr"] = lr
            ids, mask = pad(train_w, idx, pad_id, device)
            padded_tokens += ids.numel()
            y = labels_all[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
            loss = F.cross_entropy(logits.float(), y, weight=class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            opt.step()
            loss_sum += loss.detach()
            loss_n += 1
            step += 1
            if step % 100 == 0 or step == total:
                l = (loss_sum / loss_n).item()
                loss_curve.append((step, round(l, 5)))
                loss_sum.zero_()
                loss_n = 0
                if verbose or step % 500 == 0 or step == total:
                    log(f"  {name} step {step}/{total} epoch {epoch + 1} loss {l:.4f} lr {lr:.2e}")
        if step == total and epoch + 1 < cfg["epochs"]:
            break
        if epoch + 1 < cfg["epochs"]:
            # Per-epoch validation (calibrated as at the end), to see where the curve peaks.
            vl = {n: predict(model, win[(n, "validation")], pad_id, device, amp, args.eval_batch) for n in reported}
            t, thr, mean_f1, probs = calibrate(vl, val_truth, calibrated)
            f1s = {n: round(prf(probs[n], val_truth[n], np.float32(thr))[0], 4) for n in reported}
            epochs_val.append({"epoch": epoch + 1, "temperature": round(t, 4), "threshold": round(thr, 2), "mean_f1": round(mean_f1, 4), "f1": f1s})
            log(f"  {name} epoch {epoch + 1} validation mean F1 {mean_f1:.4f} {f1s} (T {t:.3f}, thr {thr:.2f})")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train

    # Calibration and threshold: validation only.
    t_eval = time.time()
    vl = {n: predict(model, win[(n, "validation")], pad_id, device, amp, args.eval_batch) for n in reported}
    temperature, thr, mean_f1, vprobs = calibrate(vl, val_truth, calibrated)
    thr32 = np.float32(thr)
    validation = {}
    for n in reported:
        f1, p, r = prf(vprobs[n], val_truth[n], thr32)
        validation[n] = {"n": int(len(val_truth[n])), "deals": int(val_truth[n].sum()), "f1": round(f1, 4),
                         "precision": round(p, 4), "recall": round(r, 4), "roc_auc": _r(roc_auc(vprobs[n], val_truth[n]))}
    validation["modern"]["recall_by_subtype"] = recall_by_subtype(data[("modern", "validation")], vprobs["modern"], thr32)
    test = {}
    for n in reported:
        tl = predict(model, win[(n, "test")], pad_id, device, amp, args.eval_batch)
        probs = deal_prob(tl, temperature)
        f1, p, r = prf(probs, test_truth[n], thr32)
        tp, fp, fn, tn = confusion(probs, test_truth[n], thr32)
        test[n] = {"n": int(len(probs)), "deals": int(test_truth[n].sum()), "f1": round(f1, 4), "precision": round(p, 4),
                   "recall": round(r, 4), "roc_auc": _r(roc_auc(probs, test_truth[n])), "tp": tp, "fp": fp, "fn": fn, "tn": tn}
        if n == "modern":
            test[n]["recall_by_subtype"] = recall_by_subtype(data[(n, "test")], probs, thr32)
    eval_s = time.time() - t_eval
    res = {
        "config": name, **{k: v for k, v in cfg.items() if k != "caps"}, "caps": cfg["caps"] or "none",
        "seed": seed, "batch_size": bs, "deal_weight": args.deal_weight, "dropout": args.dropout, "amp_bf16": amp,
        "max_steps": args.max_steps, "limit": args.limit,
        "train_counts": train_counts, "steps": step, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "total_s": round(time.time() - t_start, 1), "ms_per_step": round(1000 * train_s / max(step, 1), 2),
        "padded_tokens": padded_tokens, "temperature": round(temperature, 4), "threshold": round(thr, 2),
        "calibrated_on": calibrated, "validation_mean_f1": round(mean_f1, 4), "validation": validation, "test": test,
        "test_mean_f1": round(sum(test[n]["f1"] for n in SETS) / len(SETS), 4),  # the three benchmark sets
        "epochs_validation": epochs_val, "loss_curve": loss_curve, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def recall_by_subtype(records, probs, thr):
    """{subtype: [recalled, deals]} over the deals of a modern split."""
    by = {}
    for rec, pr in zip(records, probs):
        if rec["deal"] and rec.get("subtype"):
            h = by.setdefault(rec["subtype"], [0, 0])
            h[1] += 1
            h[0] += int(pr >= thr)
    return {k: by[k] for k in sorted(by, key=lambda s: (SUBTYPES.index(s) if s in SUBTYPES else 99, s))}


def _r(x):
    return None if x is None else round(x, 4)


def compact(res):
    c = res
    head = f"{c['config']}: ep{c['epochs']} fr{c['frozen']} lr{c['lr']:.1e} len{c['max_len']} caps={'none' if c['caps'] == 'none' else '/'.join(f'{k[0]}{v}' for k, v in c['caps'].items())}"
    v = " ".join(f"{n[0]} {c['validation'][n]['f1']:.4f}" for n in c["validation"])
    t = " ".join(f"{n[0]} {c['test'][n]['f1']:.4f}/{c['test'][n]['precision']:.3f}/{c['test'][n]['recall']:.3f}/{(c['test'][n]['roc_auc'] or float('nan')):.4f}" for n in c["test"])
    sub = " ".join(f"{k} {h}/{n}" for k, (h, n) in c["test"]["modern"].get("recall_by_subtype", {}).items())
    vsub = " ".join(f"{k} {h}/{n}" for k, (h, n) in c["validation"]["modern"].get("recall_by_subtype", {}).items())
    head += f" sources={','.join(c.get('sources', SETS))}"
    head += "".join(f" repeat {k}x{v}" for k, v in c.get("repeat", {}).items()) + (" strip_links" if c.get("strip_links") else "")
    return (f"RESULT {head} | {c['steps']} steps {c['train_s']:.0f}s+{c['eval_s']:.0f}s | T {c['temperature']:.3f} thr {c['threshold']:.2f} | "
            f"val F1 {v} mean {c['validation_mean_f1']:.4f} | val modern recall {vsub} | test F1/P/R/AUC {t} | modern recall {sub}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--max-steps", type=int, default=None, help="stop each config after this many steps (smoke tests)")
    ap.add_argument("--limit", type=int, default=None, help="examples per (set, split) (smoke tests)")
    ap.add_argument("--data", default=os.path.join(HERE, "data.jsonl.gz"))
    ap.add_argument("--base", default=os.path.join(HERE, "base"))
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=0.06)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--deal-weight", type=float, default=2.0)
    ap.add_argument("--dropout", type=float, default=0.0, help="BERT dropout (0 = as the candle trainer, which has none)")
    ap.add_argument("--no-amp", action="store_true", help="train/eval in float32 instead of bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--deadline-s", type=float, default=450.0,
                    help="skip a config whose predicted run would end past this many seconds after start (0 = never skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    names = [c.strip().upper() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configs {bad}; known: {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    out_dir = os.environ.get("OUT")
    out_path = os.path.join(out_dir, "sweep.jsonl") if out_dir else None
    log(f"torch {torch.__version__} device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
        + f" configs {names} limit {args.limit} max_steps {args.max_steps} -> {out_path}")

    data = load_data(args.data, args.limit, args.seed)
    args.reported = tuple(n for n in WRITTEN if (n, "validation") in data)  # validated and tested
    enc = Encoder(os.path.join(args.base, "tokenizer.json"))
    with open(os.path.join(args.base, "config.json")) as f:
        args.pad_id = json.load(f).get("pad_token_id", 0)
    content = {"plain": {k: enc.content_ids(v) for k, v in data.items()}}
    if any(CONFIGS[n].get("strip_links") for n in names):
        stripping = Encoder(os.path.join(args.base, "tokenizer.json"), strip_links=True)
        content["strip_links"] = {k: stripping.content_ids(v) for k, v in data.items()}
    log("data:", {f"{k[0]}/{k[1]}": (len(v), sum(r["deal"] for r in v)) for k, v in sorted(data.items())},
        f"prefix {enc.prefix} suffix {enc.suffix}")

    last = None  # the last finished config's result, for time predictions
    done = []
    for i, name in enumerate(names):
        cfg = CONFIGS[name]
        if args.deadline_s and last is not None:
            # Predict this config's time from the last finished one: per-step time, scaled up by
            # tokens per step and by the trainable depth when the GPU is compute-bound (max of
            # the launch-bound and compute-bound estimates, so it errs long).
            room = cfg["max_len"] - len(enc.prefix) - len(enc.suffix)
            recs = {n: data.get((n, "train"), []) for n in cfg.get("sources", SETS)}
            keep = cap_train(recs, cfg["caps"], args.seed, cfg.get("repeat"))
            n_train = sum(len(keep[n]) for n in recs)
            tok_epoch = sum(min(len(content["plain"][(n, "train")][j]), room) + 2 for n in recs for j in keep[n])
            per_epoch = math.ceil(n_train / args.batch_size)
            steps = per_epoch * cfg["epochs"]
            if args.max_steps:
                steps = min(steps, args.max_steps)
            tok_per_step = 1.15 * tok_epoch / per_epoch
            depth = (6 + 2 * (6 - cfg["frozen"])) / (6 + 2 * (6 - last["frozen"]))
            step_s = last["train_s"] / max(last["steps"], 1)
            scale = max(1.0, tok_per_step / (last["padded_tokens"] / max(last["steps"], 1)) * depth)
            predicted = steps * step_s * scale + last["eval_s"] * max(1.0, cfg["max_len"] / last["max_len"]) + 5
            left = args.deadline_s - (time.time() - T0)
            if predicted > left:
                log(f"SKIP {name}: predicted {predicted:.0f}s, {left:.0f}s left before --deadline-s {args.deadline_s:.0f}")
                rec = {"config": name, "skipped": True, "predicted_s": round(predicted, 1), "left_s": round(left, 1)}
                if out_path:
                    with open(out_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                continue
        log(f"config {name}: {cfg}")
        res = run_config(name, cfg, data, content, enc, args, device, verbose=(i == 0))
        last = res
        done.append(res)
        print(compact(res), flush=True)
        if out_path:
            os.makedirs(out_dir, exist_ok=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    log(f"done: {len(done)}/{len(names)} configs")
    if done:
        print(f"{'cfg':3} {'valF1':>6} {'testF1 r':>9} {'t':>6} {'m':>6} {'mean':>6} {'thr':>5} {'sec':>5}")
        for r in done:
            print(f"{r['config']:3} {r['validation_mean_f1']:6.4f} {r['test']['reuters']['f1']:9.4f} {r['test']['twitter']['f1']:6.4f} "
                  f"{r['test']['modern']['f1']:6.4f} {r['test_mean_f1']:6.4f} {r['threshold']:5.2f} {r['total_s']:5.0f}", flush=True)


if __name__ == "__main__":
    main()
