//! SOLAR 10.7B depth up-scaling (Kim et al., 2023): take two copies of an n-layer base model,
//! drop the last `m` layers of the first and the first `m` of the second, and stack them:
//! 2·(n−m) layers (32 → 48 for m = 8).

use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig};
use serde::Deserialize;

/// `[steps.scale] m = 8`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Layers trimmed from each copy.
    #[serde(default = "default_m")]
    m: u32,
}

fn default_m() -> u32 {
    8
}

struct SolarDus;

impl LayerPolicy for SolarDus {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let [base] = models else {
            return Err(format!(
                "solar-dus scales exactly one base model, got {}",
                models.len()
            ));
        };
        let (n, m) = (base.num_layers, params.m);
        if m == 0 || 2 * m >= n {
            return Err(format!(
                "m = {m} must be between 1 and {} for a {n}-layer model",
                (n - 1) / 2
            ));
        }
        let bottom = (0..n - m).map(|l| LayerSource::copy(0, l));
        let top = (m..n).map(|l| LayerSource::copy(0, l));
        Ok(LayerPlan {
            base_model: 0,
            layers: bottom.chain(top).collect(),
        })
    }
}

dusflow_sdk::layer_policy!(SolarDus);
