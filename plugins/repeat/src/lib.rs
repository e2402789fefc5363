//! Layer repetition: the base model's whole stack `times` times (n → 2n by default). The SOLAR paper's
//! "simpler alternative" to depth up-scaling: no layers are trimmed, so the seam between the copies (layer
//! n−1 followed by layer 0) is as large as it gets.

use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig};
use serde::Deserialize;

/// `params = { times = 2 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Copies of the stack.
    #[serde(default = "default_times")]
    times: u32,
}

fn default_times() -> u32 {
    2
}

struct Repeat;

impl LayerPolicy for Repeat {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let [base] = models else {
            return Err(format!("repeat scales exactly one base model, got {}", models.len()));
        };
        if params.times == 0 {
            return Err("times must be at least 1".to_string());
        }
        let layers = (0..params.times)
            .flat_map(|_| 0..base.num_layers)
            .map(|l| LayerSource::copy(0, l))
            .collect();
        Ok(LayerPlan { base_model: 0, layers })
    }
}

dusflow_sdk::layer_policy!(Repeat);
