//! What the training kinds share: their parameters ([`TrainStepConfig`], also read by `dpo`), checks, data
//! filters, progress, and — for the language-model kinds `pretrain` and `sft` — one implementation,
//! [`LmTrainStep`], parameterised by how records become rows ([`LmRows`]): "model folder + rows in, trained
//! model folder out" (load, train with checkpoints, save as a Hugging Face folder, report).

use crate::data::{
    derive_seed, load_mixture, DatasetReport, DatasetSource, Example, RecordFilter, RecordFormat,
    TemplateChoice, TrainSequence,
};
use crate::model::lora::LoraSettings;
use crate::model::Tokenizer;
use crate::plugins::StepPluginHost;
use crate::steps::{
    ArtifactKind, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots, Resources,
    StepContext, StepKind,
};
use crate::train::{
    checkpoint_dir, load_for_lora_training, load_for_training, move_contents, plot_loss,
    save_lora_trained, save_trained, train_on, AdamWConfig, ComputeDType, Parallel, ScheduleKind,
    TrainOptions, TrainSummary, ADAPTER_PART,
};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Parameters of a `pretrain` or `sft` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainStepConfig {
    /// Peak learning rate.
    #[serde(default = "TrainStepConfig::default_lr")]
    pub lr: f64,
    /// Decay after warmup: `cosine`, `linear` or `constant`.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Warmup optimizer steps (exclusive with `warmup_ratio`).
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps (rounded up, like transformers).
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Passes over the data (default 1; ignored when `max_steps` is set).
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Optimizer steps to take (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Rows per forward pass.
    #[serde(default = "TrainStepConfig::default_micro_batch")]
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "TrainStepConfig::default_grad_accum")]
    pub grad_accum: usize,
    /// Tokens per row: the block length of pretraining, the maximum length of SFT examples.
    #[serde(default = "TrainStepConfig::default_seq_len")]
    pub seq_len: usize,
    /// AdamW decoupled weight decay (matrices only).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW (β₁, β₂).
    #[serde(default = "TrainStepConfig::default_betas")]
    pub betas: [f64; 2],
    /// AdamW ε.
    #[serde(default = "TrainStepConfig::default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    #[serde(default = "TrainStepConfig::default_clip")]
    pub clip: f64,
    /// Seed offset, combined with the workflow seed.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every this many optimizer steps (0 = never).
    #[serde(default = "TrainStepConfig::default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// With `inputs.eval_data`: score the held-out data every this many optimizer steps (0 = after the last
    /// step only); logged as `eval_loss` in `metrics.jsonl`, plotted in `loss.svg` and by `report`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eval_every: usize,
    /// SFT: pack several examples per row (kept apart by the mask). Pretraining always packs.
    #[serde(default)]
    pub packing: bool,
    /// Pretraining: keep documents apart inside a block (block-diagonal mask, positions restart).
    #[serde(default)]
    pub separate_documents: bool,
    /// Compute precision.
    #[serde(default)]
    pub dtype: ComputeDType,
    /// Shuffle rows every epoch.
    #[serde(default = "TrainStepConfig::default_true")]
    pub shuffle: bool,
    /// Parameters of the data-filter plugins the datasets name, by plugin name; a filter not listed gets
    /// `{}`. (The plugins' bytes enter the cache key through the datasets that name them.)
    #[serde(default)]
    pub filter_params: FilterParams,
    /// Train a LoRA adapter instead of the weights: `{ r, alpha, dropout, targets, rslora }` (PEFT's names:
    /// `targets` = `target_modules`, names or `"all-linear"`). The base stays frozen; the artifact is the
    /// merged model, with the adapter in PEFT's format as the part `STEP/adapter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `adamw` (f32 moments) or `adamw_8bit` (block-wise 8-bit moments: a quarter of the memory).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Keep f32 master weights when computing in bf16 (default). `false`: update the bf16 weights directly
    /// with stochastic rounding (2 bytes per parameter instead of 6).
    #[serde(default = "TrainStepConfig::default_true")]
    pub master_weights: bool,
    /// SFT: how `chat` and `alpaca` records are rendered: `auto` (the model's chat template when it has one,
    /// else ChatML; Alpaca records with the Stanford prompt), `model`, `chatml` or `alpaca`.
    #[serde(default, skip_serializing_if = "TemplateChoice::is_auto")]
    pub template: TemplateChoice,
    /// Devices to train on: a number, or `"all"` (every GPU of the machine; every rank under torchrun or
    /// Slurm). Each device takes its share of every micro-batch (`micro_batch` counts rows over all
    /// devices), so the result equals one device's up to the order of f32 sums. An execution setting: not
    /// part of the cache key, so a run stopped on 4 devices resumes on 2.
    #[serde(default, skip_serializing)]
    pub devices: Option<crate::distributed::Devices>,
    /// ZeRO stage: 0 (each device holds the whole optimizer state) or 1 (f32 masters and moments sharded
    /// across devices). Same weights either way; not part of the cache key.
    #[serde(default, skip_serializing)]
    pub zero: u8,
}

pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl TrainStepConfig {
    fn default_lr() -> f64 {
        1e-4
    }
    pub(crate) fn default_micro_batch() -> usize {
        4
    }
    pub(crate) fn default_grad_accum() -> usize {
        1
    }
    fn default_seq_len() -> usize {
        512
    }
    pub(crate) fn default_betas() -> [f64; 2] {
        [0.9, 0.999]
    }
    pub(crate) fn default_eps() -> f64 {
        1e-8
    }
    pub(crate) fn default_clip() -> f64 {
        1.0
    }
    pub(crate) fn default_checkpoint_every() -> usize {
        100
    }
    pub(crate) fn default_true() -> bool {
        true
    }

    /// Range and combination checks shared by both kinds.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let mut need = |ok: bool, key: &str, msg: &str| {
            if !ok {
                out.push(ConfigIssue::new(key, msg));
            }
        };
        need(
            self.lr > 0.0 && self.lr.is_finite() && self.lr < 1.0,
            "lr",
            "must be in (0, 1)",
        );
        need(self.micro_batch >= 1, "micro_batch", "must be at least 1");
        need(self.grad_accum >= 1, "grad_accum", "must be at least 1");
        need(self.seq_len >= 2, "seq_len", "must be at least 2");
        need(
            self.weight_decay >= 0.0 && self.weight_decay < 1.0,
            "weight_decay",
            "must be in [0, 1)",
        );
        need(
            self.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "betas",
            "each beta must be in [0, 1)",
        );
        need(self.eps > 0.0, "eps", "must be positive");
        need(
            self.master_weights || self.dtype == ComputeDType::Bf16,
            "master_weights",
            "false only makes sense with dtype = \"bf16\" (f32 weights are their own masters)",
        );
        need(
            self.clip >= 0.0 && self.clip.is_finite(),
            "clip",
            "must be >= 0 (0 = no clipping)",
        );
        need(self.epochs != Some(0), "epochs", "must be at least 1");
        need(self.max_steps != Some(0), "max_steps", "must be at least 1");
        need(
            !(self.warmup_steps.is_some() && self.warmup_ratio.is_some()),
            "warmup_ratio",
            "set either warmup_steps or warmup_ratio, not both",
        );
        need(
            self.warmup_ratio.is_none_or(|r| (0.0..1.0).contains(&r)),
            "warmup_ratio",
            "must be in [0, 1)",
        );
        need(
            self.zero <= 1,
            "zero",
            "must be 0 or 1 (ZeRO-1 shards the optimizer state; stages 2 and 3 are not implemented)",
        );
        out.extend(self.lora_issues());
        out
    }

    /// The `lora` table's problems, keyed `lora.KEY`.
    fn lora_issues(&self) -> Vec<ConfigIssue> {
        self.lora
            .iter()
            .flat_map(|l| l.issues())
            .map(|(key, message)| ConfigIssue::new(format!("lora.{key}"), message))
            .collect()
    }

    /// Optimizer steps for `rows` rows.
    pub fn total_steps(&self, rows: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => (self.epochs.unwrap_or(1) * rows)
                .div_ceil(self.micro_batch * self.grad_accum)
                .max(1),
        }
    }

    /// Warmup steps out of `total`.
    pub fn warmup(&self, total: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total as f64).ceil() as usize,
            _ => 0,
        }
    }

    /// The AdamW settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
            weight_decay: self.weight_decay,
            moments: self.optimizer.moments(),
            masters: self.master_weights,
        }
    }
}

/// The optimizer a training step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with f32 moments.
    #[default]
    Adamw,
    /// AdamW with block-wise 8-bit moments (bitsandbytes' `adamw_8bit` scheme).
    #[serde(rename = "adamw_8bit")]
    Adamw8bit,
}

impl OptimizerKind {
    /// How the moments are stored.
    pub fn moments(self) -> crate::train::MomentPrecision {
        match self {
            OptimizerKind::Adamw => crate::train::MomentPrecision::F32,
            OptimizerKind::Adamw8bit => crate::train::MomentPrecision::Blockwise8,
        }
    }
}

/// The model input, its tokenizer and the datasets of a training step.
pub struct TrainInputs {
    /// The model folder.
    pub model_dir: std::path::PathBuf,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The datasets, resolved.
    pub sources: Vec<DatasetSource>,
    /// The step's seed (workflow seed combined with the offset).
    pub seed: u64,
}

/// Resolves the `model` and `data` slots of `ctx`.
pub fn resolve_inputs(cfg: &TrainStepConfig, ctx: &StepContext) -> Result<TrainInputs> {
    let model = ctx.input("model")?;
    let tokenizer = Tokenizer::from_model_dir(&model.path).with_context(|| {
        format!(
            "model {:?} needs a tokenizer.json to train on text",
            model.name
        )
    })?;
    let sources = ctx
        .inputs_of("data")
        .iter()
        .map(DatasetSource::from_input)
        .collect::<Result<Vec<_>>>()?;
    if sources.is_empty() {
        bail!("step `{}` has no `data` input", ctx.step);
    }
    let seed = derive_seed(ctx.settings.seed, &format!("train/{}", cfg.seed));
    Ok(TrainInputs {
        model_dir: model.path.clone(),
        tokenizer,
        sources,
        seed,
    })
}

/// A step's parameters of data-filter plugins, by plugin name (its `filter_params` key).
pub type FilterParams = indexmap::IndexMap<String, serde_json::Value>;

/// The filter factory of a step: each name is a `[plugins.*]` filter of a dataset the step reads, loaded
/// with the engine's plugin host and configured with its `filter_params` entry (`{}` when absent).
pub fn plugin_filters<'a>(
    filter_params: &'a FilterParams,
    ctx: &'a StepContext,
) -> impl FnMut(&str) -> Result<Box<dyn RecordFilter>> + 'a {
    move |name: &str| {
        let Some(spec) = ctx.plugins.get(name) else {
            bail!(
                "a dataset of step `{}` uses filter {name:?}, which is not declared in [plugins]",
                ctx.step
            );
        };
        let params = filter_params
            .get(name)
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        let plugin = ctx.load_plugin(name, spec)?;
        Ok(Box::new(crate::data::PluginFilter::start(
            &plugin,
            name,
            &params.to_string(),
        )?))
    }
}

/// What a step with `filter_params` depends on beyond inputs: the filter plugins named there.
pub fn dependencies(filter_params: &FilterParams) -> crate::steps::Dependencies {
    crate::steps::Dependencies {
        plugins: filter_params.keys().cloned().collect(),
        files: Vec::new(),
    }
}

/// Checks that every `filter_params` key is a declared plugin.
pub fn check_filter_plugins(
    filter_params: &FilterParams,
    ctx: &dyn crate::steps::CheckContext,
) -> Vec<ConfigIssue> {
    filter_params
        .keys()
        .filter(|name| !ctx.has_plugin(name))
        .map(|name| {
            ConfigIssue::new(
                format!("filter_params.{name}"),
                format!("no [plugins.{name}] in this workflow"),
            )
        })
        .collect()
}

/// A progress observer for a step: position, loss and tokens/s on the step's bar; stops when cancelled.
pub fn progress_observer(
    ctx: &StepContext,
) -> impl FnMut(&crate::train::StepMetrics, usize) -> Result<()> + '_ {
    move |m, total| {
        ctx.progress.set_length(total as u64);
        ctx.progress.set_position(m.step as u64);
        ctx.progress
            .set_message(format!("loss {:.4} · {:.0} tok/s", m.loss, m.tokens_per_s));
        ctx.check_cancelled()
    }
}

/// Trains the model in `model_dir` on `rows` and writes the result into `out_dir`: a Hugging Face folder
/// (config, safetensors in `save_dtype`, tokenizer files) plus `metrics.jsonl`, `loss.svg` and
/// `train_report.json`. Checkpoints live in `out_dir/checkpoints` while training and are removed at the end.
#[allow(clippy::too_many_arguments)]
pub fn train_model(
    cfg: &TrainStepConfig,
    title: &str,
    model_dir: &Path,
    rows: &[TrainSequence],
    pad_id: u32,
    seed: u64,
    datasets: &[DatasetReport],
    save_dtype: DType,
    device: &candle_core::Device,
    out_dir: &Path,
    observer: &mut dyn crate::train::TrainObserver,
    held_out: Option<(&[TrainSequence], usize)>,
    parallel: &Parallel,
) -> Result<TrainSummary> {
    let mut trainee = Trainee::load(cfg, model_dir, None, seed, device)?;
    let total = cfg.total_steps(rows.len());
    let opts = TrainOptions {
        lr: cfg.lr,
        schedule: cfg.schedule,
        warmup_steps: cfg.warmup(total),
        total_steps: total,
        micro_batch: cfg.micro_batch,
        grad_accum: cfg.grad_accum,
        clip: (cfg.clip > 0.0).then_some(cfg.clip),
        seed,
        shuffle: cfg.shuffle,
        checkpoint_every: cfg.checkpoint_every,
        pad_id,
    };
    let summary = train_on(
        &trainee.model,
        &mut trainee.opt,
        rows,
        &opts,
        out_dir,
        observer,
        held_out,
        parallel,
    )?;
    if !parallel.is_root() {
        return Ok(summary);
    }

    let staging = out_dir.join(".model");
    trainee.save(&staging, save_dtype)?;
    move_contents(&staging, out_dir)?;
    plot_loss(&summary.history, title, &out_dir.join("loss.svg"))?;
    let mut report = serde_json::json!({
        "datasets": datasets,
        "rows": rows.len(),
        "options": opts,
        "steps": summary.steps,
        "resumed_from": summary.resumed_from,
        "final_loss": summary.final_loss,
        "tokens_seen": summary.tokens_seen,
        "tokens_per_s": summary.tokens_per_s,
    });
    if parallel.world_size() > 1 {
        report["devices"] = parallel.world_size().into();
        report["zero"] = (parallel.zero as u8).into();
    }
    std::fs::write(
        out_dir.join("train_report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let ckpt = checkpoint_dir(out_dir);
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt)?;
    }
    Ok(summary)
}

/// Inputs of the training kinds: one model, one or more datasets, and held-out datasets scored along the
/// way (`eval_data`, optional).
pub const TRAIN_INPUTS: &[InputSlot] = &[
    InputSlot::one("model", &[ArtifactKind::Model]),
    InputSlot::many("data", &[ArtifactKind::Dataset]),
    InputSlot::many(EVAL_DATA, &[ArtifactKind::Dataset]).optional(),
];

/// The input slot of held-out datasets.
pub const EVAL_DATA: &str = "eval_data";

/// `eval_every` set without held-out data to score.
pub fn eval_every_issue(eval_every: usize, ctx: &dyn CheckContext) -> Option<ConfigIssue> {
    (eval_every > 0 && ctx.input_count(EVAL_DATA) == Some(0)).then(|| {
        ConfigIssue::new(
            "eval_every",
            "needs held-out data to score: inputs.eval_data = [\"DATASET\", ...]",
        )
    })
}

/// What distinguishes one language-model training kind from another: its name, the record layouts it
/// reads, its own checks, and how the loaded examples become token rows.
pub trait LmRows: Send + Sync + 'static {
    /// The `kind = "..."` name.
    const NAME: &'static str;
    /// The kind's version (see [`StepKind::version`]).
    const VERSION: u32;
    /// The layouts its datasets may have.
    const FORMATS: &'static [RecordFormat];
    /// Checks beyond [`TrainStepConfig::issues`].
    fn check(c: &TrainStepConfig) -> Vec<ConfigIssue>;
    /// The training rows of `examples`; an error when none is usable.
    fn rows(
        c: &TrainStepConfig,
        inputs: &TrainInputs,
        examples: &[Example],
        ctx: &StepContext,
    ) -> Result<Vec<TrainSequence>>;
}

/// A language-model training kind (`pretrain`, `sft`): load the datasets, make rows with `R`, train the
/// input model on them with the causal-LM loss, write the trained model folder.
pub struct LmTrainStep<R>(std::marker::PhantomData<R>);

impl<R> Default for LmTrainStep<R> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<R: LmRows> StepKind for LmTrainStep<R> {
    type Config = TrainStepConfig;

    fn name(&self) -> &'static str {
        R::NAME
    }

    fn version(&self) -> u32 {
        R::VERSION
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(TRAIN_INPUTS)
    }

    fn output(&self, _: &TrainStepConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    fn parts(&self, c: &TrainStepConfig) -> Vec<crate::steps::ArtifactPart> {
        adapter_parts(c)
    }

    fn check(&self, c: &TrainStepConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = c.issues();
        issues.extend(check_filter_plugins(&c.filter_params, ctx));
        issues.extend(R::check(c));
        issues.extend(eval_every_issue(c.eval_every, ctx));
        issues
    }

    fn dependencies(&self, c: &TrainStepConfig) -> Dependencies {
        dependencies(&c.filter_params)
    }

    fn resources(&self, _: &TrainStepConfig) -> Resources {
        Resources {
            exclusive_device: true,
        }
    }

    fn resumable(&self) -> bool {
        true
    }

    fn run(&self, c: &TrainStepConfig, ctx: &StepContext) -> Result<()> {
        if crate::distributed::launch_step(ctx, R::NAME, c, c.devices, c.zero)? {
            return Ok(());
        }
        let parallel = crate::distributed::parallel(ctx);
        let inputs = resolve_inputs(c, ctx)?;
        let mut filters = plugin_filters(&c.filter_params, ctx);
        let mixture = load_mixture(&inputs.sources, &mut filters, inputs.seed, R::FORMATS)?;
        let rows = R::rows(c, &inputs, &mixture.examples, ctx)?;
        let held_out = held_out_rows::<R>(c, &inputs, &mut filters, ctx)?;
        let pad = inputs
            .tokenizer
            .pad_id()
            .or(inputs.tokenizer.eos_id())
            .unwrap_or(0);
        let device = crate::distributed::device(ctx)?;
        let mut observer = progress_observer(ctx);
        train_model(
            c,
            &format!("{}: training loss", ctx.step),
            &inputs.model_dir,
            &rows,
            pad,
            inputs.seed,
            &mixture.reports,
            crate::device::candle_dtype(ctx.settings.dtype),
            &device,
            &ctx.out_dir,
            &mut observer,
            held_out.as_deref().map(|rows| (rows, c.eval_every)),
            &parallel,
        )?;
        Ok(())
    }
}

/// The rows of the `eval_data` inputs, made like the training rows (same formats, the training data's filter
/// factory, template and length limit); `None` without such inputs.
fn held_out_rows<R: LmRows>(
    c: &TrainStepConfig,
    inputs: &TrainInputs,
    filters: &mut crate::data::FilterFactory<'_>,
    ctx: &StepContext,
) -> Result<Option<Vec<TrainSequence>>> {
    let sources = ctx
        .inputs_of(EVAL_DATA)
        .iter()
        .map(DatasetSource::from_input)
        .collect::<Result<Vec<_>>>()?;
    if sources.is_empty() {
        return Ok(None);
    }
    let held = load_mixture(&sources, filters, inputs.seed, R::FORMATS)
        .context("loading the held-out data (inputs.eval_data)")?;
    let rows = R::rows(c, inputs, &held.examples, ctx)
        .context("making rows of the held-out data (inputs.eval_data)")?;
    Ok(Some(rows))
}

/// A model folder loaded for a training step: every weight trained (f32 masters), or — with `lora` — the
/// base frozen and an adapter trained.
pub struct Trainee {
    /// The model the loop runs (adapter attached for LoRA).
    pub model: crate::model::Llama,
    /// Its optimizer: every weight, or the adapter's factors.
    pub opt: crate::train::AdamW,
    /// The trained adapter (its factors are the optimizer's variables).
    pub adapter: Option<crate::model::lora::Adapter>,
    base_dir: std::path::PathBuf,
}

impl Trainee {
    /// Loads `base_dir` as `cfg` says (`dtype`, optimizer, `lora`, `gradient_checkpointing`). A LoRA run
    /// continues the adapter in `adapter_start` when given (sDPO's later stages), else starts a fresh one
    /// from `seed`.
    pub fn load(
        cfg: &TrainStepConfig,
        base_dir: &Path,
        adapter_start: Option<&Path>,
        seed: u64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (model, opt, adapter) = match &cfg.lora {
            None => {
                let (model, opt) = load_for_training(base_dir, cfg.dtype, cfg.adamw(), device)?;
                (model, opt, None)
            }
            Some(lora) => {
                let (model, opt, adapter) = load_for_lora_training(
                    base_dir,
                    cfg.dtype,
                    lora,
                    adapter_start,
                    seed,
                    cfg.adamw(),
                    device,
                )?;
                (model, opt, Some(adapter))
            }
        };
        Ok(Trainee {
            model: model.with_checkpointing(cfg.gradient_checkpointing),
            opt,
            adapter,
            base_dir: base_dir.to_path_buf(),
        })
    }

    /// Writes the trained model as a Hugging Face folder at `dst` (full fine-tuning: in `save_dtype`;
    /// LoRA: merged in the base's dtype, with the adapter under `dst/adapter/`).
    pub fn save(&self, dst: &Path, save_dtype: DType) -> Result<()> {
        match &self.adapter {
            None => save_trained(&self.model, &self.opt, &self.base_dir, dst, save_dtype),
            Some(adapter) => {
                let base_name = self
                    .base_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                save_lora_trained(&self.base_dir, adapter, &base_name, dst)
            }
        }
    }
}

/// The artifact parts of a training step: `adapter` (PEFT's files) when it trains a LoRA adapter.
pub fn adapter_parts(cfg: &TrainStepConfig) -> Vec<crate::steps::ArtifactPart> {
    match cfg.lora {
        Some(_) => vec![crate::steps::ArtifactPart {
            name: ADAPTER_PART.to_string(),
            path: ADAPTER_PART.into(),
            kind: ArtifactKind::Files,
        }],
        None => Vec::new(),
    }
}
