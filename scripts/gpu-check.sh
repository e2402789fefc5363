#!/usr/bin/env bash
# The GPU check, one call on a machine with an NVIDIA GPU, from the repository root, with `.gpu/` (made by
# scripts/build-cuda.sh) present:
#   1. the GPU and the binaries' libraries (ldd),
#   2. model parity on the GPU (gpu_check parity): f32/bf16 logits vs transformers and the CPU, f32
#      gradients vs the CPU, a bf16 optimizer step with f32 masters, and the fused attention op (Triton
#      kernels) against the CPU op: output and gradients for every mask kind, head dims 64/80/128,
#   2b. the world-size-1 NCCL path (gpu_check nccl; one GPU holds one rank): NCCL initialised through
#      dusflow's rendezvous hub, all-reduce / reduce-scatter / all-gather / broadcast returning their input,
#      and 4 training steps (bf16, f32 masters) on the NCCL group of one, plain and ZeRO-1, equal bit for bit
#      to the same steps without a group,
#   3. the attention op alone at 4 x 1024 (32 heads, 4 KV heads, head dim 128, bf16, causal): forward +
#      backward time and TFLOP/s, next to PyTorch's scaled_dot_product_attention on the same card and shapes,
#   4. the whole recipe on the GPU: the quickstart workflow (scale → pretrain → SFT → sDPO → merge → eval →
#      report) with `device = "cuda"` and smaller budgets,
#   5. training speed of a ~0.84B-parameter Llama in bf16 (tokens/s, MFU, peak GPU memory) at 4 x 1024,
#      1 x 4096 and 1 x 8192 tokens per step, and where a 4 x 1024 step's time goes (with the inference
#      forward).
# Logs and results go to $OUT (default ./gpu-check-out); a summary table is printed last.
#   STAGE_TIMEOUT (default 200 s) bounds each stage after parity; SPEEDS (default
#   "16 4 1024 6;16 1 4096 4;16 1 8192 3": LAYERS BATCH SEQ STEPS per run) and PROFILE (default
#   "16 4 1024 4"); TORCH_PY: a Python with CUDA torch (default /opt/torch/.venv/bin/python, else python3).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-200}
SPEEDS=${SPEEDS:-16 4 1024 6;16 1 4096 4;16 1 8192 3}
PROFILE=${PROFILE:-16 4 1024 4}
TORCH_PY=${TORCH_PY:-$( [ -x /opt/torch/.venv/bin/python ] && echo /opt/torch/.venv/bin/python || echo python3 )}
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
# NCCL (libnccl.so.2, linked by the cuda build for training on several GPUs): torch's wheels carry it too.
NCCL_LIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib 2>/dev/null | head -n 1)
if [ -z "$NCCL_LIB" ]; then
    NCCL_LIB=$(dirname "$(find / -name 'libnccl.so.2' -not -path '*/proc/*' 2>/dev/null | head -n 1)")
fi
export LD_LIBRARY_PATH=$CU13:$NCCL_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$BIN/dus" | grep -E 'cuda|cublas|curand|nvrtc|nccl|not found'
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

echo "== NCCL, world size 1" >&2
timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" nccl > "$OUT/nccl.jsonl" 2> "$OUT/nccl.log"
NCCL_RC=$?
cat "$OUT/nccl.jsonl"; tail -n 5 "$OUT/nccl.log"

echo "== attention op" >&2
timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" attention 4 1024 > "$OUT/attention.jsonl" 2> "$OUT/attention.log"
ATTN_RC=$?
# PyTorch's fused attention on the same card and shapes (FLOPs counted the same way).
timeout "$STAGE_TIMEOUT" "$TORCH_PY" - 4 1024 >> "$OUT/attention.jsonl" 2>> "$OUT/attention.log" <<'EOF'
import json, sys, time
import torch
import torch.nn.functional as F
b, s = int(sys.argv[1]), int(sys.argv[2])
nh, nkv, hd = 32, 4, 128
x = lambda h: torch.randn(b, h, s, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
q, k, v = x(nh), x(nkv), x(nkv)
d_out = torch.randn(b, nh, s, hd, device="cuda", dtype=torch.bfloat16)
fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
def both():
    fwd().backward(d_out)
def timed(f, runs=10):
    f(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(runs):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / runs
with torch.no_grad():
    f_s = timed(fwd)
fb_s = timed(both)
flops = 4.0 * b * nh * s * s * hd / 2
print(json.dumps({"check": "attention", "impl": f"torch {torch.__version__} scaled_dot_product_attention",
                  "batch": b, "seq": s, "heads": nh, "kv_heads": nkv, "head_dim": hd, "dtype": "bf16",
                  "causal": True, "forward_ms": f_s * 1e3, "forward_backward_ms": fb_s * 1e3,
                  "forward_tflops": flops / f_s / 1e12, "forward_backward_tflops": 3.5 * flops / fb_s / 1e12}))
EOF
TORCH_RC=$?
cat "$OUT/attention.jsonl"

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
SPEED_RC=0
: > "$OUT/speed.jsonl"
IFS=';' read -ra RUNS <<< "$SPEEDS"
for run in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" train-speed $run >> "$OUT/speed.jsonl" 2>> "$OUT/speed.log" || SPEED_RC=$?
done
cat "$OUT/speed.jsonl"; tail -n 5 "$OUT/speed.log"
echo "== where a training step's time goes" >&2
# shellcheck disable=SC2086
timeout "$STAGE_TIMEOUT" "$BIN/gpu_check" train-profile $PROFILE > "$OUT/profile.jsonl" 2>> "$OUT/speed.log"
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
printf '%-60s %s\n' "NCCL world size 1 (gpu_check nccl)" "$([ $NCCL_RC = 0 ] && echo pass || echo "FAIL ($NCCL_RC): see nccl.log")"
python3 - "$OUT/nccl.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  {r['check'][:76]:<78} {'ok' if r['ok'] else 'FAIL'}  {json.dumps(r['value'])}")
EOF
python3 - "$OUT/attention.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    extra = f", materialised {r['materialised_forward_backward_ms']:.1f} ms" if "materialised_forward_backward_ms" in r else ""
    print(f"attention {r['batch']}x{r['seq']} {r['impl']}: forward {r['forward_ms']:.2f} ms ({r['forward_tflops']:.0f} TFLOP/s), "
          f"forward+backward {r['forward_backward_ms']:.2f} ms ({r['forward_backward_tflops']:.0f} TFLOP/s){extra}")
EOF
[ $ATTN_RC = 0 ] || echo "attention failed ($ATTN_RC): see attention.log"
[ $TORCH_RC = 0 ] || echo "torch scaled_dot_product_attention failed ($TORCH_RC): see attention.log"
printf '%-60s %s\n' "quickstart on cuda (exit $WF_RC)" "${WF_SECONDS} s"
python3 - "$OUT/speed.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"train-speed: {r['parameters']/1e9:.2f}B params, batch {r['batch']}x{r['seq']}, {r['tokens_per_s']:.0f} tokens/s, "
          f"{r['model_tflops']:.1f} TFLOP/s, MFU {100*r['mfu']:.1f} %, peak {r['peak_gpu_memory_gib']:.1f} GiB, "
          f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
EOF
[ $SPEED_RC = 0 ] || echo "train-speed failed ($SPEED_RC): see speed.log"
python3 - "$OUT/profile.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"train step {r['batch']}x{r['seq']} {r['train_step_seconds']*1000:.0f} ms:", ", ".join(f"{k} {v*1000:.0f} ms" for k, v in r["seconds_per_phase"].items()))
EOF
[ $PROFILE_RC = 0 ] || echo "train-profile failed ($PROFILE_RC): see speed.log"
exit $(( PARITY_RC | NCCL_RC | ATTN_RC | TORCH_RC | WF_RC | SPEED_RC | PROFILE_RC ))
