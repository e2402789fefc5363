//! AdamW with fp32 master weights, written out because candle's keeps its state in the variable's dtype:
//! the update is torch's `AdamW` (decoupled decay, bias-corrected moments, `eps` added after the square
//! root), always in f32, and the compute weights (f32 or bf16) are refreshed from the masters after each step.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};

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
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trained tensor: the compute variable the model reads, its f32 master copy and moments.
#[derive(Debug)]
pub struct Param {
    /// Checkpoint name.
    pub name: String,
    /// The variable in the model (compute dtype).
    pub var: Var,
    /// f32 master weights (the same storage as `var` when computing in f32).
    pub master: Tensor,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
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
}

impl AdamW {
    /// Wraps named variables: f32 masters (copies of bf16/f16 variables), zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let master = if var.dtype() == DType::F32 {
                var.as_tensor().clone()
            } else {
                var.to_dtype(DType::F32)?
            };
            let m = master.zeros_like()?;
            let v = master.zeros_like()?;
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
    /// On the CPU the moments and master weights are updated in place in one pass each; elsewhere with
    /// tensor ops. Both follow torch's arithmetic (`lerp` for the first moment, `eps` after the root).
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
        for (p, g) in self.params.iter_mut().zip(grads) {
            let decay = if p.decay { c.weight_decay } else { 0.0 };
            let update = WeightUpdate {
                decay: (1.0 - lr * decay) as f32,
                step_size: lr / bias1,
                bias2_sqrt,
                eps: c.eps,
            };
            let fused = self.fused
                && p.master.device().is_cpu()
                && [&p.master, &p.m, &p.v, g]
                    .iter()
                    .all(|t| t.is_contiguous() && t.dtype() == DType::F32);
            if fused {
                p.m.inplace_op2(
                    g,
                    &MomentUpdate {
                        weight: (1.0 - c.beta1) as f32,
                        square: false,
                    },
                )?;
                p.v.inplace_op2(
                    g,
                    &MomentUpdate {
                        weight: (1.0 - c.beta2) as f32,
                        square: true,
                    },
                )?;
                p.master.inplace_op3(&p.m, &p.v, &update)?;
                if p.var.dtype() != DType::F32 {
                    p.var.set(&p.master.to_dtype(p.var.dtype())?)?;
                }
            } else {
                p.m = (&p.m + ((g - &p.m)? * (1.0 - c.beta1))?)?;
                p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let mut w = p.master.clone();
                if decay != 0.0 {
                    w = (w * update.decay as f64)?;
                }
                let denom = ((p.v.sqrt()? / bias2_sqrt)? + c.eps)?;
                let w = (w - ((&p.m / denom)? * update.step_size)?)?;
                set_master(p, w)?;
            }
        }
        Ok(())
    }
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

/// `p ← p·decay − step_size · m / (√v / bias2_sqrt + eps)`.
struct WeightUpdate {
    decay: f32,
    step_size: f64,
    bias2_sqrt: f64,
    eps: f64,
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
        let (w, m, v) = (
            f32_slice_mut(s1, l1)?,
            f32_slice(s2, l2)?,
            f32_slice(s3, l3)?,
        );
        if w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("adamw: weight and moment sizes differ");
        }
        let (step, b2, eps) = (
            self.step_size as f32,
            self.bias2_sqrt as f32,
            self.eps as f32,
        );
        for ((p, m), v) in w.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt() / b2 + eps;
            *p = *p * self.decay - step * (m / denom);
        }
        Ok(())
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

/// Stores new master weights and refreshes the compute variable from them.
pub fn set_master(p: &mut Param, w: Tensor) -> Result<()> {
    if p.var.dtype() == DType::F32 {
        p.var.set(&w)?;
        p.master = p.var.as_tensor().clone();
    } else {
        p.var.set(&w.to_dtype(p.var.dtype())?)?;
        p.master = w;
    }
    Ok(())
}
