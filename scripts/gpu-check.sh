#!/usr/bin/env bash
# The GPU check, one call on a machine with an NVIDIA GPU, from the repository root, with `.gpu/` (made by
# scripts/build-cuda.sh) present:
#   1. the GPU and the binaries' libraries (ldd),
#   2. model parity on the GPU (gpu_check parity): f32/bf16 logits vs transformers and the CPU, f32
#      gradients vs the CPU, a bf16 optimizer step with f32 masters,
#   3. the whole recipe on the GPU: the quickstart workflow (scale → pretrain → SFT → sDPO → merge → eval →
#      report) with `device = "cuda"` and smaller budgets,
#   4. training speed of a ~0.84B-parameter Llama in bf16 (tokens/s, MFU), and where a step's time goes.
# Logs and results go to $OUT (default ./gpu-check-out); a summary table is printed last.
#   STAGE_TIMEOUT (default 200 s) bounds stages 3 and 4 each; SPEED="LAYERS BATCH SEQ STEPS" (default 16 4 1024 6).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-200}
SPEED=${SPEED:-16 4 1024 6}
mkdir -p "$OUT"
BIN=$(mktemp -d)
for b in dus gpu_check; do
    python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" ".gpu/$b.xz" "$BIN/$b"
    chmod +x "$BIN/$b"
done

# CUDA 13 runtime libraries: the machine's PyTorch wheels carry them (the driver's libcuda is on the system).
CU13=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
if [ -z "$CU13" ]; then
    CU13=$(dirname "$(find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -n 1)")
fi
export LD_LIBRARY_PATH=$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$BIN/dus" | grep -E 'cuda|cublas|curand|nvrtc|not found'
} 2>&1 | tee "$OUT/env.txt"
if ldd "$BIN/dus" "$BIN/gpu_check" | grep -q 'not found'; then
    echo "missing libraries, stopping" >&2
    exit 1
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)

echo "== parity" >&2
"$BIN/gpu_check" parity host/tests/fixtures/model > "$OUT/parity.jsonl" 2> "$OUT/parity.log"
PARITY_RC=$?
cat "$OUT/parity.jsonl"

echo "== workflow on the GPU" >&2
WF=$(mktemp -d)
python3 - "$WF/quickstart-gpu.toml" <<'EOF'
import re, sys
text = open("workflows/quickstart.toml").read().replace('device = "cpu"', 'device = "cuda"')
shrink = {"count": lambda n: max(n // 10, 24), "max_steps": lambda n: max(n // 10, 2),
          "limit": lambda n: max(n // 10, 5), "max_gen_toks": lambda n: min(n, 48)}
for key, f in shrink.items():
    text = re.sub(r"(^|[\s{,])(%s\s*=\s*)(\d+)" % key,
                  lambda m: m.group(1) + m.group(2) + str(f(int(m.group(3)))), text, flags=re.M)
open(sys.argv[1], "w").write(text)
EOF
WF_START=$(date +%s)
timeout "$STAGE_TIMEOUT" "$BIN/dus" run "$WF/quickstart-gpu.toml" --output "$WF/runs" > "$OUT/workflow.log" 2>&1
WF_RC=$?
WF_SECONDS=$(( $(date +%s) - WF_START ))
find "$WF/runs" -name report.md -exec cp {} "$OUT/report.md" \; 2>/dev/null
tail -n 25 "$OUT/workflow.log"

echo "== training speed" >&2
# shellcheck disable=SC2086
timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" train-speed $SPEED > "$OUT/speed.jsonl" 2> "$OUT/speed.log"
SPEED_RC=$?
cat "$OUT/speed.jsonl"; tail -n 5 "$OUT/speed.log"
echo "== where a training step's time goes" >&2
# shellcheck disable=SC2086
timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" train-profile $SPEED > "$OUT/profile.jsonl" 2>> "$OUT/speed.log"
PROFILE_RC=$?
cat "$OUT/profile.jsonl"

echo
echo "GPU check on $CARD, $(date -u +%F)"
printf '%-60s %s\n' "parity (gpu_check parity)" "$([ $PARITY_RC = 0 ] && echo pass || echo "FAIL ($PARITY_RC)")"
python3 - "$OUT/parity.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  {r['check'][:70]:<72} {r['value']:.2e} (limit {r['limit']:.0e}) {'ok' if r['ok'] else 'FAIL'}")
EOF
printf '%-60s %s\n' "quickstart on cuda (exit $WF_RC)" "${WF_SECONDS} s"
python3 - "$OUT/speed.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"train-speed: {r['parameters']/1e9:.2f}B params, batch {r['batch']}x{r['seq']}, {r['tokens_per_s']:.0f} tokens/s, "
          f"{r['model_tflops']:.1f} TFLOP/s, MFU {100*r['mfu']:.1f} %, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
EOF
[ $SPEED_RC = 0 ] || echo "train-speed failed ($SPEED_RC): see speed.log"
python3 - "$OUT/profile.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"train step {r['train_step_seconds']*1000:.0f} ms:", ", ".join(f"{k} {v*1000:.0f} ms" for k, v in r["seconds_per_phase"].items()))
EOF
[ $PROFILE_RC = 0 ] || echo "train-profile failed ($PROFILE_RC): see speed.log"
exit $(( PARITY_RC | WF_RC | SPEED_RC | PROFILE_RC ))
