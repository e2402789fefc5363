//! Plain Rust types exchanged with plugins, independent of the generated WIT bindings: what the
//! scale, data and merge steps pass in and get back.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The three kinds of plugin, one per WIT world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Chooses the layers of an up-scaled model (`layer-policy`).
    LayerPolicy,
    /// Keeps, drops or rewrites data records (`data-filter`).
    DataFilter,
    /// Plans per-tensor merges (`merge-rule`).
    MergeRule,
}

impl PluginKind {
    /// Every kind, in WIT order.
    pub const ALL: [PluginKind; 3] = [
        PluginKind::LayerPolicy,
        PluginKind::DataFilter,
        PluginKind::MergeRule,
    ];

    /// The WIT interface name (`layer-policy`, `data-filter`, `merge-rule`).
    pub fn interface(self) -> &'static str {
        match self {
            PluginKind::LayerPolicy => "layer-policy",
            PluginKind::DataFilter => "data-filter",
            PluginKind::MergeRule => "merge-rule",
        }
    }

    /// The WIT world a plugin of this kind implements.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::LayerPolicy => "layer-policy-plugin",
            PluginKind::DataFilter => "data-filter-plugin",
            PluginKind::MergeRule => "merge-rule-plugin",
        }
    }

    /// Parses a WIT interface name.
    pub fn from_interface(name: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.interface() == name)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.interface())
    }
}

impl std::str::FromStr for PluginKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        PluginKind::from_interface(s).with_context(|| {
            format!("unknown plugin kind '{s}' (expected layer-policy, data-filter or merge-rule)")
        })
    }
}

/// A plugin's identity, as it reports it through `info.describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Plugin name (a Rust plugin's crate name).
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// One-line description.
    pub description: String,
}

/// One input model of a `scale` step, as given to a layer policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// The model's name in the step (alias or path).
    pub name: String,
    /// `architectures[0]` of config.json.
    pub architecture: String,
    /// `num_hidden_layers`.
    pub num_layers: u32,
    /// `hidden_size`.
    pub hidden_size: u32,
    /// `intermediate_size`.
    pub intermediate_size: u32,
    /// `num_attention_heads`.
    pub num_attention_heads: u32,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub num_key_value_heads: u32,
    /// `vocab_size`.
    pub vocab_size: u32,
    /// The raw config.json text.
    pub config_json: String,
}

impl ModelDescription {
    /// Reads the fields a layer policy needs from a Hugging Face `config.json` text.
    pub fn from_config_json(name: &str, config_json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(config_json)
            .with_context(|| format!("config.json of {name} is not JSON"))?;
        let field = |key: &str| -> Result<u32> {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("config.json of {name} has no integer `{key}`"))
        };
        let heads = field("num_attention_heads")?;
        Ok(ModelDescription {
            name: name.to_string(),
            architecture: v["architectures"][0]
                .as_str()
                .unwrap_or("unknown")
                .to_string(),
            num_layers: field("num_hidden_layers")?,
            hidden_size: field("hidden_size")?,
            intermediate_size: field("intermediate_size")?,
            num_attention_heads: heads,
            num_key_value_heads: field("num_key_value_heads").unwrap_or(heads),
            vocab_size: field("vocab_size")?,
            config_json: config_json.to_string(),
        })
    }
}

/// What to do to a tensor of a copied layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformOp {
    /// Replace by zeros.
    Zero,
    /// Multiply by a factor.
    Scale(f32),
}

/// A transform for the tensors of a layer whose layer-relative name ends with `tensor_suffix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorTransform {
    /// E.g. `self_attn.o_proj.weight`.
    pub tensor_suffix: String,
    /// The transform.
    pub op: TransformOp,
}

/// One layer of the new model: layer `layer` of input model `model`, then `transforms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Index into the step's input models.
    pub model: usize,
    /// Layer index in that model.
    pub layer: usize,
    /// Transforms applied after copying.
    pub transforms: Vec<TensorTransform>,
}

/// A layer policy's answer: the new model's layers, and the input model that provides the
/// embeddings, final norm, LM head and config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Index into the step's input models.
    pub base_model: usize,
    /// The new model's layers, bottom to top.
    pub layers: Vec<LayerSpec>,
}

impl LayerPlan {
    /// Checks that every index is in range and every factor finite.
    pub fn validate(&self, models: &[ModelDescription]) -> Result<()> {
        if self.base_model >= models.len() {
            bail!(
                "base-model {} is out of range ({} input models)",
                self.base_model,
                models.len()
            );
        }
        if self.layers.is_empty() {
            bail!("the plan has no layers");
        }
        for (i, l) in self.layers.iter().enumerate() {
            let Some(m) = models.get(l.model) else {
                bail!(
                    "layer {i} takes model {} of {} input models",
                    l.model,
                    models.len()
                );
            };
            if l.layer >= m.num_layers as usize {
                bail!(
                    "layer {i} takes layer {} of model {} which has {} layers",
                    l.layer,
                    m.name,
                    m.num_layers
                );
            }
            for t in &l.transforms {
                if t.tensor_suffix.is_empty() {
                    bail!("layer {i} has a transform with an empty tensor suffix");
                }
                if let TransformOp::Scale(f) = t.op {
                    if !f.is_finite() {
                        bail!("layer {i} scales {} by {f}", t.tensor_suffix);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A data filter's answer for one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Keep the record unchanged.
    Keep,
    /// Remove the record.
    Drop,
    /// Replace the record by this JSON text (checked to be valid JSON).
    Rewrite(String),
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Decodes little-endian bytes of this type to f32.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// Whole-tensor statistics of one input, computed by the host for the merge rule.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TensorStats {
    /// Euclidean norm.
    pub l2_norm: f64,
    /// Mean of the elements.
    pub mean: f64,
    /// Standard deviation (population).
    pub std: f64,
    /// Largest absolute value.
    pub abs_max: f64,
}

impl TensorStats {
    /// Computes the statistics of a tensor given as little-endian bytes of `dtype`.
    pub fn compute(dtype: DType, bytes: &[u8]) -> TensorStats {
        let values = dtype.decode(bytes);
        let n = values.len().max(1) as f64;
        let (mut sum, mut sq, mut abs_max) = (0.0f64, 0.0f64, 0.0f64);
        for &v in &values {
            let v = f64::from(v);
            sum += v;
            sq += v * v;
            abs_max = abs_max.max(v.abs());
        }
        let mean = sum / n;
        TensorStats {
            l2_norm: sq.sqrt(),
            mean,
            std: (sq / n - mean * mean).max(0.0).sqrt(),
            abs_max,
        }
    }
}

/// One tensor to merge, as described to a merge rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Full tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Element type (of every input and of the output).
    pub dtype: DType,
    /// Layer index, none outside the layers.
    pub layer: Option<u32>,
    /// Number of layers of the merged model.
    pub num_layers: u32,
    /// Statistics per input model, in the step's order.
    pub stats: Vec<TensorStats>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Parses the layer index out of names like `model.layers.12.mlp.up_proj.weight`.
    pub fn layer_of(name: &str) -> Option<u32> {
        let mut parts = name.split('.');
        while let Some(p) = parts.next() {
            if p == "layers" || p == "h" || p == "blocks" {
                return parts.next()?.parse().ok();
            }
        }
        None
    }
}

/// How the host merges one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergePlan {
    /// `out = Σ coefficient[i] · input[i]`.
    Linear(Vec<f32>),
    /// Spherical interpolation from input 0 (t = 0) to input 1 (t = 1).
    Slerp(f32),
    /// `out = input[i]`.
    CopyFrom(usize),
    /// Stream the tensor through the plugin's `merge-chunk`.
    Custom,
}

impl MergePlan {
    /// Checks the plan against the number of inputs.
    pub fn validate(&self, inputs: usize) -> Result<()> {
        match self {
            MergePlan::Linear(c) if c.len() != inputs => {
                bail!(
                    "linear plan has {} coefficients for {inputs} inputs",
                    c.len()
                )
            }
            MergePlan::Linear(c) if c.iter().any(|x| !x.is_finite()) => {
                bail!("linear plan has a non-finite coefficient")
            }
            MergePlan::Slerp(_) if inputs != 2 => {
                bail!("slerp needs exactly 2 inputs, the step has {inputs}")
            }
            MergePlan::Slerp(t) if !t.is_finite() => bail!("slerp t = {t} is not finite"),
            MergePlan::CopyFrom(i) if *i >= inputs => {
                bail!("copy-from {i} is out of range ({inputs} inputs)")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_is_parsed_from_tensor_names() {
        assert_eq!(
            TensorInfo::layer_of("model.layers.12.mlp.up_proj.weight"),
            Some(12)
        );
        assert_eq!(TensorInfo::layer_of("model.embed_tokens.weight"), None);
    }

    #[test]
    fn stats_of_a_small_tensor() {
        let bytes: Vec<u8> = [3.0f32, -4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let s = TensorStats::compute(DType::F32, &bytes);
        assert_eq!((s.l2_norm, s.mean, s.std, s.abs_max), (5.0, -0.5, 3.5, 4.0));
    }

    #[test]
    fn plans_out_of_range_are_rejected() {
        assert!(MergePlan::Linear(vec![0.5]).validate(2).is_err());
        assert!(MergePlan::Slerp(0.5).validate(3).is_err());
        assert!(MergePlan::CopyFrom(2).validate(2).is_err());
        assert!(MergePlan::Linear(vec![0.5, 0.5]).validate(2).is_ok());
    }
}

/// The params of a step as plugins receive them: the step's TOML table serialised to JSON.
/// Use this (not an ad-hoc conversion) so every step passes params the same way.
pub fn params_json(table: &toml::Table) -> String {
    serde_json::to_string(table).expect("a TOML table is representable as JSON")
}

#[cfg(test)]
mod params_tests {
    #[test]
    fn toml_params_become_json() {
        let table: toml::Table =
            toml::from_str("m = 8\nname = 'x'\n[inner]\nlist = [1.5, 2.0]\n").unwrap();
        let json: serde_json::Value = serde_json::from_str(&super::params_json(&table)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"m": 8, "name": "x", "inner": {"list": [1.5, 2.0]}})
        );
    }
}
