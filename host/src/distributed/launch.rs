//! The launching side of a step on several devices: start one worker per rank, serve their hub, relay rank
//! 0's progress, and wait. Any rank that ends badly fails the group (the hub tells every other rank to
//! abort), stragglers are killed after a grace period, and the step fails with the first rank's error — no
//! artifact, and the work folder with its checkpoints stays for the rerun.

use super::cluster::Cluster;
use super::worker::{apply_progress, run_rank, WorkerJob};
use super::{collective_timeout, Devices};
use crate::spec::DeviceChoice;
use crate::step::StepContext;
use crate::train::distributed::{run_ranks, Hub, HubHandle};
use crate::train::Parallel;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the other ranks have to stop after the group failed, before they are killed.
const GRACE: Duration = Duration::from_secs(30);

/// How a step's ranks are started (a service of the run; the default starts worker processes).
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Processes or threads.
    pub mode: LaunchMode,
    /// Collective timeout: how long ranks wait for each other (connecting, and within each operation).
    pub timeout: Duration,
    /// Extra environment variables of worker processes.
    pub env: Vec<(String, String)>,
}

/// Where ranks run.
#[derive(Debug, Clone)]
pub enum LaunchMode {
    /// One process per rank: `program args…`, the job as JSON on its standard input.
    Processes {
        /// The executable.
        program: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
    /// One thread per rank in this process, with the in-process collective (CPU only; tests).
    Threads,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            mode: LaunchMode::Processes {
                program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("dus")),
                args: vec!["__worker".into()],
            },
            timeout: collective_timeout(),
            env: Vec::new(),
        }
    }
}

/// Runs step `ctx` (kind `kind`, parameters `config`) on several devices when it asks for them and is not
/// itself a rank: returns `true` when the ranks ran it (rank 0 wrote the outputs into `ctx.out_dir`),
/// `false` when the caller should run it here, on one device (or as its rank).
pub fn launch_step(
    ctx: &StepContext,
    kind: &str,
    config: &impl Serialize,
    devices: Option<Devices>,
    zero: u8,
) -> Result<bool> {
    if ctx.services.get::<super::RankContext>().is_some() {
        return Ok(false);
    }
    let cluster = ctx.services.get::<Cluster>();
    let world = resolve_world(devices, cluster.as_deref(), ctx.settings.device)?;
    if world == 1 {
        return Ok(false);
    }
    let launch = ctx
        .services
        .get::<LaunchConfig>()
        .map(|c| (*c).clone())
        .unwrap_or_default();
    let job = WorkerJob::new(
        ctx,
        kind,
        serde_json::to_value(config)?,
        world,
        zero == 1,
        launch.timeout,
    );
    tracing::info!(step = %ctx.step, "training on {world} devices{}", if zero == 1 { " (ZeRO-1)" } else { "" });
    match (&cluster, &launch.mode) {
        (Some(cluster), _) => cluster.run_step(&job, &launch, ctx)?,
        (None, LaunchMode::Threads) => run_threads(&job, &launch, ctx)?,
        (None, LaunchMode::Processes { .. }) => run_processes(&job, &launch, ctx)?,
    }
    Ok(true)
}

/// How many ranks a step with `devices` gets.
fn resolve_world(
    devices: Option<Devices>,
    cluster: Option<&Cluster>,
    device: DeviceChoice,
) -> Result<usize> {
    if let Some(c) = cluster {
        let world = c.world_size();
        return match devices {
            None | Some(Devices::All) => Ok(world),
            Some(Devices::Count(n)) if n == 1 || n == world => Ok(n),
            Some(Devices::Count(n)) => bail!(
                "devices = {n}, but the launcher started {world} ranks: use devices = \"all\" (or {world}), \
                 or 1 to train on rank 0 alone"
            ),
        };
    }
    let gpus = gpu_count(device);
    match devices {
        None => Ok(1),
        Some(Devices::All) => Ok(gpus.max(1)),
        Some(Devices::Count(n)) => {
            if gpus > 0 {
                ensure!(
                    n <= gpus,
                    "devices = {n}, but this machine has {gpus} GPU{}",
                    if gpus == 1 { "" } else { "s" }
                );
            }
            Ok(n)
        }
    }
}

/// GPUs this process would use (0: it trains on the CPU).
fn gpu_count(device: DeviceChoice) -> usize {
    if device == DeviceChoice::Cpu || !crate::device::CUDA_COMPILED {
        return 0;
    }
    cuda_device_count()
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> usize {
    0
}

/// A random token for one group.
pub(super) fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ranks as threads of this process.
fn run_threads(job: &WorkerJob, launch: &LaunchConfig, ctx: &StepContext) -> Result<()> {
    ensure!(
        ctx.settings.device == DeviceChoice::Cpu || !crate::device::CUDA_COMPILED,
        "ranks as threads train on the CPU only (set device = \"cpu\")"
    );
    let results = run_ranks(job.world, launch.timeout, |rank, comm| {
        let progress = if rank == 0 {
            ctx.progress.clone()
        } else {
            indicatif::ProgressBar::hidden()
        };
        run_rank(
            &job.for_rank(rank, rank, "", ""),
            Parallel::new(comm, job.zero),
            candle_core::Device::Cpu,
            progress,
            ctx.cancel.clone(),
        )
    });
    first_failure(
        results
            .into_iter()
            .enumerate()
            .map(|(r, x)| x.map_err(|e| format!("rank {r}: {e:#}")))
            .collect(),
    )
}

/// The error of the rank that failed first in cause, not in consequence: the first message that is not
/// another rank's abort reaching it.
fn first_failure(results: Vec<std::result::Result<(), String>>) -> Result<()> {
    let failures: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
    if failures.is_empty() {
        return Ok(());
    }
    let cause = failures
        .iter()
        .find(|f| !f.contains("collective aborted") && !f.contains("collective timed out"))
        .unwrap_or(&failures[0]);
    bail!("{cause}")
}

/// One rank being waited for.
pub(super) trait RankHandle {
    /// The rank.
    fn rank(&self) -> usize;
    /// `Some(Ok)` / `Some(Err(why))` once it ended.
    fn poll(&mut self) -> Option<std::result::Result<(), String>>;
    /// Stops it now.
    fn kill(&mut self);
}

/// A worker process on this machine.
pub(super) struct LocalWorker {
    rank: usize,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    ended: bool,
}

impl LocalWorker {
    /// Starts rank `job.rank` as a process of `launch`, its standard error forwarded (and its last lines
    /// kept for the error message).
    pub(super) fn spawn(job: &WorkerJob, launch: &LaunchConfig) -> Result<Self> {
        let LaunchMode::Processes { program, args } = &launch.mode else {
            bail!("not a process launch");
        };
        let mut child = Command::new(program)
            .args(args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting rank {}: {}", job.rank, program.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(&serde_json::to_vec(job)?)?;
        drop(stdin);
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("piped");
        let (rank, keep) = (job.rank, tail.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
            {
                tracing::info!("rank {rank}: {line}");
                let mut t = keep.lock().unwrap_or_else(|e| e.into_inner());
                t.push_back(line);
                if t.len() > 12 {
                    t.pop_front();
                }
            }
        });
        Ok(LocalWorker {
            rank: job.rank,
            child,
            tail,
            ended: false,
        })
    }

    fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let errors: Vec<&String> = t.iter().filter(|l| l.contains("error")).collect();
        let lines: Vec<&String> = if errors.is_empty() {
            t.iter().collect()
        } else {
            errors
        };
        lines
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl RankHandle for LocalWorker {
    fn rank(&self) -> usize {
        self.rank
    }

    fn poll(&mut self) -> Option<std::result::Result<(), String>> {
        if self.ended {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.ended = true;
                // Let the forwarding thread catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                Some(if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "rank {} exited with {status}: {}",
                        self.rank,
                        self.tail()
                    ))
                })
            }
            Ok(None) => None,
            Err(e) => {
                self.ended = true;
                Some(Err(format!("rank {}: {e}", self.rank)))
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ranks as processes on this machine.
fn run_processes(job: &WorkerJob, launch: &LaunchConfig, ctx: &StepContext) -> Result<()> {
    let hub = Hub::bind("127.0.0.1:0")?;
    let addr = hub.local_addr()?.to_string();
    let token = new_token();
    let handle = hub.serve(job.world, token.clone(), launch.timeout);
    let mut ranks: Vec<Box<dyn RankHandle>> = Vec::with_capacity(job.world);
    for rank in 0..job.world {
        match LocalWorker::spawn(&job.for_rank(rank, rank, &addr, &token), launch) {
            Ok(w) => ranks.push(Box::new(w)),
            Err(e) => {
                handle.abort(&format!("{e:#}"));
                for r in &mut ranks {
                    r.kill();
                }
                let _ = handle.finish();
                return Err(e);
            }
        }
    }
    supervise(ctx, handle, ranks)
}

/// Waits for every rank, relaying rank 0's progress. The first rank to fail (or the step's cancellation)
/// fails the hub, which tells the other ranks; those still running after [`GRACE`] are killed.
pub(super) fn supervise(
    ctx: &StepContext,
    hub: HubHandle,
    mut ranks: Vec<Box<dyn RankHandle>>,
) -> Result<()> {
    let mut outcomes: Vec<Option<std::result::Result<(), String>>> = vec![None; ranks.len()];
    let mut failed_at: Option<Instant> = None;
    loop {
        while let Ok((rank, note)) = hub.notes().try_recv() {
            if rank == 0 {
                apply_progress(&ctx.progress, &note);
            }
        }
        for (i, r) in ranks.iter_mut().enumerate() {
            if let Some(outcome) = r.poll() {
                if let Err(why) = &outcome {
                    if failed_at.is_none() {
                        hub.abort(why);
                        failed_at = Some(Instant::now());
                    }
                }
                outcomes[i] = Some(outcome);
            }
        }
        if outcomes.iter().all(Option::is_some) {
            break;
        }
        if ctx.is_cancelled() && failed_at.is_none() {
            hub.abort("the step was cancelled");
            failed_at = Some(Instant::now());
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            for (i, r) in ranks.iter_mut().enumerate() {
                if outcomes[i].is_none() {
                    r.kill();
                    outcomes[i] = Some(Err(format!(
                        "rank {} was killed: still running {GRACE:?} after the group failed",
                        r.rank()
                    )));
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if failed_at.is_none() {
        // Every rank exited well, so each said it was done before closing: the hub stops on its own.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hub.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if !hub.is_finished() {
        hub.abort("every rank has exited");
    }
    let hub_result = hub.finish();
    if ctx.is_cancelled() {
        bail!(crate::step::Cancelled);
    }
    first_failure(
        outcomes
            .into_iter()
            .map(|o| o.expect("all ended"))
            .collect(),
    )?;
    hub_result.context("the ranks' hub")
}
