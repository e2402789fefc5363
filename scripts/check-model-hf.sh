#!/usr/bin/env bash
# Proves that model folders written by dusflow load in Hugging Face transformers with matching logits.
# Needs a Python with torch, transformers, safetensors (default /work/.venvs/torch/bin/python; override with PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/.venvs/torch/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
DUSFLOW_EXPORT_DIR="$OUT" cargo test -q -p dusflow --test model_export -- --ignored
"$PYTHON" host/tests/fixtures/model/check_hf_load.py "$OUT"
