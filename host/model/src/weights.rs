//! Getting weights into a model and back out: load a Hugging Face folder (as trainable `Var`s or plain
//! tensors), initialise from scratch, and save as a Hugging Face folder in a chosen dtype.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::checkpoint_writer::{
    write_checkpoint, ShardOptions, StagingDir, TensorSpec, WrittenCheckpoint,
};
use super::config::LlamaConfig;
use super::llama::Llama;
use super::tensor_store::{safetensors_dtype, TensorStore};

/// Files copied verbatim from the source folder when saving (tokenizer and generation settings).
pub const AUX_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Checks a checkpoint against its config before any tensor data is read: every weight the config requires
/// is present with the shape it implies, and no layer tensor lies beyond `num_hidden_layers`. Errors name
/// the tensor and the file (or index) that should hold it. Extra tensors outside the layers are allowed.
pub fn check_weights(store: &TensorStore, cfg: &LlamaConfig) -> Result<()> {
    for (name, shape) in cfg.weight_shapes() {
        let Some(meta) = store.get(&name) else {
            let why = if name == "lm_head.weight" {
                " (config.json has tie_word_embeddings = false, so the model needs its own head)"
                    .to_string()
            } else {
                format!(
                    " (config.json: {} layers of hidden size {})",
                    cfg.num_hidden_layers, cfg.hidden_size
                )
            };
            bail!("{}: missing tensor {name:?}{why}", store.describe());
        };
        if meta.shape != shape.as_slice() {
            bail!(
                "tensor {name:?} in {} has shape {:?}, but config.json implies {:?}",
                meta.file.display(),
                meta.shape,
                shape
            );
        }
    }
    for meta in store.metas() {
        if let Some(layer) = layer_of(meta.name) {
            if layer >= cfg.num_hidden_layers {
                bail!(
                    "tensor {:?} in {} belongs to layer {layer}, but config.json says num_hidden_layers = {}",
                    meta.name,
                    meta.file.display(),
                    cfg.num_hidden_layers
                );
            }
        }
    }
    Ok(())
}

/// The layer index of `model.layers.<i>.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Reads every weight that `cfg` requires from `store` ([`check_weights`] first), converted to `dtype`.
/// Extra tensors are ignored except a redundant `lm_head.weight` of a tied model.
pub fn load_tensors(
    store: &TensorStore,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    check_weights(store, cfg)?;
    let mut out = HashMap::new();
    for (name, shape) in cfg.weight_shapes() {
        out.insert(name.clone(), store.tensor_as(&name, &shape, dtype, device)?);
    }
    Ok(out)
}

/// Loads a model folder (config + weights) for inference in `dtype`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Llama> {
    let cfg = LlamaConfig::from_path(dir)?;
    let store = TensorStore::open(dir)?;
    let tensors = load_tensors(&store, &cfg, dtype, device)?;
    Llama::new(&cfg, VarBuilder::from_tensors(tensors, dtype, device))
        .with_context(|| format!("building model from {}", dir.display()))
}

/// Loads a model folder as trainable variables in `dtype` (e.g. f32 master weights from a bf16 checkpoint).
/// Returns the `VarMap` holding every weight and the model built on it.
pub fn load_trainable(dir: &Path, dtype: DType, device: &Device) -> Result<(VarMap, Llama)> {
    let cfg = LlamaConfig::from_path(dir)?;
    let store = TensorStore::open(dir)?;
    let tensors = load_tensors(&store, &cfg, dtype, device)?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let model = Llama::new(&cfg, VarBuilder::from_varmap(&varmap, dtype, device))?;
    Ok((varmap, model))
}

/// A freshly initialised trainable model: linear and embedding weights ~ normal(0, `initializer_range`)
/// (as transformers' `_init_weights`), norm weights 1, the `pad_token_id` row of the embedding 0.
/// Deterministic for a given `seed` (the values differ from PyTorch's RNG stream).
pub fn init_trainable(
    cfg: &LlamaConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(VarMap, Llama)> {
    cfg.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, cfg.initializer_range as f32).context("initializer_range")?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, shape) in cfg.weight_shapes() {
            let n: usize = shape.iter().product();
            let mut values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            // transformers' nn.Embedding(padding_idx=pad_token_id) starts with a zero padding row.
            if name == "model.embed_tokens.weight" {
                if let Some(pad) = cfg
                    .pad_token_id
                    .map(|p| p as usize)
                    .filter(|p| *p < cfg.vocab_size)
                {
                    values[pad * cfg.hidden_size..(pad + 1) * cfg.hidden_size].fill(0.0);
                }
            }
            let t = Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let model = Llama::new(cfg, VarBuilder::from_varmap(&varmap, dtype, device))?;
    Ok((varmap, model))
}

/// How to save a model folder.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Dtype of the weights on disk.
    pub dtype: DType,
    /// Sharding; default one file.
    pub shards: ShardOptions,
    /// Folder whose tokenizer and generation-config files ([`AUX_FILES`]) are copied, if any.
    pub copy_from: Option<PathBuf>,
    /// Replace an existing destination folder.
    pub replace: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::F32,
            shards: ShardOptions::default(),
            copy_from: None,
            replace: false,
        }
    }
}

/// Saves `model`'s weights with `cfg` as a Hugging Face folder at `dir`, atomically (staging folder, then
/// rename). Tensors are converted to the target dtype one at a time.
pub fn save_model(dir: &Path, model: &Llama, opts: &SaveOptions) -> Result<WrittenCheckpoint> {
    save_tensors(dir, model.config(), &model.named_weights(), opts)
}

/// Saves the variables of a `VarMap` (e.g. after training) with `cfg` as a Hugging Face folder at `dir`, in
/// model order; every weight that `cfg` requires must be present. See [`save_model`].
pub fn save_varmap(
    dir: &Path,
    cfg: &LlamaConfig,
    varmap: &VarMap,
    opts: &SaveOptions,
) -> Result<WrittenCheckpoint> {
    let tensors = {
        let data = varmap.data().lock().expect("varmap lock");
        cfg.weight_shapes()
            .into_iter()
            .map(|(name, _)| match data.get(&name) {
                Some(v) => Ok((name, v.as_tensor().clone())),
                None => bail!("VarMap has no variable {name:?} (required by the config)"),
            })
            .collect::<Result<Vec<_>>>()?
    };
    save_tensors(dir, cfg, &tensors, opts)
}

/// Saves named tensors (checkpoint names) with `cfg` as a Hugging Face folder at `dir`; see [`save_model`].
pub fn save_tensors(
    dir: &Path,
    cfg: &LlamaConfig,
    tensors: &[(String, Tensor)],
    opts: &SaveOptions,
) -> Result<WrittenCheckpoint> {
    let st_dtype = safetensors_dtype(opts.dtype)?;
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), st_dtype, t.dims().to_vec()))
        .collect();
    let staging = StagingDir::new(dir)?;
    let written = write_checkpoint(staging.path(), &specs, opts.shards, |spec| {
        Ok(Cow::Owned(tensor_bytes(
            by_name[spec.name.as_str()],
            opts.dtype,
        )?))
    })?;
    let mut cfg = cfg.clone();
    let dtype_name = torch_dtype_name(opts.dtype);
    if cfg.extra.contains_key("dtype") {
        cfg.extra.insert("dtype".into(), dtype_name.into());
    } else {
        cfg.extra.insert("torch_dtype".into(), dtype_name.into());
    }
    std::fs::write(staging.path().join("config.json"), cfg.to_json_string()?)?;
    if let Some(src) = &opts.copy_from {
        copy_aux_files(src, staging.path())?;
    }
    staging.commit(opts.replace)?;
    Ok(written)
}

/// Copies the [`AUX_FILES`] present in `src` into `dst`.
pub fn copy_aux_files(src: &Path, dst: &Path) -> Result<()> {
    for name in AUX_FILES {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, dst.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}

/// The little-endian bytes of `t` converted to `dtype`.
pub fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => bail!("saving {other:?} tensors is not supported"),
    })
}

fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}
