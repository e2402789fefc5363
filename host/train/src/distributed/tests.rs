//! The training loop over several in-process ranks against one rank: the same weights within f32
//! reduction-order rounding (bit for bit where the sums run in the same order), ZeRO-1 equal to plain data
//! parallelism bit for bit in every optimizer mode, uneven last micro-batches, a failing rank stopping every
//! rank at once, and a run resumed with another number of ranks.

use super::in_process::run_ranks;
use super::Parallel;
use crate::model_io::{load_for_training, ComputeDType};
use crate::optimizer::{AdamW, AdamWConfig, MomentPrecision};
use crate::schedule::ScheduleKind;
use crate::trainer::{train_on, TrainOptions, TrainSummary};
use crate::{latest_checkpoint, StepMetrics};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dusflow_data::{pack_documents, tokenize_document, TrainSequence};
use dusflow_model::tokenizer::{BYTE_PAD, BYTE_VOCAB};
use dusflow_model::{init_trainable, save_model, LlamaConfig, SaveOptions, Tokenizer};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tiny_model(dir: &Path) -> PathBuf {
    // Hidden size 40: parameters of 40, 1600, 2560, ... values, so shards cut through parameters.
    let cfg = LlamaConfig::tiny(BYTE_VOCAB, 40, 72, 2, 4, 2);
    let (_, model) = init_trainable(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("tiny");
    save_model(&path, &model, &SaveOptions::default()).unwrap();
    Tokenizer::save_byte_level(&path).unwrap();
    path
}

/// The first `n` rows of 24 tokens packed from the documents `text(0)`, `text(1)`, … (enough of them).
fn packed_rows(n: usize, text: impl Fn(usize) -> String) -> Vec<TrainSequence> {
    let tok = Tokenizer::byte_level();
    let docs: Vec<Vec<u32>> = (0..3 * n)
        .map(|i| tokenize_document(&tok, &text(i)).unwrap())
        .collect();
    pack_documents(&docs, 24, false)[..n].to_vec()
}

/// Packed rows from short sums; 22 rows, so a micro-batch of 4 leaves 2 at each epoch's end.
fn rows() -> Vec<TrainSequence> {
    packed_rows(22, |i| {
        format!("{} plus {} is {}.", i % 7, i % 5, i % 7 + i % 5)
    })
}

/// Held-out rows scored every 3 steps: 7 rows, so micro-batches of 4 leave a short one for the ranks to
/// share unevenly.
fn held_out_rows() -> Vec<TrainSequence> {
    packed_rows(7, |i| {
        format!("{} minus {} is {}.", i + 5, i % 5, i + 5 - i % 5)
    })
}

fn options(total: usize, micro_batch: usize, grad_accum: usize) -> TrainOptions {
    TrainOptions {
        lr: 3e-3,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 2,
        total_steps: total,
        micro_batch,
        grad_accum,
        clip: Some(1.0),
        seed: 11,
        shuffle: true,
        checkpoint_every: 0,
        pad_id: BYTE_PAD,
    }
}

/// What one rank ended with.
struct RankRun {
    summary: TrainSummary,
    /// The weights to save (masters), rank 0 only after ZeRO-1.
    masters: Vec<Vec<f32>>,
    /// The compute variables.
    vars: Vec<Vec<f32>>,
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn snapshot(opt: &AdamW, summary: TrainSummary) -> RankRun {
    RankRun {
        summary,
        masters: opt.params.iter().map(|p| values(&p.master)).collect(),
        vars: opt
            .params
            .iter()
            .map(|p| values(p.var.as_tensor()))
            .collect(),
    }
}

#[derive(Clone, Copy)]
struct Setup {
    compute: ComputeDType,
    adamw: AdamWConfig,
}

const F32: Setup = Setup {
    compute: ComputeDType::F32,
    adamw: AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        moments: MomentPrecision::F32,
        masters: true,
    },
};

type Observer = dyn Fn(usize, &StepMetrics) -> Result<()> + Sync;

/// Trains on `world` in-process ranks (`world = 1`: the plain loop, no group).
fn train_ranks(
    model: &Path,
    work: &Path,
    world: usize,
    zero: bool,
    setup: Setup,
    opts: &TrainOptions,
    observe: &Observer,
) -> Vec<Result<RankRun>> {
    let rows = rows();
    let held = held_out_rows();
    let run = |rank: usize, par: Parallel| -> Result<RankRun> {
        let (m, mut opt) = load_for_training(model, setup.compute, setup.adamw, &Device::Cpu)?;
        let mut observer = |s: &StepMetrics, _: usize| observe(rank, s);
        let summary = train_on(
            &m,
            &mut opt,
            &rows,
            opts,
            work,
            &mut observer,
            Some((&held, 3)),
            &par,
        )?;
        Ok(snapshot(&opt, summary))
    };
    if world == 1 && !zero {
        return vec![run(0, Parallel::single())];
    }
    run_ranks(world, Duration::from_secs(60), |rank, comm| {
        run(rank, Parallel::new(comm, zero))
    })
}

fn no_observer(_: usize, _: &StepMetrics) -> Result<()> {
    Ok(())
}

fn ok(runs: Vec<Result<RankRun>>) -> Vec<RankRun> {
    runs.into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e:#}")))
        .collect()
}

/// max |a − b| / max |a| over all parameters.
fn relative_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut gap, mut scale) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            gap = gap.max((p - q).abs() as f64);
            scale = scale.max(p.abs() as f64);
        }
    }
    gap / scale
}

/// Every rank's variables are the same, bit for bit.
fn assert_ranks_agree(runs: &[RankRun]) {
    for (r, run) in runs.iter().enumerate().skip(1) {
        assert!(
            run.vars == runs[0].vars,
            "rank {r}'s weights differ from rank 0's"
        );
    }
}

#[test]
fn two_three_and_four_ranks_train_like_one_rank_with_whole_micro_batches() {
    // Micro-batches of 4 rows (22 rows: each epoch ends with a micro-batch of 2, which 3 or 4 ranks share
    // unevenly, some with no rows) and 2 micro-batches per step: 8 steps cross two epoch ends.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let opts = options(8, 4, 2);
    let one = ok(train_ranks(
        &model,
        &dir.path().join("w1"),
        1,
        false,
        F32,
        &opts,
        &no_observer,
    ));
    let moved = relative_gap(&one[0].masters, &{
        let (_, opt) = load_for_training(&model, F32.compute, F32.adamw, &Device::Cpu).unwrap();
        opt.params
            .iter()
            .map(|p| values(&p.master))
            .collect::<Vec<_>>()
    });
    for world in [2, 3, 4] {
        let work = dir.path().join(format!("w{world}"));
        let runs = ok(train_ranks(
            &model,
            &work,
            world,
            false,
            F32,
            &opts,
            &no_observer,
        ));
        assert_ranks_agree(&runs);
        let gap = relative_gap(&one[0].masters, &runs[0].masters);
        eprintln!("{world} ranks vs 1: max weight difference {gap:.2e} of the largest weight (training moved them {moved:.2e})");
        // f32 sums in another order (per-rank partial sums of each micro-batch): a few ulps per gradient,
        // grown by 8 Adam steps. The bound is two orders of magnitude below what training moves.
        assert!(gap < 2e-5, "{world} ranks: {gap:e}");
        for (a, b) in one[0].summary.history.iter().zip(&runs[0].summary.history) {
            assert_eq!((a.targets, a.tokens), (b.targets, b.tokens));
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * a.loss,
                "step {}: {} vs {}",
                a.step,
                a.loss,
                b.loss
            );
            // The held-out rows, shared out among the ranks, are scored like one rank scores them all.
            let (x, y) = (a.extra.get(crate::EVAL_LOSS), b.extra.get(crate::EVAL_LOSS));
            assert_eq!(
                x.is_some(),
                a.step % 3 == 0 || a.step == 8,
                "step {}",
                a.step
            );
            assert_eq!(x.is_some(), y.is_some(), "step {}", a.step);
            if let (Some(x), Some(y)) = (x, y) {
                assert!(
                    (x - y).abs() < 1e-5 * x,
                    "step {}: held-out {x} vs {y}",
                    a.step
                );
            }
        }
    }
}

#[test]
fn one_row_per_rank_is_bit_identical_to_accumulating_micro_batches_of_one() {
    // N ranks with micro-batches of N rows sum the same per-row gradients in the same order as one rank
    // accumulating N micro-batches of one row (the in-process sum runs in rank order). Without clipping
    // (whose norm is summed per shard) the weights are identical.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    for world in [2, 4] {
        let mut single = options(5, 1, world);
        single.clip = None;
        let mut ranks = options(5, world, 1);
        ranks.clip = None;
        let one = ok(train_ranks(
            &model,
            &dir.path().join(format!("a{world}")),
            1,
            false,
            F32,
            &single,
            &no_observer,
        ));
        let many = ok(train_ranks(
            &model,
            &dir.path().join(format!("b{world}")),
            world,
            false,
            F32,
            &ranks,
            &no_observer,
        ));
        assert!(one[0].masters == many[0].masters, "{world} ranks");
        let losses = |r: &RankRun| r.summary.history.iter().map(|m| m.loss).collect::<Vec<_>>();
        assert_eq!(losses(&one[0]), losses(&many[0]));
    }
}

#[test]
fn zero_1_equals_plain_data_parallel_bit_for_bit_in_every_optimizer_mode() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut opts = options(6, 3, 2);
    opts.checkpoint_every = 4;
    let modes = [
        ("f32", F32),
        (
            "8-bit moments",
            Setup {
                adamw: AdamWConfig {
                    moments: MomentPrecision::Blockwise8,
                    ..F32.adamw
                },
                ..F32
            },
        ),
        (
            "bf16 with f32 masters",
            Setup {
                compute: ComputeDType::Bf16,
                ..F32
            },
        ),
        (
            "bf16 without masters, 8-bit moments",
            Setup {
                compute: ComputeDType::Bf16,
                adamw: AdamWConfig {
                    moments: MomentPrecision::Blockwise8,
                    masters: false,
                    ..F32.adamw
                },
            },
        ),
    ];
    for (i, (name, setup)) in modes.into_iter().enumerate() {
        // Stop after step 4 (its checkpoint written) to compare checkpoints, then finish.
        let stop = |_: usize, m: &StepMetrics| -> Result<()> {
            if m.step == 4 {
                bail!("stop at 4");
            }
            Ok(())
        };
        let plain_dir = dir.path().join(format!("plain{i}"));
        let zero_dir = dir.path().join(format!("zero{i}"));
        for (work, zero) in [(&plain_dir, false), (&zero_dir, true)] {
            let stopped = train_ranks(&model, work, 3, zero, setup, &opts, &stop);
            assert!(stopped.iter().all(|r| r.is_err()), "{name}");
        }
        let tensors = |work: &Path| {
            let ckpt = latest_checkpoint(&work.join("checkpoints"))
                .unwrap()
                .unwrap();
            candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &Device::Cpu)
                .unwrap()
        };
        let (a, b) = (tensors(&plain_dir), tensors(&zero_dir));
        assert_eq!(a.len(), b.len(), "{name}");
        for (key, t) in &a {
            let u = &b[key];
            assert_eq!(t.dtype(), u.dtype(), "{name}: {key}");
            let same = t
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                == u.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
            assert!(same, "{name}: checkpoint tensor {key} differs");
        }
        let plain = ok(train_ranks(
            &model,
            &plain_dir,
            3,
            false,
            setup,
            &opts,
            &no_observer,
        ));
        let zero = ok(train_ranks(
            &model,
            &zero_dir,
            3,
            true,
            setup,
            &opts,
            &no_observer,
        ));
        assert_eq!(zero[0].summary.resumed_from, 4, "{name}");
        assert_ranks_agree(&zero);
        assert!(plain[0].vars == zero[0].vars, "{name}: weights differ");
        assert!(
            plain[0].masters == zero[0].masters,
            "{name}: masters differ"
        );
        let losses = |r: &RankRun| r.summary.history.iter().map(|m| m.loss).collect::<Vec<_>>();
        assert_eq!(losses(&plain[0]), losses(&zero[0]), "{name}");
    }
}

#[test]
fn a_rank_that_errors_stops_every_rank_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let fail = |rank: usize, m: &StepMetrics| -> Result<()> {
        if rank == 1 && m.step == 2 {
            bail!("rank 1 ran out of memory");
        }
        Ok(())
    };
    for zero in [false, true] {
        let t0 = Instant::now();
        let runs = train_ranks(
            &model,
            &dir.path().join(format!("f{zero}")),
            3,
            zero,
            F32,
            &options(6, 3, 1),
            &fail,
        );
        // The group's timeout is 60 s: an abort reaches the others at once.
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        for (rank, r) in runs.iter().enumerate() {
            let err = format!("{:#}", r.as_ref().err().expect("every rank fails"));
            assert!(err.contains("ran out of memory"), "rank {rank}: {err}");
        }
    }
}

#[test]
fn a_run_stopped_with_four_ranks_resumes_with_two_or_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut opts = options(6, 4, 1);
    opts.checkpoint_every = 3;
    let crash = |_: usize, m: &StepMetrics| -> Result<()> {
        if m.step == 4 {
            bail!("killed");
        }
        Ok(())
    };
    let full = ok(train_ranks(
        &model,
        &dir.path().join("full"),
        4,
        true,
        F32,
        &opts,
        &no_observer,
    ));
    for (world, zero) in [(2, false), (2, true), (1, false)] {
        let work = dir.path().join(format!("r{world}{zero}"));
        let stopped = train_ranks(&model, &work, 4, true, F32, &opts, &crash);
        assert!(stopped.iter().all(|r| r.is_err()));
        let resumed = ok(train_ranks(
            &model,
            &work,
            world,
            zero,
            F32,
            &opts,
            &no_observer,
        ));
        assert_eq!(resumed[0].summary.resumed_from, 3);
        assert_eq!(
            resumed[0].summary.history.len(),
            6,
            "metrics of steps 1-3 kept"
        );
        let gap = relative_gap(&full[0].masters, &resumed[0].masters);
        eprintln!("4 ranks, resumed with {world} (zero = {zero}): {gap:.2e}");
        assert!(gap < 2e-5, "{world} ranks: {gap:e}");
    }
}
