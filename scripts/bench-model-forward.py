"""Helper of scripts/bench-model-forward.sh: makes the ~20M-parameter benchmark model and times transformers.

    python scripts/bench-model-forward.py make DIR        # random Llama (f32 safetensors) in DIR
    python scripts/bench-model-forward.py bench DIR B S R # median and best forward time of transformers, no grad
"""

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def make(out):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters (tied), written to {out}")


def bench(folder, batch, seq, repeats):
    for attn in ["sdpa", "eager"]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()
        vocab = model.config.vocab_size
        ids = torch.tensor([(i * 7919 + 13) % vocab for i in range(batch * seq)]).reshape(batch, seq)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - t)
        t, best = statistics.median(times), min(times)
        n = batch * seq
        print(f"transformers {attn} forward (inference_mode): median {t:.3f} s = {n / t:.0f} tokens/s; best {best:.3f} s = {n / best:.0f} tokens/s")
    print(f"transformers: torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        bench(sys.argv[2], *map(int, sys.argv[3:6]))
