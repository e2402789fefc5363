//! {{name}}: a merge rule. Params arrive as JSON from the step's TOML table.
//! Example: SLERP layer tensors with `t`, element-wise maximum for everything else.

use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "half")]
    t: f32,
}

fn half() -> f32 {
    0.5
}

struct Rule(Params);

impl MergeRule for Rule {
    type Params = Params;

    fn new(params: Params) -> Result<Self, String> {
        Ok(Self(params))
    }

    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
        Ok(match tensor.layer {
            Some(_) if tensor.stats.len() == 2 => MergePlan::Slerp(self.0.t),
            _ => MergePlan::Custom,
        })
    }

    fn merge(&self, _: &TensorInfo, _offset: u64, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), String> {
        for (i, o) in out.iter_mut().enumerate() {
            *o = inputs.iter().map(|x| x[i]).fold(f32::NEG_INFINITY, f32::max);
        }
        Ok(())
    }
}

dusflow_sdk::merge_rule!(Rule);
