//! AdamW with fp32 master weights, written out because candle's keeps its state in the variable's dtype:
//! the update is torch's `AdamW` (decoupled decay, bias-corrected moments, `eps` added after the square
//! root), always in f32, and the compute weights (f32 or bf16) are refreshed from the masters after each step.
//!
//! Two memory-lean variants for models whose full state does not fit (issue 19; a 10.7B model's bf16 weights,
//! f32 masters and f32 moments are ~170 GB):
//! - [`MomentPrecision::Blockwise8`]: both moments kept as 8-bit codes with one f32 scale per block of
//!   [`Q8_BLOCK`] values (block-wise dynamic quantisation, the scheme of bitsandbytes' 8-bit optimizers): 2 bytes
//!   per parameter instead of 8. Each step decodes a block, updates it in f32 and encodes it again. The second
//!   moment is stored as its square root: its dynamic range halves (in log scale), so a small second moment
//!   is not rounded to zero inside a block with a large one — which would turn the update `m / √v` into
//!   `m / ε`.
//! - `masters = false`: no f32 copy; the bf16 weights are updated in f32 and written back with stochastic
//!   rounding (up or down with the probabilities that make the rounding unbiased), so updates smaller than
//!   half a bf16 step still move the weights on average instead of being rounded away. The random bits come
//!   from a counter-based hash of (parameter, step, element): deterministic, so a resumed run is identical.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (torch defaults except `weight_decay`, which is the caller's choice).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norm weights, like transformers' Trainer).
    pub weight_decay: f64,
    /// How the moments are stored.
    pub moments: MomentPrecision,
    /// Whether f32 master weights are kept for bf16/f16 variables (without: stochastic rounding).
    pub masters: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            moments: MomentPrecision::F32,
            masters: true,
        }
    }
}

/// How AdamW stores its two moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentPrecision {
    /// f32 (8 bytes per parameter).
    #[default]
    F32,
    /// Block-wise 8-bit codes (2 bytes per parameter plus a scale per block).
    Blockwise8,
}

/// Values per quantisation block of the 8-bit moments.
pub const Q8_BLOCK: usize = 256;

/// One moment (m or v) of one parameter.
#[derive(Debug, Clone)]
pub enum Moment {
    /// Full precision, on the parameter's device.
    F32(Tensor),
    /// 8-bit block-wise codes (host memory).
    Blockwise8(Quantized8),
}

impl Moment {
    /// The moment as an f32 tensor of `shape` on `device` (decoded when quantised).
    pub fn to_f32(&self, shape: &[usize], device: &candle_core::Device) -> Result<Tensor> {
        Ok(match self {
            Moment::F32(t) => t.clone(),
            Moment::Blockwise8(q) => Tensor::from_vec(q.decode(), shape, device)?,
        })
    }
}

/// Values quantised block-wise to 8-bit codes of a dynamic (log-spaced) map, one absmax scale per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized8 {
    /// One code per value.
    pub codes: Vec<u8>,
    /// The largest |value| of each block of [`Q8_BLOCK`].
    pub absmax: Vec<f32>,
    /// Whether the map covers negative values (m) or not (v ≥ 0).
    pub signed: bool,
    /// Whether the codes hold the square roots of the values (v).
    pub root: bool,
}

impl Quantized8 {
    /// `len` zeros of the first moment (signed).
    pub fn first_moment(len: usize) -> Self {
        Self::zeros(len, true, false)
    }

    /// `len` zeros of the second moment (non-negative, stored as square roots).
    pub fn second_moment(len: usize) -> Self {
        Self::zeros(len, false, true)
    }

    fn zeros(len: usize, signed: bool, root: bool) -> Self {
        Quantized8 {
            codes: vec![dynamic_map(signed).zero_code; len],
            absmax: vec![0.0; len.div_ceil(Q8_BLOCK)],
            signed,
            root,
        }
    }

    /// Encodes first-moment `values` (`root = false`) or second-moment ones (`root = true`, values ≥ 0).
    pub fn encode(values: &[f32], root: bool) -> Self {
        let mut q = Quantized8::zeros(values.len(), !root, root);
        for (b, block) in values.chunks(Q8_BLOCK).enumerate() {
            let stored: Vec<f32> = if root {
                block.iter().map(|v| v.sqrt()).collect()
            } else {
                block.to_vec()
            };
            q.store_block(b, &stored);
        }
        q
    }

    /// The decoded values.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        for (b, block) in out.chunks_mut(Q8_BLOCK).enumerate() {
            self.load_block(b, block);
        }
        if self.root {
            out.iter_mut().for_each(|v| *v *= *v);
        }
        out
    }

    fn block(&mut self, b: usize, len: usize) -> BlockRef<'_> {
        BlockRef {
            codes: &mut self.codes[b * Q8_BLOCK..b * Q8_BLOCK + len],
            absmax: &mut self.absmax[b],
            signed: self.signed,
        }
    }

    fn load_block(&self, b: usize, out: &mut [f32]) {
        let map = &dynamic_map(self.signed).values;
        let scale = self.absmax[b];
        let codes = &self.codes[b * Q8_BLOCK..b * Q8_BLOCK + out.len()];
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = map[c as usize] * scale;
        }
    }

    fn store_block(&mut self, b: usize, values: &[f32]) {
        self.block(b, values.len()).encode(values);
    }
}

/// A sorted table of 256 code values in [-1, 1] (or [0, 1]), dense near zero: a sign bit (signed maps),
/// then `e` zero bits and a one choose the decade 10^-e, and the remaining bits a linear fraction inside it,
/// so small moments keep relative precision. Built once.
struct DynamicMap {
    values: [f32; 256],
    zero_code: u8,
}

impl DynamicMap {
    fn build(signed: bool) -> Self {
        let magnitude_bits = if signed { 7 } else { 8 };
        let mut magnitudes: Vec<f64> = Vec::new();
        for e in 0..magnitude_bits - 1 {
            let fraction_bits = magnitude_bits - 1 - e;
            let n = 1usize << fraction_bits;
            // Midpoints of n equal steps over [0.1, 1] of this decade.
            for i in 0..n {
                let lo = 0.1 + 0.9 * i as f64 / n as f64;
                let hi = 0.1 + 0.9 * (i + 1) as f64 / n as f64;
                magnitudes.push(10f64.powi(-e) * (lo + hi) / 2.0);
            }
        }
        magnitudes.push(1.0);
        let mut values: Vec<f64> = vec![0.0];
        values.extend(&magnitudes);
        if signed {
            values.extend(magnitudes.iter().map(|m| -m));
        }
        values.sort_by(|a, b| a.total_cmp(b));
        values.dedup();
        // Pad to 256 entries with the largest value (never the nearest of anything new).
        while values.len() < 256 {
            values.push(1.0);
        }
        values.truncate(256);
        let values: [f32; 256] = std::array::from_fn(|i| values[i] as f32);
        let zero_code = values.iter().position(|&v| v == 0.0).expect("0 is a code") as u8;
        DynamicMap { values, zero_code }
    }

    /// The code whose value is nearest to `x` (ties to the lower code).
    fn nearest(&self, x: f32) -> u8 {
        let i = self.values.partition_point(|&v| v < x);
        if i == 0 {
            return 0;
        }
        if i >= 256 {
            return 255;
        }
        if (x - self.values[i - 1]) <= (self.values[i] - x) {
            (i - 1) as u8
        } else {
            i as u8
        }
    }
}

fn dynamic_map(signed: bool) -> &'static DynamicMap {
    static SIGNED: std::sync::OnceLock<DynamicMap> = std::sync::OnceLock::new();
    static UNSIGNED: std::sync::OnceLock<DynamicMap> = std::sync::OnceLock::new();
    if signed {
        SIGNED.get_or_init(|| DynamicMap::build(true))
    } else {
        UNSIGNED.get_or_init(|| DynamicMap::build(false))
    }
}

/// One trained tensor: the compute variable the model reads, its master weights and moments.
#[derive(Debug)]
pub struct Param {
    /// Checkpoint name.
    pub name: String,
    /// The variable in the model (compute dtype).
    pub var: Var,
    /// The weights the update reads and writes: an f32 copy for a bf16/f16 variable when masters are kept;
    /// otherwise the same storage as `var` (an f32 variable, or a bf16 one updated with stochastic rounding).
    pub master: Tensor,
    /// First moment.
    pub m: Moment,
    /// Second moment.
    pub v: Moment,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// AdamW over a set of [`Param`]s.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// The parameters, in a fixed order.
    pub params: Vec<Param>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Use the in-place single-pass update where possible (CPU, contiguous f32); `false` forces tensor ops.
    pub fused: bool,
    /// For an optimizer over slices of other parameters (ZeRO-1 shards): per parameter, the index of the
    /// whole parameter and the slice's first element in it, so stochastic rounding draws the same noise for
    /// an element as the optimizer over whole parameters. `None`: parameter `i` is whole parameter `i`.
    pub noise_origins: Option<Vec<(usize, usize)>>,
}

impl AdamW {
    /// Wraps named variables: f32 masters for bf16/f16 variables when `config.masters`, zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let master = if var.dtype() == DType::F32 || !config.masters {
                var.as_tensor().clone()
            } else {
                var.to_dtype(DType::F32)?
            };
            ensure!(
                matches!(master.dtype(), DType::F32 | DType::BF16),
                "parameter {name}: without master weights the optimizer updates f32 or bf16 weights, not {:?}",
                master.dtype()
            );
            let zero = |signed: bool| -> Result<Moment> {
                Ok(match config.moments {
                    MomentPrecision::F32 => {
                        Moment::F32(Tensor::zeros(var.shape(), DType::F32, var.device())?)
                    }
                    MomentPrecision::Blockwise8 if signed => {
                        Moment::Blockwise8(Quantized8::first_moment(var.elem_count()))
                    }
                    MomentPrecision::Blockwise8 => {
                        Moment::Blockwise8(Quantized8::second_moment(var.elem_count()))
                    }
                })
            };
            let (m, v) = (zero(true)?, zero(false)?);
            let decay = var.rank() >= 2;
            params.push(Param {
                name,
                var,
                master,
                m,
                v,
                decay,
            });
        }
        Ok(AdamW {
            config,
            params,
            steps: 0,
            fused: true,
            noise_origins: None,
        })
    }

    /// Each parameter's gradient in `grads` as f32 (what [`AdamW::step`] takes), in parameter order; an error
    /// names a parameter the backward pass did not reach.
    pub fn f32_gradients(&self, grads: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .map(|p| {
                let g = grads
                    .get(p.var.as_tensor())
                    .with_context(|| format!("parameter {} received no gradient", p.name))?;
                Ok(g.to_dtype(DType::F32)?)
            })
            .collect()
    }

    /// One update with learning rate `lr` and f32 gradients `grads` (same order as `params`).
    /// On the CPU the moments and weights are updated in place in one pass each (8-bit moments: one pass over
    /// blocks, decoded and encoded in it); with f32 moments elsewhere with tensor ops; 8-bit moments and
    /// stochastic rounding off the CPU go through host memory. All follow torch's arithmetic (`lerp` for the
    /// first moment, `eps` after the root).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "{} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (index, (p, g)) in self.params.iter_mut().zip(grads).enumerate() {
            let decay = if p.decay { c.weight_decay } else { 0.0 };
            let (whole, offset) = match &self.noise_origins {
                Some(origins) => origins[index],
                None => (index, 0),
            };
            let update = WeightUpdate {
                decay: (1.0 - lr * decay) as f32,
                step_size: lr / bias1,
                bias2_sqrt,
                eps: c.eps,
                rounding_seed: rounding_seed(whole, self.steps),
                offset,
            };
            let moments = Moments {
                beta1: c.beta1,
                beta2: c.beta2,
            };
            step_param(p, g, &moments, &update, self.fused)?;
        }
        Ok(())
    }
}

/// The moment decay rates of a step.
struct Moments {
    beta1: f64,
    beta2: f64,
}

fn step_param(
    p: &mut Param,
    g: &Tensor,
    moments: &Moments,
    update: &WeightUpdate,
    fused: bool,
) -> Result<()> {
    let separate_master = p.master.dtype() == DType::F32 && p.var.dtype() != DType::F32;
    let on_cpu = p.master.device().is_cpu();
    match (&mut p.m, &mut p.v) {
        (Moment::F32(m), Moment::F32(v)) => {
            let cpu_ready = on_cpu
                && [&p.master, m, v, g].iter().all(|t| t.is_contiguous())
                && [&*m, &*v, g].iter().all(|t| t.dtype() == DType::F32);
            if fused && cpu_ready {
                update_moments(m, v, g, moments)?;
                p.master.inplace_op3(m, v, update)?;
            } else if p.master.dtype() != DType::F32 {
                // Stochastic rounding has no tensor-op form: update through host memory.
                let cpu = candle_core::Device::Cpu;
                let (mut mh, mut vh) = (
                    m.to_device(&cpu)?.contiguous()?,
                    v.to_device(&cpu)?.contiguous()?,
                );
                let gh = g.to_device(&cpu)?.contiguous()?;
                let wh = p.master.to_device(&cpu)?.contiguous()?;
                mh = mh.copy()?;
                vh = vh.copy()?;
                update_moments(&mh, &vh, &gh, moments)?;
                wh.inplace_op3(&mh, &vh, update)?;
                *m = mh.to_device(p.master.device())?;
                *v = vh.to_device(p.master.device())?;
                p.var.set(&wh.to_device(p.master.device())?)?;
                return Ok(());
            } else {
                *m = (&*m + ((g - &*m)? * (1.0 - moments.beta1))?)?;
                *v = ((&*v * moments.beta2)? + (g.sqr()? * (1.0 - moments.beta2))?)?;
                let mut w = p.master.clone();
                if update.decay != 1.0 {
                    w = (w * update.decay as f64)?;
                }
                let denom = ((v.sqrt()? / update.bias2_sqrt)? + update.eps)?;
                let w = (w - ((&*m / denom)? * update.step_size)?)?;
                return set_master(p, w);
            }
        }
        (Moment::Blockwise8(m), Moment::Blockwise8(v)) => {
            let op = Blockwise8Update {
                moments: std::sync::Mutex::new((m, v)),
                beta1: moments.beta1 as f32,
                beta2: moments.beta2 as f32,
                weight: update,
            };
            if on_cpu && p.master.is_contiguous() && g.is_contiguous() && g.dtype() == DType::F32 {
                p.master.inplace_op2(g, &op)?;
            } else {
                let cpu = candle_core::Device::Cpu;
                let wh = p.master.to_device(&cpu)?.contiguous()?.copy()?;
                let gh = g.to_device(&cpu)?.to_dtype(DType::F32)?.contiguous()?;
                wh.inplace_op2(&gh, &op)?;
                let back = wh.to_device(p.master.device())?;
                if separate_master {
                    p.master = back;
                } else {
                    p.var.set(&back)?;
                    p.master = p.var.as_tensor().clone();
                    return Ok(());
                }
            }
        }
        _ => anyhow::bail!(
            "parameter {}: its two moments are stored differently",
            p.name
        ),
    }
    if separate_master {
        p.var.set(&p.master.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}

fn update_moments(m: &Tensor, v: &Tensor, g: &Tensor, moments: &Moments) -> Result<()> {
    m.inplace_op2(
        g,
        &MomentUpdate {
            weight: (1.0 - moments.beta1) as f32,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &MomentUpdate {
            weight: (1.0 - moments.beta2) as f32,
            square: true,
        },
    )?;
    Ok(())
}

/// The stochastic-rounding seed of parameter `index` at optimizer step `step`.
fn rounding_seed(index: usize, step: usize) -> u64 {
    splitmix64(((index as u64) << 32) ^ step as u64)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x` rounded to bf16 up or down at random, with the probability of rounding up equal to `x`'s distance
/// from the lower neighbour in units of the gap (unbiased): `noise` is added below the 16 kept bits and the
/// rest truncated.
pub fn round_bf16_stochastic(x: f32, noise: u16) -> half::bf16 {
    if !x.is_finite() {
        return half::bf16::from_f32(x);
    }
    let bits = x.to_bits().wrapping_add(noise as u32);
    half::bf16::from_bits((bits >> 16) as u16)
}

/// `m ← m + w·(g − m)` (torch's `lerp_`), or with `square`, `v ← (1 − w)·v + w·g²` (`mul_` + `addcmul_`).
struct MomentUpdate {
    weight: f32,
    square: bool,
}

impl candle_core::InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (moment, grad) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?);
        if moment.len() != grad.len() {
            candle_core::bail!("adamw: moment and gradient sizes differ");
        }
        let w = self.weight;
        if self.square {
            let keep = 1.0 - w;
            for (v, g) in moment.iter_mut().zip(grad) {
                *v = *v * keep + w * g * g;
            }
        } else {
            for (m, g) in moment.iter_mut().zip(grad) {
                *m += w * (g - *m);
            }
        }
        Ok(())
    }
}

/// `p ← p·decay − step_size · m / (√v / bias2_sqrt + eps)`; bf16 weights are rounded stochastically.
struct WeightUpdate {
    decay: f32,
    step_size: f64,
    bias2_sqrt: f64,
    eps: f64,
    rounding_seed: u64,
    /// Position of the updated tensor's first element in its whole parameter (for the rounding noise).
    offset: usize,
}

impl WeightUpdate {
    fn consts(&self) -> (f32, f32, f32) {
        (
            self.step_size as f32,
            self.bias2_sqrt as f32,
            self.eps as f32,
        )
    }

    /// Applies the update to `weights` (f32 or bf16 storage) with f32 moments `m`, `v` of the same length;
    /// `offset` is the position of the first weight in its tensor (for the rounding noise).
    fn apply(
        &self,
        weights: &mut candle_core::CpuStorage,
        range: (usize, usize),
        offset: usize,
        m: &[f32],
        v: &[f32],
    ) -> candle_core::Result<()> {
        let (step, b2, eps) = self.consts();
        let decay = self.decay;
        let new = move |p: f32, m: f32, v: f32| -> f32 {
            let denom = v.sqrt() / b2 + eps;
            p * decay - step * (m / denom)
        };
        match weights {
            candle_core::CpuStorage::F32(w) => {
                let w = &mut w[range.0..range.1];
                if w.len() != m.len() || w.len() != v.len() {
                    candle_core::bail!("adamw: weight and moment sizes differ");
                }
                for ((p, m), v) in w.iter_mut().zip(m).zip(v) {
                    *p = new(*p, *m, *v);
                }
            }
            candle_core::CpuStorage::BF16(w) => {
                let w = &mut w[range.0..range.1];
                if w.len() != m.len() || w.len() != v.len() {
                    candle_core::bail!("adamw: weight and moment sizes differ");
                }
                for (i, ((p, m), v)) in w.iter_mut().zip(m).zip(v).enumerate() {
                    let x = new(p.to_f32(), *m, *v);
                    let noise = splitmix64(self.rounding_seed ^ (offset + i) as u64) as u16;
                    *p = round_bf16_stochastic(x, noise);
                }
            }
            _ => candle_core::bail!("adamw: weights must be f32 or bf16"),
        }
        Ok(())
    }
}

impl candle_core::InplaceOp3 for WeightUpdate {
    fn name(&self) -> &'static str {
        "adamw-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let range = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: weights must be contiguous".into()))?;
        self.apply(
            s1,
            range,
            self.offset,
            f32_slice(s2, l2)?,
            f32_slice(s3, l3)?,
        )
    }
}

/// The whole 8-bit AdamW update of one parameter, block by block: decode m and v, update them with the
/// gradient, update the weights, encode m and v. Blocks run in parallel.
struct Blockwise8Update<'a> {
    moments: std::sync::Mutex<(&'a mut Quantized8, &'a mut Quantized8)>,
    beta1: f32,
    beta2: f32,
    weight: &'a WeightUpdate,
}

impl candle_core::InplaceOp2 for Blockwise8Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-8bit"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let grad = f32_slice(s2, l2)?;
        let (w0, w1) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: weights must be contiguous".into()))?;
        if w1 - w0 != grad.len() {
            candle_core::bail!("adamw: weight and gradient sizes differ");
        }
        let mut guard = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        if m.codes.len() != grad.len() || v.codes.len() != grad.len() {
            candle_core::bail!("adamw: 8-bit moments and gradient sizes differ");
        }
        let (b1, b2) = (self.beta1, self.beta2);
        // Each block: decode, update moments, encode; the new moments are kept for the weight pass.
        let blocks = grad.len().div_ceil(Q8_BLOCK);
        let mut new_m = vec![0f32; grad.len()];
        let mut new_v = vec![0f32; grad.len()];
        let (m_signed, v_signed) = (m.signed, v.signed);
        m.codes
            .par_chunks_mut(Q8_BLOCK)
            .zip(m.absmax.par_iter_mut())
            .zip(v.codes.par_chunks_mut(Q8_BLOCK))
            .zip(v.absmax.par_iter_mut())
            .zip(new_m.par_chunks_mut(Q8_BLOCK))
            .zip(new_v.par_chunks_mut(Q8_BLOCK))
            .zip(grad.par_chunks(Q8_BLOCK))
            .for_each(|((((((mc, ma), vc), va), nm), nv), g)| {
                let mut mq = BlockRef {
                    codes: mc,
                    absmax: ma,
                    signed: m_signed,
                };
                let mut vq = BlockRef {
                    codes: vc,
                    absmax: va,
                    signed: v_signed,
                };
                mq.decode(nm);
                vq.decode(nv);
                let mut roots = [0f32; Q8_BLOCK];
                for (((m, v), r), g) in nm.iter_mut().zip(nv.iter_mut()).zip(&mut roots).zip(g) {
                    *m += (1.0 - b1) * (g - *m);
                    // The codes hold √v.
                    *v = *v * *v * b2 + (1.0 - b2) * g * g;
                    *r = v.sqrt();
                }
                mq.encode(nm);
                vq.encode(&roots[..nv.len()]);
            });
        debug_assert_eq!(blocks, m.absmax.len());
        self.weight
            .apply(s1, (w0, w1), self.weight.offset, &new_m, &new_v)
    }
}

/// One block of a [`Quantized8`], borrowed.
struct BlockRef<'a> {
    codes: &'a mut [u8],
    absmax: &'a mut f32,
    signed: bool,
}

impl BlockRef<'_> {
    fn decode(&self, out: &mut [f32]) {
        let map = &dynamic_map(self.signed).values;
        for (o, &c) in out.iter_mut().zip(self.codes.iter()) {
            *o = map[c as usize] * *self.absmax;
        }
    }

    fn encode(&mut self, values: &[f32]) {
        let map = dynamic_map(self.signed);
        let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        *self.absmax = absmax;
        let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
        for (c, &v) in self.codes.iter_mut().zip(values) {
            *c = map.nearest(v * inv);
        }
    }
}

fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// Stores new master weights and refreshes the compute variable from them. Without a separate f32 copy
/// (`master` is the variable itself), `w` is written into the variable.
pub fn set_master(p: &mut Param, w: Tensor) -> Result<()> {
    let separate = p.master.dtype() == DType::F32 && p.var.dtype() != DType::F32;
    if separate {
        p.var.set(&w.to_dtype(p.var.dtype())?)?;
        p.master = w;
    } else {
        p.var.set(&w.to_dtype(p.var.dtype())?)?;
        p.master = p.var.as_tensor().clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_maps_are_sorted_and_hold_zero_and_one() {
        for signed in [true, false] {
            let map = dynamic_map(signed);
            assert!(map.values.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(map.values[map.zero_code as usize], 0.0);
            assert_eq!(*map.values.last().unwrap(), 1.0);
            assert_eq!(map.values[0], if signed { -1.0 } else { 0.0 });
            // Dense near zero: the smallest positive code is far below the largest gap's size.
            let smallest = map.values.iter().copied().find(|&v| v > 0.0).unwrap();
            assert!(smallest < 1e-5, "{smallest}");
        }
    }

    #[test]
    fn block_quantisation_keeps_each_value_within_its_decades_step() {
        // Values over six decades, both signs, in blocks of different scales.
        let values: Vec<f32> = (0..3 * Q8_BLOCK + 17)
            .map(|i| {
                let x = ((i * 7919) % 1000) as f32 / 1000.0;
                let decade = 10f32.powi(-(((i * 31) % 6) as i32));
                let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
                sign * (0.1 + 0.9 * x) * decade * (1 + i / Q8_BLOCK) as f32
            })
            .collect();
        let q = Quantized8::encode(&values, false);
        for (i, (v, d)) in values.iter().zip(q.decode()).enumerate() {
            // Decade e (values in (10^-(e+1), 10^-e] of the block's absmax) has 2^(6 - e) codes over
            // [0.1, 1] x 10^-e: the worst error is half their spacing (the coarser decade at a boundary).
            let absmax = q.absmax[i / Q8_BLOCK];
            let e = ((-(v.abs() / absmax).log10()).ceil() as i32 - 1).max(0);
            let step = 0.9 / 2f32.powi(6 - e) * 10f32.powi(-e);
            let bound = 0.5 * step * absmax * 1.001;
            assert!(
                (v - d).abs() <= bound,
                "value {i}: {v} decoded as {d} (bound {bound})"
            );
        }
        // Square roots for the second moment: a value 10^-12 of its block's largest stays non-zero (coarse,
        // within a factor of 2: it sits in the sparsest decade of the square roots).
        let mut second = vec![1.0f32; Q8_BLOCK];
        second[5] = 1e-12;
        let q = Quantized8::encode(&second, true);
        let back = q.decode();
        assert!((0.5..2.0).contains(&(back[5] / 1e-12)), "{}", back[5]);
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_picks_a_neighbour() {
        let one = half::bf16::from_f32(1.0);
        let up = half::bf16::from_bits(one.to_bits() + 1);
        // A quarter of the way from 1 to the next bf16.
        let x = 1.0 + 0.25 * (up.to_f32() - 1.0);
        let n = 20_000;
        let mut sum = 0f64;
        for i in 0..n {
            let r = round_bf16_stochastic(x, (splitmix64(i) >> 48) as u16);
            assert!(r == one || r == up);
            sum += r.to_f64();
        }
        let mean = sum / n as f64;
        assert!((mean - x as f64).abs() < 2e-4, "mean {mean} vs {x}");
        // Representable values and non-finite ones are kept.
        assert_eq!(round_bf16_stochastic(1.0, u16::MAX), one);
        assert!(round_bf16_stochastic(f32::NAN, 7).is_nan());
    }

    #[test]
    fn updates_below_half_a_bf16_step_still_move_weights_without_masters() {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(512, DType::BF16, &dev).unwrap()).unwrap();
        let config = AdamWConfig {
            masters: false,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        // Adam's step is about lr per step: 1e-4 is an eightieth of the bf16 gap at 1.0 (2^-7).
        let g = Tensor::ones(512, DType::F32, &dev).unwrap();
        for _ in 0..100 {
            opt.step(std::slice::from_ref(&g), 1e-4).unwrap();
        }
        let mean = w
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Round-to-nearest would have left every weight at 1.0; the expected value is 1 - 100 * 1e-4.
        assert!((mean - 0.99).abs() < 1.5e-3, "mean weight {mean}");
    }
}
