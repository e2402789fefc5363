//! The layer plan every policy produces (built-in, explicit slices, or plugin) and the streaming writer
//! executes: per new layer, which input model and layer it copies and which tensors it transforms.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What to do to one tensor of a copied layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformOp {
    /// Replace every element by +0.0 (LLaMA-Pro: a new block whose output projections are zero is the identity).
    Zero,
    /// Multiply every element by a factor, computed in f32 and rounded once to the stored dtype (as
    /// `tensor * factor` in torch, i.e. mergekit's passthrough `scale` parameter).
    Scale(f32),
}

/// A transform of the tensors of one layer whose layer-relative name (e.g. `self_attn.o_proj.weight`)
/// ends with `tensor_suffix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorTransform {
    /// Suffix of the layer-relative tensor name; must match at least one tensor of the layer.
    pub tensor_suffix: String,
    /// The transform.
    pub op: TransformOp,
}

impl TensorTransform {
    /// `o_proj` and `down_proj` multiplied by `factor` (0 = LLaMA-Pro's identity initialisation).
    pub fn output_projections(op: TransformOp) -> Vec<TensorTransform> {
        ["self_attn.o_proj.weight", "mlp.down_proj.weight"]
            .into_iter()
            .map(|s| TensorTransform {
                tensor_suffix: s.to_string(),
                op,
            })
            .collect()
    }
}

/// One layer of the new model: layer `layer` of input model `model`, then `transforms` in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSource {
    /// Index into the step's input models.
    pub model: usize,
    /// Layer index in that model.
    pub layer: usize,
    /// Transforms applied to the copied tensors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<TensorTransform>,
}

impl LayerSource {
    /// An unchanged copy of layer `layer` of model `model`.
    pub fn copy(model: usize, layer: usize) -> Self {
        LayerSource {
            model,
            layer,
            transforms: Vec::new(),
        }
    }
}

/// The new model: its layers bottom to top, and the models that give everything that is not a layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalePlan {
    /// Input model providing the embeddings, config.json and tokenizer files (mergekit: the first slice's).
    pub embed_model: usize,
    /// Input model providing the final norm and the LM head (mergekit: the last slice's).
    pub head_model: usize,
    /// The new model's layers.
    pub layers: Vec<LayerSource>,
}

impl ScalePlan {
    /// A plan whose embeddings come from the first layer's model and whose head comes from the last
    /// layer's model, as mergekit's passthrough does.
    pub fn from_layers(layers: Vec<LayerSource>) -> Self {
        let embed_model = layers.first().map_or(0, |l| l.model);
        let head_model = layers.last().map_or(0, |l| l.model);
        ScalePlan {
            embed_model,
            head_model,
            layers,
        }
    }

    /// Checks the plan against the input models' layer counts (`layers[i]` = layers of model `i`) and the
    /// sanity limit; `policy` names the policy in messages.
    pub fn validate(
        &self,
        policy: &str,
        names: &[String],
        layers: &[usize],
        max_layers: usize,
    ) -> Result<()> {
        let models = layers.len();
        if self.layers.is_empty() {
            bail!("policy `{policy}` returned no layers");
        }
        if self.layers.len() > max_layers {
            bail!(
                "policy `{policy}` returned {} layers, over the limit max_layers = {max_layers} (raise it if you mean it)",
                self.layers.len()
            );
        }
        for (what, m) in [("embeddings", self.embed_model), ("head", self.head_model)] {
            if m >= models {
                bail!("policy `{policy}` takes the {what} from model {m}, but the step has {models} input model(s)");
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            let Some(&n) = layers.get(l.model) else {
                bail!("policy `{policy}`: new layer {i} takes model {}, but the step has {models} input model(s)", l.model);
            };
            if l.layer >= n {
                bail!(
                    "policy `{policy}`: new layer {i} takes layer {} of model `{}`, which has {n} layers (0..{n})",
                    l.layer,
                    names[l.model]
                );
            }
            for t in &l.transforms {
                if t.tensor_suffix.is_empty() {
                    bail!("policy `{policy}`: new layer {i} has a transform with an empty tensor suffix");
                }
                if let TransformOp::Scale(f) = t.op {
                    if !f.is_finite() {
                        bail!(
                            "policy `{policy}`: new layer {i} scales `{}` by {f}",
                            t.tensor_suffix
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
