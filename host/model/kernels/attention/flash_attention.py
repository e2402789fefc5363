"""The fused attention's CUDA kernels, written in Triton (FlashAttention-2: online softmax forward that keeps
only the log-sum-exp, backward that recomputes the probabilities tile by tile).

Layouts are the model's natural ones: queries (batch, seq, heads, head_dim), keys and values (batch, keys,
kv_heads, head_dim), any strides with a contiguous head_dim; outputs and gradients contiguous in those
shapes; log-sum-exps and the backward's D = rowsum(dO * O) as f32 (batch, heads, seq). A KV head serves
`group` query heads (grouped-query attention without repeated copies). Masks, all combinable, decided per
element inside the tiles (causal and the sliding window also bound the loops):
  causal        key j visible to query i when j <= offset + i
  window > 0    and offset + i - j < window
  key mask      (batch, keys) u8, 0 hides a key (padding)
  documents     (batch, keys) u32, a query (at offset + i) sees only keys of its own document
A query that sees no key writes zeros and log-sum-exp +inf (so the backward's probabilities are 0).

Compiled ahead of time to PTX by generate.py; checked on the CPU by test_interpreter.py (TRITON_INTERPRET=1)
against a NumPy reference. The Rust launcher is host/model/src/attention/cuda.rs.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible(offs_q, offs_k, seq, keys, b, offset, causal, window, has_key_mask, KEY_MASK, has_docs, DOCS,
             KEYS_FIRST: tl.constexpr):
    """Visibility of a (queries x keys) tile, or (keys x queries) when KEYS_FIRST."""
    if KEYS_FIRST:
        qpos = offset + offs_q[None, :]
        kpos = offs_k[:, None]
        vis = (offs_k[:, None] < keys) & (offs_q[None, :] < seq)
    else:
        qpos = offset + offs_q[:, None]
        kpos = offs_k[None, :]
        vis = (offs_q[:, None] < seq) & (offs_k[None, :] < keys)
    if causal != 0:
        vis = vis & (kpos <= qpos)
    if window > 0:
        vis = vis & (qpos - kpos < window)
    row = b.to(tl.int64) * keys
    if has_key_mask != 0:
        km = tl.load(KEY_MASK + row + offs_k, mask=offs_k < keys, other=0)
        if KEYS_FIRST:
            vis = vis & (km[:, None] != 0)
        else:
            vis = vis & (km[None, :] != 0)
    if has_docs != 0:
        dk = tl.load(DOCS + row + offs_k, mask=offs_k < keys, other=0)
        dq = tl.load(DOCS + row + offset + offs_q, mask=offs_q < seq, other=0)
        if KEYS_FIRST:
            vis = vis & (dk[:, None] == dq[None, :])
        else:
            vis = vis & (dk[None, :] == dq[:, None])
    return vis


@triton.jit
def _key_range(start_m, keys, offset, causal, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys lo..hi that some query of tile start_m may see (scalar branches: the interpreter needs 0-d
    loop bounds)."""
    lo = 0
    hi = keys
    if causal != 0:
        end = offset + (start_m + 1) * BLOCK_M
        if end < keys:
            hi = end
    if window > 0:
        first = offset + start_m * BLOCK_M + 1 - window
        if first > 0:
            lo = first // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def attn_fwd(Q, K, V, O, LSE, KEY_MASK, DOCS,
             stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
             seq, keys, heads, group, head_dim, offset, causal, window, has_key_mask, has_docs, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(seq, BLOCK_M), batch * heads): one query tile of one head."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    g = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seq
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + g * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g * stride_vh
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, keys, offset, causal, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < keys
        kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        vis = _visible(offs_m, offs_n, seq, keys, b, offset, causal, window, has_key_mask, KEY_MASK, has_docs,
                       DOCS, False)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    row = (b.to(tl.int64) * seq + offs_m) * heads + h
    tl.store(O + row[:, None] * head_dim + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b.to(tl.int64) * heads + h) * seq + offs_m, lse, mask=m_ok)


@triton.jit
def attn_bwd_delta(O, DO, DELTA, seq, heads, head_dim,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(seq, BLOCK_M), batch * heads): D = rowsum(dO * O) for contiguous O and dO."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < seq)[:, None] & (offs_d < head_dim)[None, :]
    row = (b.to(tl.int64) * seq + offs_m) * heads + h
    ptrs = row[:, None] * head_dim + offs_d[None, :]
    o = tl.load(O + ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + (b.to(tl.int64) * heads + h) * seq + offs_m, tl.sum(o * do, 1), mask=offs_m < seq)


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KEY_MASK, DOCS,
                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                  stride_vh, seq, keys, heads, group, head_dim, offset, causal, window, has_key_mask, has_docs,
                  scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Grid (cdiv(keys, BLOCK_N), batch * kv_heads): dK, dV of one key tile, summed over the group's heads.
    DO is contiguous like O; DK, DV are contiguous (batch, keys, kv_heads, head_dim)."""
    start_n = tl.program_id(0)
    bg = tl.program_id(1)
    kv_heads = heads // group
    b = bg // kv_heads
    g = bg % kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = offs_n < keys
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    # The queries that may see a key of this tile (scalar branches: the interpreter needs 0-d bounds).
    lo = 0
    hi = seq
    if causal != 0:
        first = start_n * BLOCK_N - offset
        if first > 0:
            lo = first // BLOCK_M * BLOCK_M
    if window > 0:
        last = (start_n + 1) * BLOCK_N - 1 + window - offset
        if last < seq:
            hi = last
    for hr in range(0, group):
        h = g * group + hr
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        stat = (b.to(tl.int64) * heads + h) * seq
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seq
            qT = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None],
                         other=0.0)
            lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
            qkT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
            vis = _visible(offs_m, offs_n, seq, keys, b, offset, causal, window, has_key_mask, KEY_MASK, has_docs,
                           DOCS, True)
            pT = tl.where(vis, tl.math.exp2(qkT - lse[None, :] * LOG2E), 0.0)
            row = (b.to(tl.int64) * seq + offs_m) * heads + h
            do = tl.load(DO + row[:, None] * head_dim + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                         other=0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    out = ((b.to(tl.int64) * keys + offs_n) * kv_heads + g)[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KEY_MASK, DOCS,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                seq, keys, heads, group, head_dim, offset, causal, window, has_key_mask, has_docs, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(seq, BLOCK_M), batch * heads): dQ of one query tile of one head. DO and DQ are contiguous
    like O."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    g = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seq
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_ok, other=0.0)
    row = (b.to(tl.int64) * seq + offs_m) * heads + h
    do = tl.load(DO + row[:, None] * head_dim + offs_d[None, :], mask=q_ok, other=0.0)
    stat = (b.to(tl.int64) * heads + h) * seq
    lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + g * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    lo, hi = _key_range(start_m, keys, offset, causal, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < keys)[None, :] & d_ok[:, None]
        kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=kv_ok, other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None], mask=kv_ok, other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        vis = _visible(offs_m, offs_n, seq, keys, b, offset, causal, window, has_key_mask, KEY_MASK, has_docs,
                       DOCS, False)
        p = tl.where(vis, tl.math.exp2(qk - lse[:, None] * LOG2E), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    tl.store(DQ + row[:, None] * head_dim + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)
