//! The merge kernels, one tensor at a time, spread over cores in chunks: linear, SLERP, and the task-vector
//! family (task arithmetic, TIES, DARE). Arithmetic follows mergekit 0.1.5 operation by operation, in f32,
//! rounded once to the output dtype.

use super::elements::{
    bf16_bits, bf16_bits_mut, bf16_to_f32, encode, prefetch, with_wide_vectors, Source,
    PREFETCH_AHEAD,
};
use super::sparsify::{self, Keep, CHUNK};
use anyhow::{bail, Result};
use rayon::prelude::*;
use safetensors::Dtype;

/// How the task-vector methods drop elements of δ = model − base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsification {
    /// Keep everything (task arithmetic).
    None,
    /// Keep the largest |δ| (TIES).
    Magnitude,
    /// Keep a seeded random subset (DARE).
    Random {
        /// Seed of the masks.
        seed: u64,
    },
}

/// A task-vector merge of one tensor: `base + λ · Σ wᵢ δᵢ mᵢ [/ Σ wᵢ mᵢ]` (mergekit's
/// `GeneralizedTaskArithmeticMerge`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskVectorPlan {
    /// Weight of each non-base model.
    pub weights: Vec<f32>,
    /// Density of each non-base model (fraction kept).
    pub densities: Vec<f64>,
    /// How δ is sparsified.
    pub sparsification: Sparsification,
    /// TIES sign election (majority by sum) and disjoint mean.
    pub consensus: bool,
    /// Divide by the (masked) weight sum.
    pub normalize: bool,
    /// Rescale each sparsified δ to its original L1 norm.
    pub rescale: bool,
    /// Scale of the merged task vector.
    pub lambda: f32,
}

/// What to do with one tensor. Inputs are ordered: for [`TensorPlan::TaskVector`] the base comes first.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorPlan {
    /// `Σ wᵢ xᵢ`, divided by `Σ wᵢ` when `normalize`.
    Linear {
        /// One weight per input.
        weights: Vec<f32>,
        /// Divide by the weight sum.
        normalize: bool,
    },
    /// Spherical interpolation from input 0 (`t = 0`) to input 1 (`t = 1`), over the flattened tensor.
    Slerp {
        /// Interpolation factor.
        t: f32,
    },
    /// Base (input 0) plus the merged task vectors of the other inputs.
    TaskVector(TaskVectorPlan),
    /// Input `i` unchanged (converted to the output dtype).
    CopyFrom(usize),
}

/// Merges one tensor of `numel` elements from `inputs` into little-endian bytes of `out_dtype`.
/// `name` seeds DARE masks.
pub fn merge_tensor(
    plan: &TensorPlan,
    name: &str,
    inputs: &[Source<'_>],
    out_dtype: Dtype,
) -> Result<Vec<u8>> {
    let numel = inputs.first().map(Source::numel).unwrap_or(0);
    let mut out = vec![0u8; numel * out_dtype.bitsize() / 8];
    merge_tensor_to(plan, name, inputs, out_dtype, TensorOut::Buffer(&mut out))?;
    Ok(out)
}

/// Where a merged tensor's bytes go.
pub enum TensorOut<'a> {
    /// A buffer of exactly the output's length.
    Buffer(&'a mut [u8]),
    /// A sink called with each computed chunk's bytes and their byte offset in the tensor, from several
    /// threads at once (e.g. positioned writes into the output file while the chunk is still in cache).
    Sink(&'a (dyn Fn(usize, &[u8]) -> Result<()> + Sync)),
}

/// Merges one tensor like [`merge_tensor`], its bytes going to `out`.
pub fn merge_tensor_to(
    plan: &TensorPlan,
    name: &str,
    inputs: &[Source<'_>],
    out_dtype: Dtype,
    out: TensorOut<'_>,
) -> Result<()> {
    let numel = inputs.first().map(Source::numel).unwrap_or(0);
    if let Some(bad) = inputs.iter().find(|s| s.numel() != numel) {
        bail!(
            "tensor {name:?}: inputs have {} and {} elements",
            numel,
            bad.numel()
        );
    }
    let out_size = out_dtype.bitsize() / 8;
    if let TensorOut::Buffer(buffer) = &out {
        if buffer.len() != numel * out_size {
            bail!(
                "tensor {name:?}: output buffer of {} bytes for {numel} elements",
                buffer.len()
            );
        }
    }
    let out = Output {
        to: out,
        numel,
        dtype: out_dtype,
    };
    match plan {
        TensorPlan::Linear { weights, normalize } => {
            check_count(name, "linear", weights.len(), inputs.len())?;
            // mergekit: result = 0; result.addcmul_(xᵢ, wᵢ) in order (torch computes each step as one fused
            // multiply-add, rounding once); result /= Σ wᵢ.
            let denominator: f32 = weights.iter().fold(0.0f32, |a, w| a + w);
            out.for_each_chunk(inputs.len(), 0, inputs, |_, _, x, acc| {
                acc.fill(0.0);
                for (xi, &w) in x.iter().zip(weights) {
                    let xi = &xi[..];
                    with_wide_vectors!(add_scaled(acc: &mut [f32], xi: &[f32], w: f32));
                }
                if *normalize {
                    acc.iter_mut().for_each(|a| *a /= denominator);
                }
            })?;
        }
        TensorPlan::Slerp { t } => {
            check_count(name, "slerp", 2, inputs.len())?;
            let (ca, cb) = slerp_coefficients(*t, inputs, numel);
            // bf16 in and out (the usual case): one fused pass per chunk, same operations and result.
            let fused = |start: usize, out_chunk: &mut [u8]| -> bool {
                if out_dtype != Dtype::BF16 {
                    return false;
                }
                let len = out_chunk.len() / 2;
                match (
                    inputs[0].bf16_bits(start, len),
                    inputs[1].bf16_bits(start, len),
                    bf16_bits_mut(out_chunk),
                ) {
                    (Some(a), Some(b), Some(out)) => {
                        with_wide_vectors!(interpolate_bf16(ca: f32, a: &[u16], cb: f32, b: &[u16], out: &mut [u16]));
                        true
                    }
                    _ => false,
                }
            };
            out.for_each_chunk_or(2, 0, inputs, fused, |_, _, x, acc| {
                let (a, b) = (&x[0][..], &x[1][..]);
                with_wide_vectors!(interpolate(ca: f32, a: &[f32], cb: f32, b: &[f32], acc: &mut [f32]));
            })?;
        }
        TensorPlan::TaskVector(p) => {
            check_count(name, "task-vector", p.weights.len() + 1, inputs.len())?;
            check_count(
                name,
                "task-vector density",
                p.densities.len() + 1,
                inputs.len(),
            )?;
            task_vector(p, name, inputs, out)?;
        }
        TensorPlan::CopyFrom(i) => {
            let Some(src) = inputs.get(*i) else {
                bail!("tensor {name:?}: copy from input {i} of {}", inputs.len())
            };
            let src = std::slice::from_ref(src);
            out.for_each_chunk(1, 0, src, |_, _, x, acc| acc.copy_from_slice(&x[0]))?;
        }
    }
    Ok(())
}

fn check_count(name: &str, what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        bail!("tensor {name:?}: {what} plan expects {expected} inputs, got {got}");
    }
    Ok(())
}

/// A tensor's output under way: where its bytes go, its length and dtype.
struct Output<'a> {
    to: TensorOut<'a>,
    numel: usize,
    dtype: Dtype,
}

impl Output<'_> {
    /// Runs `f(chunk index, first element, decoded inputs (scratch: `f` may overwrite them), result)` over
    /// the tensor in parallel chunks and encodes each chunk's result to the output. `x` holds the `n`
    /// decoded inputs followed by `extra` scratch buffers of the chunk's length.
    fn for_each_chunk<F>(self, n: usize, extra: usize, inputs: &[Source<'_>], f: F) -> Result<()>
    where
        F: Fn(usize, usize, &mut [Vec<f32>], &mut [f32]) + Sync,
    {
        self.for_each_chunk_or(n, extra, inputs, |_, _| false, f)
    }

    /// Like [`Output::for_each_chunk`], but `fused(first element, the chunk's output bytes)` may fill a chunk
    /// in one pass first (returning true); the chunks it declines go through the f32 buffers.
    fn for_each_chunk_or<G, F>(
        self,
        n: usize,
        extra: usize,
        inputs: &[Source<'_>],
        fused: G,
        f: F,
    ) -> Result<()>
    where
        G: Fn(usize, &mut [u8]) -> bool + Sync,
        F: Fn(usize, usize, &mut [Vec<f32>], &mut [f32]) + Sync,
    {
        let dtype = self.dtype;
        self.for_each_chunk_raw(|c, start, out_chunk| {
            if fused(start, out_chunk) {
                return;
            }
            let len = out_chunk.len() / (dtype.bitsize() / 8);
            with_scratch(n + extra + 1, len, |bufs| {
                let (acc, x) = bufs.split_last_mut().expect("result buffer");
                for (buf, src) in x.iter_mut().zip(&inputs[..n]) {
                    src.decode(start, buf);
                }
                f(c, start, x, acc);
                encode(acc, dtype, out_chunk);
            })
        })
    }

    /// Runs `f(chunk index, first element, the chunk's output bytes to fill)` over the tensor in parallel
    /// chunks (fused kernels decode, compute and encode in one pass).
    fn for_each_chunk_raw<F>(self, f: F) -> Result<()>
    where
        F: Fn(usize, usize, &mut [u8]) + Sync,
    {
        let out_size = self.dtype.bitsize() / 8;
        match self.to {
            TensorOut::Buffer(out) => {
                out.par_chunks_mut(CHUNK * out_size)
                    .enumerate()
                    .for_each(|(c, out_chunk)| f(c, c * CHUNK, out_chunk));
                Ok(())
            }
            TensorOut::Sink(sink) => (0..self.numel.div_ceil(CHUNK))
                .into_par_iter()
                .try_for_each(|c| {
                    let len = CHUNK.min(self.numel - c * CHUNK) * out_size;
                    with_byte_scratch(len, |bytes| {
                        f(c, c * CHUNK, bytes);
                        sink(c * CHUNK * out_size, bytes)
                    })
                }),
        }
    }
}

thread_local! {
    /// Per-thread f32 scratch buffers, reused across chunks and tensors (see [`with_scratch`]).
    static SCRATCH: std::cell::Cell<Vec<Vec<f32>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Calls `f` with `count` f32 buffers of length `len` (contents arbitrary), reused from this thread's
/// earlier calls: fresh chunk-sized buffers per work unit would each be a new mapping to fault in and zero.
fn with_scratch<R>(count: usize, len: usize, f: impl FnOnce(&mut [Vec<f32>]) -> R) -> R {
    // Taken out of the cell (not borrowed), so a nested call just allocates its own.
    let mut buffers = SCRATCH.with(|s| s.take());
    if buffers.len() < count {
        buffers.resize_with(count, Vec::new);
    }
    for b in &mut buffers[..count] {
        b.resize(len, 0.0);
    }
    let result = f(&mut buffers[..count]);
    SCRATCH.with(|s| s.set(buffers));
    result
}

thread_local! {
    /// Per-thread encoded-chunk buffer for [`TensorOut::Sink`] (see [`with_byte_scratch`]).
    static BYTE_SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Calls `f` with a byte buffer of length `len` (contents arbitrary), reused from this thread's earlier calls.
fn with_byte_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buffer = BYTE_SCRATCH.with(|s| s.take());
    buffer.resize(len, 0);
    let result = f(&mut buffer);
    BYTE_SCRATCH.with(|s| s.set(buffer));
    result
}

/// mergekit's SLERP coefficients `(coef_a, coef_b)` for the whole tensor: norms and the normalised dot
/// product (accumulated here in f64), then θ and the sines in f32; plain lerp when |cos θ| > 0.9995.
pub fn slerp_coefficients(t: f32, inputs: &[Source<'_>], numel: usize) -> (f32, f32) {
    let (aa, bb, ab) = (0..numel.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let len = CHUNK.min(numel - c * CHUNK);
            let start = c * CHUNK;
            if let (Some(a), Some(b)) = (
                inputs[0].bf16_bits(start, len),
                inputs[1].bf16_bits(start, len),
            ) {
                // Straight from the bf16 inputs: same products, same order of additions.
                return with_wide_vectors!(dot_products_bf16(a: &[u16], b: &[u16]) -> (f64, f64, f64));
            }
            with_scratch(2, len, |bufs| {
                let [a, b] = bufs else {
                    unreachable!("two buffers")
                };
                inputs[0].decode(start, a);
                inputs[1].decode(start, b);
                dot_products(a, b)
            })
        })
        .reduce(|| (0.0, 0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1, p.2 + q.2));
    const EPS: f64 = 1e-8;
    let norm_a = (aa.sqrt() as f32) as f64;
    let norm_b = (bb.sqrt() as f32) as f64;
    let norm_a = if norm_a > EPS { norm_a } else { 1.0 };
    let norm_b = if norm_b > EPS { norm_b } else { 1.0 };
    let dot = ((ab / (norm_a * norm_b)) as f32).clamp(-1.0, 1.0);
    if dot.abs() > 0.9995f32 {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let sin_theta = theta.sin();
    (
        ((1.0 - t) * theta).sin() / sin_theta,
        (t * theta).sin() / sin_theta,
    )
}

/// `out = ca·a + cb·b`, element by element.
#[inline(always)]
fn interpolate(ca: f32, a: &[f32], cb: f32, b: &[f32], out: &mut [f32]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = ca * a + cb * b;
    }
}

/// `out = bf16(ca·a + cb·b)` on bf16 bit patterns: [`interpolate`] fused with decoding and encoding.
#[inline(always)]
fn interpolate_bf16(ca: f32, a: &[u16], cb: f32, b: &[u16], out: &mut [u16]) {
    const LINE: usize = 32; // bf16 elements per 64-byte cache line
    for (o, (a, b)) in out.chunks_mut(LINE).zip(a.chunks(LINE).zip(b.chunks(LINE))) {
        prefetch(a.as_ptr().wrapping_add(PREFETCH_AHEAD / 2).cast());
        prefetch(b.as_ptr().wrapping_add(PREFETCH_AHEAD / 2).cast());
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = bf16_bits(ca * bf16_to_f32(*a) + cb * bf16_to_f32(*b));
        }
    }
}

/// `acc = fma(x, w, acc)`, element by element: the product is not rounded before the sum, as in torch's
/// `addcmul_` (a fused multiply-add on CPUs that have one, which is what mergekit's linear merge runs).
#[inline(always)]
fn add_scaled(acc: &mut [f32], x: &[f32], w: f32) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = v.mul_add(w, *a);
    }
}

/// `(Σ a², Σ b², Σ ab)` in f64, over [`LANES`] independent accumulators (the loop vectorises instead of
/// waiting on one chain of additions). Products of f32 values are exact in f64; only the order of the
/// additions differs from a single running sum (as it already does between parallel chunks).
fn dot_products(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    with_wide_vectors!(dot_products_lanes(a: &[f32], b: &[f32]) -> (f64, f64, f64))
}

#[inline(always)]
fn dot_products_lanes(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    let (mut aa, mut bb, mut ab) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (x, y) in a_blocks.zip(b_blocks) {
        for l in 0..LANES {
            let (x, y) = (x[l] as f64, y[l] as f64);
            aa[l] += x * x;
            bb[l] += y * y;
            ab[l] += x * y;
        }
    }
    for (l, (&x, &y)) in a_rest.iter().zip(b_rest).enumerate() {
        let (x, y) = (x as f64, y as f64);
        aa[l] += x * x;
        bb[l] += y * y;
        ab[l] += x * y;
    }
    (aa.iter().sum(), bb.iter().sum(), ab.iter().sum())
}

/// [`dot_products_lanes`] on bf16 bit patterns (exactly the same sums, without decoding into buffers first).
#[inline(always)]
fn dot_products_bf16(a: &[u16], b: &[u16]) -> (f64, f64, f64) {
    let (mut aa, mut bb, mut ab) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (x, y) in a_blocks.zip(b_blocks) {
        prefetch(x.as_ptr().wrapping_add(PREFETCH_AHEAD / 2).cast());
        prefetch(y.as_ptr().wrapping_add(PREFETCH_AHEAD / 2).cast());
        for l in 0..LANES {
            let (x, y) = (bf16_to_f32(x[l]) as f64, bf16_to_f32(y[l]) as f64);
            aa[l] += x * x;
            bb[l] += y * y;
            ab[l] += x * y;
        }
    }
    for (l, (&x, &y)) in a_rest.iter().zip(b_rest).enumerate() {
        let (x, y) = (bf16_to_f32(x) as f64, bf16_to_f32(y) as f64);
        aa[l] += x * x;
        bb[l] += y * y;
        ab[l] += x * y;
    }
    (aa.iter().sum(), bb.iter().sum(), ab.iter().sum())
}

/// Accumulators per sum in [`dot_products`].
const LANES: usize = 16;

fn task_vector(
    p: &TaskVectorPlan,
    name: &str,
    inputs: &[Source<'_>],
    out: Output<'_>,
) -> Result<()> {
    let models = p.weights.len();
    let numel = out.numel;
    // |δ| bit patterns of one chunk, decoded in stack-sized blocks (no allocation per chunk).
    let delta_chunk = |i: usize, c: usize, out: &mut [u32]| {
        const BLOCK: usize = 1024;
        let (mut b, mut x) = ([0f32; BLOCK], [0f32; BLOCK]);
        for (k, block) in out.chunks_mut(BLOCK).enumerate() {
            let start = c * CHUNK + k * BLOCK;
            let len = block.len();
            inputs[0].decode(start, &mut b[..len]);
            inputs[i + 1].decode(start, &mut x[..len]);
            for ((o, xv), bv) in block.iter_mut().zip(&x[..len]).zip(&b[..len]) {
                *o = (xv - bv).abs().to_bits();
            }
        }
    };
    let keeps: Vec<Keep> = (0..models)
        .map(|i| {
            let density = p.densities[i];
            match p.sparsification {
                Sparsification::None => Keep::All,
                _ if density >= 1.0 => Keep::All,
                Sparsification::Magnitude if density <= 0.0 => Keep::Nothing,
                Sparsification::Magnitude => {
                    sparsify::top_k(numel, sparsify::magnitude_count(density, numel), |c, o| {
                        delta_chunk(i, c, o)
                    })
                }
                Sparsification::Random { seed } => Keep::Random {
                    key: sparsify::random_key(seed, i, name),
                    density,
                },
            }
        })
        .collect();
    // L1 rescale (mergekit's `rescaled_masked_tensor`): masked · (Σ|δ| / Σ|δ·m|), skipped below 1e-7.
    let scales: Vec<Option<f32>> = if p.rescale {
        let sums: Vec<(f64, f64)> = (0..numel.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let len = CHUNK.min(numel - c * CHUNK);
                with_scratch(3, len, |bufs| {
                    let [b, x, m] = bufs else {
                        unreachable!("three buffers")
                    };
                    inputs[0].decode(c * CHUNK, &mut b[..len]);
                    let mut sums = vec![(0f64, 0f64); models];
                    for (i, sum) in sums.iter_mut().enumerate() {
                        inputs[i + 1].decode(c * CHUNK, &mut x[..len]);
                        x[..len]
                            .iter_mut()
                            .zip(&b[..len])
                            .for_each(|(xv, bv)| *xv -= bv);
                        keeps[i].mask_chunk(c, &x[..len], &mut m[..len]);
                        for (d, k) in x[..len].iter().zip(&m[..len]) {
                            sum.0 += d.abs() as f64;
                            sum.1 += (d * k).abs() as f64;
                        }
                    }
                    sums
                })
            })
            .reduce(
                || vec![(0.0, 0.0); models],
                |a, b| {
                    a.iter()
                        .zip(&b)
                        .map(|(x, y)| (x.0 + y.0, x.1 + y.1))
                        .collect()
                },
            );
        sums.iter()
            .zip(&keeps)
            .map(|(&(before, after), keep)| {
                let (before, after) = (before as f32, after as f32);
                (*keep != Keep::All && before >= 1e-7 && after >= 1e-7).then(|| before / after)
            })
            .collect()
    } else {
        vec![None; models]
    };
    let weights = &p.weights;
    let weight_sum = weights.iter().fold(0.0f32, |a, w| a + w);
    out.for_each_chunk(models + 1, 2, inputs, |c, _start, x, acc| {
        // Structure of arrays, one branch-free pass at a time, so the compiler vectorises each.
        let (x, scratch) = x.split_at_mut(models + 1);
        let [mask, majority] = scratch else {
            unreachable!("two scratch buffers")
        };
        let (base, models_x) = x.split_first_mut().expect("base input");
        let base = &base[..];
        for (i, d) in models_x.iter_mut().enumerate() {
            d.iter_mut().zip(base).for_each(|(xv, bv)| *xv -= bv);
            keeps[i].mask_chunk(c, d, mask);
            // mergekit: δ·mask, then · rescale, then · weight (each rounded in f32).
            let w = weights[i];
            match scales[i] {
                Some(s) => d
                    .iter_mut()
                    .zip(mask.iter())
                    .for_each(|(v, m)| *v = *v * m * s * w),
                None => d
                    .iter_mut()
                    .zip(mask.iter())
                    .for_each(|(v, m)| *v = *v * m * w),
            }
        }
        // acc = Σ wᵢ δᵢ mᵢ (mixed), mask = divisor.
        acc.fill(0.0);
        if p.consensus {
            // Majority sign by sum (≥ 0 → +), then keep the contributions of that sign.
            mask.fill(0.0);
            for dw in models_x.iter() {
                acc.iter_mut().zip(dw.iter()).for_each(|(t, d)| *t += d);
            }
            majority
                .iter_mut()
                .zip(acc.iter())
                .for_each(|(s, t)| *s = if *t >= 0.0 { 1.0 } else { -1.0 });
            acc.fill(0.0);
            for (dw, w) in models_x.iter().zip(weights) {
                for (((a, dv), s), m) in acc
                    .iter_mut()
                    .zip(dw.iter())
                    .zip(majority.iter())
                    .zip(mask.iter_mut())
                {
                    // Same sign as the majority (±1) and non-zero; NaN never agrees.
                    let agrees = (dv * s > 0.0) as u8 as f32;
                    *a += dv * agrees;
                    *m += w * agrees;
                }
            }
            mask.iter_mut().for_each(|m| {
                if *m == 0.0 {
                    *m = 1.0
                }
            });
        } else {
            for dw in models_x.iter() {
                acc.iter_mut().zip(dw.iter()).for_each(|(t, d)| *t += d);
            }
            mask.fill(if weight_sum.abs() < 1e-8 {
                1.0
            } else {
                weight_sum
            });
        }
        if p.normalize {
            acc.iter_mut().zip(mask.iter()).for_each(|(a, m)| *a /= m);
        }
        if p.lambda != 1.0 {
            acc.iter_mut().for_each(|a| *a *= p.lambda);
        }
        acc.iter_mut().zip(base).for_each(|(a, b)| *a += b);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn src(b: &[u8]) -> Source<'_> {
        Source {
            bytes: b,
            dtype: Dtype::F32,
        }
    }

    #[test]
    fn ties_elects_signs_and_takes_the_disjoint_mean() {
        let base = bytes(&[0.0, 0.0, 0.0, 1.0]);
        let a = bytes(&[1.0, -2.0, 0.5, 1.0]);
        let b = bytes(&[3.0, 1.0, -0.25, 1.0]);
        let plan = TensorPlan::TaskVector(TaskVectorPlan {
            weights: vec![1.0, 1.0],
            densities: vec![1.0, 1.0],
            sparsification: Sparsification::Magnitude,
            consensus: true,
            normalize: true,
            rescale: false,
            lambda: 1.0,
        });
        let out = merge_tensor(&plan, "w", &[src(&base), src(&a), src(&b)], Dtype::F32).unwrap();
        // element 0: both +, mean 2; element 1: sum -1 → only a (-2); element 2: sum 0.25 ≥ 0 → a (0.5);
        // element 3: both δ = 0 → base.
        assert_eq!(floats(&out), vec![2.0, -2.0, 0.5, 1.0]);
    }

    #[test]
    fn fused_bf16_slerp_equals_the_general_path_bit_for_bit() {
        // Random bf16 values, a length that is no multiple of a chunk, a block or a cache line.
        let n = CHUNK * 2 + 37;
        let mut x = 0x9e37_79b9u32;
        let mut random_bf16 = || -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let v = (x as f32 / u32::MAX as f32 - 0.5) * 0.2;
                    half::bf16::from_f32(v).to_bits().to_le_bytes()
                })
                .collect()
        };
        let (a, b) = (random_bf16(), random_bf16());
        let as_f32 = |bytes: &[u8]| -> Vec<u8> {
            bytes
                .chunks_exact(2)
                .flat_map(|h| bf16_to_f32(u16::from_le_bytes([h[0], h[1]])).to_le_bytes())
                .collect()
        };
        let bf16 = |bytes| Source {
            bytes,
            dtype: Dtype::BF16,
        };
        let plan = TensorPlan::Slerp { t: 0.3 };
        let fused = merge_tensor(&plan, "w", &[bf16(&a), bf16(&b)], Dtype::BF16).unwrap();
        // The same values as f32 inputs take the general path (decode, interpolate, encode).
        let (a32, b32) = (as_f32(&a), as_f32(&b));
        let general = merge_tensor(&plan, "w", &[src(&a32), src(&b32)], Dtype::BF16).unwrap();
        assert_eq!(fused, general);
        // bf16 inputs at an odd address cannot be read as u16s: the fallback gives the same bytes.
        let mut shifted = vec![0u8; a.len() + 1];
        shifted[1..].copy_from_slice(&a);
        let unaligned =
            merge_tensor(&plan, "w", &[bf16(&shifted[1..]), bf16(&b)], Dtype::BF16).unwrap();
        assert_eq!(unaligned, general);
    }

    #[test]
    fn slerp_ends_and_orthogonal_midpoint() {
        let a = bytes(&[1.0, 0.0]);
        let b = bytes(&[0.0, 1.0]);
        let at = |t| {
            floats(
                &merge_tensor(
                    &TensorPlan::Slerp { t },
                    "w",
                    &[src(&a), src(&b)],
                    Dtype::F32,
                )
                .unwrap(),
            )
        };
        assert_eq!(at(0.0), vec![1.0, 0.0]);
        let mid = at(0.5);
        assert!(
            (mid[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6
                && (mid[1] - mid[0]).abs() < 1e-7
        );
        // Collinear: lerp.
        let c = bytes(&[2.0, 0.0]);
        let lerp = merge_tensor(
            &TensorPlan::Slerp { t: 0.25 },
            "w",
            &[src(&a), src(&c)],
            Dtype::F32,
        )
        .unwrap();
        assert_eq!(floats(&lerp), vec![1.25, 0.0]);
    }
}
