//! `kind = "merge"`: merges models tensor by tensor with mergekit's methods and numerics — `linear`,
//! `slerp`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties` — streaming from memory maps to the
//! output shards with a few tensors in memory.
//!
//! ```toml
//! [steps.average]
//! kind = "merge"
//! inputs = { models = ["sft_a", "sft_b"] }
//! method = "linear"
//! weights = [0.5, 0.5]
//!
//! [steps.slerp]
//! kind = "merge"
//! inputs = { models = ["sft_a", "sft_b"] }       # t = 0 → sft_a, t = 1 → sft_b
//! method = "slerp"
//! t = [{ filter = "self_attn", value = [0, 0.5, 0.3, 0.7, 1] }, { value = 0.5 }]
//!
//! [steps.ties]
//! kind = "merge"
//! inputs = { models = ["sft_a", "sft_b"], base = "pretrained" }
//! method = "ties"
//! weights = [1.0, 0.5]
//! density = 0.5
//! dtype = "bfloat16"
//! ```
//!
//! Parameters may be numbers, per-layer gradients or tensor-name filters ([`params`]). The output folder
//! holds `model.safetensors` (or shards + index), and `config.json` and tokenizer files copied from the
//! base model when there is one, else from the first listed model. Modules: [`params`] (parameter
//! values per tensor), [`plan`] (config → what to do with each tensor), [`methods`] (the kernels),
//! [`sparsify`] (TIES/DARE masks), [`elements`] (dtype conversion), [`stream`] (reading, checking,
//! writing).

pub mod elements;
pub mod methods;
pub mod params;
pub mod plan;
pub mod plugin_rule;
pub mod sparsify;
pub mod stream;

use super::context::StepContext;
use super::kind::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, Resources,
    StepKind,
};
use anyhow::{bail, Result};
use params::Param;
use serde::{Deserialize, Serialize};

/// A built-in merge method (mergekit's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted average `Σ wᵢ xᵢ / Σ wᵢ` (`normalize` default true).
    Linear,
    /// Spherical interpolation of two models by `t`.
    Slerp,
    /// `base + λ Σ wᵢ (xᵢ − base)` (`normalize` default false).
    TaskArithmetic,
    /// Top-`density` magnitudes of each δ, sign election by sum, disjoint mean (`normalize` default true).
    Ties,
    /// Seeded random `density` of each δ, L1-rescaled, summed (`rescale` default true).
    DareLinear,
    /// DARE masks with TIES sign election (`rescale` default true).
    DareTies,
}

impl Method {
    /// Whether the method needs a `base` model.
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear | Method::Slerp)
    }

    /// mergekit's default for `normalize`.
    pub fn default_normalize(self) -> bool {
        matches!(self, Method::Linear | Method::Ties)
    }

    /// mergekit's default for `rescale`.
    pub fn default_rescale(self) -> bool {
        matches!(self, Method::DareLinear | Method::DareTies)
    }
}

/// Output element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputDtype {
    /// 32-bit float.
    Float32,
    /// bfloat16.
    Bfloat16,
    /// IEEE half.
    Float16,
}

impl OutputDtype {
    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            OutputDtype::Float32 => safetensors::Dtype::F32,
            OutputDtype::Bfloat16 => safetensors::Dtype::BF16,
            OutputDtype::Float16 => safetensors::Dtype::F16,
        }
    }

    /// The `torch_dtype` name in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutputDtype::Float32 => "float32",
            OutputDtype::Bfloat16 => "bfloat16",
            OutputDtype::Float16 => "float16",
        }
    }
}

/// A size in bytes: an integer, or a string such as `"2GB"`, `"500MB"`, `"1GiB"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    /// Bytes.
    Bytes(u64),
    /// A number with a unit (B, KB, MB, GB, KiB, MiB, GiB).
    Text(String),
}

impl ByteSize {
    /// The size in bytes, or what is wrong with the text.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) => {
                let t = t.trim();
                let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let num: f64 = num
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{t}` is not a size like \"2GB\""))?;
                let scale = match unit.trim().to_ascii_lowercase().as_str() {
                    "" | "b" => 1.0,
                    "kb" => 1e3,
                    "mb" => 1e6,
                    "gb" => 1e9,
                    "kib" => 1024.0,
                    "mib" => 1024.0 * 1024.0,
                    "gib" => 1024.0 * 1024.0 * 1024.0,
                    other => {
                        return Err(format!(
                            "unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
                        ))
                    }
                };
                Ok((num * scale) as u64)
            }
        }
    }
}

/// Parameters of a `merge` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The built-in method (exactly one of `method` and `plugin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// A `[plugins.NAME]` merge rule that plans each tensor (exactly one of `method` and `plugin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// Parameters passed to the plugin's `configure` (as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_params: Option<serde_json::Value>,
    /// One weight per model in `inputs.models` (number, gradient or filters); default 1 each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<Param>>,
    /// SLERP factor: 0 = first model (or `base`), 1 = second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<Param>,
    /// Fraction of each task vector kept (TIES, DARE); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<Param>,
    /// Scale of the merged task vector; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<Param>,
    /// Divide by the weight sum (default: the method's, as in mergekit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Rescale sparsified task vectors to their L1 norm (default: true for DARE, false otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale: Option<bool>,
    /// Seed of the DARE masks (default: the workflow seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Output dtype (default: each tensor's dtype in the first input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<OutputDtype>,
    /// Largest shard (default: one `model.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<ByteSize>,
}

/// The `merge` step kind.
pub struct MergeStep;

const SLOTS: &[InputSlot] = &[
    InputSlot {
        name: "models",
        accepts: &[ArtifactKind::Model],
        many: true,
        required: true,
    },
    InputSlot {
        name: "base",
        accepts: &[ArtifactKind::Model],
        many: false,
        required: false,
    },
];

impl StepKind for MergeStep {
    type Config = MergeConfig;

    fn name(&self) -> &'static str {
        "merge"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(SLOTS)
    }

    fn output(&self, _: &MergeConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    fn check(&self, c: &MergeConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        check_config(
            c,
            ctx.input_count("models"),
            ctx.input_count("base"),
            &|p| ctx.has_plugin(p),
        )
    }

    fn dependencies(&self, c: &MergeConfig) -> Dependencies {
        Dependencies {
            plugins: c.plugin.iter().cloned().collect(),
            files: Vec::new(),
        }
    }

    fn resources(&self, _: &MergeConfig) -> Resources {
        // Saturates every core and the memory bandwidth; running it beside training helps neither.
        Resources {
            exclusive_device: true,
        }
    }

    fn run(&self, c: &MergeConfig, ctx: &StepContext) -> Result<()> {
        let models = ctx.inputs_of("models").len();
        let base = ctx.inputs_of("base").len();
        let issues = check_config(c, Some(models), Some(base), &|p| {
            ctx.plugins.contains_key(p)
        });
        if let Some(first) = issues.first() {
            bail!("step `{}`: {}: {}", ctx.step, first.key, first.message);
        }
        stream::run(c, ctx)
    }
}

/// The checks of a merge config, given how many `models` and `base` inputs it has (when known).
pub fn check_config(
    c: &MergeConfig,
    models: Option<usize>,
    base: Option<usize>,
    has_plugin: &dyn Fn(&str) -> bool,
) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    let mut issue = |key: &str, msg: String| issues.push(ConfigIssue::new(key, msg));
    match (&c.method, &c.plugin) {
        (None, None) => issue(
            "method",
            "set `method` (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties) or `plugin`".into(),
        ),
        (Some(_), Some(_)) => issue("plugin", "set either `method` or `plugin`, not both".into()),
        (None, Some(p)) if !has_plugin(p) => issue("plugin", format!("`{p}` is not declared in [plugins]")),
        _ => {}
    }
    if c.plugin.is_none() && c.plugin_params.is_some() {
        issue("plugin_params", "only used with `plugin`".into());
    }
    let has_base = base.map(|b| b > 0);
    if let Some(method) = c.method {
        let unused = |key: &str, used: bool, issue: &mut dyn FnMut(&str, String)| {
            if !used {
                issue(
                    key,
                    format!("is not used by method `{}`", method_name(method)),
                );
            }
        };
        unused("t", c.t.is_none() || method == Method::Slerp, &mut issue);
        unused(
            "weights",
            c.weights.is_none() || method != Method::Slerp,
            &mut issue,
        );
        unused(
            "density",
            c.density.is_none()
                || !matches!(
                    method,
                    Method::Linear | Method::Slerp | Method::TaskArithmetic
                ),
            &mut issue,
        );
        unused(
            "lambda",
            c.lambda.is_none() || method.needs_base(),
            &mut issue,
        );
        unused(
            "rescale",
            c.rescale.is_none() || method.needs_base(),
            &mut issue,
        );
        unused(
            "normalize",
            c.normalize.is_none() || method != Method::Slerp,
            &mut issue,
        );
        unused(
            "seed",
            c.seed.is_none() || matches!(method, Method::DareLinear | Method::DareTies),
            &mut issue,
        );
        if method == Method::Slerp && c.t.is_none() {
            issue("t", "slerp needs `t` (0 = first model, 1 = second)".into());
        }
        if method.needs_base() && has_base == Some(false) {
            issue(
                "inputs.base",
                format!(
                    "method `{}` needs `inputs.base` (the model the task vectors are taken from)",
                    method_name(method)
                ),
            );
        }
        if method == Method::Linear && has_base == Some(true) {
            issue(
                "inputs.base",
                "linear does not use a base; list every model in `inputs.models`".into(),
            );
        }
        if method == Method::Slerp {
            let total = models.zip(base).map(|(m, b)| m + b);
            if let Some(total) = total.filter(|&t| t != 2) {
                issue(
                    "inputs",
                    format!(
                        "slerp merges exactly two models (`models = [a, b]`, or `base` and one model); got {total}"
                    ),
                );
            }
        }
    }
    if let (Some(weights), Some(n)) = (&c.weights, models) {
        if weights.len() != n {
            issue(
                "weights",
                format!(
                    "has {} entries but `inputs.models` has {n} models (one weight per model)",
                    weights.len()
                ),
            );
        }
    }
    let mut param = |key: &str, p: &Param, range: Option<(f64, f64)>| {
        if let Some(msg) = p.shape_issue() {
            issue(key, msg);
        }
        for v in p.anchors() {
            if !v.is_finite() {
                issue(key, format!("{v} is not a finite number"));
            } else if let Some((lo, hi)) = range.filter(|(lo, hi)| v < *lo || v > *hi) {
                issue(key, format!("{v} is outside [{lo}, {hi}]"));
            }
        }
    };
    if let Some(w) = &c.weights {
        for (i, p) in w.iter().enumerate() {
            param(&format!("weights[{i}]"), p, None);
        }
    }
    if let Some(t) = &c.t {
        param("t", t, Some((0.0, 1.0)));
    }
    if let Some(d) = &c.density {
        param("density", d, Some((0.0, 1.0)));
    }
    if let Some(l) = &c.lambda {
        param("lambda", l, None);
    }
    if let Some(s) = &c.shard_size {
        match s.bytes() {
            Ok(0) => issue("shard_size", "must be positive".into()),
            Ok(_) => {}
            Err(e) => issue("shard_size", e),
        }
    }
    issues
}

/// The workflow name of a method.
pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::Linear => "linear",
        Method::Slerp => "slerp",
        Method::TaskArithmetic => "task_arithmetic",
        Method::Ties => "ties",
        Method::DareLinear => "dare_linear",
        Method::DareTies => "dare_ties",
    }
}
