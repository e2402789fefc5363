//! One rank of a training step: what the launching process tells it ([`WorkerJob`], JSON on the worker's
//! standard input), and running the step kind as that rank ([`run_rank`], [`worker_main`] for the hidden
//! `dus __worker` subcommand).

use crate::spec::{DatasetSpec, PluginSpec, WorkflowSettings};
use crate::step::{ArtifactKind, InputArtifact, StepContext, StepKind};
use crate::train::distributed::TcpCollective;
use crate::train::{Collective, Parallel};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a worker needs to run its rank of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerJob {
    /// `pretrain`, `sft` or `dpo`.
    pub kind: String,
    /// The step's parameters.
    pub config: serde_json::Value,
    /// The step's name.
    pub step: String,
    /// The step's work folder (shared by every rank; only rank 0 writes).
    pub out_dir: PathBuf,
    /// The workflow file's folder.
    pub workflow_dir: PathBuf,
    /// The `[workflow]` settings.
    pub settings: WorkflowSettings,
    /// Input artifacts by slot.
    pub inputs: BTreeMap<String, Vec<JobInput>>,
    /// The plugins the step uses.
    pub plugins: BTreeMap<String, PluginSpec>,
    /// Ranks in the group.
    pub world: usize,
    /// ZeRO-1.
    pub zero: bool,
    /// Collective timeout, seconds.
    pub timeout_s: f64,
    /// This rank.
    pub rank: usize,
    /// Rank on its machine: the GPU it uses.
    pub local_rank: usize,
    /// The launching process's hub, `host:port`.
    pub hub: String,
    /// The group's token (a connection without it is refused).
    pub token: String,
}

/// An [`InputArtifact`] as a job carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInput {
    /// Referenced name.
    pub name: String,
    /// What it is.
    pub kind: ArtifactKind,
    /// Where it is.
    pub path: PathBuf,
    /// Dataset spec, for dataset inputs.
    pub dataset: Option<DatasetSpec>,
}

impl WorkerJob {
    /// The job of step `ctx` (kind `kind`, parameters `config`) for a group of `world` ranks; rank, hub and
    /// token are filled in per rank by [`WorkerJob::for_rank`].
    pub fn new(
        ctx: &StepContext,
        kind: &str,
        config: serde_json::Value,
        world: usize,
        zero: bool,
        timeout: Duration,
    ) -> Self {
        WorkerJob {
            kind: kind.to_string(),
            config,
            step: ctx.step.clone(),
            out_dir: ctx.out_dir.clone(),
            workflow_dir: ctx.workflow_dir.clone(),
            settings: ctx.settings.clone(),
            inputs: ctx
                .inputs
                .iter()
                .map(|(slot, list)| {
                    let list = list
                        .iter()
                        .map(|a| JobInput {
                            name: a.name.clone(),
                            kind: a.kind,
                            path: a.path.clone(),
                            dataset: a.dataset.clone(),
                        })
                        .collect();
                    (slot.clone(), list)
                })
                .collect(),
            plugins: ctx.plugins.clone(),
            world,
            zero,
            timeout_s: timeout.as_secs_f64(),
            rank: 0,
            local_rank: 0,
            hub: String::new(),
            token: String::new(),
        }
    }

    /// This job for rank `rank` (GPU `local_rank` of its machine), meeting at `hub` with `token`.
    pub fn for_rank(&self, rank: usize, local_rank: usize, hub: &str, token: &str) -> Self {
        WorkerJob {
            rank,
            local_rank,
            hub: hub.to_string(),
            token: token.to_string(),
            ..self.clone()
        }
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }
}

/// What a step running as one rank of a group finds in its context's services: its group and device.
pub struct RankContext {
    /// The group, with or without ZeRO-1.
    pub parallel: Parallel,
    /// This rank's device.
    pub device: Device,
}

/// Runs the job's step kind as one rank: the step context rebuilt from the job, with `parallel` and
/// `device` as a [`RankContext`] service.
pub fn run_rank(
    job: &WorkerJob,
    parallel: Parallel,
    device: Device,
    progress: indicatif::ProgressBar,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let mut services = crate::engine::default_services();
    services.insert(Arc::new(RankContext { parallel, device }));
    let ctx = StepContext {
        step: job.step.clone(),
        out_dir: job.out_dir.clone(),
        workflow_dir: job.workflow_dir.clone(),
        settings: job.settings.clone(),
        inputs: job
            .inputs
            .iter()
            .map(|(slot, list)| {
                let list = list
                    .iter()
                    .map(|a| InputArtifact {
                        name: a.name.clone(),
                        kind: a.kind,
                        path: a.path.clone(),
                        dataset: a.dataset.clone(),
                        // The launching process's engine merged any adapter into `path` already.
                        merge: None,
                    })
                    .collect();
                (slot.clone(), list)
            })
            .collect(),
        plugins: job.plugins.clone(),
        progress,
        cancel,
        services,
    };
    let config = job.config.clone();
    let parse = |what: &str| format!("the {what} parameters of step `{}`", job.step);
    match job.kind.as_str() {
        "pretrain" => crate::steps::pretrain::PretrainStep::default().run(
            &serde_json::from_value(config).with_context(|| parse("pretrain"))?,
            &ctx,
        ),
        "sft" => crate::steps::sft::SftStep::default().run(
            &serde_json::from_value(config).with_context(|| parse("sft"))?,
            &ctx,
        ),
        "dpo" => crate::steps::dpo::DpoStep.run(
            &serde_json::from_value(config).with_context(|| parse("dpo"))?,
            &ctx,
        ),
        other => bail!("step kind {other:?} does not train on several devices"),
    }
}

/// The device of a worker: the CPU, or its GPU — `local_rank`, or the only one it sees when the launcher
/// gave each task one GPU (`CUDA_VISIBLE_DEVICES` with one entry, as `srun --gpus-per-task=1` sets).
pub fn rank_device(job: &WorkerJob) -> Result<Device> {
    use crate::spec::DeviceChoice;
    let want_cuda = match job.settings.device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda => true,
        DeviceChoice::Auto => {
            crate::device::CUDA_COMPILED && candle_core::utils::cuda_is_available()
        }
    };
    if !want_cuda {
        return Ok(Device::Cpu);
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let ordinal = match visible
        .as_deref()
        .map(|v| v.split(',').filter(|s| !s.is_empty()).count())
    {
        Some(1) => 0,
        _ => job.local_rank,
    };
    Device::new_cuda(ordinal).with_context(|| format!("rank {}: opening GPU {ordinal}", job.rank))
}

/// `dus __worker`: reads a [`WorkerJob`] from standard input, joins its group, runs the step as its rank.
/// Exit status 0 when the rank finished, 1 otherwise (the error on standard error).
pub fn worker_main() -> std::process::ExitCode {
    let job = match read_job() {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run_worker(&job) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: rank {}: {e:#}", job.rank);
            std::process::ExitCode::FAILURE
        }
    }
}

fn read_job() -> Result<WorkerJob> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("reading the job from standard input")?;
    serde_json::from_str(&text).context("the job on standard input is not a worker job")
}

/// Joins the hub, sets up the collective (the TCP hub on the CPU, NCCL on GPUs), runs the rank, and tells
/// the hub how it ended.
pub fn run_worker(job: &WorkerJob) -> Result<()> {
    let timeout = job.timeout();
    let link = Arc::new(TcpCollective::connect(
        &job.hub, job.rank, job.world, &job.token, timeout,
    )?);
    let result = (|| -> Result<()> {
        let device = rank_device(job)?;
        let comm: Arc<dyn Collective> = if device.is_cuda() {
            nccl_group(job, &link, &device)?
        } else {
            link.clone()
        };
        let progress = indicatif::ProgressBar::hidden();
        let relay = (job.rank == 0).then(|| relay_progress(progress.clone(), link.clone()));
        let out = run_rank(
            job,
            Parallel::new(comm.clone(), job.zero),
            device,
            progress,
            tokio_util::sync::CancellationToken::new(),
        );
        if let Some(stop) = relay {
            stop();
        }
        if let Err(e) = &out {
            comm.abort(&format!("{e:#}"));
        }
        out
    })();
    match &result {
        Ok(()) => link.done()?,
        Err(e) => link.abort(&format!("{e:#}")),
    }
    result
}

#[cfg(feature = "cuda")]
fn nccl_group(
    job: &WorkerJob,
    link: &Arc<TcpCollective>,
    device: &Device,
) -> Result<Arc<dyn Collective>> {
    let comm = super::nccl::NcclCollective::join(
        link.as_ref(),
        job.rank,
        job.world,
        device,
        job.timeout(),
    )?;
    let comm = Arc::new(comm);
    let watched = comm.clone();
    link.watch(Box::new(move |reason| watched.abort_from_outside(&reason)))?;
    Ok(comm)
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(
    _job: &WorkerJob,
    _link: &Arc<TcpCollective>,
    _device: &Device,
) -> Result<Arc<dyn Collective>> {
    bail!("this dus was built without CUDA, so without NCCL")
}

/// Sends rank 0's progress (position, length, message) to the launching process twice a second; the
/// returned function stops it.
fn relay_progress(bar: indicatif::ProgressBar, link: Arc<TcpCollective>) -> impl FnOnce() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut last = String::new();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let note = format!(
                "{}\t{}\t{}",
                bar.position(),
                bar.length().unwrap_or(0),
                bar.message()
            );
            if note != last && link.note(&note).is_err() {
                return;
            }
            last = note;
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    move || {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = handle.join();
    }
}

/// Applies a progress note of rank 0 to the launching step's bar.
pub fn apply_progress(bar: &indicatif::ProgressBar, note: &str) {
    let mut parts = note.splitn(3, '\t');
    let (Some(pos), Some(len), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if let (Ok(pos), Ok(len)) = (pos.parse::<u64>(), len.parse::<u64>()) {
        if len > 0 {
            bar.set_length(len);
        }
        bar.set_position(pos);
        bar.set_message(msg.to_string());
    }
}
