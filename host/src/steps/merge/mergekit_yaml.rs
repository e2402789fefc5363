//! mergekit YAML configs on the `merge` step (`config = "merge.yml"`), read with mergekit 0.1.5's meaning:
//!
//! - `merge_method`, `base_model`, `models` (each with `parameters`), top-level `parameters`, numbers as
//!   values, per-layer gradients (lists) or `filter`/`value` rules — model-level values win over top-level
//!   ones, as in mergekit.
//! - `dtype` is the compute dtype: inputs are cast to it and the methods compute in it (`bfloat16` = bf16
//!   arithmetic, each torch operation rounding to bf16); `out_dtype` is the dtype written (default `dtype`,
//!   else the inputs' promoted dtype). Our TOML's `dtype` stays the output dtype with f32 arithmetic.
//! - `tokenizer_source`: `base` or a model name copies that model's tokenizer files (default: the base,
//!   else the first model, as mergekit copies).
//! - Model names resolve to the step's `inputs.models` (and `inputs.base`): an input whose workflow name
//!   is the YAML name, else whose folder is the YAML path (relative to the YAML file), else whose folder
//!   name is the YAML name's last path component. Each must match exactly one input.
//!
//! Unknown keys, methods and parameters are errors naming the YAML file and line. `slices`, `modules`,
//! `tokenizer` and `chat_template` are refused with a message (not read silently).

use super::stream::NamedModel;
use super::whole::{MethodParams, ParamValue};
use super::{params::FilterRule, params::Param, BaseUse, Method, METHODS};
use crate::spec::DType;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: String,
    #[serde(default)]
    models: Option<Vec<RawModel>>,
    #[serde(default)]
    slices: Option<Vec<RawSlice>>,
    #[serde(default)]
    modules: Option<serde_norway::Value>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    dtype: Option<DType>,
    #[serde(default)]
    out_dtype: Option<DType>,
    #[serde(default)]
    tokenizer_source: Option<String>,
    #[serde(default)]
    tokenizer: Option<serde_norway::Value>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, RawParam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    #[serde(default)]
    parameters: Option<BTreeMap<String, RawParam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, RawParam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: String,
    layer_range: [usize; 2],
    #[serde(default)]
    parameters: Option<BTreeMap<String, RawParam>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawParam {
    Flag(bool),
    Number(Param),
    Rule(FilterRule),
}

impl From<RawParam> for ParamValue {
    fn from(p: RawParam) -> Self {
        match p {
            RawParam::Flag(b) => ParamValue::Flag(b),
            RawParam::Number(p) => ParamValue::Number(p),
            RawParam::Rule(r) => ParamValue::Number(Param::Filtered(vec![r])),
        }
    }
}

/// One output slice of a merge with several `slices`: per source (base first when the slice has the base),
/// the input and the first layer read, and the slice's parameters (`per_model` for the non-base sources).
#[derive(Debug, Clone)]
pub struct MergeSlice {
    /// Base source: (input index, first layer).
    pub base: Option<(usize, usize)>,
    /// Other sources: (input index, first layer), in YAML order.
    pub models: Vec<(usize, usize)>,
    /// Layers in the slice (the same for every source).
    pub length: usize,
    /// Parameters: the source's over the slice's over the top-level ones.
    pub params: MethodParams,
}

/// A mergekit config resolved against the step's inputs.
#[derive(Debug, Clone)]
pub struct MergekitMerge {
    /// The YAML file.
    pub path: PathBuf,
    /// Its text (written beside the weights as `mergekit_config.yml`, quoted in the card).
    pub text: String,
    /// The method.
    pub method: Method,
    /// The base model, when the method reads one.
    pub base: Option<NamedModel>,
    /// The other models, in YAML order.
    pub models: Vec<NamedModel>,
    /// Parameters per model and top-level.
    pub params: MethodParams,
    /// Compute dtype (`dtype`).
    pub compute: Option<DType>,
    /// Output dtype (`out_dtype`).
    pub out_dtype: Option<DType>,
    /// The model whose tokenizer files are copied.
    pub tokenizer_donor: Option<NamedModel>,
    /// Model names as the YAML writes them: the base (if any), then the others (for the card).
    pub base_name: Option<String>,
    /// The other models' YAML names.
    pub model_names: Vec<String>,
    /// With several `slices` (or one that is not every layer): the output layers slice by slice; `base` and
    /// `models` then list every input used, for the checks and the card.
    pub slices: Option<Vec<MergeSlice>>,
    /// The step's inputs, which slices index.
    pub inputs: Vec<NamedModel>,
}

/// The 1-based line of the first line of `text` containing `needle` (for messages), if any.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// `path:line: message` (or `path: message` when the line is unknown).
fn at(path: &Path, line: Option<usize>, message: impl std::fmt::Display) -> anyhow::Error {
    match line {
        Some(l) => anyhow!("{}:{l}: {message}", path.display()),
        None => anyhow!("{}: {message}", path.display()),
    }
}

/// The YAML names of the parameters `method` reads (TOML `weights` is mergekit's per-model `weight`).
fn yaml_params(method: Method) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = method
        .spec()
        .params
        .iter()
        .filter(|p| **p != "seed")
        .map(|p| if *p == "weights" { "weight" } else { *p })
        .collect();
    if matches!(
        method.spec().combination,
        super::Combination::TaskVectors { .. }
    ) || matches!(
        method,
        Method::Breadcrumbs
            | Method::BreadcrumbsTies
            | Method::Della
            | Method::DellaLinear
            | Method::Sce
    ) {
        // Only changes the mask's storage type in mergekit, never a value.
        names.push("int8_mask");
    }
    names
}

/// Reads and resolves the mergekit config at `path` against `inputs` (the step's `models`, then `base`).
pub fn load(path: &Path, inputs: &[NamedModel]) -> Result<MergekitMerge> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading mergekit config {}", path.display()))?;
    let raw: RawConfig = serde_norway::from_str(&text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let message = e.to_string();
        // serde_norway appends "at line L column C"; the prefix already says where.
        let message = match message.find(" at line ") {
            Some(i) if line.is_some() => message[..i].to_string(),
            _ => message,
        };
        at(path, line, message)
    })?;
    let mut raw = raw;
    let mut general: Option<Vec<RawSlice>> = None;
    let mut slice_parameters: Option<BTreeMap<String, RawParam>> = None;
    if let Some(slices) = raw.slices.take() {
        let line = line_of(&text, "slices:");
        if raw.models.is_some() {
            bail!(at(path, line, "set either `models` or `slices`, not both"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        // One slice over every layer of every source is mergekit's usual SLERP layout: the same as `models`,
        // the slice's parameters between the models' and the top-level ones.
        let mut whole = slices.len() == 1;
        for source in slices.iter().flat_map(|s| &s.sources) {
            let index = resolve_model(&source.model, dir, inputs)
                .map_err(|e| at(path, line_of(&text, &source.model), e))?;
            let layers = num_layers(&inputs[index].path)?;
            let [start, end] = source.layer_range;
            if start >= end || end > layers {
                bail!(at(
                    path,
                    line_of(&text, "layer_range"),
                    format!("layer_range [{start}, {end}] of `{}`, which has {layers} layers (ranges are half-open)", source.model)
                ));
            }
            whole &= source.layer_range == [0, layers];
        }
        if whole {
            let slice = &slices[0];
            slice_parameters = slice.parameters.clone();
            raw.models = Some(
                slice
                    .sources
                    .iter()
                    .map(|s| RawModel {
                        model: s.model.clone(),
                        parameters: s.parameters.clone(),
                    })
                    .collect(),
            );
        } else {
            // Every model once (for the checks and the card); the slices are resolved below.
            let mut names: Vec<String> = Vec::new();
            for src in slices.iter().flat_map(|s| &s.sources) {
                if !names.contains(&src.model) {
                    names.push(src.model.clone());
                }
            }
            raw.models = Some(
                names
                    .into_iter()
                    .map(|model| RawModel {
                        model,
                        parameters: None,
                    })
                    .collect(),
            );
            general = Some(slices);
        }
    }
    for (key, present) in [
        ("modules", raw.modules.is_some()),
        ("tokenizer", raw.tokenizer.is_some()),
        ("chat_template", raw.chat_template.is_some()),
    ] {
        if present {
            let hint = if key == "slices" {
                " (list whole models under `models`; layer stacking is the `scale` step)"
            } else {
                ""
            };
            bail!(at(
                path,
                line_of(&text, &format!("{key}:")),
                format!("`{key}` is not supported by dusflow's merge step{hint}")
            ));
        }
    }
    let method = METHODS
        .iter()
        .find(|m| m.name == raw.merge_method)
        .map(|m| m.method)
        .ok_or_else(|| {
            at(
                path,
                line_of(&text, "merge_method"),
                format!(
                    "unknown merge_method `{}` (known: {})",
                    raw.merge_method,
                    super::method_names()
                ),
            )
        })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let find = |name: &str| -> Result<usize> {
        resolve_model(name, dir, inputs).map_err(|e| at(path, line_of(&text, name), e))
    };
    let yaml_models = raw
        .models
        .ok_or_else(|| at(path, None, "no `models` list"))?;
    let spec = method.spec();
    let base_index = match (&raw.base_model, spec.base) {
        (Some(b), BaseUse::Required | BaseUse::Optional) => Some(find(b)?),
        (None, BaseUse::Required) => bail!(at(
            path,
            line_of(&text, "merge_method"),
            format!("merge_method `{}` needs `base_model`", spec.name)
        )),
        // Methods that ignore a base (linear, karcher) merge exactly the listed models, as mergekit.
        _ => None,
    };
    let accepted = yaml_params(method);
    let check_keys = |map: &BTreeMap<String, RawParam>| -> Result<()> {
        for key in map.keys() {
            if !accepted.contains(&key.as_str()) {
                bail!(at(
                    path,
                    line_of(&text, &format!("{key}:")),
                    format!(
                        "parameter `{key}` is not used by merge_method `{}` (it reads: {})",
                        spec.name,
                        accepted.join(", ")
                    )
                ));
            }
        }
        Ok(())
    };
    let mut params = MethodParams::default();
    if let Some(p) = &raw.parameters {
        check_keys(p)?;
        params.global = p
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
    }
    if let Some(p) = &slice_parameters {
        // The slice's settings come before the top-level ones.
        check_keys(p)?;
        params.outer = std::mem::take(&mut params.global);
        params.global = p
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
    }
    let mut models = Vec::new();
    let mut model_names = Vec::new();
    let mut seen = Vec::new();
    for m in &yaml_models {
        let index = find(&m.model)?;
        if seen.contains(&index) {
            bail!(at(
                path,
                line_of(&text, &m.model),
                format!("model `{}` is listed twice", m.model)
            ));
        }
        seen.push(index);
        if let Some(p) = &m.parameters {
            check_keys(p)?;
        }
        if Some(index) == base_index {
            // The base listed among the models is still the base (mergekit's groups hold it once).
            continue;
        }
        models.push(inputs[index].clone());
        model_names.push(m.model.clone());
        params.per_model.push(
            m.parameters
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        );
    }
    let needs_weights = matches!(
        method,
        Method::Linear | Method::Nuslerp | Method::Multislerp
    ) || matches!(spec.combination, super::Combination::TaskVectors { .. })
        || matches!(
            method,
            Method::Breadcrumbs | Method::BreadcrumbsTies | Method::Della | Method::DellaLinear
        );
    if general.is_none() && needs_weights {
        for (name, p) in model_names.iter().zip(&params.per_model) {
            if !p.contains_key("weight")
                && !params.global.contains_key("weight")
                && !params.outer.contains_key("weight")
            {
                bail!(at(
                    path,
                    line_of(&text, name),
                    format!(
                        "model `{name}` has no `weight` (merge_method `{}` needs one per model)",
                        spec.name
                    )
                ));
            }
        }
    }
    if matches!(method, Method::Slerp | Method::Nearswap) && !params.global.contains_key("t") {
        bail!(at(
            path,
            line_of(&text, "merge_method"),
            format!("merge_method `{}` needs parameter `t`", spec.name)
        ));
    }
    let base = base_index.map(|i| inputs[i].clone());
    let tokenizer_donor = match raw.tokenizer_source.as_deref() {
        None => None,
        Some("base") => Some(base.clone().ok_or_else(|| at(path, line_of(&text, "tokenizer_source"), "`tokenizer_source: base` without `base_model`"))?),
        Some("union") => bail!(at(path, line_of(&text, "tokenizer_source"), "`tokenizer_source: union` (a merged vocabulary) is not supported; name one model or `base`")),
        Some(name) => Some(inputs[find(name)?].clone()),
    };
    let slices = match general {
        None => None,
        Some(raw_slices) => Some(
            resolve_slices(
                &raw_slices,
                base_index,
                &params,
                &accepted,
                method,
                &|name| find(name),
                &|key| line_of(&text, key),
            )
            .map_err(|e| match e.downcast::<Located>() {
                Ok(Located(line, message)) => at(path, line, message),
                Err(e) => e,
            })?,
        ),
    };
    Ok(MergekitMerge {
        slices,
        inputs: inputs.to_vec(),
        path: path.to_path_buf(),
        text,
        method,
        base_name: raw.base_model.clone().filter(|_| base.is_some()),
        base,
        models,
        params,
        compute: raw.dtype,
        out_dtype: raw.out_dtype,
        tokenizer_donor,
        model_names,
    })
}

/// One slice of a `passthrough` config: layers `layers` of input `input`, with its parameters (the source's
/// over the slice's over the top-level ones).
#[derive(Debug, Clone)]
pub struct PassthroughSlice {
    /// The model's name in the YAML.
    pub model: String,
    /// Index into the step's inputs.
    pub input: usize,
    /// Half-open layer range.
    pub layers: [usize; 2],
    /// `scale` (the one parameter passthrough reads), resolved as [`MethodParams`] with one model.
    pub params: MethodParams,
}

/// A mergekit `merge_method: passthrough` config with `slices`, for the `scale` step.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    /// The slices, bottom to top.
    pub slices: Vec<PassthroughSlice>,
    /// Compute dtype (inputs are cast to it before `scale` multiplies).
    pub dtype: Option<DType>,
    /// Output dtype.
    pub out_dtype: Option<DType>,
    /// The model whose tokenizer files are copied (`tokenizer_source`).
    pub tokenizer_donor: Option<usize>,
    /// The config text.
    pub text: String,
}

/// Reads a passthrough config at `path` for the `scale` step; model names resolve to `inputs` as for merges.
pub fn load_passthrough(path: &Path, inputs: &[NamedModel]) -> Result<PassthroughConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading mergekit config {}", path.display()))?;
    let raw: RawConfig =
        serde_norway::from_str(&text).map_err(|e| at(path, e.location().map(|l| l.line()), e))?;
    if raw.merge_method != "passthrough" {
        bail!(at(
            path,
            line_of(&text, "merge_method"),
            format!("the scale step runs `merge_method: passthrough` configs (got `{}`; merges are the merge step)", raw.merge_method)
        ));
    }
    for (key, present) in [
        ("models", raw.models.is_some()),
        ("modules", raw.modules.is_some()),
        ("base_model", raw.base_model.is_some()),
        ("tokenizer", raw.tokenizer.is_some()),
        ("chat_template", raw.chat_template.is_some()),
    ] {
        if present {
            bail!(at(path, line_of(&text, &format!("{key}:")), format!("`{key}` is not supported in a passthrough config for the scale step (use `slices`)")));
        }
    }
    let slices = raw
        .slices
        .ok_or_else(|| at(path, None, "a passthrough config needs `slices`"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let find = |name: &str| -> Result<usize> {
        resolve_model(name, dir, inputs).map_err(|e| at(path, line_of(&text, name), e))
    };
    let check_keys = |map: &BTreeMap<String, RawParam>| -> Result<()> {
        if let Some(key) = map.keys().find(|k| k.as_str() != "scale") {
            bail!(at(
                path,
                line_of(&text, &format!("{key}:")),
                format!("parameter `{key}` is not used by passthrough (it reads: scale)")
            ));
        }
        Ok(())
    };
    let convert = |m: &Option<BTreeMap<String, RawParam>>| -> BTreeMap<String, ParamValue> {
        m.iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect()
    };
    let mut out = Vec::new();
    for slice in &slices {
        let [source] = &slice.sources[..] else {
            bail!(at(
                path,
                line_of(&text, "sources"),
                format!(
                    "a passthrough slice has exactly one source (got {})",
                    slice.sources.len()
                )
            ));
        };
        for p in [&raw.parameters, &slice.parameters, &source.parameters]
            .into_iter()
            .flatten()
        {
            check_keys(p)?;
        }
        out.push(PassthroughSlice {
            model: source.model.clone(),
            input: find(&source.model)?,
            layers: source.layer_range,
            params: MethodParams {
                global: convert(&slice.parameters),
                per_model: vec![convert(&source.parameters)],
                outer: convert(&raw.parameters),
            },
        });
    }
    let tokenizer_donor = match raw.tokenizer_source.as_deref() {
        None => None,
        Some("base" | "union") => bail!(at(
            path,
            line_of(&text, "tokenizer_source"),
            "a passthrough config's `tokenizer_source` names one model"
        )),
        Some(name) => Some(find(name)?),
    };
    Ok(PassthroughConfig {
        slices: out,
        dtype: raw.dtype,
        out_dtype: raw.out_dtype,
        tokenizer_donor,
        text,
    })
}

/// The model names a mergekit config refers to (base first, then models and slice sources, each once), for
/// `dus merge`, which turns them into the workflow's models.
pub fn referenced_models(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading mergekit config {}", path.display()))?;
    let raw: RawConfig =
        serde_norway::from_str(&text).map_err(|e| at(path, e.location().map(|l| l.line()), e))?;
    let mut names: Vec<String> = raw.base_model.into_iter().collect();
    names.extend(raw.models.iter().flatten().map(|m| m.model.clone()));
    names.extend(
        raw.slices
            .iter()
            .flatten()
            .flat_map(|s| s.sources.iter().map(|src| src.model.clone())),
    );
    let mut unique = Vec::new();
    for n in names {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    Ok(unique)
}

/// A message about the line (if known) of the config, made into `file:line: message` by the caller.
#[derive(Debug)]
struct Located(Option<usize>, String);

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Located {}

/// The output slices of a config with several `slices`: sources resolved to inputs, each slice's parameters
/// (source over slice over top-level `global`), the base (when the method reads one) required in every slice.
fn resolve_slices(
    slices: &[RawSlice],
    base: Option<usize>,
    global: &MethodParams,
    accepted: &[&str],
    method: Method,
    find: &dyn Fn(&str) -> Result<usize>,
    line: &dyn Fn(&str) -> Option<usize>,
) -> Result<Vec<MergeSlice>> {
    let located = |key: &str, message: String| anyhow::Error::new(Located(line(key), message));
    let convert = |m: &Option<BTreeMap<String, RawParam>>| -> Result<BTreeMap<String, ParamValue>> {
        let mut out = BTreeMap::new();
        for (k, v) in m.iter().flatten() {
            if !accepted.contains(&k.as_str()) {
                return Err(located(
                    &format!("{k}:"),
                    format!(
                        "parameter `{k}` is not used by merge_method `{}` (it reads: {})",
                        method.name(),
                        accepted.join(", ")
                    ),
                ));
            }
            out.insert(k.clone(), v.clone().into());
        }
        Ok(out)
    };
    let mut out = Vec::new();
    for (k, slice) in slices.iter().enumerate() {
        let lengths: Vec<usize> = slice
            .sources
            .iter()
            .map(|s| s.layer_range[1] - s.layer_range[0])
            .collect();
        if lengths.iter().any(|l| *l != lengths[0]) {
            return Err(located(
                "sources",
                format!(
                    "slice {k}: every source must have the same number of layers (got {lengths:?})"
                ),
            ));
        }
        let mut merged = MergeSlice {
            base: None,
            models: Vec::new(),
            length: lengths.first().copied().unwrap_or(0),
            params: MethodParams {
                global: convert(&slice.parameters)?,
                per_model: Vec::new(),
                outer: global.global.clone(),
            },
        };
        for src in &slice.sources {
            let index = find(&src.model)?;
            if Some(index) == base {
                merged.base = Some((index, src.layer_range[0]));
                continue;
            }
            merged.models.push((index, src.layer_range[0]));
            let params = convert(&src.parameters)?;
            if accepted.contains(&"weight")
                && method != Method::Slerp
                && !params.contains_key("weight")
                && !merged.params.global.contains_key("weight")
                && !merged.params.outer.contains_key("weight")
            {
                return Err(located(
                    &src.model,
                    format!("slice {k}: model `{}` has no `weight`", src.model),
                ));
            }
            merged.params.per_model.push(params);
        }
        if method.spec().base == BaseUse::Required && merged.base.is_none() {
            return Err(located("sources", format!("slice {k}: the base model is not among its sources (mergekit needs it in every slice)")));
        }
        out.push(merged);
    }
    Ok(out)
}

/// `num_hidden_layers` of the model folder's config.json.
fn num_layers(model: &Path) -> Result<usize> {
    let path = model.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    json.get("num_hidden_layers")
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| anyhow!("{}: no `num_hidden_layers`", path.display()))
}

/// The input a YAML model name refers to (see the module documentation).
pub(crate) fn resolve_model(name: &str, dir: &Path, inputs: &[NamedModel]) -> Result<usize> {
    let by_name: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].name == name)
        .collect();
    if let [one] = by_name[..] {
        return Ok(one);
    }
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    if let Some(target) = canonical(&dir.join(name)) {
        let by_path: Vec<usize> = (0..inputs.len())
            .filter(|&i| canonical(&inputs[i].path).as_ref() == Some(&target))
            .collect();
        if let [one] = by_path[..] {
            return Ok(one);
        }
    }
    let last = Path::new(name.trim_end_matches('/')).file_name();
    let by_folder: Vec<usize> = (0..inputs.len())
        .filter(|&i| last.is_some() && inputs[i].path.file_name() == last)
        .collect();
    match by_folder[..] {
        [one] => Ok(one),
        [] => bail!(
            "model `{name}` is none of the step's inputs ({}); list it in `inputs.models`",
            inputs
                .iter()
                .map(|m| format!("`{}`", m.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => bail!(
            "model `{name}` matches several inputs by folder name; use the input's workflow name"
        ),
    }
}

/// A TOML merge config in mergekit's YAML (what our step computes, as mergekit would be told it): the
/// method, the inputs by workflow name, the parameters under mergekit's names (`weights` → each model's
/// `weight`), `dtype: float32` (our arithmetic) and `out_dtype`. The random-mask seed has no mergekit
/// equivalent (torch's generator draws there); it is kept as a comment.
pub fn toml_as_mergekit(
    config: &super::MergeConfig,
    method: Method,
    models: &[&str],
    base: Option<&str>,
    out_dtype: DType,
    seed: u64,
) -> Result<String> {
    use serde_json::{json, Map, Value};
    let param = |p: &Param| serde_json::to_value(p).expect("parameters serialise");
    let mut doc = Map::new();
    doc.insert("merge_method".into(), json!(method.name()));
    if let Some(b) = base {
        doc.insert("base_model".into(), json!(b));
    }
    let weights = config.weights.as_ref();
    let uses_weights = method.spec().params.contains(&"weights");
    let list: Vec<Value> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut entry = Map::new();
            entry.insert("model".into(), json!(m));
            if uses_weights {
                let w = weights.and_then(|w| w.get(i)).map_or(json!(1.0), param);
                entry.insert("parameters".into(), json!({ "weight": w }));
            }
            Value::Object(entry)
        })
        .collect();
    doc.insert("models".into(), Value::Array(list));
    let mut parameters = Map::new();
    let numbers = [
        ("t", &config.t),
        ("density", &config.density),
        ("lambda", &config.lambda),
        ("gamma", &config.gamma),
        ("epsilon", &config.epsilon),
        ("select_topk", &config.select_topk),
    ];
    for (key, value) in numbers {
        if let Some(p) = value {
            parameters.insert(key.into(), param(p));
        }
    }
    let flags = [
        ("normalize", config.normalize),
        ("rescale", config.rescale),
        ("filter_wise", config.filter_wise),
        ("nuslerp_flatten", config.nuslerp_flatten),
        ("nuslerp_row_wise", config.nuslerp_row_wise),
        ("normalize_weights", config.normalize_weights),
    ];
    for (key, value) in flags {
        if let Some(b) = value {
            parameters.insert(key.into(), json!(b));
        }
    }
    if let Some(v) = config.max_iter {
        parameters.insert("max_iter".into(), json!(v));
    }
    if let Some(v) = config.tol {
        parameters.insert("tol".into(), json!(v));
    }
    if !parameters.is_empty() {
        doc.insert("parameters".into(), Value::Object(parameters));
    }
    doc.insert("dtype".into(), json!("float32"));
    doc.insert("out_dtype".into(), json!(out_dtype.torch_name()));
    let mut text = format!(
        "# Written by dusflow's merge step (model names are the workflow's inputs).\n{}",
        serde_norway::to_string(&Value::Object(doc))?
    );
    if method.spec().params.contains(&"seed") {
        text += &format!("# dusflow draws the random masks with seed {seed}; mergekit draws them from torch's generator.\n");
    }
    Ok(text)
}

/// mergekit's display name and reference of a method, for the model card.
fn method_reference(method: Method) -> (&'static str, &'static str) {
    match method {
        Method::Linear => ("Linear", "https://arxiv.org/abs/2203.05482"),
        Method::Slerp => ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
        Method::TaskArithmetic => ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
        Method::Ties => ("TIES", "https://arxiv.org/abs/2306.01708"),
        Method::DareLinear => ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
        Method::DareTies => ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
        Method::ModelStock => ("Model Stock", "https://arxiv.org/abs/2403.19522"),
        Method::Breadcrumbs => ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
        Method::BreadcrumbsTies => (
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
        ),
        Method::Della => ("DELLA", "https://arxiv.org/abs/2406.11617"),
        Method::DellaLinear => ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
        Method::Nuslerp => ("NuSLERP", ""),
        Method::Multislerp => (
            "Multi-SLERP",
            "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        Method::Karcher => ("Karcher Mean", "https://arxiv.org/abs/2603.04972"),
        Method::Sce => ("SCE", "https://arxiv.org/abs/2408.07990"),
        Method::Nearswap => (
            "NearSwap",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
    }
}

/// Whether mergekit would list `name` as a Hugging Face repository in the card's `base_model` (not a local
/// path: no leading `/`, `~` or `.`, at most one `/`, and nothing of that name beside the config).
fn looks_like_hub_id(name: &str, dir: &Path) -> bool {
    !name.starts_with(['/', '~', '.']) && name.matches('/').count() == 1 && !dir.join(name).exists()
}

/// mergekit's model card (`README.md`) for a merge named `title` (the output folder's name; `method` `None`
/// is `passthrough`): YAML front matter, the method with its reference, the base, the models merged and the config text.
pub fn model_card(
    title: &str,
    method: Option<Method>,
    base: Option<&str>,
    models: &[&str],
    config_text: &str,
    config_dir: &Path,
) -> String {
    // mergekit lists every referenced model but the base, and does not call the slerp base a base.
    let mut referenced: Vec<&str> = base.into_iter().chain(models.iter().copied()).collect();
    referenced.dedup();
    let models = &referenced[..];
    let base = base.filter(|_| method != Some(Method::Slerp));
    let mut hub: Vec<&str> = base
        .into_iter()
        .chain(models.iter().copied())
        .filter(|m| looks_like_hub_id(m, config_dir))
        .collect();
    hub.dedup();
    let link = |m: &str| {
        if looks_like_hub_id(m, config_dir) {
            format!("[{m}](https://huggingface.co/{m})")
        } else {
            m.to_string()
        }
    };
    let base_model = if hub.is_empty() {
        "base_model: []\n".to_string()
    } else {
        format!(
            "base_model:\n{}",
            hub.iter().map(|m| format!("- {m}\n")).collect::<String>()
        )
    };
    let (pretty, url) = method.map_or(("Passthrough", ""), method_reference);
    let method_md = if url.is_empty() {
        pretty.to_string()
    } else {
        format!("[{pretty}]({url})")
    };
    let base_text = base
        .map(|b| format!(" using {} as a base", link(b)))
        .unwrap_or_default();
    let bullets: Vec<String> = models
        .iter()
        .filter(|m| Some(**m) != base)
        .map(|m| format!("* {}", link(m)))
        .collect();
    let config = config_text;
    format!(
        "---\n{base_model}library_name: transformers\ntags:\n- mergekit\n- merge\n\n---\n# {title}\n\n\
         This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).\n\n\
         ## Merge Details\n### Merge Method\n\n\
         This model was merged using the {method_md} merge method{base_text}.\n\n\
         ### Models Merged\n\nThe following models were included in the merge:\n{}\n\n\
         ### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n```yaml\n{config}\n```\n",
        bullets.join("\n")
    )
}
