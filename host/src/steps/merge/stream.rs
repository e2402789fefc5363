//! Running a merge: open the inputs, check each one against its config.json and that they fit together
//! (architecture, names, shapes) before anything is written, then compute the tensors in output order, each
//! one spread over the cores in chunks that are written into the output file as soon as they are computed.
//! Memory holds the input tensors being merged and a few chunks per core.

use super::elements::{element_size, is_float, Source};
use super::mergekit_yaml::{self, model_card, MergeSlice, MergekitMerge};
use super::methods::{merge_tensor_to, TensorOut};
use super::params::Param;
use super::params::{layer_index, TensorPosition};
use super::plan::{input_order, MethodPlanner, TensorDescription, TensorPlanner};
use super::plugin_rule::PluginPlanner;
use super::whole::{promoted, MethodParams, ParamValue, WholePlanner};
use super::{Combination, MergeConfig};
use crate::byte_size::ShardSize;
use crate::model::in_place_writer::{write_checkpoint_in_place, TensorSlot};
use crate::model::{check_weights, LlamaConfig, ShardOptions, TensorSpec, TensorStore};
use crate::plugins::StepPluginHost;
use crate::spec::DType;
use crate::steps::{Cancelled, StepContext};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Files copied from the donor model (the base, else the first listed model) when present.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// One input model: a display name and its folder (or safetensors file).
#[derive(Debug, Clone)]
pub struct NamedModel {
    /// Name used in messages (the workflow reference).
    pub name: String,
    /// Model folder.
    pub path: PathBuf,
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Safetensors files written.
    pub files: Vec<String>,
}

/// Runs a merge step.
pub fn run(c: &MergeConfig, ctx: &StepContext) -> Result<()> {
    let named = |slot: &str| -> Vec<NamedModel> {
        ctx.inputs_of(slot)
            .iter()
            .map(|a| NamedModel {
                name: a.name.clone(),
                path: a.path.clone(),
            })
            .collect()
    };
    let models = named("models");
    let base = named("base").into_iter().next();
    let cancelled = || ctx.is_cancelled();
    if let Some(path) = &c.config {
        let inputs: Vec<NamedModel> = models.iter().cloned().chain(base).collect();
        let config = super::mergekit_yaml::load(&ctx.resolve(path), &inputs)?;
        merge_mergekit(
            &config,
            c,
            ctx.settings.seed,
            &ctx.out_dir,
            ctx.settings.durable,
            &ctx.progress,
            &cancelled,
        )?;
        return Ok(());
    }
    if let Some(name) = &c.plugin {
        let spec = ctx
            .plugins
            .get(name)
            .ok_or_else(|| anyhow!("plugin `{name}` is not declared in [plugins]"))?;
        let params = c
            .plugin_params
            .clone()
            .unwrap_or(serde_json::Value::Object(Default::default()));
        let plugin = ctx.load_plugin(name, spec)?;
        let mut planner = PluginPlanner::start(&plugin, name, spec, &params.to_string())?;
        // The plugin sees every input, base first.
        let order: Vec<usize> = (0..models.len() + base.is_some() as usize).collect();
        merge_with(
            &mut planner,
            &order,
            c,
            &models,
            base.as_ref(),
            &ctx.out_dir,
            ctx.settings.durable,
            &ctx.progress,
            &cancelled,
        )?;
        return Ok(());
    }
    merge(
        c,
        &models,
        base.as_ref(),
        ctx.settings.seed,
        &ctx.out_dir,
        ctx.settings.durable,
        &ctx.progress,
        &cancelled,
    )?;
    Ok(())
}

/// Merges `models` (and `base`) into the existing folder `out_dir` as `config` says. `default_seed` seeds
/// DARE when the config has no `seed`; `durable` as in [`ShardOptions::durable`]; `cancelled` is polled
/// between tensors.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    config: &MergeConfig,
    models: &[NamedModel],
    base: Option<&NamedModel>,
    default_seed: u64,
    out_dir: &Path,
    durable: bool,
    progress: &ProgressBar,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MergeSummary> {
    let Some(method) = config.method else {
        bail!("merge-rule plugins are not available in this build yet (set `method`)");
    };
    let summary = merge_tensors(
        config,
        method,
        models,
        base,
        default_seed,
        out_dir,
        durable,
        progress,
        cancelled,
    )?;
    // mergekit writes its card and config beside every merge; ours describe the same merge in mergekit's
    // terms (f32 arithmetic, the output dtype written), so it can be rerun with mergekit.
    let out_dtype = match config.dtype {
        Some(d) => d,
        None => {
            let first = base.unwrap_or(&models[0]);
            let store = TensorStore::open(&first.path)?;
            let dtype = store.metas().map(|t| t.dtype).find(|d| is_float(*d));
            promoted(dtype).unwrap_or(DType::F32)
        }
    };
    let model_names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    let text = mergekit_yaml::toml_as_mergekit(
        config,
        method,
        &model_names,
        base.map(|b| b.name.as_str()),
        out_dtype,
        config.seed.unwrap_or(default_seed),
    )?;
    let title = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let card = model_card(
        &title,
        Some(method),
        base.map(|b| b.name.as_str()),
        &model_names,
        &text,
        out_dir,
    );
    std::fs::write(out_dir.join("README.md"), card).context("writing README.md")?;
    std::fs::write(out_dir.join("mergekit_config.yml"), &text)
        .context("writing mergekit_config.yml")?;
    Ok(summary)
}

/// The tensors of [`merge`].
#[allow(clippy::too_many_arguments)]
fn merge_tensors(
    config: &MergeConfig,
    method: super::Method,
    models: &[NamedModel],
    base: Option<&NamedModel>,
    default_seed: u64,
    out_dir: &Path,
    durable: bool,
    progress: &ProgressBar,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MergeSummary> {
    if method.spec().combination == Combination::Whole {
        let mut planner = WholePlanner {
            method,
            has_base: base.is_some(),
            params: toml_params(config, models.len()),
            // Our TOML's arithmetic is f32 whatever the output dtype.
            compute: Some(DType::F32),
            seed: config.seed.unwrap_or(default_seed),
        };
        let order: Vec<usize> = (0..models.len() + base.is_some() as usize).collect();
        return merge_with(
            &mut planner,
            &order,
            config,
            models,
            base,
            out_dir,
            durable,
            progress,
            cancelled,
        );
    }
    let mut planner = MethodPlanner::new(config, method, models.len(), default_seed);
    let order = input_order(Some(method), models.len(), base.is_some());
    merge_with(
        &mut planner,
        &order,
        config,
        models,
        base,
        out_dir,
        durable,
        progress,
        cancelled,
    )
}

/// The parameters of a TOML merge config as the whole-tensor methods read them (mergekit's names).
fn toml_params(config: &MergeConfig, models: usize) -> MethodParams {
    let mut global = BTreeMap::new();
    let mut number = |key: &str, p: &Option<Param>| {
        if let Some(p) = p {
            global.insert(key.to_string(), ParamValue::Number(p.clone()));
        }
    };
    number("t", &config.t);
    number("density", &config.density);
    number("lambda", &config.lambda);
    number("gamma", &config.gamma);
    number("epsilon", &config.epsilon);
    number("select_topk", &config.select_topk);
    number("max_iter", &config.max_iter.map(|v| Param::Value(v.into())));
    number("tol", &config.tol.map(Param::Value));
    for (key, flag) in [
        ("normalize", config.normalize),
        ("rescale", config.rescale),
        ("filter_wise", config.filter_wise),
        ("nuslerp_flatten", config.nuslerp_flatten),
        ("nuslerp_row_wise", config.nuslerp_row_wise),
        ("normalize_weights", config.normalize_weights),
    ] {
        if let Some(b) = flag {
            global.insert(key.to_string(), ParamValue::Flag(b));
        }
    }
    let weights = config
        .weights
        .clone()
        .unwrap_or_else(|| vec![Param::Value(1.0); models]);
    MethodParams {
        global,
        per_model: weights
            .into_iter()
            .map(|w| BTreeMap::from([("weight".to_string(), ParamValue::Number(w))]))
            .collect(),
        outer: BTreeMap::new(),
    }
}

/// Runs a mergekit config (already resolved against the inputs): computes in its `dtype`, writes its
/// `out_dtype`, copies the tokenizer of its `tokenizer_source`, and writes mergekit's model card
/// (`README.md`) and the config (`mergekit_config.yml`) beside the weights. `step` supplies `shard_size`
/// and `allow_non_finite`.
pub fn merge_mergekit(
    m: &MergekitMerge,
    step: &MergeConfig,
    default_seed: u64,
    out_dir: &Path,
    durable: bool,
    progress: &ProgressBar,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MergeSummary> {
    let inputs: Vec<&NamedModel> = m.base.iter().chain(&m.models).collect();
    // Without `dtype` and `out_dtype`, mergekit writes the inputs' promoted dtype.
    let out = match m.out_dtype.or(m.compute) {
        Some(d) => d,
        None => {
            let mut dtypes = Vec::new();
            for model in &inputs {
                let store = TensorStore::open(&model.path)
                    .with_context(|| format!("opening model `{}`", model.name))?;
                let first_float = store.metas().map(|t| t.dtype).find(|d| is_float(*d));
                dtypes.extend(first_float);
            }
            promoted(dtypes).unwrap_or(DType::F32)
        }
    };
    let config = MergeConfig {
        dtype: Some(out),
        ..step.clone()
    };
    let mut planner = WholePlanner {
        method: m.method,
        has_base: m.base.is_some(),
        params: m.params.clone(),
        compute: m.compute,
        seed: step.seed.unwrap_or(default_seed),
    };
    let order: Vec<usize> = (0..inputs.len()).collect();
    let summary = match &m.slices {
        Some(slices) => merge_slices(
            m,
            slices,
            &config,
            out,
            planner.seed,
            out_dir,
            durable,
            progress,
            cancelled,
        )?,
        None => merge_with(
            &mut planner,
            &order,
            &config,
            &m.models,
            m.base.as_ref(),
            out_dir,
            durable,
            progress,
            cancelled,
        )?,
    };
    if let Some(donor) = &m.tokenizer_donor {
        copy_tokenizer(&donor.path, out_dir)?;
    }
    let title = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let names: Vec<&str> = m.model_names.iter().map(String::as_str).collect();
    let card = model_card(
        &title,
        Some(m.method),
        m.base_name.as_deref(),
        &names,
        &m.text,
        m.path.parent().unwrap_or(Path::new(".")),
    );
    std::fs::write(out_dir.join("README.md"), card)
        .with_context(|| format!("writing {}", out_dir.join("README.md").display()))?;
    std::fs::write(out_dir.join("mergekit_config.yml"), &m.text)
        .with_context(|| format!("writing {}", out_dir.join("mergekit_config.yml").display()))?;
    Ok(summary)
}

/// What one output tensor of a sliced merge reads: the slice, and per source (base first) the input and
/// the tensor name, at a position along the slice.
struct SlicedTensor {
    slice: usize,
    sources: Vec<(usize, String)>,
    position: TensorPosition,
}

/// A merge with several `slices` (mergekit's layout): output layers slice by slice, layer `i` of a slice
/// merged from each source's layer `start + i` at position `i / (length − 1)`; the tensors before the layers
/// (embeddings) from the first slice's sources, those after (final norm, LM head) from the last slice's;
/// config.json from the first slice's base (else first model) with `num_hidden_layers` set.
#[allow(clippy::too_many_arguments)]
fn merge_slices(
    m: &MergekitMerge,
    slices: &[MergeSlice],
    config: &MergeConfig,
    out: DType,
    seed: u64,
    out_dir: &Path,
    durable: bool,
    progress: &ProgressBar,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MergeSummary> {
    let used: Vec<usize> = {
        let mut used = Vec::new();
        for s in slices {
            for (i, _) in s.base.iter().chain(&s.models) {
                if !used.contains(i) {
                    used.push(*i);
                }
            }
        }
        used
    };
    let stores = m
        .inputs
        .iter()
        .enumerate()
        .map(|(i, model)| {
            if !used.contains(&i) {
                return Ok(None);
            }
            TensorStore::open(&model.path)
                .map(Some)
                .with_context(|| format!("opening model `{}`", model.name))
        })
        .collect::<Result<Vec<Option<TensorStore>>>>()?;
    let used_models: Vec<&NamedModel> = used.iter().map(|&i| &m.inputs[i]).collect();
    let used_stores: Vec<TensorStore> = used
        .iter()
        .map(|&i| TensorStore::open(&m.inputs[i].path))
        .collect::<Result<Vec<_>>>()?;
    check_configs(&used_models, &used_stores)?;
    let sources_of = |s: &MergeSlice| -> Vec<(usize, usize)> {
        s.base.iter().chain(&s.models).copied().collect()
    };
    let first = sources_of(&slices[0]);
    let reference = stores[first[0].0].as_ref().expect("opened");
    let mut names: Vec<String> = reference.names().map(str::to_string).collect();
    names.sort_by_key(|n| model_order_key(n));
    let mut prefix = None;
    let mut suffixes: Vec<String> = Vec::new();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for n in &names {
        match crate::steps::scale::source::split_layer_name(n) {
            Some((p, layer, suffix)) => {
                prefix.get_or_insert_with(|| p.to_string());
                if layer == first[0].1 && !suffixes.iter().any(|s| s == suffix) {
                    suffixes.push(suffix.to_string());
                }
            }
            None if n.contains("embed") => before.push(n.clone()),
            None => after.push(n.clone()),
        }
    }
    let prefix =
        prefix.ok_or_else(|| anyhow!("model `{}` has no layers", m.inputs[first[0].0].name))?;
    let mut plan: Vec<(TensorSpec, SlicedTensor)> = Vec::new();
    let spec_of = |name: &str, store: &TensorStore| -> Result<TensorSpec> {
        let meta = store.meta(name)?;
        let dtype = if is_float(meta.dtype) {
            crate::device::safetensors_dtype(out)
        } else {
            meta.dtype
        };
        Ok(TensorSpec::new(
            name.to_string(),
            dtype,
            meta.shape.to_vec(),
        ))
    };
    let at_zero = TensorPosition { fraction: 0.0 };
    for n in &before {
        let sources = first.iter().map(|(i, _)| (*i, n.clone())).collect();
        plan.push((
            spec_of(n, reference)?,
            SlicedTensor {
                slice: 0,
                sources,
                position: at_zero,
            },
        ));
    }
    let mut out_layer = 0;
    for (k, s) in slices.iter().enumerate() {
        for offset in 0..s.length {
            let fraction = if s.length > 1 {
                offset as f64 / (s.length - 1) as f64
            } else {
                1.0
            };
            for suffix in &suffixes {
                let name = format!("{prefix}{out_layer}.{suffix}");
                let sources: Vec<(usize, String)> = sources_of(s)
                    .iter()
                    .map(|(i, start)| (*i, format!("{prefix}{}.{suffix}", start + offset)))
                    .collect();
                let (i, input_name) = &sources[0];
                let mut spec = spec_of(input_name, stores[*i].as_ref().expect("opened"))?;
                spec.name = name;
                plan.push((
                    spec,
                    SlicedTensor {
                        slice: k,
                        sources,
                        position: TensorPosition { fraction },
                    },
                ));
            }
            out_layer += 1;
        }
    }
    let last = slices.len() - 1;
    for n in &after {
        let sources = sources_of(&slices[last])
            .iter()
            .map(|(i, _)| (*i, n.clone()))
            .collect();
        plan.push((
            spec_of(n, reference)?,
            SlicedTensor {
                slice: last,
                sources,
                position: at_zero,
            },
        ));
    }
    let mut planners: Vec<WholePlanner> = slices
        .iter()
        .map(|s| WholePlanner {
            method: m.method,
            has_base: s.base.is_some(),
            params: s.params.clone(),
            compute: m.compute,
            seed,
        })
        .collect();
    let specs: Vec<TensorSpec> = plan.iter().map(|(spec, _)| spec.clone()).collect();
    let shard = ShardOptions {
        max_shard_bytes: config.shard_size.and_then(ShardSize::max_bytes),
        durable,
    };
    let by_name: std::collections::HashMap<&str, &SlicedTensor> = plan
        .iter()
        .map(|(spec, t)| (spec.name.as_str(), t))
        .collect();
    let mut fill = |spec: &TensorSpec, slot: &TensorSlot| -> Result<()> {
        if cancelled() {
            return Err(anyhow!(Cancelled));
        }
        let tensor = by_name[spec.name.as_str()];
        let read = tensor
            .sources
            .iter()
            .map(|(i, name)| {
                let store = stores[*i].as_ref().expect("opened");
                let meta = store
                    .meta(name)
                    .with_context(|| format!("model `{}`", m.inputs[*i].name))?;
                if meta.shape != spec.shape.as_slice() {
                    bail!(
                        "tensor {name:?} of model `{}` has shape {:?}, not {:?}",
                        m.inputs[*i].name,
                        meta.shape,
                        spec.shape
                    );
                }
                Ok((store.bytes(name)?, meta.dtype))
            })
            .collect::<Result<Vec<_>>>()?;
        if !is_float(read[0].1) {
            slot.write_at(0, &read[0].0)?;
            progress.inc(1);
            return Ok(());
        }
        let sources: Vec<Source<'_>> = read
            .iter()
            .map(|(bytes, dtype)| Source {
                bytes,
                dtype: *dtype,
            })
            .collect();
        let description = TensorDescription {
            name: &spec.name,
            shape: &spec.shape,
            dtype: read[0].1,
            layer: layer_index(&spec.name),
            num_layers: out_layer,
            position: tensor.position,
        };
        let values = planners[tensor.slice]
            .merge_values(&description, &sources, spec.dtype)
            .with_context(|| format!("merging tensor {:?} ({})", spec.name, m.method.name()))?;
        if !config.allow_non_finite {
            if let Some(at) = non_finite_at(&values, spec.dtype) {
                bail!(
                    "{} produced a non-finite value at element {at} of tensor {:?}",
                    m.method.name(),
                    spec.name
                );
            }
        }
        slot.write_at(0, &values)?;
        progress.inc(1);
        Ok(())
    };
    progress.set_length(specs.len() as u64);
    let written = write_checkpoint_in_place(out_dir, &specs, shard, &mut fill)?;
    let donor = &m.inputs[first[0].0];
    copy_side_files(&donor.path, out_dir, config)?;
    let text = std::fs::read_to_string(donor.path.join("config.json"))
        .with_context(|| format!("reading {}", donor.path.join("config.json").display()))?;
    let json = crate::steps::scale::writer::output_config(
        &text,
        out_layer,
        Some(crate::device::safetensors_dtype(out)),
    )?;
    std::fs::write(out_dir.join("config.json"), json).context("writing config.json")?;
    Ok(MergeSummary {
        tensors: specs.len(),
        bytes: written.total_size,
        files: written.files,
    })
}

/// Replaces the tokenizer files in `out_dir` with `donor`'s (mergekit's `tokenizer_source`).
pub fn copy_tokenizer(donor: &Path, out_dir: &Path) -> Result<()> {
    let tokenizer_files = SIDE_FILES
        .iter()
        .filter(|f| !matches!(**f, "config.json" | "generation_config.json"));
    for file in tokenizer_files {
        let (src, dst) = (donor.join(file), out_dir.join(file));
        if dst.is_file() {
            std::fs::remove_file(&dst).with_context(|| format!("replacing {}", dst.display()))?;
        }
        if src.is_file() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Like [`merge`], with tensors planned by `planner`, which reads the inputs at positions `order` of
/// `base` ++ `models`.
#[allow(clippy::too_many_arguments)]
pub fn merge_with(
    planner: &mut dyn TensorPlanner,
    order: &[usize],
    config: &MergeConfig,
    models: &[NamedModel],
    base: Option<&NamedModel>,
    out_dir: &Path,
    durable: bool,
    progress: &ProgressBar,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MergeSummary> {
    let inputs: Vec<&NamedModel> = base.into_iter().chain(models).collect();
    if inputs.is_empty() {
        bail!("merge has no input models");
    }
    let stores = inputs
        .iter()
        .map(|m| TensorStore::open(&m.path).with_context(|| format!("opening model `{}`", m.name)))
        .collect::<Result<Vec<_>>>()?;
    check_configs(&inputs, &stores)?;
    let names = check_compatible(&inputs, &stores)?;
    let reference = &stores[0];
    let num_layers = names
        .iter()
        .filter_map(|n| layer_index(n))
        .max()
        .map_or(0, |m| m + 1);

    let mut specs = Vec::with_capacity(names.len());
    for name in &names {
        let meta = reference.meta(name)?;
        let dtype = match config.dtype {
            Some(d) if is_float(meta.dtype) => crate::device::safetensors_dtype(d),
            _ => meta.dtype,
        };
        specs.push(TensorSpec::new(name.clone(), dtype, meta.shape.to_vec()));
    }
    let shard = ShardOptions {
        max_shard_bytes: config.shard_size.and_then(ShardSize::max_bytes),
        durable,
    };
    // Each tensor is computed on every core, chunk by chunk, and each chunk written into the output file
    // where it belongs while it is still in cache (no tensor-sized buffers, no writer thread).
    let mut fill = |spec: &TensorSpec, slot: &TensorSlot| -> Result<()> {
        if cancelled() {
            return Err(anyhow!(Cancelled));
        }
        let name = spec.name.as_str();
        let meta = reference.meta(name)?;
        if !is_float(meta.dtype) {
            slot.write_at(0, &reference.bytes(name)?)?;
            progress.inc(1);
            return Ok(());
        }
        let read = order
            .iter()
            .map(|&i| {
                let meta = stores[i].meta(name)?;
                element_size(meta.dtype)
                    .with_context(|| format!("tensor {name:?} in model `{}`", inputs[i].name))?;
                let bytes = stores[i]
                    .bytes(name)
                    .with_context(|| format!("model `{}`", inputs[i].name))?;
                Ok((bytes, meta.dtype))
            })
            .collect::<Result<Vec<_>>>()?;
        let sources: Vec<Source<'_>> = read
            .iter()
            .map(|(bytes, dtype)| Source {
                bytes,
                dtype: *dtype,
            })
            .collect();
        let tensor = TensorDescription {
            name,
            shape: meta.shape,
            dtype: meta.dtype,
            layer: layer_index(name),
            num_layers,
            position: TensorPosition::of(name, num_layers),
        };
        // The first non-finite element written, checked on each chunk while it is in cache.
        let first_non_finite = AtomicUsize::new(usize::MAX);
        let element = spec.dtype.bitsize() / 8;
        let write = |offset: usize, bytes: &[u8]| {
            if !config.allow_non_finite {
                if let Some(i) = non_finite_at(bytes, spec.dtype) {
                    first_non_finite.fetch_min(offset / element + i, Ordering::Relaxed);
                }
            }
            slot.write_at(offset, bytes)
        };
        let merged = match planner.plan(&tensor, &sources)? {
            Some(plan) => merge_tensor_to(&plan, name, &sources, spec.dtype, TensorOut::Sink(&write)),
            None => planner
                .merge_values(&tensor, &sources, spec.dtype)
                .and_then(|values| write(0, &values)),
        }
        .and_then(|()| match first_non_finite.load(Ordering::Relaxed) {
            usize::MAX => Ok(()),
            at => Err(anyhow!(
                "{} produced a non-finite value (NaN or infinity) at element {at} of tensor {name:?}; a model with \
                 non-finite weights is broken, so the merge stops (set `allow_non_finite = true` on the step to \
                 write such values anyway)",
                planner.describe()
            )),
        })
        .with_context(|| format!("merging tensor {name:?} ({})", planner.describe()));
        progress.inc(1);
        merged
    };
    progress.set_length(specs.len() as u64);
    let written = write_checkpoint_in_place(out_dir, &specs, shard, &mut fill)?;
    for (store, model) in stores.iter().zip(&inputs) {
        store
            .check_unchanged()
            .with_context(|| format!("model `{}`", model.name))?;
    }

    copy_side_files(&inputs[0].path, out_dir, config)?;
    Ok(MergeSummary {
        tensors: specs.len(),
        bytes: written.total_size,
        files: written.files,
    })
}

/// Checks every input folder the way loading a model for evaluation does — config.json valid and of an
/// architecture dusflow runs, every weight it implies present with its shape, no layers beyond it — and
/// that all inputs share one architecture, so the config copied into the output describes its tensors.
/// A bare `.safetensors` file (no folder, no config) is checked by [`check_compatible`] only.
pub fn check_configs(inputs: &[&NamedModel], stores: &[TensorStore]) -> Result<()> {
    let mut first: Option<(&NamedModel, LlamaConfig)> = None;
    for (model, store) in inputs.iter().zip(stores) {
        if !model.path.is_dir() {
            continue;
        }
        let what = || format!("model `{}` ({})", model.name, model.path.display());
        let config_path = model.path.join("config.json");
        if !config_path.is_file() {
            bail!("{}: no config.json in the folder", what());
        }
        let cfg = LlamaConfig::from_path(&config_path).with_context(what)?;
        check_weights(store, &cfg).with_context(what)?;
        match &first {
            None => first = Some((model, cfg)),
            Some((reference, expected)) => {
                let architecture =
                    |c: &LlamaConfig| (c.architectures.clone(), c.model_type.clone());
                if architecture(&cfg) != architecture(expected) {
                    bail!(
                        "model `{}` is {:?} ({}) but model `{}` is {:?} ({}): merge models of one architecture",
                        model.name,
                        cfg.architectures.clone().unwrap_or_default(),
                        cfg.model_type,
                        reference.name,
                        expected.architectures.clone().unwrap_or_default(),
                        expected.model_type
                    );
                }
            }
        }
    }
    Ok(())
}

/// The index of the first element of `bytes` (little-endian `dtype`) that is NaN or infinite.
fn non_finite_at(bytes: &[u8], dtype: safetensors::Dtype) -> Option<usize> {
    use safetensors::Dtype;
    // An all-ones exponent is NaN or infinity in every IEEE format.
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        Dtype::F32 => bytes.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        Dtype::F64 => bytes.chunks_exact(8).position(|b| {
            u64::from_le_bytes(b.try_into().expect("8 bytes")) & 0x7ff0_0000_0000_0000
                == 0x7ff0_0000_0000_0000
        }),
        _ => None,
    }
}

/// Checks that every input has the same tensor names and shapes as the first; returns the names in model
/// order (embeddings, layers by number, then the rest).
pub fn check_compatible(inputs: &[&NamedModel], stores: &[TensorStore]) -> Result<Vec<String>> {
    let reference = &stores[0];
    for (model, store) in inputs.iter().zip(stores).skip(1) {
        for meta in reference.metas() {
            let Some(other) = store.get(meta.name) else {
                bail!(
                    "tensor {:?} is in model `{}` ({}) but not in model `{}` ({})",
                    meta.name,
                    inputs[0].name,
                    inputs[0].path.display(),
                    model.name,
                    model.path.display()
                );
            };
            if other.shape != meta.shape {
                let hint = if meta.name.contains("embed") || meta.name.contains("lm_head") {
                    " (different vocabularies? merge models that share a tokenizer)"
                } else {
                    ""
                };
                bail!(
                    "tensor {:?} has shape {:?} in model `{}` but {:?} in model `{}`{hint}",
                    meta.name,
                    meta.shape,
                    inputs[0].name,
                    other.shape,
                    model.name
                );
            }
        }
        if let Some(extra) = store.names().find(|n| !reference.contains(n)) {
            bail!(
                "tensor {extra:?} is in model `{}` but not in model `{}`",
                model.name,
                inputs[0].name
            );
        }
    }
    let mut names: Vec<String> = reference.names().map(str::to_string).collect();
    names.sort_by_key(|n| model_order_key(n));
    Ok(names)
}

/// Sort key keeping a checkpoint's natural order: embeddings, then layers by number, then the rest.
fn model_order_key(name: &str) -> (u8, usize, String) {
    match layer_index(name) {
        Some(i) => (1, i, name.to_string()),
        None if name.contains("embed") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// Copies the donor's config and tokenizer files; sets `torch_dtype` when the output dtype is forced.
fn copy_side_files(donor: &Path, out_dir: &Path, config: &MergeConfig) -> Result<()> {
    let donor_dir = if donor.is_dir() {
        donor.to_path_buf()
    } else {
        donor.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    for file in SIDE_FILES {
        let src = donor_dir.join(file);
        if !src.is_file() {
            continue;
        }
        let dst = out_dir.join(file);
        if *file == "config.json" {
            if let Some(dtype) = config.dtype {
                let text = std::fs::read_to_string(&src)
                    .with_context(|| format!("reading {}", src.display()))?;
                let mut json: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", src.display()))?;
                if let Some(obj) = json.as_object_mut() {
                    // transformers ≥ 5 writes `dtype`, older versions `torch_dtype`: update what is there.
                    let keys: Vec<&str> = ["dtype", "torch_dtype"]
                        .into_iter()
                        .filter(|k| obj.contains_key(*k))
                        .collect();
                    for key in if keys.is_empty() { vec!["dtype"] } else { keys } {
                        obj.insert(
                            key.to_string(),
                            serde_json::Value::String(dtype.torch_name().into()),
                        );
                    }
                }
                std::fs::write(&dst, serde_json::to_string_pretty(&json)? + "\n")
                    .with_context(|| format!("writing {}", dst.display()))?;
                continue;
            }
        }
        std::fs::copy(&src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    Ok(())
}
