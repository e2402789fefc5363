//! Layer interleaving: after every `every`-th layer of the base model, a second copy of it. With `scale`,
//! the copy's output projections (`o_proj`, `down_proj`) are multiplied by that factor, so the duplicated
//! layers add less to the residual stream (0 gives LLaMA-Pro's identity blocks).

use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig, Transform};
use serde::Deserialize;

/// `params = { every = 4, scale = 0.5 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Copy every `every`-th layer.
    every: u32,
    /// Factor for the copies' `o_proj` and `down_proj` (default: unchanged copies).
    #[serde(default)]
    scale: Option<f32>,
}

struct Interleave;

impl LayerPolicy for Interleave {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let [base] = models else {
            return Err(format!("interleave scales exactly one base model, got {}", models.len()));
        };
        if params.every == 0 || params.every > base.num_layers {
            return Err(format!("every = {} must be between 1 and the {} layers", params.every, base.num_layers));
        }
        let mut layers = Vec::new();
        for l in 0..base.num_layers {
            layers.push(LayerSource::copy(0, l));
            if (l + 1) % params.every == 0 {
                let mut copy = LayerSource::copy(0, l);
                if let Some(f) = params.scale {
                    copy = copy
                        .with("self_attn.o_proj.weight", Transform::Scale(f))
                        .with("mlp.down_proj.weight", Transform::Scale(f));
                }
                layers.push(copy);
            }
        }
        Ok(LayerPlan { base_model: 0, layers })
    }
}

dusflow_sdk::layer_policy!(Interleave);
