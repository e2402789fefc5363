//! Whole-tensor merges in a compute dtype, as mergekit runs them: every input tensor is cast to the compute
//! dtype (mergekit's `dtype`), and every elementwise torch operation rounds its result to that dtype
//! (`dtype: bfloat16` is bf16 arithmetic: an op computes in f32 and rounds once, reductions accumulate in
//! f32 and round once). With `float32` the rounding is the identity and the arithmetic is plain f32.
//!
//! This runs the methods the streaming kernels ([`super::methods`]) do not (`model_stock`, `breadcrumbs`,
//! `della`, `nuslerp`, `multislerp`, `karcher`, `sce`, `nearswap`) and every method of a mergekit YAML
//! config, since those may ask for bf16 arithmetic. Each function follows the operation order of mergekit
//! 0.1.5's implementation, because the order decides the roundings.

use super::elements::{encode, Source};
use super::methods::TensorPlan;
use super::params::{Param, TensorPosition};
use super::plan::{TensorDescription, TensorPlanner};
use super::sparsify::{self, Keep, CHUNK};
use super::{Method, METHODS};
use crate::spec::DType;
use anyhow::{anyhow, bail, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;

/// The dtype a merge computes in: what each operation rounds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute(pub DType);

impl Compute {
    /// `x` rounded to the compute dtype (round-to-nearest-even, as torch casts).
    #[inline]
    pub fn r(self, x: f32) -> f32 {
        match self.0 {
            DType::F32 => x,
            DType::Bf16 => half::bf16::from_f32(x).to_f32(),
            DType::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    fn round_all(self, v: &mut [f32]) {
        if self.0 != DType::F32 {
            v.iter_mut().for_each(|x| *x = self.r(*x));
        }
    }

    /// A reduction's result: accumulated in f64 (torch accumulates reduced precision in f32, f32 with
    /// pairwise sums; both round to the same value but for rare last-place cases), rounded to f32 and then
    /// to the compute dtype.
    fn reduce(self, sum: f64) -> f32 {
        self.r(sum as f32)
    }

    fn sum(self, v: impl Iterator<Item = f32>) -> f32 {
        self.reduce(v.map(f64::from).sum())
    }

    fn norm(self, v: &[f32]) -> f32 {
        self.reduce(
            v.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt(),
        )
    }
}

/// A parameter as a mergekit config writes it: a number (or gradient, or filters), or a flag.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A number, gradient or filtered number.
    Number(Param),
    /// `true` / `false`.
    Flag(bool),
}

/// Per-tensor parameters: the model-level (mergekit's `NON_BASE`/`INPUT` scope) values per non-base model
/// and the method-level ones, resolved for a tensor by filters and layer position.
#[derive(Debug, Clone, Default)]
pub struct MethodParams {
    /// Method-level parameters (mergekit's top-level `parameters`).
    pub global: BTreeMap<String, ParamValue>,
    /// Per non-base model (in input order), overriding `global`.
    pub per_model: Vec<BTreeMap<String, ParamValue>>,
    /// Consulted after `global` (the top-level parameters when `global` holds a slice's).
    pub outer: BTreeMap<String, ParamValue>,
}

impl MethodParams {
    /// The number `key` for tensor `name` at `pos`: model `model`'s value, else the method-level one.
    pub fn number(
        &self,
        model: Option<usize>,
        key: &str,
        name: &str,
        pos: TensorPosition,
    ) -> Result<Option<f64>> {
        // mergekit tries the model's setting, then the slice's, then the top-level one; a filter list that
        // matches nothing falls through to the next.
        let scoped = model
            .and_then(|i| self.per_model.get(i))
            .and_then(|m| m.get(key));
        for value in [scoped, self.global.get(key), self.outer.get(key)]
            .into_iter()
            .flatten()
        {
            match value {
                ParamValue::Number(p) => {
                    if let Some(v) = p.resolve(name, pos) {
                        return Ok(Some(v));
                    }
                }
                ParamValue::Flag(b) => bail!("`{key}` is a number, not {b}"),
            }
        }
        Ok(None)
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.global.get(key).or_else(|| self.outer.get(key)) {
            None => Ok(default),
            Some(ParamValue::Flag(b)) => Ok(*b),
            Some(ParamValue::Number(Param::Value(v))) if *v == 0.0 || *v == 1.0 => Ok(*v == 1.0),
            Some(_) => bail!("`{key}` is true or false"),
        }
    }
}

/// Plans every tensor of a whole-tensor merge (see the module documentation).
pub struct WholePlanner {
    /// The method.
    pub method: Method,
    /// Whether input 0 is the base model.
    pub has_base: bool,
    /// Its parameters.
    pub params: MethodParams,
    /// The compute dtype (`None`: each tensor's promoted input dtype).
    pub compute: Option<DType>,
    /// Seed of the random masks (DARE, DELLA).
    pub seed: u64,
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::Bf16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// torch's type promotion among float inputs: equal types stay, anything mixed becomes f32.
pub fn promoted(dtypes: impl IntoIterator<Item = Dtype>) -> Option<DType> {
    let mut out: Option<DType> = None;
    for d in dtypes {
        let d = dtype_of(d)?;
        out = Some(match out {
            None => d,
            Some(o) if o == d => o,
            Some(_) => DType::F32,
        });
    }
    out
}

impl TensorPlanner for WholePlanner {
    fn describe(&self) -> String {
        self.method.name().to_string()
    }

    fn plan(&mut self, _: &TensorDescription<'_>, _: &[Source<'_>]) -> Result<Option<TensorPlan>> {
        Ok(None)
    }

    fn merge_values(
        &mut self,
        tensor: &TensorDescription<'_>,
        inputs: &[Source<'_>],
        out_dtype: Dtype,
    ) -> Result<Vec<u8>> {
        let compute = Compute(match self.compute {
            Some(d) => d,
            None => promoted(inputs.iter().map(|s| s.dtype))
                .ok_or_else(|| anyhow!("tensor {:?} is not a float tensor", tensor.name))?,
        });
        let numel = inputs.first().map(Source::numel).unwrap_or(0);
        let values: Vec<Vec<f32>> = inputs
            .iter()
            .map(|s| {
                let mut v = vec![0f32; numel];
                s.decode(0, &mut v);
                compute.round_all(&mut v);
                v
            })
            .collect();
        let (base, models) = if self.has_base {
            (Some(&values[0]), &values[1..])
        } else {
            (None, &values[..])
        };
        let ctx = TensorCtx {
            name: tensor.name,
            shape: tensor.shape,
            pos: tensor.position,
            c: compute,
            params: &self.params,
            seed: self.seed,
        };
        let merged = merge(self.method, &ctx, base, models)?;
        let mut out = vec![0u8; numel * out_dtype.bitsize() / 8];
        encode(&merged, out_dtype, &mut out);
        Ok(out)
    }
}

struct TensorCtx<'a> {
    name: &'a str,
    shape: &'a [usize],
    pos: TensorPosition,
    c: Compute,
    params: &'a MethodParams,
    seed: u64,
}

impl TensorCtx<'_> {
    fn num(&self, model: Option<usize>, key: &str, default: Option<f64>) -> Result<f64> {
        self.params
            .number(model, key, self.name, self.pos)?
            .or(default)
            .ok_or_else(|| match model {
                Some(i) => anyhow!("`{key}` is not set for model {i} (tensor {:?})", self.name),
                None => anyhow!("`{key}` is not set (tensor {:?})", self.name),
            })
    }

    /// Rows of the tensor as mergekit's row-wise methods see it: `(rows, columns)`, a 1-D tensor is one row.
    fn rows(&self) -> (usize, usize) {
        let numel: usize = self.shape.iter().product();
        match self.shape {
            [] => (1, 1),
            [n] => (1, *n),
            [first, ..] if *first > 0 => (*first, numel / first),
            _ => (0, 0),
        }
    }
}

fn merge(
    method: Method,
    t: &TensorCtx<'_>,
    base: Option<&Vec<f32>>,
    models: &[Vec<f32>],
) -> Result<Vec<f32>> {
    let need_base = || base.ok_or_else(|| anyhow!("method `{}` needs a base model", method.name()));
    match method {
        Method::Linear => linear(t, models),
        Method::Slerp => {
            let (a, b) = match (base, models) {
                (Some(a), [b]) => (a, b),
                (None, [a, b]) => (a, b),
                _ => bail!("slerp merges exactly two models"),
            };
            slerp(t, a, b)
        }
        Method::TaskArithmetic
        | Method::Ties
        | Method::DareLinear
        | Method::DareTies
        | Method::Breadcrumbs
        | Method::BreadcrumbsTies
        | Method::Della
        | Method::DellaLinear => task_arithmetic(method, t, need_base()?, models),
        Method::ModelStock => model_stock(t, need_base()?, models),
        Method::Nearswap => match models {
            [b] => nearswap(t, need_base()?, b),
            _ => bail!("nearswap merges a base and exactly one model"),
        },
        Method::Sce => sce(t, need_base()?, models),
        Method::Karcher => karcher(t, base, models),
        Method::Multislerp => multislerp(t, base, models),
        Method::Nuslerp => nuslerp(t, base, models),
    }
}

/// mergekit's `linear`: f32 accumulation with fused multiply-adds, divided by the f32 weight sum, then cast
/// to the compute dtype.
fn linear(t: &TensorCtx<'_>, models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let weights = (0..models.len())
        .map(|i| t.num(Some(i), "weight", None).map(|w| w as f32))
        .collect::<Result<Vec<f32>>>()?;
    let normalize = t.params.flag("normalize", true)?;
    let denominator = weights.iter().fold(0f32, |a, w| a + w);
    let mut acc = vec![0f32; models.first().map_or(0, Vec::len)];
    for (x, w) in models.iter().zip(&weights) {
        acc.iter_mut()
            .zip(x)
            .for_each(|(a, v)| *a = v.mul_add(*w, *a));
    }
    if normalize {
        acc.iter_mut().for_each(|a| *a /= denominator);
    }
    t.c.round_all(&mut acc);
    Ok(acc)
}

/// mergekit's `slerp`: in f32 over the flattened tensor, the result stored in the compute dtype.
fn slerp(t: &TensorCtx<'_>, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let factor = t.num(None, "t", None)? as f32;
    const EPS: f64 = 1e-8;
    let norm = |v: &[f32]| {
        (v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt() as f32) as f64
    };
    let (na, nb) = (norm(a), norm(b));
    let na = if na > EPS { na as f32 } else { 1.0 };
    let nb = if nb > EPS { nb as f32 } else { 1.0 };
    let dot = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from((x / na) * (y / nb)))
        .sum::<f64>() as f32;
    let dot = dot.clamp(-1.0, 1.0);
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - factor, factor)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (
            ((1.0 - factor) * theta).sin() / s,
            (factor * theta).sin() / s,
        )
    };
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| t.c.r(ca * x + cb * y))
        .collect())
}

/// The sparsification of a task-vector method.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Thinning {
    None,
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

fn thinning(method: Method) -> (Thinning, bool) {
    match method {
        Method::TaskArithmetic => (Thinning::None, false),
        Method::Ties => (Thinning::Magnitude, true),
        Method::DareLinear => (Thinning::Random, false),
        Method::DareTies => (Thinning::Random, true),
        Method::Breadcrumbs => (Thinning::MagnitudeOutliers, false),
        Method::BreadcrumbsTies => (Thinning::MagnitudeOutliers, true),
        Method::Della => (Thinning::DellaMagprune, true),
        Method::DellaLinear => (Thinning::DellaMagprune, false),
        other => unreachable!("{} is not a task-vector method", other.name()),
    }
}

/// Indices `0..n` by ascending `|v|` (as f32, as mergekit sorts), ties by index: a stable, deterministic
/// stand-in for torch's unstable sort (the order of equal magnitudes is unspecified there).
fn ascending_magnitudes(v: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].abs().total_cmp(&v[j].abs()).then(i.cmp(&j)));
    order
}

/// mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*).
fn task_arithmetic(
    method: Method,
    t: &TensorCtx<'_>,
    base: &[f32],
    models: &[Vec<f32>],
) -> Result<Vec<f32>> {
    let c = t.c;
    let spec = method.spec();
    if models.is_empty() {
        return Ok(base.to_vec());
    }
    let (thin, consensus) = thinning(method);
    let rescale = t.params.flag("rescale", spec.default_rescale)?;
    let normalize = t.params.flag("normalize", spec.default_normalize)?;
    let lambda = t.num(None, "lambda", Some(1.0))?;
    let n = base.len();
    let mut deltas = Vec::with_capacity(models.len());
    for (i, x) in models.iter().enumerate() {
        let delta: Vec<f32> = x.iter().zip(base).map(|(x, b)| c.r(x - b)).collect();
        let density = t.num(Some(i), "density", Some(1.0))?;
        let mask: Option<Vec<f32>> = match thin {
            Thinning::None => None,
            _ if density >= 1.0 => None,
            Thinning::Magnitude if density <= 0.0 || n == 0 => Some(vec![0.0; n]),
            Thinning::Magnitude => {
                let keep =
                    sparsify::top_k(n, sparsify::magnitude_count(density, n), |chunk, out| {
                        let start = chunk * CHUNK;
                        out.iter_mut()
                            .zip(&delta[start..])
                            .for_each(|(o, d)| *o = d.abs().to_bits());
                    });
                Some(mask_of(&keep, &delta))
            }
            Thinning::Random => {
                // torch draws Bernoulli(p) with p stored in the work dtype (bf16 stays bf16 on the CPU).
                let p = if c.0 == DType::Bf16 {
                    f64::from(c.r(density as f32))
                } else {
                    density
                };
                let key = sparsify::random_key(t.seed, i, t.name);
                Some(
                    (0..n)
                        .map(|j| (sparsify::uniform(key, j as u64) < p) as u8 as f32)
                        .collect(),
                )
            }
            Thinning::MagnitudeOutliers => {
                let gamma = t.num(Some(i), "gamma", Some(0.01))?;
                let target = (density * n as f64) as usize;
                let top = (gamma * n as f64) as usize;
                let bottom = n.saturating_sub(target + top);
                let order = ascending_magnitudes(&delta);
                let mut mask = vec![0f32; n];
                order[bottom.min(n)..(bottom + target).min(n)]
                    .iter()
                    .for_each(|&j| mask[j] = 1.0);
                Some(mask)
            }
            Thinning::DellaMagprune => {
                if density <= 0.0 {
                    Some(vec![0.0; n])
                } else {
                    let epsilon = t.num(Some(i), "epsilon", Some(0.15))?;
                    if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                        bail!(
                            "della: epsilon {epsilon} with density {density} leaves (0, 1): choose density ± epsilon inside it"
                        );
                    }
                    Some(della_mask(t, i, &delta, density, epsilon))
                }
            }
        };
        let delta = match mask {
            None => delta,
            Some(mask) => rescaled(c, &delta, &mask, rescale),
        };
        deltas.push(delta);
    }
    let weights = (0..models.len())
        .map(|i| t.num(Some(i), "weight", None).map(|w| c.r(w as f32)))
        .collect::<Result<Vec<f32>>>()?;
    for (d, w) in deltas.iter_mut().zip(&weights) {
        d.iter_mut().for_each(|v| *v = c.r(*v * w));
    }
    let mut mixed = vec![0f32; n];
    let mut divisor = vec![0f32; n];
    if consensus {
        for j in 0..n {
            let sign_weight = c.sum(deltas.iter().map(|d| d[j]));
            let majority = if sign_weight >= 0.0 { 1.0 } else { -1.0 };
            let (mut m, mut dv) = (0f64, 0f64);
            for (d, w) in deltas.iter().zip(&weights) {
                let sign = if d[j] > 0.0 {
                    1.0
                } else if d[j] < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                if sign == majority {
                    m += f64::from(d[j]);
                    dv += f64::from(*w);
                }
            }
            mixed[j] = c.reduce(m);
            let dv = c.reduce(dv);
            divisor[j] = if dv == 0.0 { 1.0 } else { dv };
        }
    } else {
        let total = c.sum(weights.iter().copied());
        let total = if total.abs() < 1e-8 { 1.0 } else { total };
        for (j, m) in mixed.iter_mut().enumerate() {
            *m = c.sum(deltas.iter().map(|d| d[j]));
        }
        divisor.fill(total);
    }
    if normalize {
        mixed
            .iter_mut()
            .zip(&divisor)
            .for_each(|(m, d)| *m = c.r(*m / d));
    }
    if lambda != 1.0 {
        let l = lambda as f32;
        mixed.iter_mut().for_each(|m| *m = c.r(*m * l));
    }
    Ok(base.iter().zip(&mixed).map(|(b, m)| c.r(b + m)).collect())
}

fn mask_of(keep: &Keep, delta: &[f32]) -> Vec<f32> {
    let mut mask = vec![0f32; delta.len()];
    for (chunk, (d, m)) in delta.chunks(CHUNK).zip(mask.chunks_mut(CHUNK)).enumerate() {
        keep.mask_chunk(chunk, d, m);
    }
    mask
}

/// mergekit's `rescaled_masked_tensor` with the L1 norm (or none): `δ·m`, times `Σ|δ| / Σ|δ·m|` unless
/// either is below 1e-7.
fn rescaled(c: Compute, delta: &[f32], mask: &[f32], rescale: bool) -> Vec<f32> {
    let masked: Vec<f32> = delta.iter().zip(mask).map(|(d, m)| c.r(d * m)).collect();
    if !rescale {
        return masked;
    }
    let before = c.sum(delta.iter().map(|d| d.abs()));
    let after = c.sum(masked.iter().map(|d| d.abs()));
    if before < 1e-7 || after < 1e-7 {
        return masked;
    }
    let scale = c.r(before / after);
    masked.iter().map(|m| c.r(m * scale)).collect()
}

/// DELLA's MagPrune mask: per row, keep element `j` with probability `density − ε + 2ε·rank/(n−1)`, rank by
/// ascending magnitude (ties by index), drawn with the DARE counter generator keyed by (seed, model, tensor).
fn della_mask(
    t: &TensorCtx<'_>,
    model: usize,
    delta: &[f32],
    density: f64,
    epsilon: f64,
) -> Vec<f32> {
    let c = t.c;
    // torch computes the probabilities in the work dtype: f32 on the CPU for f32 tensors, bf16 for bf16.
    let work = if c.0 == DType::Bf16 {
        c
    } else {
        Compute(DType::F32)
    };
    let (rows, cols) = t.rows();
    let key = sparsify::random_key(t.seed, model, t.name);
    let mut mask = vec![0f32; delta.len()];
    let (low, eps) = ((density - epsilon) as f32, epsilon as f32);
    let rank_of = |rank0: usize| work.r(work.r(rank0 as f32) + 1.0);
    for r in 0..rows {
        let row = &delta[r * cols..(r + 1) * cols];
        let order = ascending_magnitudes(row);
        let (min_rank, max_rank) = (rank_of(0), rank_of(cols.saturating_sub(1)));
        for (rank0, &j) in order.iter().enumerate() {
            let rank = rank_of(rank0);
            let norm = work
                .r(work.r(rank - min_rank) / work.r(max_rank - min_rank))
                .clamp(0.0, 1.0);
            let p = work.r(low + work.r(work.r(norm * 2.0) * eps));
            let index = r * cols + j;
            mask[index] = (sparsify::uniform(key, index as u64) < f64::from(p)) as u8 as f32;
        }
    }
    mask
}

/// mergekit's `model_stock`: the interpolation ratio from the mean pairwise cosine of the task vectors
/// (over the whole tensor, or per row with `filter_wise`).
fn model_stock(t: &TensorCtx<'_>, base: &[f32], models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let c = t.c;
    if models.len() < 2 {
        bail!(
            "model_stock needs a base and at least two other models (got {})",
            models.len()
        );
    }
    let filter_wise = t.params.flag("filter_wise", false)?;
    let (rows, cols) = if filter_wise {
        t.rows()
    } else {
        (1, base.len())
    };
    let count = models.len();
    let offsets: Vec<Vec<f32>> = models
        .iter()
        .map(|w| w.iter().zip(base).map(|(x, b)| c.r(x - b)).collect())
        .collect();
    let mut average = models[0].clone();
    for w in &models[1..] {
        average
            .iter_mut()
            .zip(w)
            .for_each(|(a, x)| *a = c.r(*a + x));
    }
    let count_f = count as f32;
    average.iter_mut().for_each(|a| *a = c.r(*a / count_f));
    let mut out = vec![0f32; base.len()];
    for r in 0..rows {
        let span = r * cols..(r + 1) * cols;
        let mut cosines = Vec::new();
        for (i, a) in offsets.iter().enumerate() {
            for b in &offsets[i + 1..] {
                let (a, b) = (&a[span.clone()], &b[span.clone()]);
                let norm_product = c.r(c.norm(a) * c.norm(b));
                let dot = c.sum(a.iter().zip(b).map(|(x, y)| c.r(x * y)));
                cosines.push(c.r(dot / norm_product.max(1e-6)).clamp(-1.0, 1.0));
            }
        }
        let cos =
            c.reduce(cosines.iter().map(|&x| f64::from(x)).sum::<f64>() / cosines.len() as f64);
        let denominator = c.r(1.0 + c.r((count as f32 - 1.0) * cos));
        let ratio = if denominator.abs() < 1e-6 {
            0.0
        } else {
            c.r(c.r(count_f * cos) / denominator)
        };
        let rest = c.r(1.0 - ratio);
        for j in span {
            out[j] = c.r(c.r(ratio * average[j]) + c.r(rest * base[j]));
        }
    }
    Ok(out)
}

/// mergekit's `nearswap`: move the base towards the model by `t / |base − model|` (clamped to [0, 1]).
fn nearswap(t: &TensorCtx<'_>, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let c = t.c;
    let factor = t.num(None, "t", None)? as f32;
    Ok(a.iter()
        .zip(b)
        .map(|(a, b)| {
            let absdiff = c.r(a - b).abs();
            // torch's `t / x` is `x.reciprocal() * t`: two roundings.
            let weight = c
                .r(c.r(1.0 / c.r(absdiff.max(1e-6))) * factor)
                .clamp(0.0, 1.0);
            c.r(c.r(weight * b) + c.r(c.r(1.0 - weight) * a))
        })
        .collect())
}

/// Elementwise sign consensus by sum (TIES): `mask[i][j]` = sign of `tv[i][j]` equals the majority sign.
fn consensus_masks(c: Compute, tvs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let n = tvs.first().map_or(0, Vec::len);
    let mut masks = vec![vec![0f32; n]; tvs.len()];
    for j in 0..n {
        let majority = if c.sum(tvs.iter().map(|t| t[j])) >= 0.0 {
            1.0
        } else {
            -1.0
        };
        for (m, tv) in masks.iter_mut().zip(tvs) {
            let sign = if tv[j] > 0.0 {
                1.0
            } else if tv[j] < 0.0 {
                -1.0
            } else {
                0.0
            };
            m[j] = (sign == majority) as u8 as f32;
        }
    }
    masks
}

/// mergekit's `sce`: select the top-`select_topk` elements by variance across models, erase minority
/// signs, weight each task vector by its mean square.
fn sce(t: &TensorCtx<'_>, base: &[f32], models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let c = t.c;
    if models.is_empty() {
        return Ok(base.to_vec());
    }
    let n = base.len();
    let select = t.num(None, "select_topk", Some(1.0))?;
    let mut tvs: Vec<Vec<f32>> = models
        .iter()
        .map(|x| x.iter().zip(base).map(|(x, b)| c.r(x - b)).collect())
        .collect();
    if select < 1.0 {
        let mask: Vec<f32> = if select <= 0.0 {
            vec![0.0; n]
        } else {
            let m = tvs.len() as f64;
            let var: Vec<f32> = (0..n)
                .map(|j| {
                    let mean = tvs.iter().map(|t| f64::from(t[j])).sum::<f64>() / m;
                    c.reduce(
                        tvs.iter()
                            .map(|t| (f64::from(t[j]) - mean).powi(2))
                            .sum::<f64>()
                            / m,
                    )
                })
                .collect();
            let nonzero = var.iter().filter(|v| **v != 0.0).count();
            let k = (nonzero as f64 * select) as usize;
            let mut mask = vec![0f32; n];
            if k > 0 {
                // The k largest |var|; equal values by lower index (torch.topk leaves their order open).
                let mut top: Vec<usize> = (0..n).collect();
                top.sort_by(|&i, &j| var[j].abs().total_cmp(&var[i].abs()).then(i.cmp(&j)));
                top[..k].iter().for_each(|&j| mask[j] = 1.0);
            }
            mask
        };
        for tv in &mut tvs {
            tv.iter_mut().zip(&mask).for_each(|(v, m)| *v = c.r(*v * m));
        }
    }
    let erase = consensus_masks(c, &tvs);
    let mean_squares: Vec<f32> = tvs
        .iter()
        .map(|tv| c.reduce(tv.iter().map(|v| f64::from(c.r(v * v))).sum::<f64>() / n.max(1) as f64))
        .collect();
    let weight_sum = c.sum(mean_squares.iter().copied());
    let weights: Vec<f32> = if weight_sum.abs() < 1e-6 {
        vec![c.r(1.0 / mean_squares.len() as f32); mean_squares.len()]
    } else {
        mean_squares.iter().map(|w| c.r(w / weight_sum)).collect()
    };
    Ok((0..n)
        .map(|j| {
            let erased: Vec<f32> = weights
                .iter()
                .zip(&erase)
                .map(|(w, m)| c.r(w * m[j]))
                .collect();
            let merged = c.sum(tvs.iter().zip(&erased).map(|(tv, w)| c.r(tv[j] * w)));
            let total = c.sum(erased.iter().copied()).max(1e-6);
            c.r(base[j] + c.r(merged / total))
        })
        .collect())
}

/// mergekit's `karcher`: the weighted Riemannian mean of the directions on the unit sphere (fixed-point
/// iteration), scaled by the mean norm. Norms in f32, tensors in the compute dtype.
fn karcher(t: &TensorCtx<'_>, base: Option<&Vec<f32>>, models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let c = t.c;
    let tensors: Vec<&Vec<f32>> = base.into_iter().chain(models).collect();
    if tensors.len() == 1 {
        return Ok(tensors[0].clone());
    }
    let max_iter = t.num(None, "max_iter", Some(10.0))? as usize;
    let tol = t.num(None, "tol", Some(1e-5))?;
    let f32norm = |v: &[f32]| {
        v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt() as f32
    };
    let n = tensors[0].len();
    let alpha = 1.0 / tensors.len() as f64;
    let norms: Vec<f32> = tensors.iter().map(|v| f32norm(v)).collect();
    let units: Vec<Vec<f32>> = tensors
        .iter()
        .zip(&norms)
        .map(|(v, &nv)| {
            if nv == 0.0 {
                vec![0.0; n]
            } else {
                v.iter().map(|x| c.r(x / nv)).collect()
            }
        })
        .collect();
    let valid: Vec<usize> = (0..tensors.len())
        .filter(|&i| f64::from(norms[i]) > tol)
        .collect();
    if valid.is_empty() {
        return Ok(vec![0.0; n]);
    }
    let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
    let alphas: Vec<f32> = valid.iter().map(|_| (alpha / alpha_sum) as f32).collect();
    let mut mean = vec![0f32; n];
    for (a, &i) in alphas.iter().zip(&valid) {
        mean.iter_mut()
            .zip(&units[i])
            .for_each(|(m, u)| *m = c.r(*m + c.r(a * u)));
    }
    let mean_norm = f32norm(&mean);
    mean = if f64::from(mean_norm) < tol {
        units[valid[0]].clone()
    } else {
        mean.iter().map(|m| c.r(m / mean_norm)).collect()
    };
    for _ in 0..max_iter {
        let mut tangent = vec![0f32; n];
        for (a, &i) in alphas.iter().zip(&valid) {
            let u = &units[i];
            let dot = c
                .sum(mean.iter().zip(u).map(|(m, x)| m * x))
                .clamp(-1.0, 1.0);
            let theta = c.r(dot.acos());
            if f64::from(theta) < tol {
                continue;
            }
            let coefficient = c.r(a * c.r(theta / c.r(theta.sin())));
            tangent
                .iter_mut()
                .zip(u.iter().zip(&mean))
                .for_each(|(tg, (x, m))| *tg = c.r(*tg + c.r(coefficient * c.r(x - c.r(dot * m)))));
        }
        let tangent_norm = f32norm(&tangent);
        if f64::from(tangent_norm) < tol {
            break;
        }
        let (cos, sin) = (tangent_norm.cos(), tangent_norm.sin());
        mean = mean
            .iter()
            .zip(&tangent)
            .map(|(m, tg)| c.r(c.r(cos * m) + c.r(sin * c.r(tg / tangent_norm))))
            .collect();
        let unit_norm = f32norm(&mean);
        if f64::from(unit_norm) > tol {
            mean.iter_mut().for_each(|m| *m = c.r(*m / unit_norm));
        }
    }
    let scale = norms.iter().fold(0f32, |s, nv| s + (alpha as f32) * nv);
    Ok(mean.iter().map(|m| c.r(scale * m)).collect())
}

/// mergekit's `multislerp`: barycentric interpolation on the hypersphere of the (base-relative) tensors.
fn multislerp(t: &TensorCtx<'_>, base: Option<&Vec<f32>>, models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let c = t.c;
    const EPS: f32 = 1e-8;
    if models.len() == 1 {
        return Ok(models[0].clone());
    }
    let n = models.first().map_or(0, Vec::len);
    let tensors: Vec<Vec<f32>> = models
        .iter()
        .map(|x| match base {
            Some(b) => x.iter().zip(b).map(|(x, b)| c.r(x - b)).collect(),
            None => x.clone(),
        })
        .collect();
    let mut weights = (0..models.len())
        .map(|i| t.num(Some(i), "weight", None).map(|w| c.r(w as f32)))
        .collect::<Result<Vec<f32>>>()?;
    if t.params.flag("normalize_weights", true)? {
        let total = c.sum(weights.iter().copied());
        weights.iter_mut().for_each(|w| *w = c.r(*w / total));
    }
    let norms: Vec<f32> = tensors.iter().map(|v| c.norm(v)).collect();
    let units: Vec<Vec<f32>> = tensors
        .iter()
        .zip(&norms)
        .map(|(v, nv)| {
            let d = c.r(nv + EPS);
            v.iter().map(|x| c.r(x / d)).collect()
        })
        .collect();
    let mut mean: Vec<f32> = (0..n)
        .map(|j| c.sum(units.iter().zip(&weights).map(|(u, w)| c.r(u[j] * w))))
        .collect();
    let mean_norm = c.norm(&mean);
    let add_base = |mut v: Vec<f32>| {
        if let Some(b) = base {
            v.iter_mut().zip(b).for_each(|(x, b)| *x = c.r(*x + b));
        }
        v
    };
    if mean_norm < EPS {
        if tensors.len() == 2 {
            let lerp = (0..n)
                .map(|j| c.r(c.r(tensors[0][j] * weights[0]) + c.r(tensors[1][j] * weights[1])))
                .collect();
            return Ok(add_base(lerp));
        }
        bail!("multislerp: the weighted sum of the directions of tensor {:?} is zero (antipodal inputs); change the weights", t.name);
    }
    mean.iter_mut().for_each(|m| *m = c.r(*m / mean_norm));
    let tangents: Vec<Vec<f32>> = units
        .iter()
        .map(|u| {
            let dot = c.sum(u.iter().zip(&mean).map(|(x, m)| c.r(x * m)));
            u.iter()
                .zip(&mean)
                .map(|(x, m)| c.r(x - c.r(dot * m)))
                .collect()
        })
        .collect();
    let tangent: Vec<f32> = (0..n)
        .map(|j| c.sum(tangents.iter().zip(&weights).map(|(tg, w)| c.r(tg[j] * w))))
        .collect();
    let tangent_norm = c.r(c.norm(&tangent) + EPS);
    let (cos, sin_over) = (
        c.r(tangent_norm.cos()),
        c.r(c.r(tangent_norm.sin()) / tangent_norm),
    );
    let average_norm = c.sum(norms.iter().zip(&weights).map(|(nv, w)| c.r(nv * w)));
    let result = (0..n)
        .map(|j| c.r(c.r(c.r(mean[j] * cos) + c.r(tangent[j] * sin_over)) * average_norm))
        .collect();
    Ok(add_base(result))
}

/// mergekit's `nuslerp`: SLERP of two models (or of their task vectors against a base) by
/// `t = w₁ / (w₀ + w₁)`, over the flattened tensor (default), its rows, or its columns (`nuslerp_row_wise`).
fn nuslerp(t: &TensorCtx<'_>, base: Option<&Vec<f32>>, models: &[Vec<f32>]) -> Result<Vec<f32>> {
    let c = t.c;
    let [x0, x1] = models else {
        bail!(
            "nuslerp merges exactly two models (besides an optional base); got {}",
            models.len()
        );
    };
    let w0 = t.num(Some(0), "weight", None)?;
    let w1 = t.num(Some(1), "weight", None)?;
    let total = w0 + w1;
    let factor = if total.abs() < 1e-6 { 0.5 } else { w1 / total };
    let flatten = t.params.flag("nuslerp_flatten", true)?;
    let row_wise = t.params.flag("nuslerp_row_wise", false)?;
    let (v0, v1): (Vec<f32>, Vec<f32>) = match base {
        Some(b) => (
            x0.iter().zip(b).map(|(x, b)| c.r(x - b)).collect(),
            x1.iter().zip(b).map(|(x, b)| c.r(x - b)).collect(),
        ),
        None => (x0.clone(), x1.clone()),
    };
    let n = v0.len();
    // Vectors as (count, length, stride between elements, stride between vectors).
    let (count, length, step, vstep) = if flatten {
        (1, n, 1, n)
    } else {
        let (rows, cols) = t.rows();
        if row_wise && t.shape.len() >= 2 {
            (cols, rows, cols, 1)
        } else {
            (rows, cols, 1, cols)
        }
    };
    let mut out = vec![0f32; n];
    let (one_minus, tf) = ((1.0 - factor) as f32, factor as f32);
    const EPS: f32 = 1e-8;
    for v in 0..count {
        let idx = |k: usize| v * vstep + k * step;
        let a: Vec<f32> = (0..length).map(|k| v0[idx(k)]).collect();
        let b: Vec<f32> = (0..length).map(|k| v1[idx(k)]).collect();
        let unit = |x: &[f32]| -> Vec<f32> {
            let nv = c.norm(x).max(1e-7);
            x.iter().map(|e| c.r(e / nv)).collect()
        };
        let (ua, ub) = (unit(&a), unit(&b));
        let cos = c
            .sum(ua.iter().zip(&ub).map(|(x, y)| c.r(x * y)))
            .clamp(-1.0, 1.0);
        let colinear = c.r(1.0 - c.r(cos * cos)) <= EPS * EPS;
        for k in 0..length {
            out[idx(k)] = if colinear {
                c.r(c.r(one_minus * a[k]) + c.r(tf * b[k]))
            } else {
                let theta = c.r(cos.acos());
                let sin = c.r(theta.sin());
                let sa = c.r(c.r(one_minus * theta).sin());
                let sb = c.r(c.r(tf * theta).sin());
                c.r(c.r(c.r(sa * a[k]) + c.r(sb * b[k])) / sin)
            };
        }
    }
    if let Some(b) = base {
        out.iter_mut().zip(b).for_each(|(o, b)| *o = c.r(b + *o));
    }
    Ok(out)
}

/// Every method row is reachable here (tested): the names a mergekit config may use.
pub fn whole_tensor_methods() -> impl Iterator<Item = Method> {
    METHODS.iter().map(|m| m.method)
}
