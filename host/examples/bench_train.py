"""CPU training throughput, dusflow vs transformers + torch AdamW, side by side in one run.

Both train the same randomly initialised Llama (written once by transformers) on the same token ids:
fp32, batch BATCH x SEQ, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no decay), global-norm clip 1.0,
causal LM loss over all positions. WARMUP steps are run first and not timed. The two implementations are
timed alternately for ROUNDS rounds so that load from other processes hits both; the ratio is
dusflow tokens/s / torch tokens/s per round.

Usage (from the repository root):
  /work/.venvs/torch/bin/python host/examples/bench_train.py [--batch 8] [--seq 128] [--steps 8] [--warmup 2]
      [--rounds 2] [--hidden 256] [--layers 4] [--vocab 8000] [--profile dev|release] [--compare-unfused]

--lora R makes both sides train a LoRA adapter of rank R (alpha 2R, every linear layer, no dropout) on the
frozen model instead: dusflow's own adapter against PEFT's get_peft_model on the same transformers model.

--compare-unfused also times dusflow with its fused CPU ops turned off (DUS_FUSED_OPS=0: RMSNorm, SwiGLU, RoPE
and the chunked cross-entropy as composed candle ops) in each round, to show what the fusion changes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def make_model(path, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return cfg


def torch_bench(model_dir, tokens, args):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.lora:
        import peft
        config = peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    b, s = args.batch, args.seq
    ids = torch.tensor(tokens, dtype=torch.long)
    losses = []
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        x = ids[step * b * s:(step + 1) * b * s].view(b, s)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return {"impl": "torch", "tokens_per_s": b * s * args.steps / seconds, "seconds": seconds,
            "first_loss": losses[0], "last_loss": losses[-1], "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser()
    for name, default in [("batch", 8), ("seq", 128), ("steps", 8), ("warmup", 2), ("rounds", 2),
                          ("hidden", 256), ("layers", 4), ("heads", 4), ("vocab", 8000)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--profile", default="dev")
    p.add_argument("--compare-unfused", action="store_true")
    p.add_argument("--lora", type=int, default=0)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import random
    import struct
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        make_model(model_dir, args)
        rng = random.Random(0)
        n = args.batch * args.seq * (args.steps + args.warmup)
        tokens = [rng.randrange(args.vocab) for _ in range(n)]
        tokens_file = os.path.join(tmp, "tokens.u32")
        with open(tokens_file, "wb") as f:
            f.write(struct.pack(f"<{n}I", *tokens))
        cargo = ["cargo", "run", "-q", "-p", "dusflow", "--profile", args.profile, "--example", "bench_train", "--"]
        subprocess.run(["cargo", "build", "-q", "-p", "dusflow", "--profile", args.profile, "--example",
                        "bench_train"], cwd=root, check=True)
        from safetensors.torch import load_file
        params = sum(t.numel() for t in load_file(os.path.join(model_dir, "model.safetensors")).values())
        print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}; "
              f"model {params / 1e6:.1f} M params (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); "
              f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps after {args.warmup}; profile {args.profile}"
              + (f"; LoRA r {args.lora} on every linear layer (PEFT {__import__('peft').__version__} on the torch side)"
                 if args.lora else ""))
        ratios = []
        bench_args = [model_dir, tokens_file, str(args.batch), str(args.seq), str(args.steps), str(args.warmup)]
        if args.lora:
            bench_args.append(f"lora:{args.lora}:{2 * args.lora}")

        def dusflow(fused):
            env = dict(os.environ, DUS_FUSED_OPS="1" if fused else "0")
            out = subprocess.run(cargo + bench_args, cwd=root, check=True, capture_output=True, text=True, env=env)
            return json.loads(out.stdout.strip().splitlines()[-1])

        for r in range(args.rounds):
            if args.compare_unfused:
                unfused = dusflow(False)
                print(f"round {r + 1}: dusflow unfused {unfused['tokens_per_s']:.0f} tok/s (loss "
                      f"{unfused['first_loss']:.3f} -> {unfused['last_loss']:.3f})")
            ours = dusflow(True)
            theirs = torch_bench(model_dir, tokens, args)
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            ratios.append(ratio)
            print(f"round {r + 1}: dusflow {ours['tokens_per_s']:.0f} tok/s (loss {ours['first_loss']:.3f} -> "
                  f"{ours['last_loss']:.3f}); torch {theirs['tokens_per_s']:.0f} tok/s (loss {theirs['first_loss']:.3f}"
                  f" -> {theirs['last_loss']:.3f}); ratio {ratio:.2f}")
        print(f"ratio dusflow/torch: best {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    sys.exit(main())
