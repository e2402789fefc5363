//! Layer-policy plugins (`plugin = "NAME"`): the adapter from a `[plugins.NAME]` WebAssembly component's
//! answer to the same [`ScalePlan`] the built-in policies produce.

use super::plan::{LayerSource, ScalePlan, TensorTransform, TransformOp};
use super::source::SourceModel;
use crate::plugins::{self, ModelDescription, Plugin};
use crate::workflow::PluginSpec;
use anyhow::{Context, Result};

/// Asks the layer-policy plugin `name` (declared as `spec`) for a plan over `models`, with the step's
/// `params` as JSON. Traps, time-outs, malformed answers and out-of-range indices are errors naming the
/// plugin.
pub fn plugin_plan(
    plugin: &Plugin,
    name: &str,
    spec: &PluginSpec,
    models: &[SourceModel],
    params_json: &str,
) -> Result<ScalePlan> {
    let describe = || format!("layer-policy plugin `{name}` ({})", spec.path.display());
    let policy = plugin.layer_policy().with_context(describe)?;
    let descriptions = models
        .iter()
        .map(|m| ModelDescription::from_config_json(&m.name, &m.config_text))
        .collect::<Result<Vec<_>>>()?;
    let plan = policy
        .plan(&descriptions, params_json)
        .with_context(describe)?;
    Ok(from_plugin(plan))
}

/// The plugin's plan as a [`ScalePlan`]: its `base_model` gives embeddings, config, tokenizer, final norm
/// and head (the WIT contract's meaning), its layers map one to one.
pub fn from_plugin(plan: plugins::LayerPlan) -> ScalePlan {
    ScalePlan {
        embed_model: plan.base_model,
        head_model: plan.base_model,
        layers: plan
            .layers
            .into_iter()
            .map(|l| LayerSource {
                model: l.model,
                layer: l.layer,
                transforms: l
                    .transforms
                    .into_iter()
                    .map(|t| TensorTransform {
                        tensor_suffix: t.tensor_suffix,
                        op: match t.op {
                            plugins::TransformOp::Zero => TransformOp::Zero,
                            plugins::TransformOp::Scale(f) => TransformOp::Scale(f),
                        },
                    })
                    .collect(),
            })
            .collect(),
    }
}
