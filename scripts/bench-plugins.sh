#!/usr/bin/env bash
# Plugin host benchmark: call overhead per kind, data-filter throughput (Rust and Python plugins vs
# native Rust), merge-chunk throughput (Rust and C plugins vs native loops), in one run.
# Builds the bench in the dev profile (whose dependencies, wasmtime included, are already built at
# opt-level 2) with the dusflow crate itself at opt-level 3, so the native baselines are fully
# optimised without a separate 20-minute release build of wasmtime.
# Usage: scripts/bench-plugins.sh [OUTPUT.md]   (needs the toolchains of scripts/install-plugin-toolchains.sh
# for the Python and C rows; they are reported as skipped otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/dev/stdout}"
cargo bench -p dusflow --bench plugins --profile dev \
  --config 'profile.dev.package.dusflow.opt-level=3' \
  --config 'profile.dev.package.dusflow.debug-assertions=false' \
  --config 'profile.dev.package.dusflow.overflow-checks=false' | tee "$out"
