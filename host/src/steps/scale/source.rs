//! An input model of a `scale` step: its config.json, its memory-mapped tensors, and those tensors sorted
//! into per-layer tensors (`<prefix>layers.<i>.<suffix>`) and the rest (embeddings, final norm, head).

use crate::model::{check_weights, LlamaConfig, TensorStore};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Config keys that must agree between models whose layers are stacked together.
pub const SHAPE_KEYS: [&str; 7] = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
];

/// One input model, opened for streaming.
pub struct SourceModel {
    /// The name it has in the step (`inputs = { model = [...] }`).
    pub name: String,
    /// Its folder.
    pub path: PathBuf,
    /// config.json verbatim.
    pub config_text: String,
    /// config.json parsed.
    pub config: serde_json::Value,
    /// Its tensors.
    pub store: TensorStore,
    /// What comes before the layer index in layer tensor names, e.g. `model.layers.`.
    pub layer_prefix: String,
    /// Layer-relative tensor names (e.g. `self_attn.o_proj.weight`), identical for every layer, sorted.
    pub layer_suffixes: Vec<String>,
    /// Number of layers (`num_hidden_layers`, checked against the tensors).
    pub num_layers: usize,
    /// Tensors outside the layers, by name.
    pub other_tensors: Vec<String>,
}

impl std::fmt::Debug for SourceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceModel")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("num_layers", &self.num_layers)
            .finish()
    }
}

impl SourceModel {
    /// Opens the Hugging Face model folder `path` (config.json + safetensors, one file or sharded).
    pub fn open(name: &str, path: &Path) -> Result<Self> {
        let config_path = path.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("model `{name}`: reading {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&config_text).with_context(|| {
            format!(
                "model `{name}`: {} is not valid JSON",
                config_path.display()
            )
        })?;
        let declared = config
            .get("num_hidden_layers")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                anyhow!(
                    "model `{name}`: {} has no integer `num_hidden_layers`",
                    config_path.display()
                )
            })? as usize;
        // The architecture must be one dusflow runs (heads that divide, known model type), and the
        // checkpoint must hold what the config says, before anything is written.
        let llama = LlamaConfig::from_json_str(&config_text)
            .with_context(|| format!("model `{name}`: {}", config_path.display()))?;
        let store = TensorStore::open(path)
            .with_context(|| format!("model `{name}`: opening its tensors"))?;
        check_weights(&store, &llama).with_context(|| format!("model `{name}`"))?;

        let mut prefix: Option<String> = None;
        let mut per_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut other_tensors = Vec::new();
        for tensor in store.names() {
            match split_layer_name(tensor) {
                Some((p, layer, suffix)) => {
                    match &prefix {
                        None => prefix = Some(p.to_string()),
                        Some(existing) if existing != p => {
                            bail!("model `{name}`: layer tensors under two prefixes, `{existing}` and `{p}` (tensor {tensor:?})")
                        }
                        _ => {}
                    }
                    per_layer.entry(layer).or_default().push(suffix.to_string());
                }
                None => other_tensors.push(tensor.to_string()),
            }
        }
        let layer_prefix = prefix.ok_or_else(|| {
            anyhow!(
                "model `{name}`: no layer tensors (names like `model.layers.0.…`) in {}",
                path.display()
            )
        })?;
        let found = per_layer.keys().next_back().map_or(0, |l| l + 1);
        if found != declared || per_layer.len() != declared {
            bail!("model `{name}`: config.json says num_hidden_layers = {declared}, but the checkpoint has tensors for {} layers (highest index {})", per_layer.len(), found.saturating_sub(1));
        }
        let mut layer_suffixes = per_layer.get(&0).cloned().unwrap_or_default();
        layer_suffixes.sort();
        for (layer, suffixes) in &mut per_layer {
            suffixes.sort();
            if *suffixes != layer_suffixes {
                let missing: Vec<_> = layer_suffixes
                    .iter()
                    .filter(|s| !suffixes.contains(s))
                    .collect();
                let extra: Vec<_> = suffixes
                    .iter()
                    .filter(|s| !layer_suffixes.contains(s))
                    .collect();
                if let Some(missing) = missing.first() {
                    bail!(
                        "model `{name}`: missing tensor {:?} in {} (layer 0 has {:?})",
                        format!("{layer_prefix}{layer}.{missing}"),
                        store.describe(),
                        format!("{layer_prefix}0.{missing}")
                    );
                }
                bail!(
                    "model `{name}`: tensor {:?} in {} has no counterpart {:?} in layer 0 (every layer must hold \
                     the same tensors)",
                    format!("{layer_prefix}{layer}.{}", extra[0]),
                    store.describe(),
                    format!("{layer_prefix}0.{}", extra[0])
                );
            }
            for s in suffixes.iter() {
                let t0 = store.meta(&format!("{layer_prefix}0.{s}"))?;
                let t = store.meta(&format!("{layer_prefix}{layer}.{s}"))?;
                if (t.dtype, t.shape) != (t0.dtype, t0.shape) {
                    bail!(
                        "model `{name}`: tensor {:?} is {} {:?} but layer 0's is {} {:?}",
                        t.name,
                        t.dtype,
                        t.shape,
                        t0.dtype,
                        t0.shape
                    );
                }
            }
        }
        Ok(SourceModel {
            name: name.to_string(),
            path: path.to_path_buf(),
            config_text,
            config,
            store,
            layer_prefix,
            layer_suffixes,
            num_layers: declared,
            other_tensors,
        })
    }

    /// The file holding tensor `name` and the absolute offset of its data there.
    pub fn location(&self, name: &str) -> Result<(&File, u64)> {
        self.store
            .location(name)
            .with_context(|| format!("model `{}`", self.name))
    }

    /// Full name of a layer tensor.
    pub fn layer_tensor(&self, layer: usize, suffix: &str) -> String {
        format!("{}{layer}.{suffix}", self.layer_prefix)
    }

    /// Whether a non-layer tensor belongs to the bottom of the model (embeddings) rather than the top.
    pub fn is_embedding(name: &str) -> bool {
        name.contains("embed")
    }

    /// The dtype of the layer tensors.
    pub fn layer_dtype(&self) -> Result<Dtype> {
        let s = self
            .layer_suffixes
            .first()
            .ok_or_else(|| anyhow!("model `{}` has empty layers", self.name))?;
        Ok(self.store.meta(&self.layer_tensor(0, s))?.dtype)
    }
}

/// Splits `model.layers.12.mlp.up_proj.weight` into (`model.layers.`, 12, `mlp.up_proj.weight`).
pub fn split_layer_name(name: &str) -> Option<(&str, usize, &str)> {
    let mut search = 0;
    while let Some(pos) = name[search..].find("layers.") {
        let start = search + pos;
        let at_boundary = start == 0 || name.as_bytes()[start - 1] == b'.';
        let after = start + "layers.".len();
        let digits = name[after..].bytes().take_while(u8::is_ascii_digit).count();
        if at_boundary && digits > 0 && name[after + digits..].starts_with('.') {
            let layer = name[after..after + digits].parse().ok()?;
            return Some((&name[..after], layer, &name[after + digits + 1..]));
        }
        search = after;
    }
    None
}

/// Checks that models whose layers are stacked together can be: same architecture shape (config keys
/// [`SHAPE_KEYS`]), same layer tensors with the same shapes, and (for embeddings and head from different
/// models) the same vocabulary size.
pub fn check_compatible(
    models: &[&SourceModel],
    embed: &SourceModel,
    head: &SourceModel,
) -> Result<()> {
    let first = models[0];
    for m in &models[1..] {
        for key in SHAPE_KEYS {
            if first.config.get(key) != m.config.get(key) {
                bail!(
                    "incompatible models: `{}` has {key} = {} but `{}` has {key} = {}",
                    first.name,
                    first
                        .config
                        .get(key)
                        .map_or("(none)".into(), |v| v.to_string()),
                    m.name,
                    m.config.get(key).map_or("(none)".into(), |v| v.to_string())
                );
            }
        }
        if m.layer_suffixes != first.layer_suffixes {
            bail!(
                "incompatible models: the layers of `{}` and `{}` hold different tensors",
                first.name,
                m.name
            );
        }
        for s in &first.layer_suffixes {
            let a = first.store.meta(&first.layer_tensor(0, s))?;
            let b = m.store.meta(&m.layer_tensor(0, s))?;
            if a.shape != b.shape {
                bail!(
                    "incompatible models: `{s}` is {:?} in `{}` but {:?} in `{}`",
                    a.shape,
                    first.name,
                    b.shape,
                    m.name
                );
            }
        }
    }
    if embed.config.get("vocab_size") != head.config.get("vocab_size") {
        bail!(
            "incompatible models: embeddings from `{}` (vocab_size {}) and head from `{}` (vocab_size {})",
            embed.name,
            embed.config.get("vocab_size").map_or("(none)".into(), |v| v.to_string()),
            head.name,
            head.config.get("vocab_size").map_or("(none)".into(), |v| v.to_string())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_layer_name;

    #[test]
    fn layer_names_split_at_the_index() {
        assert_eq!(
            split_layer_name("model.layers.12.mlp.up_proj.weight"),
            Some(("model.layers.", 12, "mlp.up_proj.weight"))
        );
        assert_eq!(split_layer_name("layers.0.w"), Some(("layers.", 0, "w")));
        assert_eq!(split_layer_name("model.embed_tokens.weight"), None);
        assert_eq!(split_layer_name("model.sublayers.3.w"), None);
        assert_eq!(split_layer_name("model.layers.x.w"), None);
    }
}
