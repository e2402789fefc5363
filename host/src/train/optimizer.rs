//! AdamW with fp32 master weights, written out because candle's keeps its state in the variable's dtype:
//! the update is torch's `AdamW` (decoupled decay, bias-corrected moments, `eps` added after the square
//! root), always in f32, and the compute weights (f32 or bf16) are refreshed from the masters after each step.

use anyhow::{ensure, Result};
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
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
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
}

impl AdamW {
    /// Wraps named variables: f32 masters (copies of bf16/f16 variables), zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let master = if var.dtype() == DType::F32 { var.as_tensor().clone() } else { var.to_dtype(DType::F32)? };
            let m = master.zeros_like()?;
            let v = master.zeros_like()?;
            let decay = var.rank() >= 2;
            params.push(Param { name, var, master, m, v, decay });
        }
        Ok(AdamW { config, params, steps: 0 })
    }

    /// One update with learning rate `lr` and f32 gradients `grads` (same order as `params`).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(grads.len() == self.params.len(), "{} gradients for {} parameters", grads.len(), self.params.len());
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut w = p.master.clone();
            if p.decay && c.weight_decay != 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((p.v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let w = (w - ((&p.m / denom)? * (lr / bias1))?)?;
            set_master(p, w)?;
        }
        Ok(())
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
