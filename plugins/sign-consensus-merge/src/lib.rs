//! Sign-consensus merge (the election step of TIES-merging without trimming): each element of a
//! layer tensor is the mean of the inputs whose sign agrees with the sign of their sum. Tensors
//! outside the layers (embeddings, final norm, LM head) are averaged natively by the host.

use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Also merge 1-D tensors (norm weights) element-wise instead of averaging them.
    #[serde(default)]
    include_norms: bool,
}

struct SignConsensus(Params);

impl MergeRule for SignConsensus {
    type Params = Params;

    fn new(params: Params) -> Result<Self, String> {
        Ok(Self(params))
    }

    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
        let n = tensor.stats.len();
        if n == 0 {
            return Err(format!("{} has no inputs", tensor.name));
        }
        let elementwise = tensor.layer.is_some() && (tensor.shape.len() > 1 || self.0.include_norms);
        Ok(if elementwise { MergePlan::Custom } else { MergePlan::Linear(vec![1.0 / n as f32; n]) })
    }

    fn merge(&self, _: &TensorInfo, _offset: u64, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), String> {
        for (i, o) in out.iter_mut().enumerate() {
            let sum: f32 = inputs.iter().map(|x| x[i]).sum();
            let (mut total, mut count) = (0.0f32, 0u32);
            for x in inputs {
                let v = x[i];
                if (v >= 0.0) == (sum >= 0.0) {
                    total += v;
                    count += 1;
                }
            }
            *o = if count == 0 { 0.0 } else { total / count as f32 };
        }
        Ok(())
    }
}

dusflow_sdk::merge_rule!(SignConsensus);
