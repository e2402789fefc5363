#!/usr/bin/env bash
# Merge benchmark: dusflow vs mergekit on the same two ~1.7 GB random bf16 Llamas (plus a base for TIES),
# one run each, same machine, wall time and peak RSS from /usr/bin/time, then parity of the outputs.
#
#   scripts/bench-merge.sh [WORKDIR]      (default /tmp/dus-bench-merge; needs ~5 GB of disk)
#
# Outputs go to OUT_ROOT (default /dev/shm/dus-bench-merge, a tmpfs) for both tools, so the numbers are the
# merge engines and not the disk: our checkpoint writer fsyncs each file, mergekit does not, and on a disk
# that difference alone is the disk's write time. Inputs are read through the page cache (warm for both).
# A `cp` of one input (the output's size) to OUT_ROOT is timed first: no tool can write the output faster,
# and the last column shows dusflow against it.
#
# MERGEKIT (default /work/.venvs/mergekit/bin/mergekit-yaml) must be mergekit 0.1.5. mergekit runs with
# `dtype: bfloat16` for linear and SLERP (its kernels compute in f32 and round once, as we do: the fastest
# setting with the same result) and `dtype: float32` for TIES (f32 arithmetic, as we do); output bf16.
set -euo pipefail
WORK=${1:-/tmp/dus-bench-merge}
MERGEKIT=${MERGEKIT:-/work/.venvs/mergekit/bin/mergekit-yaml}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -p dusflow --example bench_merge --manifest-path "$ROOT/Cargo.toml" >&2
BENCH=$CARGO_TARGET_DIR/release/examples/bench_merge
OUT_ROOT=${OUT_ROOT:-/dev/shm/dus-bench-merge}
mkdir -p "$WORK" "$OUT_ROOT"
[ -f "$WORK/models/b/model.safetensors" ] || "$BENCH" gen "$WORK/models"

cat "$WORK"/models/*/model.safetensors >/dev/null # warm the page cache for both tools

measure() { # label, command... → "wall_seconds peak_kib cpu_seconds" on stdout
    local log=$WORK/$1.time
    shift
    /usr/bin/time -f "%e %M %U %S" -o "$log" "$@" >"$log.out" 2>&1 || { cat "$log.out" >&2; exit 1; }
    awk '{ printf "%s %s %.2f\n", $1, $2, $3 + $4 }' "$log"
}

# The floor for any tool: copying a file of the output's size (one input) to the same place, with `cp`.
rm -f "$OUT_ROOT/cp.safetensors"
sync
read -r cp_s _ < <(measure cp cp "$WORK/models/a/model.safetensors" "$OUT_ROOT/cp.safetensors")
rm -f "$OUT_ROOT/cp.safetensors"
echo "cp of one input model ($(du -h "$WORK/models/a/model.safetensors" | cut -f1)) to $OUT_ROOT: $cp_s s (the floor for writing the output)"

printf '%-8s %10s %11s %8s %8s %14s %15s %8s %8s %9s %8s\n' method dusflow_s mergekit_s dus_cpu mk_cpu dusflow_rss_MB mergekit_rss_MB speedup cpu_ratio rss_ratio dus_vs_cp
for method in linear slerp ties; do
    case $method in
        linear) cfg="merge_method: linear
dtype: bfloat16
models:
  - {model: $WORK/models/a, parameters: {weight: 0.5}}
  - {model: $WORK/models/b, parameters: {weight: 0.5}}" ;;
        slerp) cfg="merge_method: slerp
dtype: bfloat16
base_model: $WORK/models/a
models:
  - {model: $WORK/models/a}
  - {model: $WORK/models/b}
parameters: {t: 0.5}" ;;
        ties) cfg="merge_method: ties
dtype: float32
base_model: $WORK/models/base
models:
  - {model: $WORK/models/a, parameters: {weight: 1.0, density: 0.5}}
  - {model: $WORK/models/b, parameters: {weight: 1.0, density: 0.5}}" ;;
    esac
    printf '%s\nout_dtype: bfloat16\n' "$cfg" >"$WORK/$method.yml"
    dus_out=$OUT_ROOT/dus-$method mk_out=$OUT_ROOT/mk-$method
    rm -rf "$dus_out" "$mk_out"
    sync
    read -r dus_s dus_kb dus_cpu < <(measure "dus-$method" "$BENCH" merge "$method" "$WORK/models" "$dus_out")
    sync
    read -r mk_s mk_kb mk_cpu < <(measure "mk-$method" "$MERGEKIT" "$WORK/$method.yml" "$mk_out" --no-copy-tokenizer --quiet)
    awk -v m="$method" -v ds="$dus_s" -v ms="$mk_s" -v dk="$dus_kb" -v mk="$mk_kb" -v dc="$dus_cpu" -v mc="$mk_cpu" -v cp="$cp_s" 'BEGIN {
        printf "%-8s %10.2f %11.2f %8.2f %8.2f %14.0f %15.0f %7.1fx %8.1fx %8.1fx %7.2fx\n",
            m, ds, ms, dc, mc, dk/1024, mk/1024, ms/ds, mc/dc, mk/dk, ds/cp }'
    echo "  parity: $("$BENCH" compare "$dus_out" "$mk_out")"
    rm -rf "$dus_out" "$mk_out"
done
