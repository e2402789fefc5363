//! From a merge config to what happens to each tensor: parameters resolved for the tensor's name and layer,
//! and mergekit's per-method defaults applied.

use super::elements::Source;
use super::methods::{Sparsification, TaskVectorPlan, TensorPlan};
use super::params::{Param, TensorPosition};
use super::{BaseUse, Combination, MergeConfig, Method, SparsificationKind};
use anyhow::{anyhow, bail, Result};
use safetensors::Dtype;

/// A tensor as planners see it.
#[derive(Debug, Clone, Copy)]
pub struct TensorDescription<'a> {
    /// Full name, e.g. `model.layers.3.mlp.down_proj.weight`.
    pub name: &'a str,
    /// Shape (the same in every input).
    pub shape: &'a [usize],
    /// Element type in the first input.
    pub dtype: Dtype,
    /// Layer index, `None` outside the layers.
    pub layer: Option<usize>,
    /// Number of layers of the models.
    pub num_layers: usize,
    /// Position along per-layer gradients.
    pub position: TensorPosition,
}

/// Decides what happens to each tensor: the built-in methods ([`MethodPlanner`]) or a merge-rule plugin.
/// Called from one thread, tensor by tensor, in output order.
pub trait TensorPlanner: Send {
    /// What plans the tensors, for messages (`ties`, `plugin schedule`).
    fn describe(&self) -> String;
    /// The plan for one tensor, given its inputs (in [`input_order`]); `None` when the planner computes the
    /// values itself with [`TensorPlanner::merge_values`].
    fn plan(
        &mut self,
        tensor: &TensorDescription<'_>,
        inputs: &[Source<'_>],
    ) -> Result<Option<TensorPlan>>;
    /// The merged values (little-endian bytes of `out_dtype`) of a tensor planned `None`.
    fn merge_values(
        &mut self,
        tensor: &TensorDescription<'_>,
        _inputs: &[Source<'_>],
        _out_dtype: Dtype,
    ) -> Result<Vec<u8>> {
        bail!(
            "{} does not compute values itself (tensor {:?})",
            self.describe(),
            tensor.name
        )
    }
}

impl TensorPlanner for MethodPlanner {
    fn describe(&self) -> String {
        self.name().to_string()
    }

    fn plan(
        &mut self,
        tensor: &TensorDescription<'_>,
        _: &[Source<'_>],
    ) -> Result<Option<TensorPlan>> {
        MethodPlanner::plan(self, tensor.name, tensor.position).map(Some)
    }
}

/// Plans tensors for a built-in method.
#[derive(Debug, Clone)]
pub struct MethodPlanner {
    method: Method,
    weights: Vec<Param>,
    t: Option<Param>,
    density: Option<Param>,
    lambda: Option<Param>,
    normalize: bool,
    rescale: bool,
    seed: u64,
}

impl MethodPlanner {
    /// A planner for `method` over `models` non-base models (weights default to 1), with DARE seed
    /// `config.seed` or else `default_seed`.
    pub fn new(config: &MergeConfig, method: Method, models: usize, default_seed: u64) -> Self {
        MethodPlanner {
            method,
            weights: config
                .weights
                .clone()
                .unwrap_or_else(|| vec![Param::Value(1.0); models]),
            t: config.t.clone(),
            density: config.density.clone(),
            lambda: config.lambda.clone(),
            normalize: config.normalize.unwrap_or(method.spec().default_normalize),
            rescale: config.rescale.unwrap_or(method.spec().default_rescale),
            seed: config.seed.unwrap_or(default_seed),
        }
    }

    /// The plan for tensor `name` at `pos`. Inputs are ordered as [`input_order`] says.
    pub fn plan(&self, name: &str, pos: TensorPosition) -> Result<TensorPlan> {
        let resolve = |key: &str, p: &Param| {
            p.resolve(name, pos).ok_or_else(|| {
                anyhow!("no `{key}` filter matches tensor {name:?} (add an entry without `filter`)")
            })
        };
        let optional = |key: &str, p: &Option<Param>, default: f64| {
            p.as_ref().map_or(Ok(default), |p| resolve(key, p))
        };
        let weights = self
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| resolve(&format!("weights[{i}]"), w).map(|v| v as f32))
            .collect::<Result<Vec<f32>>>()?;
        let spec = self.method.spec();
        Ok(match spec.combination {
            Combination::Whole => bail!(
                "{} runs on whole tensors (steps::merge::whole), not as a streaming plan",
                spec.name
            ),
            Combination::WeightedAverage => TensorPlan::Linear {
                weights,
                normalize: self.normalize,
            },
            Combination::Slerp => {
                let t = self.t.as_ref().ok_or_else(|| anyhow!("slerp needs `t`"))?;
                TensorPlan::Slerp {
                    t: resolve("t", t)? as f32,
                }
            }
            Combination::TaskVectors {
                sparsification,
                sign_consensus,
            } => {
                let density = optional("density", &self.density, 1.0)?;
                let lambda = optional("lambda", &self.lambda, 1.0)? as f32;
                TensorPlan::TaskVector(TaskVectorPlan {
                    densities: vec![density; weights.len()],
                    weights,
                    sparsification: match sparsification {
                        SparsificationKind::None => Sparsification::None,
                        SparsificationKind::Magnitude => Sparsification::Magnitude,
                        SparsificationKind::Random => Sparsification::Random { seed: self.seed },
                    },
                    consensus: sign_consensus,
                    normalize: self.normalize,
                    rescale: self.rescale,
                    lambda,
                })
            }
        })
    }

    /// The method's name.
    pub fn name(&self) -> &'static str {
        self.method.name()
    }
}

/// Positions (in `base` ++ `models` order, base absent when `has_base` is false) of the tensors a method
/// reads, in the order its plan expects: linear = the models; slerp = base then the model, or the two
/// models; task-vector methods = base first, then the models.
pub fn input_order(method: Option<Method>, models: usize, has_base: bool) -> Vec<usize> {
    let offset = has_base as usize;
    match method.map(|m| m.spec().base) {
        Some(BaseUse::Refused) => (offset..offset + models).collect(),
        _ => (0..offset + models).collect(),
    }
}
