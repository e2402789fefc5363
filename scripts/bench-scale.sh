#!/usr/bin/env bash
# Benchmark of the `scale` step: SOLAR-scale a random ~1.67 GB bf16 Llama (16 -> 24 layers, m = 4) and compare,
# in one run on one machine, wall time and peak RSS (/usr/bin/time -v) against `cp` of the same files and
# against mergekit's passthrough (if MERGEKIT_YAML points at mergekit-yaml or it is on PATH). Also checks that
# dusflow's and mergekit's model.safetensors are byte-identical.
#
#   scripts/bench-scale.sh [WORK_DIR]          (default /tmp/dus-bench-scale; needs ~6.5 GB free)
#   MERGEKIT_YAML=/work/.venvs/mergekit-scale/bin/mergekit-yaml scripts/bench-scale.sh
#
# REPEAT=3 (default): every tool runs REPEAT times, interleaved; the table shows the median and the min wall
# time and the largest peak RSS (a shared machine is noisy).
# PROFILE=release builds the example optimised (default dev: the workspace profile, deps at opt-level 2; the
# work is all in the kernel's read/write paths either way).
# Page cache: the source is read once before the timed runs, so every tool reads it from memory; each tool
# writes a new folder, after a `sync` so no tool pays for the previous one's writeback. dusflow fsyncs its
# output (atomic, durable artifacts); `cp + fsync` is the like-for-like baseline for that, plain `cp` the
# issue's. `dus-nosync` is dusflow with `durable = false` (no fsync), like cp and mergekit.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/dus-bench-scale}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/.cache/target}
PROFILE=${PROFILE:-dev}
REPEAT=${REPEAT:-3}
MERGEKIT_YAML=${MERGEKIT_YAML:-$(command -v mergekit-yaml || true)}

if [ "$PROFILE" = release ]; then
  cargo build -q -p dusflow --release --example bench_scale
  BIN="$CARGO_TARGET_DIR/release/examples/bench_scale"
else
  cargo build -q -p dusflow --example bench_scale
  BIN="$CARGO_TARGET_DIR/debug/examples/bench_scale"
fi

mkdir -p "$WORK"
[ -f "$WORK/src/model.safetensors" ] || "$BIN" make-model "$WORK/src" 16
cat "$WORK/src/"* > /dev/null

measure() { # name output-folder command...
  local name=$1 out=$2; shift 2
  rm -rf "$out"
  sync # start with no dirty pages left by the previous tool
  /usr/bin/time -v -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log"; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$WORK/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/$name.time")
  echo "$name $wall $rss" >> "$WORK/results.txt"
}

if [ -n "$MERGEKIT_YAML" ]; then
  printf 'slices:\n  - sources: [{ model: %s, layer_range: [0, 12] }]\n  - sources: [{ model: %s, layer_range: [4, 16] }]\nmerge_method: passthrough\n' \
    "$WORK/src" "$WORK/src" > "$WORK/solar.yml"
fi
: > "$WORK/results.txt"
for run in $(seq "$REPEAT"); do
  echo "run $run of $REPEAT" >&2
  measure cp "$WORK/cp" cp -r "$WORK/src" "$WORK/cp"
  rm -rf "$WORK/cp" # outputs not compared are removed at once, so the run needs less disk
  measure cp+fsync "$WORK/cp-sync" sh -c "cp -r '$WORK/src' '$WORK/cp-sync' && sync '$WORK/cp-sync/model.safetensors'"
  rm -rf "$WORK/cp-sync"
  measure dusflow "$WORK/dusflow" "$BIN" scale "$WORK/src" "$WORK/dusflow" 4
  measure dus-nosync "$WORK/dus-nosync" "$BIN" scale "$WORK/src" "$WORK/dus-nosync" 4 --no-fsync
  rm -rf "$WORK/dus-nosync"
  if [ -n "$MERGEKIT_YAML" ]; then
    HF_HUB_OFFLINE=1 measure mergekit "$WORK/mergekit" "$MERGEKIT_YAML" "$WORK/solar.yml" "$WORK/mergekit" --no-write-model-card --quiet
  fi
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg); dusflow profile: $PROFILE; $REPEAT runs each"
echo "source: $(du -sh "$WORK/src" | cut -f1) (16 layers) -> dusflow output $(du -sh "$WORK/dusflow" | cut -f1) (24 layers)"
sort -k1,1 -k2,2n "$WORK/results.txt" | awk '
  { n[$1]++; w[$1, n[$1]] = $2; if ($3 > rss[$1]) rss[$1] = $3; if (!($1 in seen)) { seen[$1] = 1; order[++k] = $1 } }
  END {
    for (i = 1; i <= k; i++) { t = order[i]; med[t] = w[t, int((n[t] + 1) / 2)]; min[t] = w[t, 1] }
    printf "%-10s %12s %10s %14s %14s\n", "tool", "median (s)", "min (s)", "peak RSS (MB)", "median vs cp"
    for (i = 1; i <= k; i++) { t = order[i]; printf "%-10s %12.2f %10.2f %14.1f %13.2fx\n", t, med[t], min[t], rss[t] / 1024, med[t] / med["cp"] }
    if ("cp+fsync" in med) printf "dusflow vs cp+fsync: %.2fx (median)\n", med["dusflow"] / med["cp+fsync"]
    if ("dus-nosync" in med) printf "dusflow durable = false vs cp: %.2fx (median)\n", med["dus-nosync"] / med["cp"]
    if ("mergekit" in med) printf "dusflow is %.1fx faster than mergekit (median; %.1fx with durable = false)\n", med["mergekit"] / med["dusflow"], med["mergekit"] / med["dus-nosync"]
  }'
if [ -d "$WORK/mergekit" ]; then
  a=$(sha256sum "$WORK/dusflow/model.safetensors" | cut -d' ' -f1)
  b=$(sha256sum "$WORK/mergekit/model.safetensors" | cut -d' ' -f1)
  if [ "$a" = "$b" ]; then echo "model.safetensors byte-identical to mergekit's (sha256 $a)"; else echo "model.safetensors DIFFERS from mergekit's: $a vs $b"; fi
fi
