//! Typed handle of a `layer-policy` plugin, for the `scale` step.

use super::bindings::v0_1_0::layer_policy as wit;
use super::host::{Job, Plugin};
use super::types::{
    LayerPlan, LayerSpec, ModelDescription, PluginKind, TensorTransform, TransformOp,
};
use anyhow::Result;
use wit::exports::dus::plugin::layer_policy as api;

/// A layer policy ready to plan; each [`plan`](Self::plan) runs in a fresh sandbox.
#[derive(Debug, Clone)]
pub struct LayerPolicyPlugin {
    plugin: Plugin,
}

impl Plugin {
    /// This plugin as a layer policy; fails if it is of another kind.
    pub fn layer_policy(&self) -> Result<LayerPolicyPlugin> {
        self.expect_kind(PluginKind::LayerPolicy)?;
        Ok(LayerPolicyPlugin {
            plugin: self.clone(),
        })
    }
}

impl LayerPolicyPlugin {
    /// Plans the up-scaled model's layers from the input models and the step's params (JSON);
    /// the answer is validated against `models`.
    pub fn plan(&self, models: &[ModelDescription], params_json: &str) -> Result<LayerPlan> {
        let mut job = Job::start(&self.plugin)?;
        let bindings = wit::LayerPolicyPlugin::new(&mut job.sandbox.store, &job.instance)?;
        let configs: Vec<api::ModelConfig> = models.iter().map(to_wit).collect();
        let plan = job.call("layer-policy.plan", async |store, _| {
            bindings
                .dus_plugin_layer_policy()
                .call_plan(store, &configs, params_json)
                .await
        })?;
        let plan = from_wit(plan);
        plan.validate(models)
            .map_err(|e| job.malformed("layer-policy.plan", e.to_string()))?;
        Ok(plan)
    }
}

fn to_wit(m: &ModelDescription) -> api::ModelConfig {
    api::ModelConfig {
        name: m.name.clone(),
        architecture: m.architecture.clone(),
        num_layers: m.num_layers,
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        vocab_size: m.vocab_size,
        config_json: m.config_json.clone(),
    }
}

fn from_wit(plan: api::LayerPlan) -> LayerPlan {
    LayerPlan {
        base_model: plan.base_model as usize,
        layers: plan
            .layers
            .into_iter()
            .map(|l| LayerSpec {
                model: l.model as usize,
                layer: l.layer as usize,
                transforms: l
                    .transforms
                    .into_iter()
                    .map(|t| TensorTransform {
                        tensor_suffix: t.tensor_suffix,
                        op: match t.transform {
                            api::Transform::Zero => TransformOp::Zero,
                            api::Transform::Scale(f) => TransformOp::Scale(f),
                        },
                    })
                    .collect(),
            })
            .collect(),
    }
}
