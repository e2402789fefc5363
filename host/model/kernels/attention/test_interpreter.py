"""The Triton kernels of flash_attention.py run on the CPU by Triton's interpreter (TRITON_INTERPRET=1) against
a NumPy reference in f64: outputs, log-sum-exps and the three gradients, for every mask kind, grouped-query
attention, head dims that are not a power of two, sequence lengths that are not a multiple of the tiles, keys
read through a strided view (a KV cache), in f32, bf16 and f16. Launch parameters (tile sizes) are the
generator's, so these are the kernels and configurations that generate.py compiles.

  /work/.venvs/triton/bin/python host/model/kernels/attention/test_interpreter.py [-k SUBSTRING]

(venv: requirements.txt). Not run by CI, which installs neither torch nor triton. Exits non-zero on a failure.
"""
import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flash_attention as fa  # noqa: E402
import generate  # noqa: E402

TORCH = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _patch_bf16_dot():
    """Triton 3.6's interpreter stores bf16 as uint16 and its `dot` multiplies those integers. On the GPU a
    bf16 dot multiplies exactly and accumulates in f32; do the same here (convert both operands to f32)."""
    from triton.runtime import interpreter
    import triton.language as tl

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return x
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


_patch_bf16_dot()


def block_d_for(hd):
    return next(d for d in generate.BLOCK_DS if d >= hd)


def visibility(b, s, t, offset, causal, window, key_mask, docs):
    """(b, s, t) bool: which key each query sees."""
    i = np.arange(s)[:, None] + offset
    j = np.arange(t)[None, :]
    vis = np.ones((b, s, t), dtype=bool)
    if causal:
        vis &= (j <= i)[None]
    if window:
        vis &= (i - j < window)[None]
    if key_mask is not None:
        vis &= (key_mask != 0)[:, None, :]
    if docs is not None:
        vis &= docs[:, offset:offset + s][:, :, None] == docs[:, None, :]
    return vis


def reference(q, k, v, d_out, vis, scale):
    """Materialised attention and its gradients in f64 (queries that see nothing: zeros, lse +inf)."""
    b, s, nh, hd = q.shape
    nkv = k.shape[2]
    rep = nh // nkv
    kh, vh = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, kh) * scale
    scores = np.where(vis[:, None], scores, -np.inf)
    m = scores.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m)
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l > 0, l, 1.0)
    out = np.einsum("bhij,bjhd->bihd", p, vh)
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)), np.inf)
    dp = np.einsum("bihd,bjhd->bhij", d_out, vh)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhij,bjhd->bihd", ds, kh) * scale
    dk = (np.einsum("bhij,bihd->bjhd", ds, q) * scale).reshape(b, -1, nkv, rep, hd).sum(3)
    dv = np.einsum("bhij,bihd->bjhd", p, d_out).reshape(b, -1, nkv, rep, hd).sum(3)
    return out, lse, dq, dk, dv


def run_kernels(q, k, v, d_out, offset, causal, window, key_mask, docs, scale, dtype):
    """The forward and the three backward kernels launched as the Rust side launches them."""
    b, s, nh, hd = q.shape
    _, t, nkv, _ = k.shape
    bd = block_d_for(hd)
    precision = "ieee" if dtype == "f32" else "tf32"
    km = key_mask if key_mask is not None else torch.zeros(1, dtype=torch.uint8)
    dc = docs if docs is not None else torch.zeros(1, dtype=torch.uint32)
    flags = [s, t, nh, nh // nkv, hd, offset, int(causal), window or 0, int(key_mask is not None),
             int(docs is not None)]
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    o = torch.empty((b, s, nh, hd), dtype=q.dtype)
    lse = torch.empty((b, nh, s), dtype=torch.float32)
    bm, bn, _, _ = generate.config("attn_fwd", dtype, bd)
    fa.attn_fwd[(triton.cdiv(s, bm), b * nh)](q, k, v, o, lse, km, dc, *strides, *flags, scale, BLOCK_M=bm,
                                               BLOCK_N=bn, BLOCK_D=bd, PRECISION=precision)
    delta = torch.empty((b, nh, s), dtype=torch.float32)
    bm, _, _, _ = generate.config("attn_bwd_delta", dtype, bd)
    fa.attn_bwd_delta[(triton.cdiv(s, bm), b * nh)](o, d_out, delta, s, nh, hd, BLOCK_M=bm, BLOCK_D=bd)
    dk = torch.empty((b, t, nkv, hd), dtype=q.dtype)
    dv = torch.empty((b, t, nkv, hd), dtype=q.dtype)
    bm, bn, _, _ = generate.config("attn_bwd_dkdv", dtype, bd)
    fa.attn_bwd_dkdv[(triton.cdiv(t, bn), b * nkv)](q, k, v, d_out, lse, delta, dk, dv, km, dc, *strides, *flags,
                                                     scale, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                                                     PRECISION=precision)
    dq = torch.empty((b, s, nh, hd), dtype=q.dtype)
    bm, bn, _, _ = generate.config("attn_bwd_dq", dtype, bd)
    fa.attn_bwd_dq[(triton.cdiv(s, bm), b * nh)](q, k, v, d_out, lse, delta, dq, km, dc, *strides, *flags, scale,
                                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=precision)
    return o, lse, dq, dk, dv


def case(name, dtype, b, s, offset, nh, nkv, hd, causal=True, window=None, key_mask=False, docs=False,
         strided=False):
    t = offset + s
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    q = rng.uniform(-2, 2, (b, s, nh, hd))
    k = rng.uniform(-2, 2, (b, t, nkv, hd))
    v = rng.uniform(-1, 1, (b, t, nkv, hd))
    d_out = rng.uniform(-1, 1, (b, s, nh, hd))
    km = (rng.uniform(size=(b, t)) > 0.25).astype(np.uint8) if key_mask else None
    if km is not None:
        km[0, :3] = 0  # left padding: the first queries of row 0 see nothing under the causal mask
    dc = np.minimum(np.arange(t)[None, :] // np.array([[7], [11]])[:b], 50).astype(np.uint32) if docs else None
    tt = lambda x: torch.tensor(x).to(TORCH[dtype])  # noqa: E731
    qt, kt, vt, dt = tt(q), tt(k), tt(v), tt(d_out)
    if strided:
        # Keys and values as views into larger cache buffers (as the KV cache hands them over).
        cap = t + 13
        kbuf = torch.zeros((b, cap, nkv, hd), dtype=TORCH[dtype])
        vbuf = torch.zeros((b, cap, nkv, hd), dtype=TORCH[dtype])
        kbuf[:, :t] = kt
        vbuf[:, :t] = vt
        kt, vt = kbuf[:, :t], vbuf[:, :t]
    # The reference sees exactly the rounded inputs.
    f64 = lambda x: x.to(torch.float64).numpy()  # noqa: E731
    scale = 1.0 / np.sqrt(hd)
    vis = visibility(b, s, t, offset, causal, window, km, dc)
    want = reference(f64(qt), f64(kt), f64(vt), f64(dt), vis, scale)
    got = run_kernels(qt, kt, vt, dt.contiguous(), offset, causal, window,
                      None if km is None else torch.tensor(km), None if dc is None else torch.tensor(dc),
                      scale, dtype)
    tol = {"f32": 2e-5, "bf16": 3e-2, "f16": 4e-3}[dtype]
    worst = []
    for what, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        g = f64(g)
        if what == "lse":
            finite = np.isfinite(w)
            assert (np.isinf(g) == ~finite).all(), f"{name}: lse infinite where the reference is not"
            g, w = g[finite], w[finite]
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)
        worst.append(f"{what} {err:.1e}")
        assert err <= tol, f"{name} {dtype}: {what} relative error {err:.2e} > {tol:.0e}"
        assert np.abs(w).max() > 1e-3, f"{name}: {what} trivially small"
    return ", ".join(worst)


CASES = [
    # name, kwargs
    ("no mask, MHA, hd 64", dict(b=2, s=150, offset=0, nh=4, nkv=4, hd=64, causal=False)),
    ("causal, GQA 4:1, hd 64", dict(b=2, s=150, offset=0, nh=8, nkv=2, hd=64)),
    ("causal, GQA 8:1, hd 128", dict(b=1, s=131, offset=0, nh=8, nkv=1, hd=128)),
    ("causal, hd 80 (padded to 128)", dict(b=2, s=70, offset=0, nh=2, nkv=1, hd=80)),
    ("causal, hd 8 (padded to 16)", dict(b=2, s=45, offset=0, nh=4, nkv=2, hd=8)),
    ("sliding window 17", dict(b=2, s=150, offset=0, nh=4, nkv=2, hd=64, window=17)),
    ("query offset (KV cache), strided keys", dict(b=2, s=5, offset=60, nh=4, nkv=2, hd=64, strided=True)),
    ("query offset + window", dict(b=1, s=40, offset=90, nh=4, nkv=1, hd=16, window=33)),
    ("key mask (padding) + causal", dict(b=2, s=100, offset=0, nh=4, nkv=2, hd=64, key_mask=True)),
    ("key mask without causal", dict(b=2, s=33, offset=0, nh=2, nkv=2, hd=16, causal=False, key_mask=True)),
    ("packed documents", dict(b=2, s=150, offset=0, nh=4, nkv=2, hd=64, docs=True)),
    ("everything", dict(b=2, s=77, offset=9, nh=8, nkv=2, hd=80, window=21, key_mask=True, docs=True,
                        strided=True)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    failed = 0
    for name, kw in CASES:
        if args.k not in name:
            continue
        dtypes = ["f32", "bf16"] + (["f16"] if name in ("causal, GQA 4:1, hd 64", "everything") else [])
        for dtype in dtypes:
            start = time.time()
            try:
                worst = case(name, dtype, **kw)
                print(f"ok    {name} [{dtype}]: {worst} ({time.time() - start:.1f} s)", flush=True)
            except AssertionError as e:
                failed += 1
                print(f"FAIL  {name} [{dtype}]: {e}", flush=True)
    print(f"triton {triton.__version__} interpreter: {'all passed' if not failed else f'{failed} failed'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
