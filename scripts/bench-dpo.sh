#!/usr/bin/env bash
# DPO throughput, dusflow's dpo step vs TRL's DPOTrainer (see host/examples/bench_dpo.py for what is measured).
# Needs a Python with trl: TRL_PYTHON (default /work/.venvs/trl/bin/python), made e.g. by
#   cp -a /work/.venvs/torch /work/.venvs/trl && /work/.venvs/trl/bin/python -m pip install trl
# Arguments are passed on, e.g.: scripts/bench-dpo.sh --pairs 128 --batch 8 --steps 16 --rounds 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TRL_PYTHON:-/work/.venvs/trl/bin/python}"
export TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
exec "$PY" host/examples/bench_dpo.py "$@"
