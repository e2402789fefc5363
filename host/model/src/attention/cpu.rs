//! The CPU kernels: FlashAttention-2's tiling on rayon tasks, computing in f32 (f64 for f64 inputs).
//!
//! Forward: one task per (row, KV head, query tile) holds the query rows of all the query heads that share
//! the KV head (grouped-query attention without repeating keys), walks the key tiles the mask lets it see
//! with an online softmax, and keeps per query only its output and log-sum-exp. Backward: the scores of a
//! tile are recomputed from the log-sum-exp; one pass per (row, KV head, key tile) accumulates dK and dV,
//! another per (row, KV head, query tile) dQ, so no two tasks write the same gradient. Tiles are copied
//! (and converted from bf16/f16) into small contiguous buffers and multiplied with the `gemm` crate that
//! candle uses (runtime SIMD dispatch); the softmax loops are written lane-wise so they vectorise, and are
//! compiled a second time for AVX2 + FMA, picked at run time.

use super::mask::{HostMask, TileMask};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub};

/// Keys per tile.
const KEY_TILE: usize = 128;
/// Query rows (positions × heads of a group) a task aims for: larger blocks feed the matrix products
/// better, smaller ones make more tasks.
const TARGET_ROWS: usize = 64;

/// The arithmetic type of the kernel (f32, or f64 for f64 inputs).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    const INF: Self;
    fn from_f64(x: f64) -> Self;
    fn ln(self) -> Self;
    fn exp(self) -> Self;
    /// `row[j] = exp(row[j] − shift)` (0 for −∞), returning the sum.
    fn exp_shifted(row: &mut [Self], shift: Self) -> Self;
    /// The largest element (−∞ for an empty row).
    fn row_max(row: &[Self]) -> Self;
}

/// An input element type and its arithmetic type.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    type C: Real;
    fn to_c(self) -> Self::C;
    fn from_c(c: Self::C) -> Self;
}

impl Element for f32 {
    type C = f32;
    #[inline(always)]
    fn to_c(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_c(c: f32) -> f32 {
        c
    }
}

impl Element for f64 {
    type C = f64;
    #[inline(always)]
    fn to_c(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_c(c: f64) -> f64 {
        c
    }
}

impl Element for bf16 {
    type C = f32;
    #[inline(always)]
    fn to_c(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_c(c: f32) -> bf16 {
        bf16::from_f32(c)
    }
}

impl Element for f16 {
    type C = f32;
    #[inline(always)]
    fn to_c(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_c(c: f32) -> f16 {
        f16::from_f32(c)
    }
}

/// Lanes of the hand-vectorised loops (one AVX-512 register of f32, two AVX2 ones).
const LANES: usize = 16;

/// `exp` for f32 as a branch-free polynomial (Cephes' `expf`, ~1 ulp) that the compiler vectorises;
/// arguments below −87 (and −∞) give 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer n, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    // Fused multiply-adds: single instructions in the AVX2 + FMA build (and on aarch64).
    let shifted = xc.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r + 1.0);
    // 2^n built from those bits: the low bits of n + 127 land in the exponent field (no float-to-int
    // conversion, which would not vectorise).
    let pow2 = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

#[inline(always)]
fn exp_shifted_f32(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let c: &mut [f32; LANES] = c.try_into().expect("chunk of LANES");
        for l in 0..LANES {
            let e = exp_f32(c[l] - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - shift);
        sum += *x;
    }
    acc.iter().sum::<f32>() + sum
}

#[inline(always)]
fn row_max_f32(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunk of LANES");
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in chunks.remainder().iter().chain(acc.iter()) {
        m = if x > m { x } else { m };
    }
    m
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    const INF: f32 = f32::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        exp_shifted_f32(row, shift)
    }
    #[inline(always)]
    fn row_max(row: &[f32]) -> f32 {
        row_max_f32(row)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INF: f64 = f64::NEG_INFINITY;
    const INF: f64 = f64::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_shifted(row: &mut [f64], shift: f64) -> f64 {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
    #[inline(always)]
    fn row_max(row: &[f64]) -> f64 {
        row.iter()
            .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
}

/// A `(batch, positions, heads, head_dim)` tensor in memory: any strides but a contiguous last dimension.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub batch_stride: usize,
    pub pos_stride: usize,
    pub head_stride: usize,
}

impl<T> Strided<'_, T> {
    #[inline(always)]
    fn row(&self, b: usize, pos: usize, head: usize, head_dim: usize) -> &[T] {
        let start =
            self.offset + b * self.batch_stride + pos * self.pos_stride + head * self.head_stride;
        &self.data[start..start + head_dim]
    }
}

/// Sizes and the score scale of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem {
    pub batch: usize,
    pub seq: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
}

impl Problem {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Query positions per tile: the rows of a task are positions × the heads of one group.
    fn query_tile(&self) -> usize {
        (TARGET_ROWS / self.group()).clamp(4, TARGET_ROWS)
    }
}

/// Raw output pointer shared by tasks that write disjoint elements.
struct Out<T>(*mut T);

// SAFETY: every task writes a set of indices no other task writes (see the callers), and the buffer
// outlives the parallel loop.
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

impl<T> Out<T> {
    /// # Safety
    /// `i` is in bounds and written by this task only.
    #[inline(always)]
    unsafe fn write(&self, i: usize, x: T) {
        unsafe { self.0.add(i).write(x) }
    }
}

/// `c (m×n, row stride ldc) = [c +] a·bᵀ` for `a` (m×k, ld `lda`) and `b` (n×k, ld `ldb`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mm_abt<C: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[C],
    lda: usize,
    b: &[C],
    ldb: usize,
    c: &mut [C],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if lda == k && ldb == k && ldc == n && n <= KEY_TILE {
        match k {
            8 => return small::abt::<C, 8>(m, n, a, b, c, accumulate),
            16 => return small::abt::<C, 16>(m, n, a, b, c, accumulate),

            _ => {}
        }
    }
    assert!(a.len() >= (m - 1) * lda + k && b.len() >= (n - 1) * ldb + k);
    assert!(c.len() >= (m - 1) * ldc + n);
    // SAFETY: the bounds above cover every element gemm reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            ldb as isize,
            1,
            C::ONE,
            C::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c (m×n) += a·b` for `a` (m×k, ld `lda`) and `b` (k×n, ld `ldb`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mm_ab_acc<C: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[C],
    lda: usize,
    b: &[C],
    ldb: usize,
    c: &mut [C],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k && b.len() >= (k - 1) * ldb + n);
    assert!(c.len() >= (m - 1) * ldc + n);
    // SAFETY: as in `mm_abt`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            C::ONE,
            C::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c (m×n) += aᵀ·b` for `a` (k×m, ld `lda`) and `b` (k×n, ld `ldb`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mm_atb_acc<C: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[C],
    lda: usize,
    b: &[C],
    ldb: usize,
    c: &mut [C],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.len() >= (k - 1) * lda + m && b.len() >= (k - 1) * ldb + n);
    assert!(c.len() >= (m - 1) * ldc + n);
    // SAFETY: as in `mm_abt`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            a.as_ptr(),
            lda as isize,
            1,
            b.as_ptr(),
            1,
            ldb as isize,
            C::ONE,
            C::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The score tile for small head dims `D`, where gemm's micro-kernels (built for long inner dimensions)
/// spend their time loading and storing the output block. Written on fixed-size arrays so the compiler
/// keeps the accumulators in registers and vectorises over the keys.
mod small {
    use super::{Real, KEY_TILE};

    /// `c (m×n) = [c +] a·bᵀ`, `a` m×D, `b` n×D (n ≤ KEY_TILE), all contiguous.
    #[inline(always)]
    pub(super) fn abt<C: Real, const D: usize>(
        m: usize,
        n: usize,
        a: &[C],
        b: &[C],
        c: &mut [C],
        accumulate: bool,
    ) {
        // bᵀ, padded with zero keys to a full tile, so each query row is D broadcast-multiply-adds over
        // KEY_TILE contiguous keys.
        let mut bt = [[C::ZERO; KEY_TILE]; D];
        for (j, row) in b.chunks_exact(D).take(n).enumerate() {
            for d in 0..D {
                bt[d][j] = row[d];
            }
        }
        for (ar, dst) in a.chunks_exact(D).zip(c.chunks_exact_mut(n)).take(m) {
            let mut acc = [C::ZERO; KEY_TILE];
            for d in 0..D {
                let x = ar[d];
                for (s, &y) in acc.iter_mut().zip(&bt[d]) {
                    *s += x * y;
                }
            }
            if accumulate {
                for (o, &s) in dst.iter_mut().zip(&acc) {
                    *o += s;
                }
            } else {
                dst.copy_from_slice(&acc[..n]);
            }
        }
    }
}

/// Rows of one task: the query positions `i0..i1` of every head of KV group `g`, head-major.
#[derive(Debug, Clone, Copy)]
struct Block {
    b: usize,
    g: usize,
    i0: usize,
    i1: usize,
}

impl Block {
    fn len(&self) -> usize {
        self.i1 - self.i0
    }
}

/// Copies the block's rows of `x` into `dst` (rows × head_dim), converted and multiplied by `mul`.
#[inline(always)]
fn load_rows<T: Element>(p: &Problem, x: &Strided<T>, blk: Block, mul: T::C, dst: &mut [T::C]) {
    let (hd, rep, nq) = (p.head_dim, p.group(), blk.len());
    for hr in 0..rep {
        for qi in 0..nq {
            let src = x.row(blk.b, blk.i0 + qi, blk.g * rep + hr, hd);
            let out = &mut dst[(hr * nq + qi) * hd..(hr * nq + qi + 1) * hd];
            for (o, s) in out.iter_mut().zip(src) {
                *o = s.to_c() * mul;
            }
        }
    }
}

/// Copies keys (or values) `j0..j1` of KV head `g` of row `b` into `dst` (keys × head_dim).
#[inline(always)]
fn load_keys<T: Element>(
    p: &Problem,
    x: &Strided<T>,
    b: usize,
    g: usize,
    j0: usize,
    j1: usize,
    dst: &mut [T::C],
) {
    let hd = p.head_dim;
    for (jj, j) in (j0..j1).enumerate() {
        let src = x.row(b, j, g, hd);
        for (o, s) in dst[jj * hd..(jj + 1) * hd].iter_mut().zip(src) {
            *o = s.to_c();
        }
    }
}

/// Sets the masked scores of a `Partial` tile (rows × nk, head-major rows) to −∞.
#[inline(always)]
fn mask_scores<C: Real>(
    mask: &HostMask,
    blk: Block,
    rep: usize,
    j0: usize,
    nk: usize,
    s: &mut [C],
) {
    let nq = blk.len();
    for qi in 0..nq {
        for jj in 0..nk {
            if !mask.visible(blk.b, blk.i0 + qi, j0 + jj) {
                for hr in 0..rep {
                    s[(hr * nq + qi) * nk + jj] = C::NEG_INF;
                }
            }
        }
    }
}

/// The forward of one block: writes its outputs and log-sum-exps.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_block<T: Element>(
    p: &Problem,
    q: &Strided<T>,
    k: &Strided<T>,
    v: &Strided<T>,
    mask: &HostMask,
    blk: Block,
    out: &Out<T>,
    lse: &Out<T::C>,
) {
    let (hd, rep, nq) = (p.head_dim, p.group(), blk.len());
    let rows = rep * nq;
    let mut qt = vec![T::C::ZERO; rows * hd];
    load_rows(p, q, blk, T::C::from_f64(p.scale), &mut qt);
    let mut m = vec![T::C::NEG_INF; rows];
    let mut l = vec![T::C::ZERO; rows];
    let mut acc = vec![T::C::ZERO; rows * hd];
    let mut kt = vec![T::C::ZERO; KEY_TILE * hd];
    let mut vt = vec![T::C::ZERO; KEY_TILE * hd];
    let mut s = vec![T::C::ZERO; rows * KEY_TILE];
    let (lo, hi) = mask.key_range(blk.i0, blk.i1);
    for j0 in (lo..hi).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(hi);
        let nk = j1 - j0;
        let kind = mask.classify(blk.b, blk.i0, blk.i1, j0, j1);
        if kind == TileMask::Skip {
            continue;
        }
        load_keys(p, k, blk.b, blk.g, j0, j1, &mut kt);
        load_keys(p, v, blk.b, blk.g, j0, j1, &mut vt);
        let s = &mut s[..rows * nk];
        mm_abt(rows, nk, hd, &qt, hd, &kt, hd, s, nk, false);
        if kind == TileMask::Partial {
            mask_scores(mask, blk, rep, j0, nk, s);
        }
        for r in 0..rows {
            let row = &mut s[r * nk..(r + 1) * nk];
            let m_new = {
                let mx = T::C::row_max(row);
                if mx > m[r] {
                    mx
                } else {
                    m[r]
                }
            };
            if m_new == T::C::NEG_INF {
                row.fill(T::C::ZERO);
                continue;
            }
            let correction = (m[r] - m_new).exp();
            let sum = T::C::exp_shifted(row, m_new);
            l[r] = l[r] * correction + sum;
            m[r] = m_new;
            if correction != T::C::ONE {
                for x in &mut acc[r * hd..(r + 1) * hd] {
                    *x *= correction;
                }
            }
        }
        mm_ab_acc(rows, hd, nk, s, nk, &vt, hd, &mut acc, hd);
    }
    for hr in 0..rep {
        let h = blk.g * rep + hr;
        for qi in 0..nq {
            let r = hr * nq + qi;
            let i = blk.i0 + qi;
            let base = ((blk.b * p.seq + i) * p.heads + h) * hd;
            let (inv, log_sum) = if l[r] > T::C::ZERO {
                (T::C::ONE / l[r], m[r] + l[r].ln())
            } else {
                // No visible key: the output is zero and the backward sees probabilities exp(s − ∞) = 0.
                (T::C::ZERO, T::C::INF)
            };
            for d in 0..hd {
                // SAFETY: (b, i, h) belongs to this block only.
                unsafe { out.write(base + d, T::from_c(acc[r * hd + d] * inv)) };
            }
            // SAFETY: as above.
            unsafe { lse.write((blk.b * p.heads + h) * p.seq + i, log_sum) };
        }
    }
}

/// Every block of the forward (or of the dQ pass), in an order that starts the long causal rows first.
fn query_blocks(p: &Problem) -> Vec<Block> {
    let bq = p.query_tile();
    let mut blocks = Vec::new();
    for b in 0..p.batch {
        for g in 0..p.kv_heads {
            for i0 in (0..p.seq).step_by(bq) {
                blocks.push(Block {
                    b,
                    g,
                    i0,
                    i1: (i0 + bq).min(p.seq),
                });
            }
        }
    }
    blocks.reverse();
    blocks
}

/// Attention forward: the output `(batch, seq, heads, head_dim)` contiguous, and the log-sum-exp of
/// every query `(batch, heads, seq)` (+∞ where a query sees no key).
pub(crate) fn forward<T: Element>(
    p: &Problem,
    q: Strided<T>,
    k: Strided<T>,
    v: Strided<T>,
    mask: HostMask,
) -> (Vec<T>, Vec<T::C>) {
    let n = p.batch * p.seq * p.heads;
    let mut out: Vec<T> = Vec::with_capacity(n * p.head_dim);
    let mut lse: Vec<T::C> = Vec::with_capacity(n);
    let (o_ptr, l_ptr) = (Out(out.as_mut_ptr()), Out(lse.as_mut_ptr()));
    query_blocks(p)
        .into_par_iter()
        .for_each(|blk| forward_block_entry(p, &q, &k, &v, &mask, blk, &o_ptr, &l_ptr));
    // SAFETY: the blocks cover every (b, i, h) exactly once and write all of its elements.
    unsafe {
        out.set_len(n * p.head_dim);
        lse.set_len(n);
    }
    (out, lse)
}

/// Probabilities `exp(s − lse)` of a tile in place (0 where masked).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probabilities<C: Real>(
    mask: &HostMask,
    blk: Block,
    rep: usize,
    kind: TileMask,
    j0: usize,
    nk: usize,
    lse: &[C],
    s: &mut [C],
) {
    if kind == TileMask::Partial {
        mask_scores(mask, blk, rep, j0, nk, s);
    }
    for (r, row) in s.chunks_exact_mut(nk).enumerate() {
        C::exp_shifted(row, lse[r]);
    }
}

/// `ds = p ⊙ (dp − D)` in place of `dp`, per row.
#[inline(always)]
fn score_gradient<C: Real>(p: &[C], dp: &mut [C], nk: usize, delta: &[C]) {
    for ((pr, dr), &dl) in p.chunks_exact(nk).zip(dp.chunks_exact_mut(nk)).zip(delta) {
        for (x, &pp) in dr.iter_mut().zip(pr) {
            *x = pp * (*x - dl);
        }
    }
}

/// Per-block copies of the log-sum-exp and of `D = rowsum(dO ⊙ O)`, head-major rows.
#[inline(always)]
fn block_stats<C: Real>(p: &Problem, blk: Block, lse: &[C], delta: &[C], l: &mut [C], d: &mut [C]) {
    let (rep, nq) = (p.group(), blk.len());
    for hr in 0..rep {
        let h = blk.g * rep + hr;
        let base = (blk.b * p.heads + h) * p.seq + blk.i0;
        l[hr * nq..(hr + 1) * nq].copy_from_slice(&lse[base..base + nq]);
        d[hr * nq..(hr + 1) * nq].copy_from_slice(&delta[base..base + nq]);
    }
}

/// The gradients `(dq, dk, dv)`, contiguous in the layouts of the forward's output and of its keys.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    p: &Problem,
    q: Strided<T>,
    k: Strided<T>,
    v: Strided<T>,
    o: Strided<T>,
    d_o: Strided<T>,
    lse: &[T::C],
    mask: HostMask,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let hd = p.head_dim;
    // D = rowsum(dO ⊙ O) per query and head, (batch, heads, seq).
    let mut delta = vec![T::C::ZERO; p.batch * p.heads * p.seq];
    delta
        .par_chunks_mut(p.seq.max(1))
        .enumerate()
        .for_each(|(bh, dst)| {
            let (b, h) = (bh / p.heads, bh % p.heads);
            for (i, x) in dst.iter_mut().enumerate() {
                let (a, c) = (o.row(b, i, h, hd), d_o.row(b, i, h, hd));
                *x = a
                    .iter()
                    .zip(c)
                    .fold(T::C::ZERO, |s, (a, c)| s + a.to_c() * c.to_c());
            }
        });

    let n_q = p.batch * p.seq * p.heads * hd;
    let n_k = p.batch * p.keys * p.kv_heads * hd;
    let mut dq: Vec<T> = Vec::with_capacity(n_q);
    let mut dk: Vec<T> = Vec::with_capacity(n_k);
    let mut dv: Vec<T> = Vec::with_capacity(n_k);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Out(dq.as_mut_ptr()),
        Out(dk.as_mut_ptr()),
        Out(dv.as_mut_ptr()),
    );

    // dK, dV: one task per (row, KV head, key tile).
    let mut key_blocks = Vec::new();
    for b in 0..p.batch {
        for g in 0..p.kv_heads {
            for j0 in (0..p.keys).step_by(KEY_TILE) {
                key_blocks.push((b, g, j0, (j0 + KEY_TILE).min(p.keys)));
            }
        }
    }
    key_blocks.into_par_iter().for_each(|(b, g, j0, j1)| {
        key_block_backward_entry(
            p, &q, &k, &v, &d_o, lse, &delta, &mask, b, g, j0, j1, &dk_ptr, &dv_ptr,
        )
    });

    // dQ: one task per (row, KV head, query tile).
    query_blocks(p).into_par_iter().for_each(|blk| {
        query_block_backward_entry(p, &q, &k, &v, &d_o, lse, &delta, &mask, blk, &dq_ptr)
    });
    // SAFETY: the key blocks cover every (b, j, g) and the query blocks every (b, i, h) exactly once,
    // each writing all head_dim elements.
    unsafe {
        dq.set_len(n_q);
        dk.set_len(n_k);
        dv.set_len(n_k);
    }
    (dq, dk, dv)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn key_block_backward<T: Element>(
    p: &Problem,
    q: &Strided<T>,
    k: &Strided<T>,
    v: &Strided<T>,
    d_o: &Strided<T>,
    lse: &[T::C],
    delta: &[T::C],
    mask: &HostMask,
    b: usize,
    g: usize,
    j0: usize,
    j1: usize,
    dk_out: &Out<T>,
    dv_out: &Out<T>,
) {
    let (hd, rep) = (p.head_dim, p.group());
    let nk = j1 - j0;
    let bq = p.query_tile();
    let rows_max = rep * bq;
    let mut kt = vec![T::C::ZERO; nk * hd];
    let mut vt = vec![T::C::ZERO; nk * hd];
    load_keys(p, k, b, g, j0, j1, &mut kt);
    load_keys(p, v, b, g, j0, j1, &mut vt);
    let mut dk = vec![T::C::ZERO; nk * hd];
    let mut dv = vec![T::C::ZERO; nk * hd];
    let mut qt = vec![T::C::ZERO; rows_max * hd];
    let mut dot = vec![T::C::ZERO; rows_max * hd];
    let mut s = vec![T::C::ZERO; rows_max * nk];
    let mut dp = vec![T::C::ZERO; rows_max * nk];
    let mut l = vec![T::C::ZERO; rows_max];
    let mut d = vec![T::C::ZERO; rows_max];
    let (qlo, qhi) = mask.query_range(j0, j1, p.seq);
    // Query tiles on the same grid as the forward's.
    let first = qlo / bq * bq;
    for i0 in (first..qhi).step_by(bq) {
        let blk = Block {
            b,
            g,
            i0,
            i1: (i0 + bq).min(p.seq),
        };
        let kind = mask.classify(b, blk.i0, blk.i1, j0, j1);
        if kind == TileMask::Skip {
            continue;
        }
        let rows = rep * blk.len();
        let (qt, dot, s, dp) = (
            &mut qt[..rows * hd],
            &mut dot[..rows * hd],
            &mut s[..rows * nk],
            &mut dp[..rows * nk],
        );
        load_rows(p, q, blk, T::C::from_f64(p.scale), qt);
        load_rows(p, d_o, blk, T::C::ONE, dot);
        block_stats(p, blk, lse, delta, &mut l, &mut d);
        mm_abt(rows, nk, hd, qt, hd, &kt, hd, s, nk, false);
        probabilities(mask, blk, rep, kind, j0, nk, &l, s);
        mm_atb_acc(nk, hd, rows, s, nk, dot, hd, &mut dv, hd);
        mm_abt(rows, nk, hd, dot, hd, &vt, hd, dp, nk, false);
        score_gradient(s, dp, nk, &d);
        mm_atb_acc(nk, hd, rows, dp, nk, qt, hd, &mut dk, hd);
    }
    for jj in 0..nk {
        let base = ((b * p.keys + j0 + jj) * p.kv_heads + g) * hd;
        for x in 0..hd {
            // SAFETY: (b, j, g) belongs to this key block only.
            unsafe {
                dk_out.write(base + x, T::from_c(dk[jj * hd + x]));
                dv_out.write(base + x, T::from_c(dv[jj * hd + x]));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn query_block_backward<T: Element>(
    p: &Problem,
    q: &Strided<T>,
    k: &Strided<T>,
    v: &Strided<T>,
    d_o: &Strided<T>,
    lse: &[T::C],
    delta: &[T::C],
    mask: &HostMask,
    blk: Block,
    dq_out: &Out<T>,
) {
    let (hd, rep, nq) = (p.head_dim, p.group(), blk.len());
    let rows = rep * nq;
    let scale = T::C::from_f64(p.scale);
    let mut qt = vec![T::C::ZERO; rows * hd];
    let mut dot = vec![T::C::ZERO; rows * hd];
    load_rows(p, q, blk, scale, &mut qt);
    load_rows(p, d_o, blk, T::C::ONE, &mut dot);
    let mut l = vec![T::C::ZERO; rows];
    let mut d = vec![T::C::ZERO; rows];
    block_stats(p, blk, lse, delta, &mut l, &mut d);
    let mut dq = vec![T::C::ZERO; rows * hd];
    let mut kt = vec![T::C::ZERO; KEY_TILE * hd];
    let mut vt = vec![T::C::ZERO; KEY_TILE * hd];
    let mut s = vec![T::C::ZERO; rows * KEY_TILE];
    let mut dp = vec![T::C::ZERO; rows * KEY_TILE];
    let (lo, hi) = mask.key_range(blk.i0, blk.i1);
    // Key tiles on the same grid as the dK/dV pass.
    for j0 in (lo / KEY_TILE * KEY_TILE..hi).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(p.keys);
        let nk = j1 - j0;
        let kind = mask.classify(blk.b, blk.i0, blk.i1, j0, j1);
        if kind == TileMask::Skip {
            continue;
        }
        load_keys(p, k, blk.b, blk.g, j0, j1, &mut kt);
        load_keys(p, v, blk.b, blk.g, j0, j1, &mut vt);
        let (s, dp) = (&mut s[..rows * nk], &mut dp[..rows * nk]);
        mm_abt(rows, nk, hd, &qt, hd, &kt, hd, s, nk, false);
        probabilities(mask, blk, rep, kind, j0, nk, &l, s);
        mm_abt(rows, nk, hd, &dot, hd, &vt, hd, dp, nk, false);
        score_gradient(s, dp, nk, &d);
        mm_ab_acc(rows, hd, nk, dp, nk, &kt, hd, &mut dq, hd);
    }
    for hr in 0..rep {
        let h = blk.g * rep + hr;
        for qi in 0..nq {
            let base = ((blk.b * p.seq + blk.i0 + qi) * p.heads + h) * hd;
            for x in 0..hd {
                // SAFETY: (b, i, h) belongs to this block only.
                unsafe { dq_out.write(base + x, T::from_c(dq[(hr * nq + qi) * hd + x] * scale)) };
            }
        }
    }
}

/// `$entry` runs `$body` (an `#[inline(always)]` function, so the element loops inline into it) compiled
/// a second time for AVX2 + FMA when the CPU has them.
macro_rules! simd_entry {
    ($entry:ident => $body:ident ($($arg:ident: $ty:ty),* $(,)?)) => {
        #[allow(clippy::too_many_arguments)]
        fn $entry<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<T: Element>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

simd_entry!(forward_block_entry => forward_block(
    p: &Problem, q: &Strided<T>, k: &Strided<T>, v: &Strided<T>, mask: &HostMask, blk: Block,
    out: &Out<T>, lse: &Out<T::C>,
));
simd_entry!(key_block_backward_entry => key_block_backward(
    p: &Problem, q: &Strided<T>, k: &Strided<T>, v: &Strided<T>, d_o: &Strided<T>, lse: &[T::C],
    delta: &[T::C], mask: &HostMask, b: usize, g: usize, j0: usize, j1: usize, dk_out: &Out<T>,
    dv_out: &Out<T>,
));
simd_entry!(query_block_backward_entry => query_block_backward(
    p: &Problem, q: &Strided<T>, k: &Strided<T>, v: &Strided<T>, d_o: &Strided<T>, lse: &[T::C],
    delta: &[T::C], mask: &HostMask, blk: Block, dq_out: &Out<T>,
));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
