//! Test fixture for the merge step: a merge rule that plans every layer tensor `custom` and writes the
//! value its params ask for: `value = "nan"`, `"inf"` or `"-inf"` (non-finite output the host must
//! refuse), or `"mean"` (the element-wise mean: a well-behaved custom merge). Other tensors are averaged
//! natively. With `truncate = PATH` (and a write grant to its folder) it first cuts that file to `to`
//! bytes, when asked to plan the first tensor: an input model changing while the host reads it.

use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    value: String,
    #[serde(default)]
    truncate: String,
    #[serde(default)]
    to: u64,
}

struct Misbehave(Params, std::cell::Cell<bool>);

impl MergeRule for Misbehave {
    type Params = Params;

    fn new(params: Params) -> Result<Self, String> {
        match params.value.as_str() {
            "nan" | "inf" | "-inf" | "mean" => Ok(Self(params, Default::default())),
            other => Err(format!("unknown value {other:?}")),
        }
    }

    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
        if !self.0.truncate.is_empty() && !self.1.replace(true) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&self.0.truncate)
                .and_then(|f| f.set_len(self.0.to))
                .map_err(|e| format!("cannot truncate {}: {e}", self.0.truncate))?;
        }
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
