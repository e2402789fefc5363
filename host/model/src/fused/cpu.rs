//! The CPU kernels of the fused ops: rows in parallel (rayon), f32 arithmetic, results rounded to the
//! storage type where the composed ops round (so bf16 results differ from the composed ones only where an f32
//! sum's order does).

use super::RopeTables;
use rayon::prelude::*;

/// A storage element: f32, bf16 or f16.
pub(super) trait Float: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// `x` rounded to this type and back (what a composed op in this dtype stores).
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Float for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Float for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Rows handed to one rayon task: enough work per task that scheduling is noise.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// `1 / √(mean(x²) + eps)` of one row, in f32.
#[inline]
fn inverse_rms<T: Float>(row: &[T], eps: f32) -> f32 {
    let sum: f32 = row
        .iter()
        .map(|v| {
            let f = v.to_f32();
            f * f
        })
        .sum();
    1.0 / (sum / row.len() as f32 + eps).sqrt()
}

pub(super) fn rms_norm_forward<T: Float>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let h = w.len();
    let mut y = vec![T::from_f32(0.0); x.len()];
    let per = rows_per_task(h) * h;
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(h).zip(xs.chunks(h)) {
                let r = inverse_rms(xr, eps);
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    // Normalised in f32, stored in x's dtype, then scaled in that dtype.
                    let n = T::round(v.to_f32() * r);
                    *o = T::from_f32(n * g.to_f32());
                }
            }
        });
    y
}

/// `(dx, dw)` of RMSNorm: with `n = x r`, `dn = dy w`: `dx = r (dn − n · mean(dn n))`, `dw = Σ_rows dy n`.
pub(super) fn rms_norm_backward<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f32,
) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let mut dx = vec![T::from_f32(0.0); x.len()];
    let per = rows_per_task(h) * h;
    let dw = dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
        .map(|(dxs, (xs, dys))| {
            let mut dw = vec![0f32; h];
            let mut n = vec![0f32; h];
            for ((dxr, xr), dyr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(dys.chunks(h)) {
                let r = inverse_rms(xr, eps);
                let mut dot = 0f32;
                for j in 0..h {
                    n[j] = xr[j].to_f32() * r;
                    let d = dyr[j].to_f32();
                    // The forward scaled the normalised value as stored in x's dtype.
                    dw[j] += d * T::round(n[j]);
                    dot += d * wf[j] * n[j];
                }
                let mean = dot / h as f32;
                for j in 0..h {
                    let dn = dyr[j].to_f32() * wf[j];
                    dxr[j] = T::from_f32(r * (dn - n[j] * mean));
                }
            }
            dw
        })
        .reduce(
            || vec![0f32; h],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    (dx, dw.into_iter().map(T::from_f32).collect())
}

/// candle's `silu` in dtype `T`: `v / (1 + exp(−v))` with each op rounded to `T`.
#[inline(always)]
fn silu<T: Float>(v: f32) -> f32 {
    T::round(v / T::round(1.0 + T::round((-v).exp())))
}

pub(super) fn swiglu_forward<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f32(0.0); g.len()];
    y.par_chunks_mut(16_384)
        .zip(g.par_chunks(16_384).zip(u.par_chunks(16_384)))
        .for_each(|(ys, (gs, us))| {
            for ((o, &a), &b) in ys.iter_mut().zip(gs).zip(us) {
                *o = T::from_f32(silu::<T>(a.to_f32()) * b.to_f32());
            }
        });
    y
}

/// `(dg, du)` of `silu(g) u`: `dg = dy u σ(g) (1 + g (1 − σ(g)))`, `du = dy silu(g)`.
pub(super) fn swiglu_backward<T: Float>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::from_f32(0.0); g.len()];
    let mut du = vec![T::from_f32(0.0); g.len()];
    dg.par_chunks_mut(16_384)
        .zip(du.par_chunks_mut(16_384))
        .zip(g.par_chunks(16_384).zip(u.par_chunks(16_384)))
        .zip(dy.par_chunks(16_384))
        .for_each(|(((dgs, dus), (gs, us)), dys)| {
            for i in 0..gs.len() {
                let (a, b, d) = (gs[i].to_f32(), us[i].to_f32(), dys[i].to_f32());
                let sigma = 1.0 / (1.0 + (-a).exp());
                dgs[i] = T::from_f32(d * b * sigma * (1.0 + a * (1.0 - sigma)));
                dus[i] = T::from_f32(d * silu::<T>(a));
            }
        });
    (dg, du)
}

/// `x cos + rotate_half(x) sin` (or, with `inverse`, the rotation by −θ: the backward). The forward rounds
/// like the composed ops (each product, then the sum); the inverse rounds once.
pub(super) fn rope<T: Float>(x: &[T], t: &RopeTables, inverse: bool) -> Vec<T> {
    let (_, s, h, d) = t.dims;
    let half = d / 2;
    let mut y = vec![T::from_f32(0.0); x.len()];
    // One task per (batch row, position): h heads of d values sharing one table row.
    y.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(bs, (ys, xs))| {
            let (b, pos) = (bs / s, bs % s);
            let row = if t.per_row { b * s + pos } else { pos } * half;
            let (cos, sin) = (&t.cos[row..row + half], &t.sin[row..row + half]);
            for (yh, xh) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                for i in 0..half {
                    let (x1, x2) = (xh[i].to_f32(), xh[i + half].to_f32());
                    let (c, sn) = (cos[i], sin[i]);
                    if inverse {
                        yh[i] = T::from_f32(x1 * c + x2 * sn);
                        yh[i + half] = T::from_f32(x2 * c - x1 * sn);
                    } else {
                        yh[i] = T::from_f32(T::round(x1 * c) + T::round(-x2 * sn));
                        yh[i + half] = T::from_f32(T::round(x2 * c) + T::round(x1 * sn));
                    }
                }
            }
        });
    y
}
