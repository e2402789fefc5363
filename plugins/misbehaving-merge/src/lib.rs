//! Test fixture for the merge step: a merge rule that plans every layer tensor `custom` and writes the
//! value its params ask for: `value = "nan"`, `"inf"` or `"-inf"` (non-finite output the host must
//! refuse), or `"mean"` (the element-wise mean: a well-behaved custom merge). Other tensors are averaged
//! natively.

use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    value: String,
}

struct Misbehave(Params);

impl MergeRule for Misbehave {
    type Params = Params;

    fn new(params: Params) -> Result<Self, String> {
        match params.value.as_str() {
            "nan" | "inf" | "-inf" | "mean" => Ok(Self(params)),
            other => Err(format!("unknown value {other:?}")),
        }
    }

    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
        Ok(match tensor.layer {
            Some(_) => MergePlan::Custom,
            None => MergePlan::Linear(vec![1.0 / tensor.stats.len() as f32; tensor.stats.len()]),
        })
    }

    fn merge(
        &self,
        _tensor: &TensorInfo,
        _offset: u64,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), String> {
        let fixed = match self.0.value.as_str() {
            "nan" => Some(f32::NAN),
            "inf" => Some(f32::INFINITY),
            "-inf" => Some(f32::NEG_INFINITY),
            _ => None,
        };
        for (i, o) in out.iter_mut().enumerate() {
            *o = match fixed {
                Some(v) => v,
                None => inputs.iter().map(|x| x[i]).sum::<f32>() / inputs.len() as f32,
            };
        }
        Ok(())
    }
}

dusflow_sdk::merge_rule!(Misbehave);
