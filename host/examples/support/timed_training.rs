//! A timed run of dusflow's own training loop, shared by the training benchmarks (`bench_train`,
//! `gpu_check train-speed`): constant learning rate 1e-4, clipping at 1, no shuffling, no checkpoints.
// Each example uses part of this module.
#![allow(dead_code)]

use anyhow::Result;
use dusflow::data::TrainSequence;
use dusflow::model::Llama;
use dusflow::train::{train, AdamW, ScheduleKind, StepMetrics, TrainOptions};
use std::time::Instant;

/// What a timed run measured.
pub(crate) struct TimedRun {
    /// Seconds from the end of step `warmup` to the end; `None` when no step came after the warm-up.
    pub timed_seconds: Option<f64>,
    /// Seconds of the whole run.
    pub total_seconds: f64,
    /// The loss of every step.
    pub losses: Vec<f64>,
}

/// Trains `model` on `rows`, `batch` rows per step, one pass; the steps after the first `warmup` are timed.
pub(crate) fn timed_training(
    model: &Llama,
    opt: &mut AdamW,
    rows: &[TrainSequence],
    batch: usize,
    warmup: usize,
) -> Result<TimedRun> {
    let opts = TrainOptions {
        lr: 1e-4,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        total_steps: rows.len() / batch,
        micro_batch: batch,
        grad_accum: 1,
        clip: Some(1.0),
        seed: 0,
        shuffle: false,
        checkpoint_every: 0,
        pad_id: 0,
    };
    let work = tempfile::tempdir()?;
    let mut timed_from: Option<Instant> = None;
    let mut losses = Vec::new();
    let mut observer = |m: &StepMetrics, _: usize| {
        if m.step == warmup {
            timed_from = Some(Instant::now());
        }
        losses.push(m.loss);
        Ok(())
    };
    let started = Instant::now();
    train(model, opt, rows, &opts, work.path(), &mut observer)?;
    Ok(TimedRun {
        timed_seconds: timed_from.map(|t| t.elapsed().as_secs_f64()),
        total_seconds: started.elapsed().as_secs_f64(),
        losses,
    })
}
