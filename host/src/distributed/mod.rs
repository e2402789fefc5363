//! Training steps on several GPUs and several machines (issue 22): `devices = N` (or `"all"`) runs a
//! `pretrain`, `sft` or `dpo` step as N ranks — worker processes of this binary (`dus __worker`), one per
//! GPU — that train with data parallelism (and `zero = 1`, ZeRO-1) over NCCL on GPUs, or over the TCP hub
//! on the CPU. The step waits for them; rank 0 writes the artifact.
//!
//! - [`env`]: torchrun's and Slurm's variables (`dus run` started by either runs on every rank of the
//!   launch: rank 0 drives the workflow, the others follow, [`cluster`]);
//! - [`launch`]: starting and supervising the ranks of one step;
//! - [`worker`]: one rank (the job it is given, the step it runs);
//! - `nccl` (with the `cuda` feature): the NCCL collective.

pub mod cluster;
pub mod env;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod worker;

pub use cluster::{follow, Cluster};
pub use env::{expand_nodelist, LaunchEnv, Launcher};
pub use launch::{launch_step, LaunchConfig, LaunchMode};
pub use worker::{run_worker, worker_main, RankContext, WorkerJob};

use crate::step::StepContext;
use crate::train::Parallel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How many devices a training step uses: `devices = 4` or `devices = "all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DevicesValue", into = "DevicesValue")]
pub enum Devices {
    /// This many (at least 1).
    Count(usize),
    /// Every GPU of the machine, or every rank of a torchrun / Slurm launch.
    All,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DevicesValue {
    Count(i64),
    Word(String),
}

impl TryFrom<DevicesValue> for Devices {
    type Error = String;
    fn try_from(v: DevicesValue) -> std::result::Result<Self, String> {
        match v {
            DevicesValue::Count(n) if n >= 1 => Ok(Devices::Count(n as usize)),
            DevicesValue::Count(n) => Err(format!("devices = {n}: at least 1")),
            DevicesValue::Word(w) if w == "all" => Ok(Devices::All),
            DevicesValue::Word(w) => {
                Err(format!("devices = {w:?}: a number of devices or \"all\""))
            }
        }
    }
}

impl From<Devices> for DevicesValue {
    fn from(d: Devices) -> Self {
        match d {
            Devices::Count(n) => DevicesValue::Count(n as i64),
            Devices::All => DevicesValue::Word("all".into()),
        }
    }
}

/// The collective timeout: `DUS_COLLECTIVE_TIMEOUT` seconds, default 600 (torch's NCCL default). How long
/// ranks wait for each other — to connect, and in each operation (rank 0 writing a checkpoint while the
/// others wait included).
pub fn collective_timeout() -> Duration {
    std::env::var("DUS_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(600))
}

/// The group a step runs in: its rank's when it runs as a rank, else one rank.
pub fn parallel(ctx: &StepContext) -> Parallel {
    ctx.services
        .get::<RankContext>()
        .map(|r| r.parallel.clone())
        .unwrap_or_else(Parallel::single)
}

/// The device a step computes on: its rank's GPU when it runs as a rank, else the workflow's choice.
pub fn device(ctx: &StepContext) -> Result<candle_core::Device> {
    match ctx.services.get::<RankContext>() {
        Some(r) => Ok(r.device.clone()),
        None => crate::device::select_device(ctx.settings.device),
    }
}
