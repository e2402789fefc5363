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
        let elementwise =
            tensor.layer.is_some() && (tensor.shape.len() > 1 || self.0.include_norms);
        Ok(if elementwise {
            MergePlan::Custom
        } else {
            MergePlan::Linear(vec![1.0 / n as f32; n])
        })
    }

    fn merge(
        &self,
        _: &TensorInfo,
        _offset: u64,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), String> {
        // Whole-slice passes (sum, then agreeing total and count) rather than a loop over inputs
        // per element: each pass is a straight loop the compiler vectorises with simd128.
        let mut sum = vec![0.0f32; out.len()];
        for x in inputs {
            sum.iter_mut().zip(x.iter()).for_each(|(s, v)| *s += v);
        }
        let mut count = vec![0.0f32; out.len()];
        out.fill(0.0);
        for x in inputs {
            for (((o, c), s), &v) in out.iter_mut().zip(count.iter_mut()).zip(&sum).zip(x.iter()) {
                let agree = (v >= 0.0) == (*s >= 0.0);
                *o += if agree { v } else { 0.0 };
                *c += if agree { 1.0 } else { 0.0 };
            }
        }
        out.iter_mut()
            .zip(&count)
            .for_each(|(o, c)| *o = if *c == 0.0 { 0.0 } else { *o / c });
        Ok(())
    }
}

dusflow_sdk::merge_rule!(SignConsensus);
