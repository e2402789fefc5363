"""DPO throughput on CPU, dusflow's `dpo` step vs TRL's DPOTrainer, side by side in one run.

Both train the same model on the same preference pairs with the same settings:
- the model: a random Llama written by dusflow's `init` step (byte-level tokenizer, loadable by transformers);
- the pairs: dusflow's `synthetic` step, task `preference` (`{prompt, chosen, rejected}` JSONL);
- sigmoid loss, beta 0.1, lr 1e-5 constant, no warmup, AdamW (0.9, 0.999, 1e-8, no decay), clip 1.0,
  BATCH pairs per step (no accumulation), STEPS steps, f32, CPU, 2 threads each
  (torch.set_num_threads(2); RAYON_NUM_THREADS=2 for candle);
- reference log-probs precomputed in one no-grad pass (TRL: precompute_ref_log_probs=True, with the same
  batch size), so no reference model is kept while training.

Reported per implementation: training pairs/s over steps 2..STEPS (the first step is warmup), the
reference pass in pairs/s, and the end-to-end time (dusflow: the whole `dus run` of the step, incl. process
start, data loading and saving; the first round also runs the init and synthetic steps; TRL: trainer construction incl. tokenisation and the reference pass, plus train()).
The two are run alternately for ROUNDS rounds so load from other processes hits both.

Usage (from the repository root; needs the TRL venv, see scripts/bench-dpo.sh):
  /work/.venvs/trl/bin/python host/examples/bench_dpo.py [--pairs 128] [--batch 8] [--steps 16]
      [--hidden 256] [--layers 4] [--rounds 2] [--profile dev|release]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

FLOW = """
[workflow]
name = "bench-dpo"
seed = 1
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = {hidden}
intermediate_size = {intermediate}
num_hidden_layers = {layers}
num_attention_heads = {heads}
num_key_value_heads = {heads}

[steps.pairs]
kind = "synthetic"
task = "preference"
count = {pairs}

[steps.align]
kind = "dpo"
inputs = {{ model = "tiny", data = ["pairs"] }}
beta = 0.1
lr = 1e-5
schedule = "constant"
micro_batch = {batch}
grad_accum = 1
max_steps = {steps}
checkpoint_every = 0
shuffle = false
"""


def artifact(out, step):
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name)
        if name.startswith(step + "-") and os.path.exists(os.path.join(p, "manifest.json")):
            return p
    raise SystemExit(f"no artifact for {step} in {out}")


def dus_binary(root, profile, dest):
    """Builds this checkout's `dus` and copies it to `dest`. `target/<profile>/dus` is shared by every checkout
    that uses the same target folder, so the binary is taken from `deps/` under the file name rustc is given
    (main.rs is touched so that cargo runs rustc and prints it)."""
    os.utime(os.path.join(root, "host", "src", "main.rs"))
    out = subprocess.run(["cargo", "build", "-v", "-p", "dusflow", "--profile", profile, "--bin", "dus"],
                         cwd=root, check=True, capture_output=True, text=True)
    extra = None
    for line in out.stderr.splitlines():
        if "--crate-name dus " in line:
            m = re.search(r"-C extra-filename=(\S+)", line)
            extra = m and m.group(1)
    if extra is None:
        raise SystemExit("could not find the rustc call of dus in cargo's output")
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=root,
                                     check=True, capture_output=True, text=True).stdout)
    built = os.path.join(meta["target_directory"], "debug" if profile == "dev" else profile, "deps", "dus" + extra)
    shutil.copy2(built, dest)
    return dest


def run_dusflow(dus, work, force):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    cmd = [dus, "run", os.path.join(work, "flow.toml"), "-j", "1"]
    if force:
        cmd += ["--force", "align"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    out = os.path.join(work, "out")
    align = artifact(out, "align")
    report = json.load(open(os.path.join(align, "dpo_report.json")))
    stage = report["stages"][0]
    metrics = [json.loads(l) for l in open(os.path.join(align, "metrics.jsonl"))]
    # Seconds of each step from its tokens and tokens/s.
    secs = [m["tokens"] / m["tokens_per_s"] for m in metrics]
    steady = sum(m["targets"] for m in metrics[1:]) / sum(secs[1:])
    return {
        "pairs_per_s": steady,
        "ref_pairs_per_s": stage["pairs"] / stage["reference_pass_seconds"],
        "wall_s": wall,
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
    }


def run_trl(model_dir, data_file, args, cache):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)
    torch.manual_seed(0)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, a, state, control, **kw):
            self.ends.append(time.perf_counter())

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = datasets.load_dataset("json", data_files=data_file, split="train", cache_dir=cache)
    cfg = DPOConfig(
        output_dir=os.path.join(cache, "trl-out"), beta=0.1, loss_type="sigmoid", learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch, max_length=1024, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=1,
        disable_tqdm=True,
    )
    clock = Clock()
    t_ref = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    init_s = time.perf_counter() - t_ref
    out = trainer.train()
    wall = time.perf_counter() - t0
    steady = (args.steps - 1) * args.batch / (clock.ends[-1] - clock.ends[0])
    logs = [l for l in trainer.state.log_history if "loss" in l]
    return {
        "pairs_per_s": steady,
        "init_s": init_s,
        "wall_s": wall,
        "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"],
        "train_runtime": out.metrics.get("train_runtime"),
    }


def main():
    p = argparse.ArgumentParser()
    for name, default in [("pairs", 128), ("batch", 8), ("steps", 16), ("hidden", 256), ("layers", 4),
                          ("heads", 4), ("rounds", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--profile", default="dev")
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as work:
        dus = dus_binary(root, args.profile, os.path.join(work, "dus"))
        with open(os.path.join(work, "flow.toml"), "w") as f:
            f.write(FLOW.format(hidden=args.hidden, intermediate=args.hidden * 11 // 4, layers=args.layers,
                                heads=args.heads, pairs=args.pairs, batch=args.batch, steps=args.steps))
        first = run_dusflow(dus, work, force=False)
        out = os.path.join(work, "out")
        model_dir = artifact(out, "tiny")
        data_file = os.path.join(artifact(out, "pairs"), "data.jsonl")
        params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            os.path.join(model_dir, "model.safetensors")).values())
        print(f"machine: {os.cpu_count()} cores, 2 threads per implementation; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, trl {trl.__version__}; model {params / 1e6:.2f} M params "
              f"(hidden {args.hidden}, {args.layers} layers, byte vocab); {args.pairs} pairs, batch {args.batch}, "
              f"{args.steps} steps; profile {args.profile}")
        ratios = []
        for r in range(args.rounds):
            ours = first if r == 0 else run_dusflow(dus, work, force=True)
            cache = os.path.join(work, f"trl-cache-{r}")
            theirs = run_trl(model_dir, data_file, args, cache)
            shutil.rmtree(cache, ignore_errors=True)
            ratio = ours["pairs_per_s"] / theirs["pairs_per_s"]
            ratios.append(ratio)
            print(f"round {r + 1}: dusflow {ours['pairs_per_s']:.1f} pairs/s training, reference pass "
                  f"{ours['ref_pairs_per_s']:.1f} pairs/s, step wall {ours['wall_s']:.1f} s (loss "
                  f"{ours['first_loss']:.4f} -> {ours['last_loss']:.4f}); TRL {theirs['pairs_per_s']:.1f} pairs/s "
                  f"training, init+reference {theirs['init_s']:.1f} s, wall {theirs['wall_s']:.1f} s (loss "
                  f"{theirs['first_loss']:.4f} -> {theirs['last_loss']:.4f}); ratio {ratio:.2f}")
        print(f"training pairs/s ratio dusflow/TRL: best {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    sys.exit(main())
