//! Merge parameters that vary by tensor, with mergekit's semantics: a plain number, a per-layer gradient
//! (a list interpolated over the layers), or a list of tensor-name filters (first match wins).
//!
//! ```toml
//! t = 0.5                                             # every tensor
//! t = [0.0, 0.5, 1.0]                                 # layer 0 → 0.0, middle → 0.5, last → 1.0
//! t = [{ filter = "self_attn", value = [0, 1] },      # attention tensors: a gradient
//!      { filter = "mlp", value = 0.3 },               # MLP tensors: 0.3
//!      { value = 0.5 }]                               # everything else
//! ```
//!
//! Position along a gradient (mergekit's `t`): layer `i` of `n` sits at `i / (n − 1)` (at 1 when `n = 1`);
//! tensors outside the layers (embeddings, final norm, LM head) sit at 0. A filter matches when it is
//! absent, `"*"`, or a substring of the tensor name.

use serde::{Deserialize, Serialize};

/// A value, or a gradient of values over the layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// The same value everywhere.
    Value(f64),
    /// Anchor values spread evenly over the layers, linearly interpolated between anchors.
    Gradient(Vec<f64>),
}

/// One entry of a filtered parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    /// Substring of the tensor name (`self_attn`, `mlp`, `lm_head`...); absent or `"*"` matches all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// The value (or gradient) for matching tensors.
    pub value: Scalar,
}

/// A merge parameter as written in the workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Param {
    /// The same value everywhere.
    Value(f64),
    /// A per-layer gradient.
    Gradient(Vec<f64>),
    /// Filters tried in order; the first matching one gives the value.
    Filtered(Vec<FilterRule>),
}

impl From<f64> for Param {
    fn from(v: f64) -> Self {
        Param::Value(v)
    }
}

/// Where a tensor sits along the layers, for gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorPosition {
    /// Fraction in `[0, 1]` (mergekit's `t`).
    pub fraction: f64,
}

impl TensorPosition {
    /// The position of tensor `name` in a model of `num_layers` layers: `layers.i` → `i / (num_layers − 1)`,
    /// anything outside the layers → 0.
    pub fn of(name: &str, num_layers: usize) -> Self {
        let fraction = match layer_index(name) {
            Some(i) if num_layers > 1 => i as f64 / (num_layers - 1) as f64,
            Some(_) => 1.0,
            None => 0.0,
        };
        TensorPosition { fraction }
    }
}

/// The layer index in names like `model.layers.12.mlp.up_proj.weight`.
pub fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

impl Scalar {
    /// The value at `pos`: mergekit's interpolation (`t·(n−1)` split into index and fraction, in f64).
    pub fn at(&self, pos: TensorPosition) -> Option<f64> {
        match self {
            Scalar::Value(v) => Some(*v),
            Scalar::Gradient(values) => interpolate(values, pos.fraction),
        }
    }

    fn values(&self) -> &[f64] {
        match self {
            Scalar::Value(v) => std::slice::from_ref(v),
            Scalar::Gradient(values) => values,
        }
    }
}

fn interpolate(values: &[f64], t: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let scaled = t * (values.len() - 1) as f64;
    let i0 = scaled as usize;
    let i1 = (i0 + 1).min(values.len() - 1);
    let frac = scaled - i0 as f64;
    Some((1.0 - frac) * values[i0] + frac * values[i1])
}

impl Param {
    /// The value for tensor `name` at `pos`; `None` when no filter matches (the caller's default applies).
    pub fn resolve(&self, name: &str, pos: TensorPosition) -> Option<f64> {
        match self {
            Param::Value(v) => Some(*v),
            Param::Gradient(values) => interpolate(values, pos.fraction),
            Param::Filtered(rules) => rules
                .iter()
                .find(|r| r.matches(name))
                .and_then(|r| r.value.at(pos)),
        }
    }

    /// Every number written (anchors of gradients, values of filters), for range checks.
    pub fn anchors(&self) -> Vec<f64> {
        match self {
            Param::Value(v) => vec![*v],
            Param::Gradient(values) => values.clone(),
            Param::Filtered(rules) => rules
                .iter()
                .flat_map(|r| r.value.values().iter().copied())
                .collect(),
        }
    }

    /// A problem with the shape of the parameter (an empty list), if any.
    pub fn shape_issue(&self) -> Option<String> {
        match self {
            Param::Gradient(v) if v.is_empty() => {
                Some("a gradient needs at least one value".into())
            }
            Param::Filtered(rules) if rules.is_empty() => {
                Some("a filter list needs at least one entry".into())
            }
            Param::Filtered(rules) => rules
                .iter()
                .position(|r| r.value.values().is_empty())
                .map(|i| format!("filter entry {i} has an empty gradient")),
            _ => None,
        }
    }
}

impl FilterRule {
    /// Whether this rule applies to tensor `name` (mergekit: no filter, `*`, or a substring).
    pub fn matches(&self, name: &str) -> bool {
        match self.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => name.contains(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_positions_follow_mergekit() {
        // 4 layers: t = 0, 1/3, 2/3, 1; three anchors → index 0..2.
        let g = Param::Gradient(vec![0.0, 0.5, 1.0]);
        let at = |name: &str| g.resolve(name, TensorPosition::of(name, 4)).unwrap();
        assert_eq!(at("model.embed_tokens.weight"), 0.0);
        assert_eq!(at("model.layers.0.mlp.up_proj.weight"), 0.0);
        assert!((at("model.layers.1.mlp.up_proj.weight") - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(at("model.layers.3.mlp.up_proj.weight"), 1.0);
        assert_eq!(at("model.norm.weight"), 0.0);
        assert_eq!(TensorPosition::of("model.layers.0.x", 1).fraction, 1.0);
    }

    #[test]
    fn first_matching_filter_wins() {
        let p: Param = toml::from_str::<toml::Table>(
            "p = [{ filter = \"self_attn\", value = 0.1 }, { filter = \"mlp\", value = [0.0, 1.0] }, { value = 0.5 }]",
        )
        .unwrap()["p"]
            .clone()
            .try_into()
            .unwrap();
        let pos = TensorPosition { fraction: 0.25 };
        assert_eq!(
            p.resolve("model.layers.1.self_attn.q_proj.weight", pos),
            Some(0.1)
        );
        assert_eq!(
            p.resolve("model.layers.1.mlp.up_proj.weight", pos),
            Some(0.25)
        );
        assert_eq!(p.resolve("lm_head.weight", pos), Some(0.5));
        let only = Param::Filtered(vec![FilterRule {
            filter: Some("mlp".into()),
            value: Scalar::Value(1.0),
        }]);
        assert_eq!(only.resolve("lm_head.weight", pos), None);
    }
}
