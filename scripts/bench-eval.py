"""Evaluation throughput, dusflow vs lm-evaluation-harness (HF backend), same model, same documents, one run.

  CARGO_TARGET_DIR=/work/.cache/target /work/.venvs/lmeval/bin/python scripts/bench-eval.py \
      [--docs 200] [--shots 25] [--size tiny|small] [--batch 8]

Writes ARC-layout documents (train + test) to a temporary folder, uses the committed tiny model
(host/tests/fixtures/eval/model) or makes a larger random byte-level Llama (`--size small`), then times
  1. `cargo run --release --example bench_eval` (prompt building + scoring, model load excluded), and
  2. lm_eval.simple_evaluate(model=HFLM(...)) on the same files (model load excluded),
and prints documents per second of each and the ratio. Needs lm-eval==0.4.13, torch, transformers.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "host", "tests", "fixtures", "eval")
sys.path.insert(0, FIXTURES)


def arc_docs(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        opts = [a + b, a + b + 1, abs(a - b), a * b]
        order = list(range(4))
        rng.shuffle(order)
        labels = ["A", "B", "C", "D"]
        rows.append({"id": f"b{seed}-{i}", "question": f"What is {a} plus {b}? Think about the sum carefully.",
                     "choices": {"text": [str(opts[j]) for j in order], "label": labels},
                     "answerKey": labels[order.index(0)]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--shots", type=int, default=25)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-eval-")
    data = os.path.join(work, "arc")
    os.makedirs(data)
    for split, rows in [("train", arc_docs(50, 1)), ("test", arc_docs(args.docs, 2))]:
        with open(os.path.join(data, split + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    model = os.path.join(FIXTURES, "model")
    if args.size == "small":
        import make_fixtures
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        model = os.path.join(work, "model")
        make_fixtures.make_model(model)  # tokenizer files
        cfg = LlamaConfig(vocab_size=259, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                          bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(model)

    cargo = ["cargo", "run", "--release", "-q", "-p", "dusflow", "--example", "bench_eval", "--",
             model, data, "arc_challenge", str(args.shots), "harness", str(args.batch)]
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "dusflow", "--example", "bench_eval"], cwd=ROOT, check=True)
    out = subprocess.run(cargo, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print(out, end="")
    ours = float(re.search(r"prefix_reuse=true.*= ([0-9.]+) docs/s", out).group(1))

    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    inc = os.path.join(work, "tasks")
    os.makedirs(inc)
    tasks_root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    with open(os.path.join(inc, "bench_arc.yaml"), "w") as f:
        yaml.safe_dump({"include": os.path.join(tasks_root, "arc/arc_challenge.yaml"), "task": "bench_arc",
                        "dataset_path": "json", "dataset_name": None, "tag": [], "validation_split": None,
                        "dataset_kwargs": {"data_files": {s: os.path.join(data, s + ".jsonl") for s in ["train", "test"]}}}, f)
    lm = HFLM(pretrained=model, dtype="float32", device="cpu", batch_size=args.batch)
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["bench_arc"], num_fewshot=args.shots,
                                  task_manager=TaskManager(include_path=inc))
    secs = time.perf_counter() - start
    theirs = args.docs / secs
    r = res["results"]["bench_arc"]
    print(f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''} HF backend batch={args.batch}: "
          f"{args.docs} docs in {secs:.2f} s = {theirs:.2f} docs/s (acc_norm = {r['acc_norm,none']:.4f})")
    print(f"ratio dusflow / lm-eval = {ours / theirs:.2f}x  (model: {args.size}, {args.shots}-shot ARC layout, "
          f"torch threads {__import__('torch').get_num_threads()})")


if __name__ == "__main__":
    main()
