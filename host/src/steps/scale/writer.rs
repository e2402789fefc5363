//! Executes a [`ScalePlan`]: streams tensors into canonical safetensors shards — unchanged tensors are
//! copied kernel-side from the input files, transformed or cast ones computed one at a time from the
//! input files — copies the tokenizer files and writes config.json, into a folder the caller makes atomic.

use super::config_json;
use super::copy_writer::{write_checkpoint_copying, TensorData};
use super::plan::{ScalePlan, TransformOp};
use super::source::{check_compatible, SourceModel};
use crate::model::checkpoint_writer::{ShardOptions, TensorSpec};
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// Files copied from the embedding model's folder when present: mergekit's tokenizer list plus `vocab.json`.
pub const TOKENIZER_FILES: [&str; 11] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// How to write the new model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Cast floating-point tensors to this dtype (F32, F16 or BF16); `None` keeps each tensor's dtype.
    pub dtype: Option<Dtype>,
    /// Sharding of the output.
    pub shard: ShardOptions,
}

/// What [`write_scaled`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleReport {
    /// Layers of the new model.
    pub layers: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Safetensors files written, in shard order.
    pub files: Vec<String>,
    /// Bytes of tensor data written.
    pub total_size: u64,
    /// Other files copied (tokenizer, generation config).
    pub copied: Vec<String>,
}

/// Where one output tensor comes from.
struct Job {
    model: usize,
    source: String,
    ops: Vec<TransformOp>,
}

/// Writes the model described by `plan` over `models` into the existing folder `out_dir`. `policy` names the
/// policy in error messages; `on_tensor(bytes, total)` is called after each tensor is produced (with its size
/// and the size of all tensors) and may return an error to stop (cancellation).
pub fn write_scaled(
    models: &[SourceModel],
    plan: &ScalePlan,
    policy: &str,
    out_dir: &Path,
    opts: &WriteOptions,
    on_tensor: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<ScaleReport> {
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let counts: Vec<usize> = models.iter().map(|m| m.num_layers).collect();
    plan.validate(policy, &names, &counts, usize::MAX)?;
    let embed = &models[plan.embed_model];
    let head = &models[plan.head_model];
    let mut used: Vec<usize> = plan
        .layers
        .iter()
        .map(|l| l.model)
        .chain([plan.embed_model, plan.head_model])
        .collect();
    used.sort();
    used.dedup();
    let used_models: Vec<&SourceModel> = used.iter().map(|&i| &models[i]).collect();
    check_compatible(&used_models, embed, head)?;
    if let Some(d) = opts.dtype {
        if !is_float(d) || d == Dtype::F64 {
            bail!("cannot cast to {d}: choose f32, f16 or bf16");
        }
    } else {
        let first = used_models[0].layer_dtype()?;
        for m in &used_models[1..] {
            let d = m.layer_dtype()?;
            if d != first {
                bail!("incompatible models: `{}` stores {first}, `{}` stores {d}; set `dtype` to cast them to one type", used_models[0].name, m.name);
            }
        }
    }

    let mut specs = Vec::new();
    let mut jobs = Vec::new();
    let mut push = |model: &SourceModel,
                    index: usize,
                    source: String,
                    out_name: String,
                    ops: Vec<TransformOp>|
     -> Result<()> {
        let meta = model.store.meta(&source)?;
        let dtype = match opts.dtype {
            Some(d) if is_float(meta.dtype) => d,
            _ => meta.dtype,
        };
        if !ops.is_empty() && !matches!(meta.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            bail!("policy `{policy}`: cannot transform {source:?} of model `{}`: it is {}, not f32/f16/bf16", model.name, meta.dtype);
        }
        specs.push(TensorSpec::new(out_name, dtype, meta.shape.to_vec()));
        jobs.push(Job {
            model: index,
            source,
            ops,
        });
        Ok(())
    };
    for t in embed
        .other_tensors
        .iter()
        .filter(|t| SourceModel::is_embedding(t))
    {
        push(embed, plan.embed_model, t.clone(), t.clone(), Vec::new())?;
    }
    for (i, layer) in plan.layers.iter().enumerate() {
        let m = &models[layer.model];
        for t in &layer.transforms {
            if !m
                .layer_suffixes
                .iter()
                .any(|s| s.ends_with(&t.tensor_suffix))
            {
                bail!(
                    "policy `{policy}`: new layer {i} transforms `{}`, which matches no tensor of a layer of `{}` ({})",
                    t.tensor_suffix,
                    m.name,
                    m.layer_suffixes.join(", ")
                );
            }
        }
        for s in &m.layer_suffixes {
            let ops = layer
                .transforms
                .iter()
                .filter(|t| s.ends_with(&t.tensor_suffix))
                .map(|t| t.op)
                .collect();
            push(
                m,
                layer.model,
                m.layer_tensor(layer.layer, s),
                embed.layer_tensor(i, s),
                ops,
            )?;
        }
    }
    for t in head
        .other_tensors
        .iter()
        .filter(|t| !SourceModel::is_embedding(t))
    {
        push(head, plan.head_model, t.clone(), t.clone(), Vec::new())?;
    }

    let total: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
    let by_name: HashMap<String, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let written = write_checkpoint_copying(out_dir, &specs, opts.shard, |spec| {
        let job = &jobs[by_name[&spec.name]];
        let model = &models[job.model];
        let meta = model.store.meta(&job.source)?;
        let out = if job.ops.is_empty() && spec.dtype == meta.dtype {
            let (file, offset) = model.location(&job.source)?;
            TensorData::FileRange { file, offset }
        } else {
            let bytes = model.store.bytes(&job.source)?;
            let out = transform(&bytes, meta.dtype, spec.dtype, &job.ops)
                .with_context(|| format!("tensor {:?} of model `{}`", job.source, model.name))?;
            TensorData::Bytes(out)
        };
        on_tensor(spec.byte_len() as u64, total)?;
        Ok(out)
    })?;
    // Kernel-side copies read the input files without looking: an input rewritten meanwhile fails here.
    for model in models {
        model
            .store
            .check_unchanged()
            .with_context(|| format!("model `{}`", model.name))?;
    }

    let mut copied = Vec::new();
    for file in TOKENIZER_FILES {
        let from = embed.path.join(file);
        if from.is_file() {
            std::fs::copy(&from, out_dir.join(file))
                .with_context(|| format!("copying {}", from.display()))?;
            copied.push(file.to_string());
        }
    }
    let config = output_config(&embed.config_text, plan.layers.len(), opts.dtype)
        .with_context(|| format!("rewriting config.json of `{}`", embed.name))?;
    std::fs::write(out_dir.join("config.json"), config).context("writing config.json")?;
    Ok(ScaleReport {
        layers: plan.layers.len(),
        tensors: specs.len(),
        files: written.files,
        total_size: written.total_size,
        copied,
    })
}

/// The new config.json: the source text with `num_hidden_layers` (and, when casting, `torch_dtype` / `dtype`) replaced.
pub fn output_config(text: &str, layers: usize, dtype: Option<Dtype>) -> Result<String> {
    let mut out = config_json::replace_value(text, "num_hidden_layers", &layers.to_string())?
        .ok_or_else(|| anyhow!("no top-level `num_hidden_layers`"))?;
    if let Some(d) = dtype {
        let name = format!("\"{}\"", torch_name(d));
        let mut found = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(t) = config_json::replace_value(&out, key, &name)? {
                out = t;
                found = true;
            }
        }
        if !found {
            out = config_json::append_member(&out, "torch_dtype", &name)?;
        }
    }
    Ok(out)
}

fn torch_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Converts little-endian `bytes` of `from` to `to`, applying `ops` the way torch does in mergekit: values
/// are first cast to `to`, then each scale is computed in f32 and rounded (to nearest even) to `to`. Any
/// `Zero` makes the whole tensor +0.0.
pub fn transform(bytes: &[u8], from: Dtype, to: Dtype, ops: &[TransformOp]) -> Result<Vec<u8>> {
    if ops.contains(&TransformOp::Zero) {
        // A zeroed tensor is +0.0 everywhere, whatever (finite) scale comes before or after.
        let n = bytes.len() / elem_size(from)?;
        return Ok(vec![0u8; n * elem_size(to)?]);
    }
    let round = |v: f32| -> f32 {
        match to {
            Dtype::BF16 => bf16::from_f32(v).to_f32(),
            Dtype::F16 => f16::from_f32(v).to_f32(),
            _ => v,
        }
    };
    let mut values = decode(bytes, from)?;
    if from != to {
        values.iter_mut().for_each(|v| *v = round(*v));
    }
    for op in ops {
        if let TransformOp::Scale(f) = *op {
            values.iter_mut().for_each(|v| *v = round(*v * f));
        }
    }
    encode(&values, to)
}

fn elem_size(d: Dtype) -> Result<usize> {
    match d {
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        other => bail!("{other} tensors cannot be cast or transformed (only f32, f16 and bf16)"),
    }
}

fn decode(bytes: &[u8], d: Dtype) -> Result<Vec<f32>> {
    elem_size(d)?;
    Ok(match d {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    })
}

fn encode(values: &[f32], d: Dtype) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * elem_size(d)?);
    match d {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect()
    }

    #[test]
    fn scale_rounds_once_to_the_stored_dtype() {
        let x = bf16_bytes(&[1.0, -3.0, 0.1]);
        let out = transform(&x, Dtype::BF16, Dtype::BF16, &[TransformOp::Scale(0.7)]).unwrap();
        let expected = bf16_bytes(&[
            bf16::from_f32(1.0).to_f32() * 0.7,
            -3.0 * 0.7,
            bf16::from_f32(0.1).to_f32() * 0.7,
        ]);
        assert_eq!(out, expected);
    }

    #[test]
    fn zero_writes_positive_zeros_of_the_target_dtype() {
        let x: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            transform(&x, Dtype::F32, Dtype::BF16, &[TransformOp::Zero]).unwrap(),
            vec![0u8; 4]
        );
    }

    #[test]
    fn cast_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even one (1.0).
        let x: Vec<u8> = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let out = transform(&x, Dtype::F32, Dtype::BF16, &[]).unwrap();
        assert_eq!(out, bf16_bytes(&[1.0, 1.0 + 4.0 / 256.0]));
    }
}
