//! {{name}}: a layer policy. Params arrive as JSON from the step's TOML table.
//! Example: repeat the middle third of the base model's layers once.

use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// How many times the middle third is repeated.
    #[serde(default = "one")]
    repeats: u32,
}

fn one() -> u32 {
    1
}

struct Policy;

impl LayerPolicy for Policy {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let base = models.first().ok_or("needs a base model")?;
        let n = base.num_layers;
        let (lo, hi) = (n / 3, 2 * n / 3);
        let mut layers: Vec<LayerSource> = (0..hi).map(|l| LayerSource::copy(0, l)).collect();
        for _ in 0..params.repeats {
            layers.extend((lo..hi).map(|l| LayerSource::copy(0, l)));
        }
        layers.extend((hi..n).map(|l| LayerSource::copy(0, l)));
        Ok(LayerPlan { base_model: 0, layers })
    }
}

dusflow_sdk::layer_policy!(Policy);
