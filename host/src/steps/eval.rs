//! `kind = "eval"`: scores a model on the H6 tasks of the Open LLM Leaderboard (ARC, HellaSwag, MMLU,
//! TruthfulQA, Winogrande, GSM8K) and on user tasks, the way lm-evaluation-harness does (see
//! [`crate::eval`]).
//!
//! ```toml
//! [steps.eval]
//! kind = "eval"
//! inputs = { model = "solar", data = ["heldout"] }
//! tasks = ["arc_challenge", "gsm8k"]          # default: all six H6 tasks
//! data = { arc_challenge = "heldout" }        # task -> an input of the `data` slot
//! data_paths = { gsm8k = "data/gsm8k" }      # task -> a file or folder
//! data_dir = "evaldata"                      # else <data_dir>/<task>/{test,train,...}.jsonl or <task>.jsonl
//! mode = "leaderboard-v1"                    # or "harness" (lm-eval 0.4 on PyPI)
//! limit = 100                                # documents per task (per subject for MMLU)
//! num_fewshot = { gsm8k = 8 }
//! ```
//!
//! Output (an Evaluation): `results.json` (scores, H6 average), `results.md` (the table),
//! `lm_eval_results.json` (the same scores in lm-evaluation-harness 0.4's results layout, see
//! [`crate::eval::harness_results`]), and `tasks/<task>.json` with every document's prompts,
//! log-likelihoods or generation, and metrics.

use crate::eval::evaluate::{evaluate_task, EvalOptions, Progress};
use crate::eval::fewshot::Mode;
use crate::eval::harness_results::{harness_results, HarnessRun};
use crate::eval::metrics::Extraction;
use crate::eval::scoring::Scorer;
use crate::eval::tables::{markdown_table, Summary};
use crate::eval::tasks::{BuiltinOptions, CustomTask, TaskSpec, H6};
use crate::eval::TaskData;
use crate::model::{load_model, Tokenizer};
use crate::workflow::DType;
use anyhow::{bail, Context, Result};
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, Resources,
    StepKind,
};
use dusflow_core::step::{InputArtifact, StepContext};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Parameters of an `eval` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Built-in tasks to run (default: the six H6 tasks).
    #[serde(default = "EvalConfig::default_tasks")]
    pub tasks: Vec<String>,
    /// User-defined tasks (`[[steps.NAME.custom]]`), run after `tasks`.
    #[serde(default)]
    pub custom: Vec<CustomTask>,
    /// Task name → name of an input in the `data` slot holding its data.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Task name → a data file or folder (relative to the workflow file).
    #[serde(default)]
    pub data_paths: BTreeMap<String, PathBuf>,
    /// Folder with one entry per task: `<task>/` (split files) or `<task>.jsonl` (relative to the workflow).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Whose behaviour to reproduce: `leaderboard-v1` (the paper's numbers) or `harness` (lm-eval 0.4).
    #[serde(default)]
    pub mode: Mode,
    /// At most this many documents per task (per subject for MMLU).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    #[serde(default = "EvalConfig::default_batch_size")]
    pub batch_size: usize,
    /// Few-shot counts replacing the leaderboard's, by task.
    #[serde(default)]
    pub num_fewshot: BTreeMap<String, usize>,
    /// GSM8K answer extraction in harness mode: `strict` or `flexible`.
    #[serde(default)]
    pub gsm8k_extraction: Extraction,
    /// Keep `:` as a GSM8K stop string in leaderboard-v1 mode (the leaderboard did).
    #[serde(default = "yes")]
    pub gsm8k_colon_stop: bool,
    /// Compute a context shared by several choices once.
    #[serde(default = "yes")]
    pub prefix_reuse: bool,
    /// Compute dtype (default f32).
    #[serde(default)]
    pub dtype: Option<DType>,
}

fn yes() -> bool {
    true
}

impl EvalConfig {
    fn default_tasks() -> Vec<String> {
        H6.iter().map(|s| s.to_string()).collect()
    }
    fn default_batch_size() -> usize {
        8
    }

    /// The task definitions this config asks for, in order.
    pub fn task_specs(&self) -> Result<Vec<TaskSpec>> {
        let opts = BuiltinOptions {
            mode: self.mode,
            gsm8k_colon_stop: self.gsm8k_colon_stop,
        };
        let mut specs = Vec::new();
        for t in &self.tasks {
            specs.push(TaskSpec::builtin(t, opts)?);
        }
        for c in &self.custom {
            specs.push(TaskSpec::custom(c)?);
        }
        for s in specs.iter_mut() {
            if let Some(k) = self.num_fewshot.get(&s.name) {
                s.num_fewshot = *k;
            }
        }
        Ok(specs)
    }
}

/// The `eval` step kind.
pub struct EvalStep;

const INPUTS: &[InputSlot] = &[
    InputSlot::one("model", &[ArtifactKind::Model]),
    InputSlot::many("data", &[ArtifactKind::Dataset, ArtifactKind::Files]).optional(),
];

impl StepKind for EvalStep {
    type Config = EvalConfig;

    fn name(&self) -> &'static str {
        "eval"
    }

    fn version(&self) -> u32 {
        // 2: also writes lm_eval_results.json.
        // 3: attention through the fused op (issue 17): the same values up to float rounding.
        3
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(INPUTS)
    }

    fn output(&self, _: &EvalConfig) -> ArtifactKind {
        ArtifactKind::Evaluation
    }

    fn check(&self, c: &EvalConfig, _: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let opts = BuiltinOptions {
            mode: c.mode,
            gsm8k_colon_stop: c.gsm8k_colon_stop,
        };
        let mut names = Vec::new();
        for (i, t) in c.tasks.iter().enumerate() {
            match TaskSpec::builtin(t, opts) {
                Ok(s) => names.push(s.name),
                Err(e) => issues.push(ConfigIssue::new(format!("tasks[{i}]"), e.to_string())),
            }
        }
        for (i, t) in c.custom.iter().enumerate() {
            match TaskSpec::custom(t) {
                Ok(s) => names.push(s.name),
                Err(e) => issues.push(ConfigIssue::new(format!("custom[{i}]"), e.to_string())),
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            if !seen.insert(n) {
                issues.push(ConfigIssue::new(
                    "tasks",
                    format!("task `{n}` appears twice"),
                ));
            }
        }
        if names.is_empty() {
            issues.push(ConfigIssue::new("tasks", "no tasks to evaluate"));
        }
        for key in c
            .num_fewshot
            .keys()
            .chain(c.data.keys())
            .chain(c.data_paths.keys())
        {
            if !names.contains(key) {
                issues.push(ConfigIssue::new(
                    key.clone(),
                    format!(
                        "`{key}` is not one of this step's tasks ({})",
                        names.join(", ")
                    ),
                ));
            }
        }
        if c.batch_size == 0 || c.batch_size > 4096 {
            issues.push(ConfigIssue::new("batch_size", "must be between 1 and 4096"));
        }
        if c.limit == Some(0) {
            issues.push(ConfigIssue::new("limit", "must be at least 1"));
        }
        issues
    }

    fn dependencies(&self, c: &EvalConfig) -> Dependencies {
        let mut files: Vec<PathBuf> = c.data_dir.iter().cloned().collect();
        files.extend(c.data_paths.values().cloned());
        Dependencies {
            plugins: vec![],
            files,
        }
    }

    fn resources(&self, _: &EvalConfig) -> Resources {
        Resources {
            exclusive_device: true,
        }
    }

    fn run(&self, c: &EvalConfig, ctx: &StepContext) -> Result<()> {
        let model_in = ctx.input("model")?;
        let device = crate::device::select_device(ctx.settings.device)?;
        let dtype = crate::device::candle_dtype(c.dtype.unwrap_or(DType::F32));
        let model = load_model(&model_in.path, dtype, &device)
            .with_context(|| format!("loading model `{}`", model_in.name))?;
        let tokenizer = Tokenizer::from_model_dir(&model_in.path)
            .with_context(|| format!("tokenizer of model `{}`", model_in.name))?;
        let cancelled = || ctx.is_cancelled();
        let scorer = Scorer {
            model: &model,
            tokenizer: &tokenizer,
            add_special_tokens: c.mode == Mode::Harness,
            max_length: model.config().max_position_embeddings,
            batch_size: c.batch_size,
            prefix_reuse: c.prefix_reuse,
            cancelled: Some(&cancelled),
        };
        let opts = EvalOptions {
            mode: c.mode,
            limit: c.limit,
            extraction: c.gsm8k_extraction,
        };
        let tasks_dir = ctx.out_dir.join("tasks");
        std::fs::create_dir_all(&tasks_dir)?;
        let mut results = Vec::new();
        let specs = c.task_specs()?;
        for spec in &specs {
            ctx.check_cancelled()?;
            let source = task_source(c, ctx, &spec.name)?;
            let data =
                TaskData::load(&source).with_context(|| format!("task `{}` data", spec.name))?;
            ctx.progress.set_message(spec.name.clone());
            ctx.progress.set_position(0);
            let bar = &ctx.progress;
            let mut progress = |p: Progress| match p {
                Progress::Total(n) => bar.set_length(n as u64),
                Progress::Done(n) => bar.inc(n as u64),
            };
            let result = evaluate_task(spec, &data, &scorer, &opts, &mut progress)?;
            let path = tasks_dir.join(format!("{}.json", spec.name));
            std::fs::write(&path, serde_json::to_vec_pretty(&result)?)
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(
                "{}: {} = {:.4} ({} documents)",
                spec.name,
                result.metric,
                result.score,
                result.num_docs
            );
            results.push(result);
        }
        let summary = Summary::new(&model_in.name, c.mode, c.limit, &results);
        std::fs::write(
            ctx.out_dir.join("results.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        std::fs::write(
            ctx.out_dir.join("results.md"),
            markdown_table(&[(model_in.name.clone(), summary)]),
        )?;
        let run = HarnessRun {
            model: &model_in.name,
            model_path: &model_in.path.display().to_string(),
            mode: c.mode,
            limit: c.limit,
            batch_size: c.batch_size,
            extraction: c.gsm8k_extraction,
        };
        let pairs: Vec<_> = specs.iter().zip(&results).collect();
        std::fs::write(
            ctx.out_dir.join("lm_eval_results.json"),
            serde_json::to_vec_pretty(&harness_results(&run, &pairs))?,
        )?;
        Ok(())
    }
}

/// Where a task's data is: a named input, a path, `<data_dir>/<task>` or the only data input.
fn task_source(c: &EvalConfig, ctx: &StepContext, task: &str) -> Result<PathBuf> {
    let inputs = ctx.inputs_of("data");
    if let Some(name) = c.data.get(task) {
        return match inputs.iter().find(|a| &a.name == name) {
            Some(a) => artifact_data(a, task),
            None => bail!(
                "task `{task}`: `{name}` is not an input of the `data` slot (inputs: {})",
                inputs
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    if let Some(path) = c.data_paths.get(task) {
        return Ok(ctx.resolve(path));
    }
    if let Some(a) = inputs.iter().find(|a| a.name == task) {
        return artifact_data(a, task);
    }
    if let Some(dir) = &c.data_dir {
        let dir = ctx.resolve(dir);
        for candidate in [dir.join(task), dir.join(format!("{task}.jsonl"))] {
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        bail!(
            "task `{task}`: neither {}/{task}/ nor {task}.jsonl exists",
            dir.display()
        );
    }
    if let [only] = inputs {
        return artifact_data(only, task);
    }
    bail!("task `{task}` has no data: map it with `data = {{ {task} = \"INPUT\" }}`, `data_paths` or `data_dir`")
}

/// A dataset's file, or a data step's `data.jsonl`, or the folder itself (split files). A task's documents
/// are read as they are: a dataset that asks for filters or a sample cap is refused rather than silently
/// read whole.
fn artifact_data(a: &InputArtifact, task: &str) -> Result<PathBuf> {
    if let Some(spec) = &a.dataset {
        if !spec.filters.is_empty() {
            bail!(
                "task `{task}`: dataset {:?} names filters ({}), which evaluation does not apply: \
                 filter the data in a step before (or use a dataset without filters)",
                a.name,
                spec.filters.join(", ")
            );
        }
        if let Some(cap) = spec.max_samples {
            bail!(
                "task `{task}`: dataset {:?} has max_samples = {cap}; evaluation caps documents with \
                 the step's `limit` instead",
                a.name
            );
        }
    }
    let single = a.path.join("data.jsonl");
    Ok(if a.path.is_dir() && single.is_file() {
        single
    } else {
        a.path.clone()
    })
}
