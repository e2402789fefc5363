//! The training loop, nanoGPT-style: for each optimizer step — build micro-batches, forward, loss,
//! backward, accumulate, check, clip, AdamW step, log, checkpoint. Resumes from the newest checkpoint in
//! the work folder and then ends with the same weights as an uninterrupted run.
//!
//! What is optimised is an [`Objective`]: language modelling on token rows ([`LmObjective`], pretrain and
//! SFT) or a preference loss on pairs (DPO, in [`super::dpo`]). The loop only sees units, summed losses and
//! named metric sums.
//!
//! With several ranks ([`train_objective_on`] and a [`Parallel`] group) every micro-batch's rows are shared
//! out among the ranks, each step's units are counted over all of them (every rank holds all the data, so
//! this needs no exchange), gradients and logged sums are summed across ranks, and all ranks take the same
//! step: the run equals one rank taking whole micro-batches, up to the order of f32 sums. Only rank 0 writes
//! (metrics, checkpoints); an error on any rank aborts the group so that every rank stops.

use super::batch::build_micro_batch;
use super::checkpoint::TrainState;
use super::distributed::data_parallel::DataParallel;
use super::distributed::Parallel;
use super::metrics::{MetricsLog, StepMetrics};
use super::optimizer::AdamW;
use super::schedule::{LrSchedule, ScheduleKind};
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use dusflow_data::{BatchOrder, TrainSequence};
use dusflow_model::Llama;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to train (the optimizer's own settings live in [`super::AdamWConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: ScheduleKind,
    /// Warmup optimizer steps.
    pub warmup_steps: usize,
    /// Optimizer steps to take.
    pub total_steps: usize,
    /// Rows per forward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value (after accumulation); `None` = no clipping.
    pub clip: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
    /// Shuffle rows each epoch.
    pub shuffle: bool,
    /// Write a checkpoint every this many optimizer steps (0 = never).
    pub checkpoint_every: usize,
    /// Padding token id.
    pub pad_id: u32,
}

/// Called after every optimizer step (progress bars, cancellation, tests that simulate a crash).
pub trait TrainObserver {
    /// `m` was just logged; an error stops training (after any checkpoint of this step was written).
    fn on_step(&mut self, m: &StepMetrics, total_steps: usize) -> Result<()>;
}

impl<F: FnMut(&StepMetrics, usize) -> Result<()>> TrainObserver for F {
    fn on_step(&mut self, m: &StepMetrics, total_steps: usize) -> Result<()> {
        self(m, total_steps)
    }
}

/// Data the loop scores but never trains on (Hugging Face Trainer's `eval_dataset` with `eval_steps`): its
/// mean loss per unit — without dropout or a gradient, on the weights just updated — is logged as
/// `eval_loss` with every `every`-th step and with the last one, and each of the objective's metrics as
/// `eval_<name>` (DPO: `eval_rewards/accuracies`, … as TRL logs them).
pub struct HeldOut<'a> {
    /// The held-out items, scored with the training objective.
    pub objective: &'a dyn Objective,
    /// Score after every this many optimizer steps (0: after the last step only).
    pub every: usize,
}

impl HeldOut<'_> {
    /// Whether the model after `done` optimizer steps (of `total`) is scored.
    pub fn due(&self, done: usize, total: usize) -> bool {
        done == total || (self.every > 0 && done.is_multiple_of(self.every))
    }
}

/// The metric name of the held-out loss in `metrics.jsonl`.
pub const EVAL_LOSS: &str = "eval_loss";

/// What a finished run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps in total.
    pub steps: usize,
    /// Step the run resumed from (0 = fresh start).
    pub resumed_from: usize,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Input tokens processed, including before a resume.
    pub tokens_seen: u64,
    /// Mean input tokens per second of this process.
    pub tokens_per_s: f64,
    /// Every step's metrics, including before a resume.
    pub history: Vec<StepMetrics>,
}

/// One micro-batch's forward pass as an [`Objective`] computed it.
pub struct MicroLoss {
    /// The loss summed over the micro-batch's units: a differentiable f32 scalar.
    pub loss_sum: Tensor,
    /// Input tokens processed.
    pub tokens: usize,
    /// Metric values summed over the units (the loop logs sum / units of the step), e.g. `rewards/chosen`.
    pub metric_sums: Vec<(&'static str, f64)>,
}

/// What the loop minimises: the mean, over the units of an optimizer step (target tokens of token rows,
/// or preference pairs), of a per-unit loss.
pub trait Objective {
    /// Number of items the data order runs over (rows or pairs).
    fn len(&self) -> usize;
    /// Whether there is nothing to train on.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loss units of the items `idx` (known without a forward pass, so the step's total normalises every
    /// micro-batch before its backward pass).
    fn units(&self, idx: &[usize]) -> usize;
    /// Forward over the items `idx`: summed loss, tokens and metric sums.
    fn micro_batch_loss(&self, model: &Llama, idx: &[usize]) -> Result<MicroLoss>;
    /// Feeds everything about the data that decides the result into a checkpoint fingerprint.
    fn digest(&self, h: &mut blake3::Hasher);
    /// The names of the metric sums [`Objective::micro_batch_loss`] reports, in a fixed order (ranks sum
    /// them together even when one of them had no rows in a step).
    fn metric_names(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Next-token language modelling on token rows (pretrain, SFT): units are target tokens.
pub struct LmObjective<'a> {
    /// The rows.
    pub rows: &'a [TrainSequence],
    /// Padding id.
    pub pad_id: u32,
}

impl Objective for LmObjective<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn units(&self, idx: &[usize]) -> usize {
        idx.iter().map(|&i| self.rows[i].target_count()).sum()
    }

    fn micro_batch_loss(&self, model: &Llama, idx: &[usize]) -> Result<MicroLoss> {
        let picked: Vec<&TrainSequence> = idx.iter().map(|&i| &self.rows[i]).collect();
        let b = build_micro_batch(&picked, self.pad_id, model.device())?;
        let hidden = model.forward_hidden_train(&b.input_ids, &b.forward)?;
        Ok(MicroLoss {
            loss_sum: model.nll_sum(&hidden, &b.targets, &b.weights)?,
            tokens: b.tokens,
            metric_sums: Vec::new(),
        })
    }

    fn digest(&self, h: &mut blake3::Hasher) {
        for r in self.rows {
            for id in &r.ids {
                h.update(&id.to_le_bytes());
            }
            for l in &r.learn {
                h.update(&[*l as u8]);
            }
            if let Some(d) = &r.doc_ids {
                for id in d {
                    h.update(&id.to_le_bytes());
                }
            }
            h.update(b"|");
        }
    }
}

/// Trains `model` (whose variables `opt` updates) on `rows` with the language-modelling loss. Checkpoints
/// go to `work_dir/checkpoints`, metrics to `work_dir/metrics.jsonl`; an existing checkpoint of the same
/// run is resumed.
pub fn train(
    model: &Llama,
    opt: &mut AdamW,
    rows: &[TrainSequence],
    opts: &TrainOptions,
    work_dir: &Path,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    train_on(
        model,
        opt,
        rows,
        opts,
        work_dir,
        observer,
        None,
        &Parallel::single(),
    )
}

/// [`train`] as one rank of `parallel`, scoring `held_out` rows along the way when given (`every` as in
/// [`HeldOut`]).
#[allow(clippy::too_many_arguments)]
pub fn train_on(
    model: &Llama,
    opt: &mut AdamW,
    rows: &[TrainSequence],
    opts: &TrainOptions,
    work_dir: &Path,
    observer: &mut dyn TrainObserver,
    held_out: Option<(&[TrainSequence], usize)>,
    parallel: &Parallel,
) -> Result<TrainSummary> {
    if rows.is_empty() {
        parallel.comm.abort("no training rows");
        bail!("no training rows");
    }
    let objective = LmObjective {
        rows,
        pad_id: opts.pad_id,
    };
    let held_objective = held_out.map(|(rows, every)| {
        let objective = LmObjective {
            rows,
            pad_id: opts.pad_id,
        };
        (objective, every)
    });
    let held_out = held_objective.as_ref().map(|(objective, every)| HeldOut {
        objective: objective as &dyn Objective,
        every: *every,
    });
    train_objective_on(
        model,
        opt,
        &objective,
        opts,
        work_dir,
        observer,
        held_out.as_ref(),
        parallel,
    )
}

/// Trains `model` on any [`Objective`]; see [`train`].
pub fn train_objective(
    model: &Llama,
    opt: &mut AdamW,
    objective: &dyn Objective,
    opts: &TrainOptions,
    work_dir: &Path,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    train_objective_on(
        model,
        opt,
        objective,
        opts,
        work_dir,
        observer,
        None,
        &Parallel::single(),
    )
}

/// [`train_objective`] as one rank of `parallel` (every rank calls it with the same objective and
/// options). An error here aborts the group, so the other ranks fail too instead of waiting.
#[allow(clippy::too_many_arguments)]
pub fn train_objective_on(
    model: &Llama,
    opt: &mut AdamW,
    objective: &dyn Objective,
    opts: &TrainOptions,
    work_dir: &Path,
    observer: &mut dyn TrainObserver,
    held_out: Option<&HeldOut>,
    parallel: &Parallel,
) -> Result<TrainSummary> {
    let result = train_loop(
        model, opt, objective, opts, work_dir, observer, held_out, parallel,
    );
    if let Err(e) = &result {
        parallel.comm.abort(&format!("{e:#}"));
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    model: &Llama,
    opt: &mut AdamW,
    objective: &dyn Objective,
    opts: &TrainOptions,
    work_dir: &Path,
    observer: &mut dyn TrainObserver,
    held_out: Option<&HeldOut>,
    parallel: &Parallel,
) -> Result<TrainSummary> {
    ensure!(!objective.is_empty(), "nothing to train on");
    if let Some(h) = held_out {
        ensure!(!h.objective.is_empty(), "the held-out data is empty");
    }
    ensure!(
        opts.micro_batch > 0 && opts.grad_accum > 0,
        "micro_batch and grad_accum must be positive"
    );
    let device = model.device().clone();
    let order = BatchOrder::new(objective.len(), opts.micro_batch, opts.seed, opts.shuffle);
    let schedule = LrSchedule {
        lr: opts.lr,
        kind: opts.schedule,
        warmup: opts.warmup_steps,
        total: opts.total_steps,
    };
    let fingerprint = fingerprint(opts, opt, objective)?;
    let root = parallel.is_root();
    if root {
        std::fs::create_dir_all(work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
    }
    let checkpoints = checkpoint_dir(work_dir);
    let mut dp = DataParallel::new(parallel, opt, &device);
    let (start, mut tokens_seen) = dp.resume(&checkpoints, opt, &fingerprint)?;
    // Rank 0 keeps metrics.jsonl; the others only remember this run's steps.
    let mut metrics = if root {
        Some(MetricsLog::open(&work_dir.join("metrics.jsonl"), start)?)
    } else {
        None
    };
    let mut history: Vec<StepMetrics> = Vec::new();
    let names = objective.metric_names();
    let began = Instant::now();
    let mut tokens_this_run = 0u64;
    for step in start..opts.total_steps {
        let t0 = Instant::now();
        let batches: Vec<Vec<usize>> = (0..opts.grad_accum)
            .map(|a| order.micro_batch(step * opts.grad_accum + a))
            .collect();
        let targets: usize = batches.iter().map(|idx| objective.units(idx)).sum();
        ensure!(
            targets > 0,
            "step {}: no target tokens in this step's micro-batches",
            step + 1
        );
        let mine: Vec<Vec<usize>> = batches
            .iter()
            .map(|b| dp.rows(b))
            .filter(|b| !b.is_empty())
            .collect();
        let rank = (parallel.world_size() > 1).then(|| parallel.rank());
        let acc = accumulate_gradients(model, opt, objective, &mine, targets, step, rank)?;
        let mut grads = dp.reduce(opt, acc.grads)?;
        let grad_norm = dp.grad_norm(&grads)?;
        check_finite(step, "gradient norm", grad_norm)?;
        if let Some(max) = opts.clip {
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                dp.scale(&mut grads, coef)?;
            }
        }
        let lr = schedule.at(step);
        dp.step(opt, grads, lr)?;

        let (loss_sum, tokens, metric_sums) = if parallel.world_size() == 1 {
            (acc.loss_sum, acc.tokens, acc.metric_sums)
        } else {
            // Loss, tokens and the metric sums of every rank, in a fixed order.
            let mut local = vec![acc.loss_sum, acc.tokens as f64];
            for name in names {
                local.push(
                    acc.metric_sums
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0.0, |(_, v)| *v),
                );
            }
            if let Some((unknown, _)) = acc.metric_sums.iter().find(|(n, _)| !names.contains(n)) {
                bail!("the objective reported metric {unknown:?}, not among its metric_names()");
            }
            let all = dp.sum(local)?;
            let metric_sums = names
                .iter()
                .copied()
                .zip(all[2..].iter().copied())
                .collect();
            (all[0], all[1] as usize, metric_sums)
        };
        let loss = loss_sum / targets as f64;
        tokens_seen += tokens as u64;
        tokens_this_run += tokens as u64;
        let tokens_per_s = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let mut extra: std::collections::BTreeMap<String, f64> = metric_sums
            .into_iter()
            .map(|(k, v)| (k.to_string(), v / targets as f64))
            .collect();
        if let Some(h) = held_out.filter(|h| h.due(step + 1, opts.total_steps)) {
            let (eval_loss, eval_metrics) =
                held_out_loss(model, h.objective, opts.micro_batch, &dp)?;
            check_finite(step, "held-out loss", eval_loss)?;
            extra.insert(EVAL_LOSS.to_string(), eval_loss);
            for (name, value) in eval_metrics {
                extra.insert(format!("eval_{name}"), value);
            }
        }
        let m = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            targets,
            tokens,
            tokens_per_s,
            extra,
        };
        match metrics.as_mut() {
            Some(log) => log.log(&m)?,
            None => history.push(m.clone()),
        }
        if opts.checkpoint_every > 0
            && (step + 1) % opts.checkpoint_every == 0
            && step + 1 < opts.total_steps
        {
            let state = TrainState {
                step: step + 1,
                tokens_seen,
                fingerprint: fingerprint.clone(),
            };
            dp.save(&checkpoints, opt, &state)?;
        }
        observer.on_step(&m, opts.total_steps)?;
    }
    dp.finish(opt)?;
    let history = match metrics {
        Some(log) => log.history,
        None => history,
    };
    Ok(TrainSummary {
        steps: opts.total_steps,
        resumed_from: start,
        final_loss: history.last().map(|m| m.loss).unwrap_or(f64::NAN),
        tokens_seen,
        tokens_per_s: tokens_this_run as f64 / began.elapsed().as_secs_f64().max(1e-9),
        history,
    })
}

/// The checkpoints folder inside a work folder.
pub fn checkpoint_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("checkpoints")
}

/// Summed results of one optimizer step's micro-batches.
struct Accumulated {
    loss_sum: f64,
    /// `None` when this rank had no rows in the step.
    grads: Option<Vec<Tensor>>,
    tokens: usize,
    metric_sums: Vec<(&'static str, f64)>,
}

/// Forward and backward over every micro-batch, each loss divided by the step's total unit count, so the
/// summed gradients are those of the mean loss over all units of the step. Returns the summed
/// (un-normalised) loss, f32 gradients in `opt.params` order (none without micro-batches), tokens and
/// metric sums. `rank`: this rank's number when there are several (its dropout masks are its own).
fn accumulate_gradients(
    model: &Llama,
    opt: &AdamW,
    objective: &dyn Objective,
    batches: &[Vec<usize>],
    units: usize,
    step: usize,
    rank: Option<usize>,
) -> Result<Accumulated> {
    let mut acc: Option<Vec<Tensor>> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    let mut metric_sums: Vec<(&'static str, f64)> = Vec::new();
    for (k, idx) in batches.iter().enumerate() {
        // Adapter dropout masks follow the step and micro-batch, so a resumed run draws the same ones.
        model.set_dropout_seed(Some(dropout_seed(step, k, rank)));
        let micro = objective.micro_batch_loss(model, idx)?;
        let value = micro.loss_sum.to_scalar::<f32>()? as f64;
        check_finite(step, &format!("loss (micro-batch {})", k + 1), value)?;
        loss_sum += value;
        tokens += micro.tokens;
        for (name, v) in micro.metric_sums {
            match metric_sums.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => *sum += v,
                None => metric_sums.push((name, v)),
            }
        }
        let mut grads = (micro.loss_sum / units as f64)?.backward()?;
        model.merge_recomputed_grads(&mut grads)?;
        let these = opt.f32_gradients(&grads)?;
        acc = Some(match acc {
            None => these,
            Some(prev) => prev
                .iter()
                .zip(&these)
                .map(|(a, g)| a + g)
                .collect::<candle_core::Result<_>>()?,
        });
    }
    Ok(Accumulated {
        loss_sum,
        grads: acc,
        tokens,
        metric_sums,
    })
}

/// The mean loss per unit of every item of `objective`, and the mean of each of its metrics (in
/// [`Objective::metric_names`] order), in micro-batches of `micro_batch` items shared out among the ranks like
/// training's; no dropout, and the graph is dropped without a backward pass.
fn held_out_loss(
    model: &Llama,
    objective: &dyn Objective,
    micro_batch: usize,
    dp: &DataParallel,
) -> Result<(f64, Vec<(&'static str, f64)>)> {
    model.set_dropout_seed(None);
    let names = objective.metric_names();
    let all: Vec<usize> = (0..objective.len()).collect();
    // The loss sum, then each metric's sum.
    let mut sums = vec![0.0; 1 + names.len()];
    let mut units = 0usize;
    for batch in all.chunks(micro_batch) {
        units += objective.units(batch);
        let mine = dp.rows(batch);
        if !mine.is_empty() {
            let micro = objective.micro_batch_loss(model, &mine)?;
            sums[0] += micro.loss_sum.to_scalar::<f32>()? as f64;
            for (name, value) in micro.metric_sums {
                let Some(k) = names.iter().position(|n| *n == name) else {
                    bail!("the objective reported metric {name:?}, not among its metric_names()");
                };
                sums[1 + k] += value;
            }
        }
    }
    ensure!(units > 0, "the held-out data has no target tokens");
    let sums = dp.sum(sums)?;
    let metrics = names
        .iter()
        .zip(&sums[1..])
        .map(|(name, sum)| (*name, sum / units as f64))
        .collect();
    Ok((sums[0] / units as f64, metrics))
}

/// The dropout seed of micro-batch `k` of optimizer step `step`, on `rank` of several. Ranks draw apart:
/// their shares of a micro-batch have the same shape, and one seed would give every share the same masks.
/// (So dropout with several ranks draws other masks than one rank does: equal in distribution, not in
/// value.)
fn dropout_seed(step: usize, k: usize, rank: Option<usize>) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"dropout");
    h.update(&(step as u64).to_le_bytes());
    h.update(&(k as u64).to_le_bytes());
    if let Some(rank) = rank {
        h.update(b"rank");
        h.update(&(rank as u64).to_le_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Stops with a clear error when a loss or gradient value is NaN or infinite.
fn check_finite(step: usize, what: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        bail!("step {}: {what} is {value}; stopping (lower the learning rate, check the data, or use f32)", step + 1);
    }
    Ok(())
}

/// L2 norm over all gradients together, with one read from the device (a read per tensor would wait for
/// the device ~150 times a step at the paper's size).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let squares = grads
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sum = Tensor::stack(&squares, 0)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(sum.sqrt())
}

/// Scales gradients by `max / (norm + 1e-6)` when that is below 1 (torch's `clip_grad_norm_`).
pub fn clip_gradients(grads: &mut [Tensor], norm: f64, max: f64) -> Result<()> {
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// Digest of everything that decides the result: options, optimizer settings, parameter names/shapes, data.
fn fingerprint(opts: &TrainOptions, opt: &AdamW, objective: &dyn Objective) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(serde_json::to_string(opts)?.as_bytes());
    h.update(format!("{:?}", opt.config).as_bytes());
    for p in &opt.params {
        h.update(format!("{}{:?}{:?}", p.name, p.master.dims(), p.var.dtype()).as_bytes());
    }
    objective.digest(&mut h);
    Ok(h.finalize().to_hex()[..16].to_string())
}
