//! `kind = "scale"`: depth up-scaling (step 1 of the SOLAR recipe). From one model (or several, for
//! frankenmerges) and a layer policy, writes a new Hugging Face model folder whose layers are copies of the
//! inputs' layers, renumbered, with optional per-tensor transforms.
//!
//! Same conventions as mergekit's `passthrough`: embeddings, config.json and tokenizer files from the first
//! slice's model, final norm and LM head from the last slice's (tied embeddings stay tied), config.json with
//! only `num_hidden_layers` (and the dtype, when casting) changed, and canonical safetensors, so the SOLAR
//! output is byte-identical to mergekit's.
//!
//! ```toml
//! [steps.scale]
//! kind = "scale"
//! inputs = { model = "base" }
//! policy = "solar"     # solar (m or s) | repeat (times) | interleave (every) | llama-pro (every) | slices
//! m = 8                # 32 layers -> 48
//! # slices = [{ model = "base", layers = [0, 24] }, { model = "base", layers = [8, 32] }]
//! # dtype = "bf16"     # cast; default: keep the stored dtype
//! # shard_size = "5GB"
//! ```
//!
//! Modules: [`plan`] (the plan every policy produces), [`policy`] (built-in policies), [`source`] (input
//! models), [`writer`] (streams the plan into a folder), [`copy_writer`] (canonical safetensors with kernel-side
//! copies), [`config_json`] (byte-preserving config edits).

pub mod config_json;
pub mod copy_writer;
pub mod plan;
pub mod plugin_policy;
pub mod policy;
pub mod source;
pub mod writer;

pub use plan::{LayerSource, ScalePlan, TensorTransform, TransformOp};
pub use policy::{builtin_plan, BuiltinPolicy, PolicyParams, SliceSpec, TransformSpec};
pub use source::SourceModel;
pub use writer::{write_scaled, ScaleReport, WriteOptions};

use crate::byte_size::ShardSize;
use crate::model::checkpoint_writer::ShardOptions;
use crate::plugins::StepPluginHost;
use crate::steps::merge::mergekit_yaml::{self, PassthroughConfig};
use crate::steps::merge::stream::NamedModel;
use crate::workflow::DType;
use anyhow::{bail, Context, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, StepKind,
};
use serde::{Deserialize, Serialize};

/// Which policy a step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// A built-in policy.
    Builtin(BuiltinPolicy),
    /// The `[plugins.NAME]` layer-policy plugin.
    Plugin(String),
}

impl Policy {
    /// The name used in messages and in `scale_plan.json`.
    pub fn name(&self) -> &str {
        match self {
            Policy::Builtin(p) => p.name(),
            Policy::Plugin(name) => name,
        }
    }
}

/// Default sanity limit on the new model's layer count.
pub const DEFAULT_MAX_LAYERS: usize = 1024;

/// Parameters of a `scale` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// The built-in policy; may be left out when `slices` or `plugin` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<BuiltinPolicy>,
    /// A `[plugins.NAME]` layer-policy plugin instead of a built-in policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// The plugin's parameters (a table, passed to it as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
    /// `solar`: layers trimmed from each copy (n = 32, m = 8 → 48).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<usize>,
    /// `solar`: target layer count instead of `m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<usize>,
    /// `repeat`: copies of the stack (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<usize>,
    /// `interleave` / `llama-pro`: a copy after every `every`-th layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<usize>,
    /// `solar` / `repeat` / `interleave`: multiply `o_proj` and `down_proj` of repeated layers by this factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_duplicates: Option<f32>,
    /// Explicit slices (mergekit style), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<SliceSpec>,
    /// Cast floating-point tensors to this dtype; default keeps what is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
    /// Largest shard: `"5GB"` (10^9), `"500MB"`, `"2GiB"` (2^30), or `"none"` for one file.
    #[serde(default = "ScaleConfig::default_shard_size")]
    pub shard_size: ShardSize,
    /// Refuse plans with more layers than this.
    #[serde(default = "ScaleConfig::default_max_layers")]
    pub max_layers: usize,
    /// A mergekit `passthrough` YAML config (relative to the workflow) instead of a policy: its `slices`
    /// (one source each, `scale` parameters with filters and gradients), `dtype` / `out_dtype` and
    /// `tokenizer_source`; its model names are the step's `model` inputs (as for `merge`'s `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<std::path::PathBuf>,
}

impl ScaleConfig {
    fn default_shard_size() -> ShardSize {
        ShardSize::Bytes(5_000_000_000)
    }
    fn default_max_layers() -> usize {
        DEFAULT_MAX_LAYERS
    }

    /// The policy to run: `plugin`, `policy`, or `slices` when only `slices` is given.
    pub fn resolved_policy(&self) -> Result<Policy> {
        match (&self.plugin, self.policy, self.slices.is_empty()) {
            (Some(_), Some(p), _) => {
                bail!("give `policy = \"{}\"` or `plugin`, not both", p.name())
            }
            (Some(name), None, _) => Ok(Policy::Plugin(name.clone())),
            (None, Some(p), _) => Ok(Policy::Builtin(p)),
            (None, None, false) => Ok(Policy::Builtin(BuiltinPolicy::Slices)),
            (None, None, true) => {
                bail!("set `policy` (solar, repeat, interleave, llama-pro), give `slices`, or name a `plugin`")
            }
        }
    }

    /// The built-in policies' parameters.
    pub fn policy_params(&self) -> PolicyParams {
        PolicyParams {
            m: self.m,
            s: self.s,
            times: self.times,
            every: self.every,
            scale_duplicates: self.scale_duplicates,
            slices: self.slices.clone(),
        }
    }

    /// The writer options; `durable` as in [`ShardOptions::durable`].
    pub fn write_options(&self, durable: bool) -> Result<WriteOptions> {
        Ok(WriteOptions {
            dtype: self.dtype.map(crate::device::safetensors_dtype),
            shard: ShardOptions {
                max_shard_bytes: self.shard_size.max_bytes(),
                durable,
            },
        })
    }
}

const INPUTS: &[InputSlot] = &[InputSlot::many("model", &[ArtifactKind::Model])];

/// The `scale` step kind.
pub struct ScaleStep;

impl StepKind for ScaleStep {
    type Config = ScaleConfig;

    fn name(&self) -> &'static str {
        "scale"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(INPUTS)
    }

    fn output(&self, _: &ScaleConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    fn check(&self, c: &ScaleConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if c.config.is_some() {
            let given = [
                ("policy", c.policy.is_some()),
                ("plugin", c.plugin.is_some()),
                ("params", c.params.is_some()),
                ("m", c.m.is_some()),
                ("s", c.s.is_some()),
                ("times", c.times.is_some()),
                ("every", c.every.is_some()),
                ("scale_duplicates", c.scale_duplicates.is_some()),
                ("slices", !c.slices.is_empty()),
                ("dtype", c.dtype.is_some()),
            ];
            for (key, set) in given {
                if set {
                    issues.push(ConfigIssue::new(
                        key,
                        "comes from the mergekit config (`config`); set it there",
                    ));
                }
            }
            return issues;
        }
        let policy = match c.resolved_policy() {
            Ok(Policy::Builtin(p)) => p,
            Ok(Policy::Plugin(name)) => {
                if !ctx.has_plugin(&name) {
                    issues.push(ConfigIssue::new(
                        "plugin",
                        format!("no [plugins.{name}] in this workflow"),
                    ));
                }
                let builtin = [
                    c.m.is_some(),
                    c.s.is_some(),
                    c.times.is_some(),
                    c.every.is_some(),
                ];
                if builtin.iter().any(|&b| b)
                    || c.scale_duplicates.is_some()
                    || !c.slices.is_empty()
                {
                    issues.push(ConfigIssue::new(
                        "plugin",
                        "a plugin takes its parameters in `params = { ... }`, not as step keys",
                    ));
                }
                return issues;
            }
            Err(e) => return vec![ConfigIssue::new("policy", e.to_string())],
        };
        if c.params.is_some() {
            issues.push(ConfigIssue::new(
                "params",
                "`params` is for plugins; built-in policies take step keys",
            ));
        }
        let allowed: &[&str] = match policy {
            BuiltinPolicy::Solar => &["m", "s", "scale_duplicates"],
            BuiltinPolicy::Repeat => &["times", "scale_duplicates"],
            BuiltinPolicy::Interleave => &["every", "scale_duplicates"],
            BuiltinPolicy::LlamaPro => &["every"],
            BuiltinPolicy::Slices => &["slices"],
        };
        let given = [
            ("m", c.m.is_some()),
            ("s", c.s.is_some()),
            ("times", c.times.is_some()),
            ("every", c.every.is_some()),
            ("scale_duplicates", c.scale_duplicates.is_some()),
            ("slices", !c.slices.is_empty()),
        ];
        for (key, set) in given {
            if set && !allowed.contains(&key) {
                issues.push(ConfigIssue::new(
                    key,
                    format!(
                        "policy `{}` does not use `{key}` (it takes: {})",
                        policy.name(),
                        allowed.join(", ")
                    ),
                ));
            }
        }
        if policy == BuiltinPolicy::Solar && c.m.is_none() && c.s.is_none() {
            issues.push(ConfigIssue::new(
                "m",
                "policy `solar` needs `m` (layers trimmed per copy) or `s` (target layer count)",
            ));
        }
        if policy == BuiltinPolicy::Solar && c.m.is_some() && c.s.is_some() {
            issues.push(ConfigIssue::new(
                "s",
                "policy `solar`: give `m` or `s`, not both",
            ));
        }
        if policy == BuiltinPolicy::Slices && c.slices.is_empty() {
            issues.push(ConfigIssue::new(
                "slices",
                "policy `slices` needs a non-empty `slices` list",
            ));
        }
        if matches!(policy, BuiltinPolicy::Interleave | BuiltinPolicy::LlamaPro)
            && c.every.is_none()
        {
            issues.push(ConfigIssue::new(
                "every",
                format!("policy `{}` needs `every`", policy.name()),
            ));
        }
        for (i, s) in c.slices.iter().enumerate() {
            if s.layers[0] >= s.layers[1] {
                issues.push(ConfigIssue::new(
                    format!("slices[{i}].layers"),
                    format!(
                        "[{}, {}] is empty (ranges are half-open)",
                        s.layers[0], s.layers[1]
                    ),
                ));
            }
            for (j, t) in s.transforms.iter().enumerate() {
                if let Err(e) = t.to_transform() {
                    issues.push(ConfigIssue::new(
                        format!("slices[{i}].transforms[{j}]"),
                        e.to_string(),
                    ));
                }
            }
        }
        if c.max_layers == 0 {
            issues.push(ConfigIssue::new("max_layers", "must be at least 1"));
        }
        issues
    }

    fn dependencies(&self, c: &ScaleConfig) -> Dependencies {
        Dependencies {
            plugins: c.plugin.iter().cloned().collect(),
            files: c.config.iter().cloned().collect(),
        }
    }

    fn run(&self, c: &ScaleConfig, ctx: &StepContext) -> Result<()> {
        let inputs = ctx.inputs_of("model");
        if inputs.is_empty() {
            bail!("step `{}` has no input `model`", ctx.step);
        }
        let models = inputs
            .iter()
            .map(|a| SourceModel::open(&a.name, &a.path))
            .collect::<Result<Vec<_>>>()?;
        if let Some(path) = &c.config {
            let named: Vec<NamedModel> = inputs
                .iter()
                .map(|a| NamedModel {
                    name: a.name.clone(),
                    path: a.path.clone(),
                })
                .collect();
            let yaml = ctx.resolve(path);
            let config = mergekit_yaml::load_passthrough(&yaml, &named)?;
            let report = scale_mergekit(&config, &yaml, &models, c, &ctx.out_dir, ctx)?;
            ctx.progress.finish_with_message(format!(
                "{} layers, {} tensors",
                report.layers, report.tensors
            ));
            return Ok(());
        }
        let policy = c.resolved_policy()?;
        let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
        let counts: Vec<usize> = models.iter().map(|m| m.num_layers).collect();
        let plan = match &policy {
            Policy::Builtin(p) => builtin_plan(*p, &c.policy_params(), &names, &counts)?,
            Policy::Plugin(name) => {
                let spec = ctx.plugins.get(name).ok_or_else(|| {
                    anyhow::anyhow!("plugin `{name}` was not given to step `{}`", ctx.step)
                })?;
                let params =
                    serde_json::to_string(c.params.as_ref().unwrap_or(&serde_json::json!({})))?;
                plugin_policy::plugin_plan(
                    &ctx.load_plugin(name, spec)?,
                    name,
                    spec,
                    &models,
                    &params,
                )?
            }
        };
        plan.validate(policy.name(), &names, &counts, c.max_layers)?;
        let report = scale_into(
            &models,
            &plan,
            policy.name(),
            &ctx.out_dir,
            &c.write_options(ctx.settings.durable)?,
            ctx,
        )?;
        ctx.progress.finish_with_message(format!(
            "{} layers, {} tensors",
            report.layers, report.tensors
        ));
        Ok(())
    }
}

/// The layer plan of a mergekit passthrough config: each slice's layers in order, each tensor multiplied
/// by its `scale` (resolved on the output tensor name, at the layer's position within its slice, as
/// mergekit's gradients are).
pub fn mergekit_plan(config: &PassthroughConfig, models: &[SourceModel]) -> Result<ScalePlan> {
    let mut layers = Vec::new();
    for (i, s) in config.slices.iter().enumerate() {
        let model = &models[s.input];
        let [start, end] = s.layers;
        if start >= end || end > model.num_layers {
            bail!(
                "slice {i}: layer_range [{start}, {end}] of model `{}`, which has {} layers (ranges are half-open)",
                model.name,
                model.num_layers
            );
        }
        let count = end - start;
        for offset in 0..count {
            let fraction = if count > 1 {
                offset as f64 / (count - 1) as f64
            } else {
                1.0
            };
            let position = crate::steps::merge::params::TensorPosition { fraction };
            let mut transforms = Vec::new();
            for suffix in &model.layer_suffixes {
                let name = format!("{}{}.{suffix}", model.layer_prefix, layers.len());
                if let Some(v) = s.params.number(Some(0), "scale", &name, position)? {
                    if !v.is_finite() {
                        bail!("slice {i}: `scale` of {name:?} is {v}");
                    }
                    transforms.push(TensorTransform {
                        tensor_suffix: suffix.clone(),
                        op: TransformOp::Scale(v as f32),
                    });
                }
            }
            layers.push(LayerSource {
                model: s.input,
                layer: start + offset,
                transforms,
            });
        }
    }
    Ok(ScalePlan::from_layers(layers))
}

/// Runs a mergekit passthrough config (see [`mergekit_plan`]) into `out_dir`, then writes mergekit's model
/// card and the config beside the model, and the `tokenizer_source` model's tokenizer.
pub fn scale_mergekit(
    config: &PassthroughConfig,
    yaml: &std::path::Path,
    models: &[SourceModel],
    step: &ScaleConfig,
    out_dir: &std::path::Path,
    ctx: &StepContext,
) -> Result<ScaleReport> {
    let dtype = match (config.dtype, config.out_dtype) {
        (Some(d), Some(o)) if d != o => bail!(
            "{}: `dtype: {}` with `out_dtype: {}`: the scale step casts once (set one of them)",
            yaml.display(),
            d.torch_name(),
            o.torch_name()
        ),
        (d, o) => o.or(d),
    };
    let plan = mergekit_plan(config, models)?;
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let counts: Vec<usize> = models.iter().map(|m| m.num_layers).collect();
    plan.validate("passthrough", &names, &counts, step.max_layers)?;
    let opts = WriteOptions {
        dtype: dtype.map(crate::device::safetensors_dtype),
        ..step.write_options(ctx.settings.durable)?
    };
    let report = scale_into(models, &plan, "passthrough", out_dir, &opts, ctx)?;
    if let Some(donor) = config.tokenizer_donor {
        crate::steps::merge::stream::copy_tokenizer(&models[donor].path, out_dir)?;
    }
    let title = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut referenced: Vec<String> = Vec::new();
    for s in &config.slices {
        let name = s.model.clone();
        if !referenced.contains(&name) {
            referenced.push(name);
        }
    }
    let referenced: Vec<&str> = referenced.iter().map(String::as_str).collect();
    let card = mergekit_yaml::model_card(
        &title,
        None,
        None,
        &referenced,
        &config.text,
        yaml.parent().unwrap_or(std::path::Path::new(".")),
    );
    std::fs::write(out_dir.join("README.md"), card).context("writing README.md")?;
    std::fs::write(out_dir.join("mergekit_config.yml"), &config.text)
        .context("writing mergekit_config.yml")?;
    Ok(report)
}

/// Runs `plan` into the step's folder with progress and cancellation, and records the plan beside the model
/// (`scale_plan.json`: policy, inputs and, per new layer, its source and transforms).
pub fn scale_into(
    models: &[SourceModel],
    plan: &ScalePlan,
    policy: &str,
    out_dir: &std::path::Path,
    opts: &WriteOptions,
    ctx: &StepContext,
) -> Result<ScaleReport> {
    let report = write_scaled(models, plan, policy, out_dir, opts, &mut |bytes, total| {
        ctx.progress.set_length(total);
        ctx.progress.inc(bytes);
        ctx.check_cancelled()
    })?;
    let record = serde_json::json!({
        "policy": policy,
        "inputs": models.iter().map(|m| serde_json::json!({ "name": m.name, "layers": m.num_layers })).collect::<Vec<_>>(),
        "plan": plan,
        "files": report.files,
        "total_size": report.total_size,
    });
    std::fs::write(
        out_dir.join(PLAN_FILE),
        serde_json::to_string_pretty(&record)? + "\n",
    )
    .context("writing scale_plan.json")?;
    Ok(report)
}

/// The provenance file a `scale` step writes beside the model.
pub const PLAN_FILE: &str = "scale_plan.json";
