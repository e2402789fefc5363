//! The sDPO stages: stage t computes its reference log-probs once (no grad, stored in the work folder),
//! then trains M_{t−1} on chunk t and writes M_t. Every stage resumes: a finished stage is not redone, an
//! unfinished one continues from its last checkpoint and reuses its stored reference pass.

use super::chunks::{all_pairs, chunk_origin, PreferenceData, SourcedPair};
use crate::model::load_model;
use crate::steps::training::TrainStepConfig;
use crate::steps::training::{progress_observer, Trainee};
use crate::steps::{InputArtifact, StepContext};
use crate::train::dpo::{
    reference_pass, DpoLossConfig, DpoObjective, PreferencePair, ReferenceLogps,
};
use crate::train::ADAPTER_PART;
use crate::train::{
    move_contents, train_objective_on, HeldOut, MetricsLog, Objective, Parallel, StepMetrics,
    TrainObserver, TrainOptions,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use dusflow_core::atomic::write_file_atomic;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which model a reference pass used: where it came from and the BLAKE3 of its safetensors files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `input model "NAME"`, `input reference "NAME"` or `stage-T` (this step's M_T).
    pub source: String,
    /// BLAKE3 over the model's `*.safetensors` files (names and bytes, in name order).
    pub blake3: String,
}

/// BLAKE3 over the `*.safetensors` files of model folder `dir`.
pub fn model_digest(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading model folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        let file = std::fs::File::open(f).with_context(|| format!("hashing {}", f.display()))?;
        h.update_reader(file)
            .with_context(|| format!("hashing {}", f.display()))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A stored reference pass (`reference_logps/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredReference {
    /// Digest of the pairs and the reference model; a stored pass of other data or model is recomputed.
    pub fingerprint: String,
    /// The model.
    pub reference: ModelIdentity,
    /// Seconds the pass took.
    pub seconds: f64,
    /// The log-probs, in chunk order.
    pub logps: ReferenceLogps,
}

/// Reference log-probs of `pairs` under the model in `dir`: read from `file` when it holds this pass,
/// otherwise taken from `known` (log-probs of these pairs under this model from an earlier pass, with its
/// seconds) or computed (one no-grad pass, batches of `batch`), and stored there atomically when `write`
/// (rank 0 of several). Returns the stored pass and whether it was reused from `file`.
#[allow(clippy::too_many_arguments)]
pub fn reference_logps(
    file: &Path,
    dir: &Path,
    identity: ModelIdentity,
    pairs: &[&PreferencePair],
    known: Option<(ReferenceLogps, f64)>,
    batch: usize,
    pad: u32,
    device: &Device,
    write: bool,
    on_batch: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<(StoredReference, bool)> {
    let mut h = blake3::Hasher::new();
    h.update(identity.blake3.as_bytes());
    for p in pairs {
        for part in [&p.prompt, &p.chosen, &p.rejected] {
            for id in part.iter() {
                h.update(&id.to_le_bytes());
            }
            h.update(b"|");
        }
    }
    let fingerprint = h.finalize().to_hex()[..16].to_string();
    if let Ok(bytes) = std::fs::read(file) {
        if let Ok(stored) = serde_json::from_slice::<StoredReference>(&bytes) {
            if stored.fingerprint == fingerprint {
                return Ok((stored, true));
            }
        }
    }
    let (logps, seconds) = match known {
        Some(k) => k,
        None => {
            let t0 = Instant::now();
            let model = load_model(dir, DType::F32, device)?;
            let owned: Vec<PreferencePair> = pairs.iter().map(|p| (*p).clone()).collect();
            let logps = reference_pass(&model, &owned, batch, pad, on_batch)?;
            (logps, t0.elapsed().as_secs_f64())
        }
    };
    let stored = StoredReference {
        fingerprint,
        reference: identity,
        seconds,
        logps,
    };
    if write {
        write_file_atomic(file, &serde_json::to_vec(&stored)?)?;
    }
    Ok((stored, false))
}

/// What one stage did (an entry of `dpo_report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    /// t, 1-based.
    pub stage: usize,
    /// Pairs in the chunk.
    pub pairs: usize,
    /// Dataset name → pairs, and record index ranges (see [`super::chunks::ChunkOrigin`]).
    pub chunk: serde_json::Value,
    /// The policy it started from (M_{t−1}).
    pub initial: ModelIdentity,
    /// The reference model.
    pub reference: ModelIdentity,
    /// Seconds of the reference pass (of the run that computed it).
    pub reference_pass_seconds: f64,
    /// Whether a stored pass was reused (a resumed run).
    pub reference_pass_reused: bool,
    /// Where M_t is, relative to the artifact (`stage-t` or `.` for the last stage).
    pub output: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Step the stage resumed from (0 = fresh).
    pub resumed_from: usize,
    /// Pairs per second of training in this process (forward + backward + update).
    pub pairs_per_s: f64,
    /// The last optimizer step's metrics.
    pub final_metrics: Option<StepMetrics>,
}

/// Everything a stage needs besides its chunk.
pub struct StageSetup<'a> {
    /// The step's output (= work) folder.
    pub out_dir: &'a Path,
    /// Training keys.
    pub train: &'a TrainStepConfig,
    /// Loss.
    pub loss: DpoLossConfig,
    /// Data-order seed.
    pub seed: u64,
    /// Padding id.
    pub pad: u32,
    /// Dtype of the written models.
    pub save_dtype: DType,
    /// Compute device.
    pub device: &'a Device,
    /// This rank's group (rank 0 writes).
    pub parallel: &'a Parallel,
}

impl StageSetup<'_> {
    /// [`reference_logps`] with the step's batch size, padding, device and writer (rank 0), counting
    /// batches on `ctx`'s progress bar.
    pub fn stored_reference(
        &self,
        ctx: &StepContext,
        file: &Path,
        model: (&Path, ModelIdentity),
        pairs: &[&PreferencePair],
        known: Option<(ReferenceLogps, f64)>,
    ) -> Result<(StoredReference, bool)> {
        reference_logps(
            file,
            model.0,
            model.1,
            pairs,
            known,
            self.train.micro_batch,
            self.pad,
            self.device,
            self.parallel.is_root(),
            &mut batch_progress(ctx, pairs.len()),
        )
    }
}

/// Work folder of stage `t` (checkpoints, metrics, done marker); removed when the step finishes.
pub fn stage_work_dir(out_dir: &Path, t: usize) -> PathBuf {
    out_dir.join(".dpo-work").join(format!("stage-{t}"))
}

/// Runs stage `t` (or returns its report when a previous run finished it): trains the model in
/// `initial_dir` on `chunk` against `reference` log-probs and writes M_t to `output` (a folder; for the
/// last stage the artifact root, written through a staging folder).
#[allow(clippy::too_many_arguments)]
pub fn run_stage(
    setup: &StageSetup<'_>,
    t: usize,
    chunk: &[SourcedPair],
    chunk_origin: serde_json::Value,
    initial: (&Path, ModelIdentity),
    adapter_start: Option<&Path>,
    reference: (StoredReference, bool),
    held_out: Option<(&[PreferencePair], &StoredReference)>,
    output: &str,
    observer: &mut dyn TrainObserver,
) -> Result<StageReport> {
    let work = stage_work_dir(setup.out_dir, t);
    let done = work.join("done.json");
    if let Ok(bytes) = std::fs::read(&done) {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", done.display()));
    }
    let pairs: Vec<PreferencePair> = chunk.iter().map(|p| p.pair.clone()).collect();
    let mut trainee = Trainee::load(
        setup.train,
        initial.0,
        adapter_start,
        setup.seed ^ t as u64,
        setup.device,
    )?;
    let total = setup.train.total_steps(pairs.len());
    let opts = TrainOptions {
        lr: setup.train.lr,
        schedule: setup.train.schedule,
        warmup_steps: setup.train.warmup(total),
        total_steps: total,
        micro_batch: setup.train.micro_batch,
        grad_accum: setup.train.grad_accum,
        clip: (setup.train.clip > 0.0).then_some(setup.train.clip),
        seed: setup.seed ^ t as u64,
        shuffle: setup.train.shuffle,
        checkpoint_every: setup.train.checkpoint_every,
        pad_id: setup.pad,
    };
    let objective = DpoObjective {
        pairs: &pairs,
        reference: &reference.0.logps,
        loss: setup.loss,
        pad_id: setup.pad,
    };
    let held_objective = held_out.map(|(pairs, reference)| DpoObjective {
        pairs,
        reference: &reference.logps,
        loss: setup.loss,
        pad_id: setup.pad,
    });
    let held_out = held_objective.as_ref().map(|objective| HeldOut {
        objective: objective as &dyn Objective,
        every: setup.train.eval_every,
    });
    let t0 = Instant::now();
    let summary = train_objective_on(
        &trainee.model,
        &mut trainee.opt,
        &objective,
        &opts,
        &work,
        observer,
        held_out.as_ref(),
        setup.parallel,
    )?;
    let trained_pairs = (summary.steps - summary.resumed_from) * opts.micro_batch * opts.grad_accum;
    let pairs_per_s = trained_pairs as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let report = StageReport {
        stage: t,
        pairs: pairs.len(),
        chunk: chunk_origin,
        initial: initial.1,
        reference: reference.0.reference.clone(),
        reference_pass_seconds: reference.0.seconds,
        reference_pass_reused: reference.1,
        output: output.to_string(),
        steps: summary.steps,
        resumed_from: summary.resumed_from,
        pairs_per_s,
        final_metrics: summary.history.last().cloned(),
    };
    if !setup.parallel.is_root() {
        return Ok(report);
    }
    if output == "." {
        let staging = work.join("model");
        trainee.save(&staging, setup.save_dtype)?;
        move_contents(&staging, setup.out_dir)?;
    } else {
        trainee.save(&setup.out_dir.join(output), setup.save_dtype)?;
    }
    write_file_atomic(&done, &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

/// Every stage's logged steps, in order, tagged with their stage.
pub fn stage_histories(out_dir: &Path, stages: usize) -> Result<Vec<(usize, StepMetrics)>> {
    let mut all = Vec::new();
    for t in 1..=stages {
        let path = stage_work_dir(out_dir, t).join("metrics.jsonl");
        let log = MetricsLog::open(&path, usize::MAX)?;
        all.extend(log.history.into_iter().map(|m| (t, m)));
    }
    Ok(all)
}

/// The stage loop's inputs beyond the [`StageSetup`].
pub struct Stages<'a> {
    /// The loaded pairs.
    pub data: &'a PreferenceData,
    /// D_1..D_T.
    pub chunks: &'a [Vec<SourcedPair>],
    /// M_0: its folder and identity.
    pub initial: (PathBuf, ModelIdentity),
    /// A fixed reference model (`inputs.reference`); else stage t's reference is M_{t−1}.
    pub fixed_reference: Option<&'a InputArtifact>,
    /// M_0's log-probs of every pair, when computed for margin chunking (reused where M_0 is the reference).
    pub initial_pass: Option<&'a StoredReference>,
    /// Held-out pairs (`inputs.eval_data`), scored in every stage against that stage's reference.
    pub held_out: Option<&'a [PreferencePair]>,
}

/// Runs the stages in order: stage t's reference pass (stored, or taken from the initial pass when the
/// reference is M_0), then training M_{t−1} into M_t (`stage-<t>/`, the last one into the artifact root).
pub fn run_stages(
    setup: &StageSetup<'_>,
    ctx: &StepContext,
    stages: &Stages<'_>,
) -> Result<Vec<StageReport>> {
    // Position of each (dataset, record) in the initial pass.
    let initial_index: HashMap<(usize, usize), usize> = all_pairs(stages.data)
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.dataset, p.record), i))
        .collect();
    let refs_dir = setup.out_dir.join("reference_logps");
    let count = stages.chunks.len();
    let mut reports = Vec::with_capacity(count);
    let mut current = stages.initial.clone();
    for (i, chunk) in stages.chunks.iter().enumerate() {
        let t = i + 1;
        let (ref_dir, ref_identity) = match stages.fixed_reference {
            Some(r) => (
                r.path.clone(),
                ModelIdentity {
                    source: format!("input reference {:?}", r.name),
                    blake3: model_digest(&r.path)?,
                },
            ),
            None => current.clone(),
        };
        ctx.progress
            .set_message(format!("stage {t}/{count}: reference pass"));
        let refs: Vec<&PreferencePair> = chunk.iter().map(|p| &p.pair).collect();
        let known = match stages.initial_pass {
            Some(pass) if pass.reference == ref_identity => {
                let pick = |v: &[f32]| -> Vec<f32> {
                    chunk
                        .iter()
                        .map(|p| v[initial_index[&(p.dataset, p.record)]])
                        .collect()
                };
                let logps = ReferenceLogps {
                    chosen: pick(&pass.logps.chosen),
                    rejected: pick(&pass.logps.rejected),
                };
                let share = chunk.len() as f64 / initial_index.len().max(1) as f64;
                Some((logps, pass.seconds * share))
            }
            _ => None,
        };
        let held_out_reference = match stages.held_out {
            Some(held) => {
                let refs: Vec<&PreferencePair> = held.iter().collect();
                let (stored, _) = setup.stored_reference(
                    ctx,
                    &refs_dir.join(format!("stage-{t}-eval_data.json")),
                    (&ref_dir, ref_identity.clone()),
                    &refs,
                    None,
                )?;
                Some(stored)
            }
            None => None,
        };
        let reference = setup.stored_reference(
            ctx,
            &refs_dir.join(format!("stage-{t}.json")),
            (&ref_dir, ref_identity),
            &refs,
            known,
        )?;
        ctx.progress
            .set_message(format!("stage {t}/{count}: training"));
        let output = if t == count {
            ".".to_string()
        } else {
            format!("stage-{t}")
        };
        let mut observer = progress_observer(ctx);
        // LoRA trains one adapter over every stage on the frozen base: stage t continues stage t−1's.
        let (start, adapter_start) = match (&setup.train.lora, t) {
            (Some(_), 1) => (stages.initial.clone(), None),
            (Some(_), _) => (
                stages.initial.clone(),
                Some(
                    setup
                        .out_dir
                        .join(format!("stage-{}", t - 1))
                        .join(ADAPTER_PART),
                ),
            ),
            (None, _) => (current.clone(), None),
        };
        let report = run_stage(
            setup,
            t,
            chunk,
            serde_json::to_value(chunk_origin(stages.data, chunk))?,
            (&start.0, start.1.clone()),
            adapter_start.as_deref(),
            reference,
            stages.held_out.zip(held_out_reference.as_ref()),
            &output,
            &mut observer,
        )?;
        reports.push(report);
        // Rank 0 has written M_t; the other ranks read it next.
        setup.parallel.comm.barrier()?;
        if t < count {
            // M_t starts (and, in sDPO, is the reference of) the next stage.
            let written = setup.out_dir.join(&output);
            let identity = ModelIdentity {
                source: format!("stage-{t}"),
                blake3: model_digest(&written)?,
            };
            current = (written, identity);
        }
    }
    Ok(reports)
}

/// A reference pass's progress on the step's bar; stops when the step is cancelled.
pub fn batch_progress(ctx: &StepContext, total: usize) -> impl FnMut(usize) -> Result<()> + '_ {
    move |done: usize| {
        ctx.progress.set_length(total as u64);
        ctx.progress.set_position(done as u64);
        ctx.check_cancelled()
    }
}
