//! Merge-rule plugins (`plugin = "NAME"`): the adapter from a `[plugins.NAME]` component's per-tensor answer
//! to the native kernels (`linear`, `slerp`, `copy-from` run as [`TensorPlan`]s at full speed) or, for
//! `custom`, to the plugin's own element-wise function, streamed chunk by chunk.

use super::elements::{encode, Source};
use super::methods::TensorPlan;
use super::plan::{TensorDescription, TensorPlanner};
use crate::plugins::{
    DType as PluginDType, MergePlan, MergeRulePlugin, Plugin, TensorInfo, TensorStats,
};
use crate::workflow::PluginSpec;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::Dtype;

/// Plans tensors with a merge-rule plugin.
pub struct PluginPlanner {
    name: String,
    rule: MergeRulePlugin,
    /// The description of the tensor last planned (reused by `merge_values`).
    last: Option<TensorInfo>,
}

impl PluginPlanner {
    /// Starts a merge job of the loaded plugin `name` (declared as `spec`), configured with
    /// `params_json`.
    pub fn start(
        plugin: &Plugin,
        name: &str,
        spec: &PluginSpec,
        params_json: &str,
    ) -> Result<Self> {
        let describe = || format!("merge-rule plugin `{name}` ({})", spec.path.display());
        let rule = plugin.merge_rule(params_json).with_context(describe)?;
        Ok(PluginPlanner {
            name: name.to_string(),
            rule,
            last: None,
        })
    }

    fn info(&mut self, t: &TensorDescription<'_>, inputs: &[Source<'_>]) -> Result<TensorInfo> {
        if let Some(info) = self.last.as_ref().filter(|i| i.name == t.name) {
            return Ok(info.clone());
        }
        let dtype = plugin_dtype(t.dtype)?;
        let stats = inputs
            .iter()
            .map(|s| Ok(TensorStats::compute(plugin_dtype(s.dtype)?, s.bytes)))
            .collect::<Result<Vec<_>>>()?;
        let info = TensorInfo {
            name: t.name.to_string(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            dtype,
            layer: t.layer.map(|l| l as u32),
            num_layers: t.num_layers as u32,
            stats,
        };
        self.last = Some(info.clone());
        Ok(info)
    }
}

fn plugin_dtype(d: Dtype) -> Result<PluginDType> {
    Ok(match d {
        Dtype::F32 => PluginDType::F32,
        Dtype::F16 => PluginDType::F16,
        Dtype::BF16 => PluginDType::BF16,
        other => bail!("merge-rule plugins take f32, f16 or bf16 tensors, not {other:?}"),
    })
}

impl TensorPlanner for PluginPlanner {
    fn describe(&self) -> String {
        format!("merge-rule plugin `{}`", self.name)
    }

    fn plan(
        &mut self,
        t: &TensorDescription<'_>,
        inputs: &[Source<'_>],
    ) -> Result<Option<TensorPlan>> {
        let info = self.info(t, inputs)?;
        let plan = self
            .rule
            .plan_tensor(&info)
            .with_context(|| self.describe())?;
        Ok(match plan {
            MergePlan::Linear(coefficients) => Some(TensorPlan::Linear {
                weights: coefficients,
                normalize: false,
            }),
            MergePlan::Slerp(t) => Some(TensorPlan::Slerp { t }),
            MergePlan::CopyFrom(i) => Some(TensorPlan::CopyFrom(i)),
            MergePlan::Custom => None,
        })
    }

    fn merge_values(
        &mut self,
        t: &TensorDescription<'_>,
        inputs: &[Source<'_>],
        out_dtype: Dtype,
    ) -> Result<Vec<u8>> {
        let info = self.info(t, inputs)?;
        let first = inputs
            .first()
            .ok_or_else(|| anyhow!("tensor {:?} has no inputs", t.name))?;
        if let Some(other) = inputs.iter().find(|s| s.dtype != first.dtype) {
            bail!(
                "tensor {:?}: a custom plugin merge needs one dtype in every input, got {:?} and {:?}",
                t.name,
                first.dtype,
                other.dtype
            );
        }
        let raw: Vec<&[u8]> = inputs.iter().map(|s| s.bytes).collect();
        let mut merged = vec![0u8; first.bytes.len()];
        self.rule
            .merge_custom(&info, &raw, &mut merged)
            .with_context(|| self.describe())?;
        if out_dtype == first.dtype {
            return Ok(merged);
        }
        let src = Source {
            bytes: &merged,
            dtype: first.dtype,
        };
        let mut values = vec![0f32; src.numel()];
        src.decode(0, &mut values);
        let mut out = vec![0u8; values.len() * out_dtype.bitsize() / 8];
        encode(&values, out_dtype, &mut out);
        Ok(out)
    }
}
