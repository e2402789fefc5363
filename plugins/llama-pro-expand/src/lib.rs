//! LLaMA-Pro block expansion (Wu et al., 2024): after every `every` layers of the base model insert
//! a copy of the layer just passed, with `o_proj` and `down_proj` zeroed so the new block starts as
//! the identity.

use dusflow_sdk::layer_policy::{
    LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig, Transform,
};
use serde::Deserialize;

/// `[steps.scale] every = 4`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Insert one new block after each group of this many layers.
    every: u32,
}

struct LlamaProExpand;

impl LayerPolicy for LlamaProExpand {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let [base] = models else {
            return Err(format!(
                "llama-pro-expand expands exactly one base model, got {}",
                models.len()
            ));
        };
        if params.every == 0 || base.num_layers % params.every != 0 {
            return Err(format!(
                "every = {} must divide the {} layers",
                params.every, base.num_layers
            ));
        }
        let mut layers = Vec::new();
        for l in 0..base.num_layers {
            layers.push(LayerSource::copy(0, l));
            if (l + 1) % params.every == 0 {
                let block = LayerSource::copy(0, l)
                    .with("self_attn.o_proj.weight", Transform::Zero)
                    .with("mlp.down_proj.weight", Transform::Zero);
                layers.push(block);
            }
        }
        Ok(LayerPlan {
            base_model: 0,
            layers,
        })
    }
}

dusflow_sdk::layer_policy!(LlamaProExpand);
