//! A per-layer schedule for merging two models: a linear merge whose weight for the second model moves
//! linearly from `from` at the first layer to `to` at the last (e.g. more of model A early, more of B late),
//! and is `outside` for embeddings, final norm and LM head. Every tensor is planned `linear`, so the host
//! does the arithmetic natively at full speed.

use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Weight of the second model at the first layer.
    #[serde(default)]
    from: f32,
    /// Weight of the second model at the last layer.
    #[serde(default = "one")]
    to: f32,
    /// Weight of the second model outside the layers.
    #[serde(default = "half")]
    outside: f32,
}

fn one() -> f32 {
    1.0
}

fn half() -> f32 {
    0.5
}

struct LayerSchedule(Params);

impl LayerSchedule {
    /// The second model's weight for `tensor`.
    fn weight(&self, tensor: &TensorInfo) -> f32 {
        let p = &self.0;
        match tensor.layer {
            None => p.outside,
            Some(_) if tensor.num_layers <= 1 => p.from,
            Some(layer) => {
                let x = layer as f32 / (tensor.num_layers - 1) as f32;
                p.from + (p.to - p.from) * x
            }
        }
    }
}

impl MergeRule for LayerSchedule {
    type Params = Params;

    fn new(params: Params) -> Result<Self, String> {
        for (name, v) in [("from", params.from), ("to", params.to), ("outside", params.outside)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} = {v} must be between 0 and 1"));
            }
        }
        Ok(Self(params))
    }

    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
        if tensor.stats.len() != 2 {
            return Err(format!("{}: layer-schedule merges exactly two models, got {}", tensor.name, tensor.stats.len()));
        }
        let w = self.weight(tensor);
        Ok(MergePlan::Linear(vec![1.0 - w, w]))
    }

    fn merge(&self, tensor: &TensorInfo, _offset: u64, _inputs: &[&[f32]], _out: &mut [f32]) -> Result<(), String> {
        Err(format!("{}: every tensor is planned linear; no element-wise merge", tensor.name))
    }
}

dusflow_sdk::merge_rule!(LayerSchedule);
