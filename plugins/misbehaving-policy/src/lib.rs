//! Test fixture for the `scale` step: a layer policy that misbehaves as its params ask. `mode` is one of:
//! "loop" (never returns), "panic" (traps), "empty" (plans no layers), "out-of-range" (asks for layer n of
//! an n-layer model), "many" (plans 100 000 layers).

use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    mode: String,
}

struct Misbehave;

impl LayerPolicy for Misbehave {
    type Params = Params;

    fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
        let n = models.first().map_or(0, |m| m.num_layers);
        let layers = match params.mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if x == 0 {
                        break Vec::new();
                    }
                }
            }
            "panic" => panic!("misbehaving-policy panics on request"),
            "empty" => Vec::new(),
            "out-of-range" => vec![LayerSource::copy(0, n)],
            "many" => (0..100_000).map(|i| LayerSource::copy(0, i % n)).collect(),
            other => return Err(format!("unknown mode {other:?}")),
        };
        Ok(LayerPlan { base_model: 0, layers })
    }
}

dusflow_sdk::layer_policy!(Misbehave);
