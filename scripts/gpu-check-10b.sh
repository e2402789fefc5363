#!/usr/bin/env bash
# The paper's model size on one GPU (issue 19's GPU stage), one call on a machine with an NVIDIA GPU of
# ~80 GB, from the repository root, with `.gpu/` (made by scripts/build-cuda.sh) present. Through `dus` itself:
#   1. an `init` step makes a random 10.7B-shaped Llama on the GPU (48 layers, hidden 4096, MLP 14336,
#      32 / 8 heads, vocab 32000; bf16, ~21.5 GB),
#   2. LoRA SFT (r 16 on every linear layer, activation checkpointing) at 4 x 1024 and 1 x 4096 tokens a step,
#   3. LoRA DPO (same adapter settings, precomputed reference log-probs) at 4 x 1024 and 1 x 4096 (pairs of
#      500- and 2000-token prompts and answers, truncated as TRL does to max_prompt_length / max_length),
#   4. the memory-lean full fine-tune: continued pretraining with 8-bit AdamW, bf16 weights without f32
#      masters (stochastic rounding) and checkpointing at 1 x 4096.
# Each training step runs MAX_STEPS (default 3) optimizer steps; tokens/s comes from the step's metrics
# (mean over the steps after the first), peak GPU memory from nvidia-smi sampled every 100 ms while the step
# runs (the whole process: weights, adapter, optimizer state, activations, the memory pool's cache).
# Logs under $OUT (default ./gpu-check-10b-out); a table is printed last. Needs ~25 GB of free disk.
#   STAGE_TIMEOUT (default 540 s) bounds each dus run.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-10b-out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
MAX_STEPS=${MAX_STEPS:-3}
mkdir -p "$OUT"
BIN=$(mktemp -d)
python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" .gpu/dus.xz "$BIN/dus"
chmod +x "$BIN/dus"
CU13=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
if [ -z "$CU13" ]; then
    CU13=$(dirname "$(find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -n 1)")
fi
export LD_LIBRARY_PATH=$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CARD=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1)
WORK=${WORK:-$(mktemp -d)}

# Data long enough to fill the sequence lengths (byte-level tokens: one per character), and one workflow per
# training step sharing one output folder, so the model is made once and each step runs in its own process.
python3 - "$WORK" "$MAX_STEPS" <<'PY'
import json, os, random, sys
work, max_steps = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = "the model layer depth scale merge data train align token weight loss step seam copy".split()
text = lambda n: " ".join(rng.choice(words) for _ in range(n // 6))[:n]
with open(os.path.join(work, "text.jsonl"), "w") as f:
    for _ in range(64):
        f.write(json.dumps({"text": text(8000)}) + "\n")
with open(os.path.join(work, "sft.jsonl"), "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": text(1000), "completion": text(3000)}) + "\n")
with open(os.path.join(work, "pairs.jsonl"), "w") as f:
    for _ in range(32):
        f.write(json.dumps({"prompt": text(500), "chosen": text(500), "rejected": text(500)}) + "\n")
head = f"""[workflow]
name = "solar-shape"
device = "cuda"
dtype = "bf16"
seed = 1
jobs = 1

[steps.model]
kind = "init"
hidden_size = 4096
intermediate_size = 14336
num_hidden_layers = 48
num_attention_heads = 32
num_key_value_heads = 8
vocab_size = 32000
max_position_embeddings = 4096

[datasets.text]
path = "text.jsonl"
format = "text"

[datasets.sft]
path = "sft.jsonl"
format = "prompt-completion"

[datasets.pairs]
path = "pairs.jsonl"
format = "preference"

[datasets.pairs-long]
path = "pairs-long.jsonl"
format = "preference"
"""
lora = 'lora = { r = 16, alpha = 32, dropout = 0.05, targets = "all-linear" }\ngradient_checkpointing = true\n'
common = f"max_steps = {max_steps}\ndtype = \"bf16\"\n"
steps = {
    "init": "",
    "sft-4x1024": f'kind = "sft"\ninputs = {{ model = "model", data = "sft" }}\n{lora}lr = 2e-4\n{common}packing = true\nseq_len = 1024\nmicro_batch = 4\n',
    "sft-1x4096": f'kind = "sft"\ninputs = {{ model = "model", data = "sft" }}\n{lora}lr = 2e-4\n{common}packing = true\nseq_len = 4096\nmicro_batch = 1\n',
    "dpo-4x1024": f'kind = "dpo"\ninputs = {{ model = "model", data = "pairs" }}\n{lora}lr = 5e-6\n{common}max_length = 1024\nmax_prompt_length = 512\nmicro_batch = 4\n',
    "dpo-1x4096": f'kind = "dpo"\ninputs = {{ model = "model", data = "pairs-long" }}\n{lora}lr = 5e-6\n{common}max_length = 4096\nmax_prompt_length = 2048\nmicro_batch = 1\n',
    "lean-1x4096": f'kind = "pretrain"\ninputs = {{ model = "model", data = "text" }}\noptimizer = "adamw_8bit"\nmaster_weights = false\ngradient_checkpointing = true\nlr = 1e-5\n{common}seq_len = 4096\nmicro_batch = 1\n',
}
for name, body in steps.items():
    with open(os.path.join(work, f"{name}.toml"), "w") as f:
        f.write(head + (f"\n[steps.{name}]\n{body}" if body else ""))
PY

# Peak memory of the GPU while "$@" runs (MiB, whole device), next to its exit status and time.
run_measured() {
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
    local sampler=$!
    local start; start=$(date +%s)
    timeout "$STAGE_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    echo "$name $rc $(( $(date +%s) - start )) $(sort -n "$OUT/$name.mem" | tail -n 1)" >> "$OUT/results.txt"
    tail -n 5 "$OUT/$name.log"
}

: > "$OUT/results.txt"
echo "== the 10.7B-shaped model (init on the GPU)" >&2
run_measured init "$BIN/dus" run "$WORK/init.toml" --output "$WORK/runs"
for step in sft-4x1024 sft-1x4096 dpo-4x1024 dpo-1x4096 lean-1x4096; do
    echo "== $step" >&2
    # Each step in its own process (the model cached), so the memory sampled is that step's.
    run_measured "$step" "$BIN/dus" run "$WORK/$step.toml" --output "$WORK/runs"
done

echo
echo "10.7B-shaped training on $CARD, $(date -u +%F), $MAX_STEPS optimizer steps each"
python3 - "$OUT/results.txt" "$WORK/runs" <<'PY'
import glob, json, os, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
print(f"{'step':<14} {'exit':>4} {'wall s':>7} {'peak GPU GiB':>13} {'tokens/s':>10}")
for name, rc, seconds, *peak in rows:
    tps = ""
    for path in glob.glob(os.path.join(sys.argv[2], f"{name}-*", "metrics.jsonl")):
        steps = [json.loads(l) for l in open(path) if l.strip()]
        later = [s["tokens_per_s"] for s in steps[1:]] or [s["tokens_per_s"] for s in steps]
        if later:
            tps = f"{sum(later) / len(later):.0f}"
    peak_gib = f"{int(peak[0]) / 1024:.1f}" if peak else "?"
    print(f"{name:<14} {rc:>4} {seconds:>7} {peak_gib:>13} {tps:>10}")
PY
