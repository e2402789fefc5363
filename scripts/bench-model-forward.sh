#!/usr/bin/env bash
# Forward tokens/s on CPU of dusflow's Llama vs transformers, same ~20M-parameter model, same inputs, one run.
# Usage: scripts/bench-model-forward.sh [batch] [seq] [repeats] [rounds]   (default 4 256 5 2)
# The two implementations are timed alternately for `rounds` rounds, so that load from other processes on a
# shared machine hits both; each line reports the median and the fastest of `repeats` runs.
# Needs a Python with torch + transformers (default /work/.venvs/torch/bin/python; override with PYTHON).
# The Rust side is built with the dev profile, whose dependencies (candle, gemm) are optimised at opt-level 2;
# set PROFILE=release for a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/.venvs/torch/bin/python}
PROFILE=${PROFILE:-dev}
B=${1:-4}; S=${2:-256}; R=${3:-5}; ROUNDS=${4:-2}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$PYTHON" scripts/bench-model-forward.py make "$DIR/model"
cargo bench -q -p dusflow --profile "$PROFILE" --bench model_forward --no-run
for round in $(seq 1 "$ROUNDS"); do
  echo "--- round $round, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  cargo bench -q -p dusflow --profile "$PROFILE" --bench model_forward -- "$DIR/model" "$B" "$S" "$R"
  "$PYTHON" scripts/bench-model-forward.py bench "$DIR/model" "$B" "$S" "$R"
done
