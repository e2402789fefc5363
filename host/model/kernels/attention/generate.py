"""Compiles the Triton kernels of flash_attention.py ahead of time to PTX for Hopper (sm_90a), with no GPU, and
writes beside this script:
  ptx/<kernel>_<dtype>_d<block_d>.ptx   one file per kernel, dtype and head-dim block
  ptx/manifest.json                     the launch facts of each (entry name, block sizes, warps, shared memory)
  ptx/kernels.rs                        the same table for the Rust launcher (host/model/src/attention/cuda.rs)

  python3 -m venv /work/.venvs/triton && /work/.venvs/triton/bin/pip install -r requirements.txt
  /work/.venvs/triton/bin/python host/model/kernels/attention/generate.py

The Triton version is pinned in requirements.txt (3.6.0, torch 2.11's); the PTX it emits (.version 8.7) loads on
driver 580 / CUDA 13.0. Every pointer is declared 16-byte aligned and every stride a multiple of 16 elements,
which lets Triton vectorise the loads; the launcher pads or copies inputs that do not qualify.
"""
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flash_attention as fa  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}
BLOCK_DS = [16, 64, 128]


def config(kernel, dtype, block_d):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the Triton tutorial's Hopper choices, halved for f32 (twice
    the bytes per element) and for the widest head dim in the backward (shared memory)."""
    wide = dtype == "f32"
    if kernel == "attn_fwd":
        if wide:
            return 64, 32, 4, 2
        return (128, 64, 8, 3) if block_d == 128 else (128, 64, 4, 3)
    if kernel == "attn_bwd_delta":
        return 64, None, 4, 1
    if kernel == "attn_bwd_dkdv":  # BLOCK_M queries per step, BLOCK_N keys per program
        if wide:
            return 32, 32, 4, 2
        return (32, 128, 8, 2) if block_d == 128 else (32, 128, 4, 3)
    if kernel == "attn_bwd_dq":  # BLOCK_M queries per program, BLOCK_N keys per step
        if wide:
            return 32, 32, 4, 2
        return (128, 32, 8, 2) if block_d == 128 else (128, 32, 4, 3)
    raise ValueError(kernel)


def signature(kernel, dtype):
    """Argument name -> Triton type, in order, and the 16-divisibility hints."""
    t = "*" + DTYPES[dtype]
    strides = [f"stride_{x}{d}" for x in "qkv" for d in "bsh"]
    ints = ["seq", "keys", "heads", "group", "head_dim", "offset", "causal", "window", "has_key_mask",
            "has_docs"]
    if kernel == "attn_fwd":
        ptrs = [("Q", t), ("K", t), ("V", t), ("O", t), ("LSE", "*fp32"), ("KEY_MASK", "*u8"), ("DOCS", "*u32")]
    elif kernel == "attn_bwd_delta":
        sig = {"O": t, "DO": t, "DELTA": "*fp32", "seq": "i32", "heads": "i32", "head_dim": "i32"}
        return sig, {"O", "DO", "DELTA"}
    elif kernel == "attn_bwd_dkdv":
        ptrs = [("Q", t), ("K", t), ("V", t), ("DO", t), ("LSE", "*fp32"), ("DELTA", "*fp32"), ("DK", t), ("DV", t),
                ("KEY_MASK", "*u8"), ("DOCS", "*u32")]
    elif kernel == "attn_bwd_dq":
        ptrs = [("Q", t), ("K", t), ("V", t), ("DO", t), ("LSE", "*fp32"), ("DELTA", "*fp32"), ("DQ", t),
                ("KEY_MASK", "*u8"), ("DOCS", "*u32")]
    sig = dict(ptrs)
    sig.update({s: "i32" for s in strides})
    sig.update({i: "i32" for i in ints})
    sig["scale"] = "fp32"
    return sig, {name for name, _ in ptrs} | set(strides)


def compile_one(kernel, dtype, block_d):
    fn = getattr(fa, kernel)
    block_m, block_n, warps, stages = config(kernel, dtype, block_d)
    sig, aligned = signature(kernel, dtype)
    constexprs = {"BLOCK_M": block_m, "BLOCK_D": block_d}
    if block_n is not None:
        constexprs["BLOCK_N"] = block_n
        constexprs["PRECISION"] = "ieee" if dtype == "f32" else "tf32"
    full = {name: sig.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    backend = triton.compiler.make_backend(TARGET)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    md = compiled.metadata
    assert getattr(md, "global_scratch_size", 0) == 0 and getattr(md, "profile_scratch_size", 0) == 0, kernel
    # Shared memory beyond what an H100/H200 block may opt into cannot launch.
    assert md.shared <= 232448, (kernel, dtype, block_d, md.shared)
    file = f"{kernel}_{dtype}_d{block_d}.ptx"
    with open(os.path.join(HERE, "ptx", file), "w") as f:
        f.write(compiled.asm["ptx"])
    return {"kernel": kernel, "entry": md.name, "dtype": dtype, "block_d": block_d, "block_m": block_m,
            "block_n": block_n or 0, "num_warps": warps, "num_stages": stages, "shared": md.shared,
            "args": [n for n in fn.arg_names if full[n] != "constexpr"], "file": file}


def main():
    os.makedirs(os.path.join(HERE, "ptx"), exist_ok=True)
    table = []
    for kernel in ["attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"]:
        for dtype in DTYPES:
            for block_d in BLOCK_DS:
                entry = compile_one(kernel, dtype, block_d)
                print(f"{entry['file']}: {entry['shared']} B shared, {entry['num_warps']} warps", flush=True)
                table.append(entry)
    with open(os.path.join(HERE, "ptx", "manifest.json"), "w") as f:
        json.dump({"triton": triton.__version__, "target": "cuda:90:32", "kernels": table}, f, indent=1)
        f.write("\n")
    rows = []
    for e in table:
        rows.append(
            f'    TritonKernel {{ kernel: "{e["kernel"]}", entry: "{e["entry"]}", dtype: "{e["dtype"]}", '
            f'block_d: {e["block_d"]}, block_m: {e["block_m"]}, block_n: {e["block_n"]}, '
            f'num_warps: {e["num_warps"]}, shared: {e["shared"]}, args: {len(e["args"])}, '
            f'ptx: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/attention/ptx/{e["file"]}")) }},')
    with open(os.path.join(HERE, "ptx", "kernels.rs"), "w") as f:
        f.write(f"// @generated by host/model/kernels/attention/generate.py (Triton {triton.__version__}, "
                "cuda:90:32). Do not edit.\n")
        f.write("const KERNELS: &[TritonKernel] = &[\n" + "\n".join(rows) + "\n];\n")


if __name__ == "__main__":
    main()
