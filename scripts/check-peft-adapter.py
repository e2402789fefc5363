"""Checks a dusflow LoRA artifact with PEFT itself: the adapter loads with `PeftModel.from_pretrained`, gives
the logits of the merged model dusflow wrote, and PEFT's own `merge_and_unload` gives dusflow's merged weights.

    python scripts/check-peft-adapter.py BASE_MODEL ARTIFACT [--tol 1e-4]

BASE_MODEL: the Hugging Face folder the LoRA step trained on; ARTIFACT: the step's artifact folder (the merged
model, with the adapter under ARTIFACT/adapter/). Needs torch, transformers, peft and safetensors from PyPI
(not needed by CI: the committed fixtures in host/tests/fixtures/lora test the same files without torch).
Exits non-zero when a difference exceeds --tol.
"""

import argparse
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def merged_weights(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("artifact")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    adapter_dir = os.path.join(args.artifact, "adapter")
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    peft_model.eval()
    ours = AutoModelForCausalLM.from_pretrained(args.artifact, dtype=torch.float32)
    ours.eval()

    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=generator)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
        our_logits = ours(input_ids=ids).logits
    logit_diff = (peft_logits - our_logits).abs().max().item()

    merged = peft_model.merge_and_unload().state_dict()
    written = merged_weights(args.artifact)
    weight_diff = 0.0
    worst = ""
    for name, tensor in written.items():
        theirs = merged[name].to(tensor.dtype)
        d = (theirs.float() - tensor.float()).abs().max().item()
        if d >= weight_diff:
            weight_diff, worst = d, name
    missing = sorted(set(merged) - set(written) - {"lm_head.weight"})

    print(f"adapter: {adapter_dir}")
    print(f"PeftModel logits vs dusflow's merged model: max |diff| {logit_diff:.3e} (2 x 16 random ids)")
    print(f"merge_and_unload weights vs dusflow's: max |diff| {weight_diff:.3e} ({worst}), {len(written)} tensors")
    if missing:
        print(f"tensors PEFT has that the artifact lacks: {missing}")
    ok = logit_diff <= args.tol and weight_diff <= args.tol and not missing
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
