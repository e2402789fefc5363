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
pub mod mergekit_yaml;
pub mod methods;
pub mod params;
pub mod plan;
pub mod plugin_rule;
pub mod sparsify;
pub mod stream;
pub mod whole;

use crate::byte_size::ShardSize;
use crate::spec::DType;
use anyhow::{bail, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, Resources,
    StepKind,
};
use params::Param;
use serde::{Deserialize, Serialize};

/// A built-in merge method (mergekit's names). What each one does is its row in [`METHODS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted average `Σ wᵢ xᵢ / Σ wᵢ`.
    Linear,
    /// Spherical interpolation of two models by `t`.
    Slerp,
    /// `base + λ Σ wᵢ (xᵢ − base)`.
    TaskArithmetic,
    /// Top-`density` magnitudes of each δ, sign election by sum, disjoint mean.
    Ties,
    /// Seeded random `density` of each δ, L1-rescaled, summed.
    DareLinear,
    /// DARE masks with TIES sign election.
    DareTies,
    /// Model Stock: interpolates base → average by the task vectors' mean pairwise cosine.
    ModelStock,
    /// Model Breadcrumbs: drops the smallest and the `gamma` largest magnitudes of each δ, then sums.
    Breadcrumbs,
    /// Breadcrumbs masks with TIES sign election.
    BreadcrumbsTies,
    /// DELLA: magnitude-ranked random drop (MagPrune), rescaled, TIES sign election.
    Della,
    /// DELLA's MagPrune without sign election.
    DellaLinear,
    /// SLERP of two models by normalised weights, optionally of task vectors, per row or flattened.
    Nuslerp,
    /// Barycentric interpolation of any number of models on the hypersphere.
    Multislerp,
    /// The Karcher (Riemannian) mean of the models' directions, scaled by their mean norm.
    Karcher,
    /// SCE: variance-selected elements, sign election, task vectors weighted by their energy.
    Sce,
    /// NearSwap: takes the model's value where it is within `t` of the base.
    Nearswap,
}

/// How a method combines its inputs (the kernel that runs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// A weighted average of the models.
    WeightedAverage,
    /// Spherical interpolation of exactly two models.
    Slerp,
    /// Task vectors `xᵢ − base`, sparsified, optionally sign-elected, scaled and added to the base.
    TaskVectors {
        /// How each task vector is thinned before combining.
        sparsification: SparsificationKind,
        /// Whether a sign is elected per element and disagreeing entries dropped (TIES).
        sign_consensus: bool,
    },
    /// Computed on whole tensors by [`whole`] (the newer mergekit methods).
    Whole,
}

/// How a task-vector method thins each δ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparsificationKind {
    /// Keep everything.
    None,
    /// Keep the top-`density` magnitudes.
    Magnitude,
    /// Keep a seeded random `density` (DARE).
    Random,
}

/// Whether a method reads `inputs.base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// It must be given.
    Required,
    /// It may be given (slerp: base and one model).
    Optional,
    /// It must not be given.
    Refused,
}

/// One row of the method table: everything validation, planning and messages know about a method.
#[derive(Debug, Clone, Copy)]
pub struct MethodSpec {
    /// The enum value.
    pub method: Method,
    /// The name in workflows and mergekit configs.
    pub name: &'static str,
    /// Whether `inputs.base` is read.
    pub base: BaseUse,
    /// How inputs are combined.
    pub combination: Combination,
    /// mergekit's default for `normalize`.
    pub default_normalize: bool,
    /// mergekit's default for `rescale`.
    pub default_rescale: bool,
    /// The optional parameters it reads (others are reported as unused): `weights`, `t`, `density`,
    /// `lambda`, `normalize`, `rescale`, `seed`.
    pub params: &'static [&'static str],
}

/// The built-in methods, one row each (mergekit 0.1.5's names and defaults). Adding a method: a variant of
/// [`Method`], a row here and, for a new [`Combination`], its kernel in [`methods`].
pub const METHODS: &[MethodSpec] = &[
    MethodSpec {
        method: Method::Linear,
        name: "linear",
        base: BaseUse::Refused,
        combination: Combination::WeightedAverage,
        default_normalize: true,
        default_rescale: false,
        params: &["weights", "normalize"],
    },
    MethodSpec {
        method: Method::Slerp,
        name: "slerp",
        base: BaseUse::Optional,
        combination: Combination::Slerp,
        default_normalize: false,
        default_rescale: false,
        params: &["t"],
    },
    MethodSpec {
        method: Method::TaskArithmetic,
        name: "task_arithmetic",
        base: BaseUse::Required,
        combination: Combination::TaskVectors {
            sparsification: SparsificationKind::None,
            sign_consensus: false,
        },
        default_normalize: false,
        default_rescale: false,
        params: &["weights", "lambda", "normalize", "rescale"],
    },
    MethodSpec {
        method: Method::Ties,
        name: "ties",
        base: BaseUse::Required,
        combination: Combination::TaskVectors {
            sparsification: SparsificationKind::Magnitude,
            sign_consensus: true,
        },
        default_normalize: true,
        default_rescale: false,
        params: &["weights", "density", "lambda", "normalize", "rescale"],
    },
    MethodSpec {
        method: Method::DareLinear,
        name: "dare_linear",
        base: BaseUse::Required,
        combination: Combination::TaskVectors {
            sparsification: SparsificationKind::Random,
            sign_consensus: false,
        },
        default_normalize: false,
        default_rescale: true,
        params: &[
            "weights",
            "density",
            "lambda",
            "normalize",
            "rescale",
            "seed",
        ],
    },
    MethodSpec {
        method: Method::DareTies,
        name: "dare_ties",
        base: BaseUse::Required,
        combination: Combination::TaskVectors {
            sparsification: SparsificationKind::Random,
            sign_consensus: true,
        },
        default_normalize: false,
        default_rescale: true,
        params: &[
            "weights",
            "density",
            "lambda",
            "normalize",
            "rescale",
            "seed",
        ],
    },
    MethodSpec {
        method: Method::ModelStock,
        name: "model_stock",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["filter_wise"],
    },
    MethodSpec {
        method: Method::Breadcrumbs,
        name: "breadcrumbs",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &[
            "weights",
            "density",
            "gamma",
            "lambda",
            "normalize",
            "rescale",
        ],
    },
    MethodSpec {
        method: Method::BreadcrumbsTies,
        name: "breadcrumbs_ties",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &[
            "weights",
            "density",
            "gamma",
            "lambda",
            "normalize",
            "rescale",
        ],
    },
    MethodSpec {
        method: Method::Della,
        name: "della",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: true,
        default_rescale: true,
        params: &[
            "weights",
            "density",
            "epsilon",
            "lambda",
            "normalize",
            "rescale",
            "seed",
        ],
    },
    MethodSpec {
        method: Method::DellaLinear,
        name: "della_linear",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: true,
        params: &[
            "weights",
            "density",
            "epsilon",
            "lambda",
            "normalize",
            "rescale",
            "seed",
        ],
    },
    MethodSpec {
        method: Method::Nuslerp,
        name: "nuslerp",
        base: BaseUse::Optional,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["weights", "nuslerp_flatten", "nuslerp_row_wise"],
    },
    MethodSpec {
        method: Method::Multislerp,
        name: "multislerp",
        base: BaseUse::Optional,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["weights", "normalize_weights"],
    },
    MethodSpec {
        method: Method::Karcher,
        name: "karcher",
        base: BaseUse::Refused,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["max_iter", "tol"],
    },
    MethodSpec {
        method: Method::Sce,
        name: "sce",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["select_topk"],
    },
    MethodSpec {
        method: Method::Nearswap,
        name: "nearswap",
        base: BaseUse::Required,
        combination: Combination::Whole,
        default_normalize: false,
        default_rescale: false,
        params: &["t"],
    },
];

/// Every optional parameter some method reads.
const METHOD_PARAMS: &[&str] = &[
    "weights",
    "t",
    "density",
    "lambda",
    "normalize",
    "rescale",
    "seed",
    "gamma",
    "epsilon",
    "select_topk",
    "filter_wise",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "normalize_weights",
    "max_iter",
    "tol",
];

impl Method {
    /// The method's row in [`METHODS`].
    pub fn spec(self) -> &'static MethodSpec {
        METHODS
            .iter()
            .find(|m| m.method == self)
            .expect("every method has a row in METHODS (tested)")
    }

    /// The name in workflows.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Whether the method needs a `base` model.
    pub fn needs_base(self) -> bool {
        self.spec().base == BaseUse::Required
    }
}

/// The method names, for messages: `linear, slerp, …`.
pub fn method_names() -> String {
    METHODS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
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
    /// Seed of the DARE and DELLA masks (default: the workflow seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Breadcrumbs: fraction of the largest magnitudes dropped (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<Param>,
    /// DELLA: spread of the keep probabilities around `density` (default 0.15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<Param>,
    /// SCE: fraction of elements kept, by variance across models (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_topk: Option<Param>,
    /// Model Stock: one ratio per row instead of per tensor (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_wise: Option<bool>,
    /// NuSLERP: interpolate the flattened tensor (default true) instead of rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nuslerp_flatten: Option<bool>,
    /// NuSLERP: with `nuslerp_flatten = false`, interpolate columns instead of rows (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nuslerp_row_wise: Option<bool>,
    /// Multi-SLERP: divide the weights by their sum (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize_weights: Option<bool>,
    /// Karcher: iterations (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iter: Option<u32>,
    /// Karcher: convergence tolerance (default 1e-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tol: Option<f64>,
    /// A mergekit YAML config (relative to the workflow file) instead of the keys above: its models are
    /// the step's inputs, its `dtype` is the compute dtype and `out_dtype` the output's (see
    /// [`mergekit_yaml`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<std::path::PathBuf>,
    /// Output dtype (default: each tensor's dtype in the first input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
    /// Largest shard (default: one `model.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<ShardSize>,
    /// Write NaN and infinite values instead of failing the step (default false: a merge that produces
    /// them, from a plugin or from broken inputs, is an error naming the tensor).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_finite: bool,
}

impl MergeConfig {
    /// Whether the optional method parameter `key` (one of [`METHOD_PARAMS`]) is written.
    fn is_set(&self, key: &str) -> bool {
        match key {
            "weights" => self.weights.is_some(),
            "t" => self.t.is_some(),
            "density" => self.density.is_some(),
            "lambda" => self.lambda.is_some(),
            "normalize" => self.normalize.is_some(),
            "rescale" => self.rescale.is_some(),
            "seed" => self.seed.is_some(),
            "gamma" => self.gamma.is_some(),
            "epsilon" => self.epsilon.is_some(),
            "select_topk" => self.select_topk.is_some(),
            "filter_wise" => self.filter_wise.is_some(),
            "nuslerp_flatten" => self.nuslerp_flatten.is_some(),
            "nuslerp_row_wise" => self.nuslerp_row_wise.is_some(),
            "normalize_weights" => self.normalize_weights.is_some(),
            "max_iter" => self.max_iter.is_some(),
            "tol" => self.tol.is_some(),
            other => unreachable!("{other} is not a method parameter"),
        }
    }
}

/// The `merge` step kind.
pub struct MergeStep;

const SLOTS: &[InputSlot] = &[
    InputSlot::many("models", &[ArtifactKind::Model]),
    InputSlot::one("base", &[ArtifactKind::Model]).optional(),
];

impl StepKind for MergeStep {
    type Config = MergeConfig;

    fn name(&self) -> &'static str {
        "merge"
    }

    fn version(&self) -> u32 {
        // 2: linear accumulates with fused multiply-adds, as mergekit's `addcmul_`
        // 3: mergekit's model card (README.md) and config (mergekit_config.yml) beside the weights
        3
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
            files: c.config.iter().cloned().collect(),
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
    if c.config.is_some() {
        if c.method.is_some() || c.plugin.is_some() {
            issue(
                "config",
                "a mergekit config names its own `merge_method`: set `config` or `method`/`plugin`, not both"
                    .into(),
            );
        }
        for key in METHOD_PARAMS
            .iter()
            .filter(|k| c.is_set(k) && **k != "seed")
        {
            issue(
                key,
                "comes from the mergekit config (`config`); set it there".into(),
            );
        }
        if c.dtype.is_some() {
            issue(
                "dtype",
                "with `config`, the YAML's `dtype` (compute) and `out_dtype` (written) decide"
                    .into(),
            );
        }
        if c.plugin_params.is_some() {
            issue("plugin_params", "only used with `plugin`".into());
        }
        return issues;
    }
    match (&c.method, &c.plugin) {
        (None, None) => issue(
            "method",
            format!("set `method` ({}) or `plugin`", method_names()),
        ),
        (Some(_), Some(_)) => issue("plugin", "set either `method` or `plugin`, not both".into()),
        (None, Some(p)) if !has_plugin(p) => {
            issue("plugin", format!("`{p}` is not declared in [plugins]"))
        }
        _ => {}
    }
    if c.plugin.is_none() && c.plugin_params.is_some() {
        issue("plugin_params", "only used with `plugin`".into());
    }
    let has_base = base.map(|b| b > 0);
    if let Some(method) = c.method {
        let spec = method.spec();
        // `seed` is accepted by every method: the deterministic ones ignore it, and it lets a merge be swept
        // over seeds to pair with seed-swept candidates (`merge[seed=2]` reads their `seed=2` points).
        for key in METHOD_PARAMS.iter().filter(|k| **k != "seed") {
            if c.is_set(key) && !spec.params.contains(key) {
                issue(key, format!("is not used by method `{}`", spec.name));
            }
        }
        if spec.combination == Combination::Slerp && c.t.is_none() {
            issue("t", "slerp needs `t` (0 = first model, 1 = second)".into());
        }
        if method == Method::Nearswap && c.t.is_none() {
            issue(
                "t",
                "nearswap needs `t` (the distance below which the model's value is taken)".into(),
            );
        }
        if method == Method::Nuslerp && models.is_some_and(|m| m != 2) {
            issue(
                "inputs.models",
                "nuslerp merges exactly two models (and an optional base)".into(),
            );
        }
        if method == Method::ModelStock && models.is_some_and(|m| m < 2) {
            issue(
                "inputs.models",
                "model_stock needs at least two models besides the base".into(),
            );
        }
        match (spec.base, has_base) {
            (BaseUse::Required, Some(false)) => issue(
                "inputs.base",
                format!(
                    "method `{}` needs `inputs.base` (the model the task vectors are taken from)",
                    spec.name
                ),
            ),
            (BaseUse::Refused, Some(true)) => issue(
                "inputs.base",
                format!(
                    "{} does not use a base; list every model in `inputs.models`",
                    spec.name
                ),
            ),
            _ => {}
        }
        if spec.combination == Combination::Slerp {
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
    issues
}

#[cfg(test)]
mod method_table_tests {
    use super::*;

    #[test]
    fn every_method_has_exactly_one_row_and_its_serde_name() {
        for spec in METHODS {
            assert_eq!(
                METHODS.iter().filter(|m| m.method == spec.method).count(),
                1,
                "{}",
                spec.name
            );
            assert_eq!(
                serde_json::to_value(spec.method).unwrap(),
                serde_json::json!(spec.name)
            );
            for p in spec.params {
                assert!(METHOD_PARAMS.contains(p), "{}: {p}", spec.name);
            }
        }
    }
}
