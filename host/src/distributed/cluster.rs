//! Several machines, launched the way torchrun and Slurm users expect: every process of the launch runs the
//! same `dus run flow.toml`. Rank 0 (the driver) runs the workflow as usual and listens on
//! `MASTER_ADDR:MASTER_PORT`; every other rank (a follower) connects to it and waits. When a training step
//! runs on the launch's devices, the driver opens a hub for the step and sends each follower its rank's job;
//! the follower starts the worker (`dus __worker`, on GPU `LOCAL_RANK`), reports how it ended and waits for
//! the next. Every other step runs on the driver only. The driver's end (or death) ends the followers.
//!
//! The messages are JSON lines over the control connection. Every machine must see the workflow's inputs
//! and output folder at the same paths (a shared file system), as with any multi-node training.

use super::env::LaunchEnv;
use super::launch::{supervise, LaunchConfig, LaunchMode, LocalWorker, RankHandle};
use super::worker::WorkerJob;
use crate::step::StepContext;
use crate::train::distributed::Hub;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToFollower {
    Job { id: u64, job: Box<WorkerJob> },
    Kill { id: u64 },
    Exit,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToDriver {
    Hello { rank: usize, local_rank: usize },
    Finished { id: u64, ok: bool, message: String },
}

fn send_line(stream: &Mutex<TcpStream>, msg: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(&line)?;
    s.flush()?;
    Ok(())
}

/// Reads JSON lines from `stream` into a channel until it closes (then `None`).
fn read_lines<T: for<'de> Deserialize<'de> + Send + 'static>(
    stream: TcpStream,
    tx: Sender<Option<T>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<T>(&line) {
                Ok(msg) => {
                    if tx.send(Some(msg)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("control connection: unreadable message ({e})");
                    break;
                }
            }
        }
        let _ = tx.send(None);
    });
}

/// A follower as the driver sees it.
struct Follower {
    local_rank: usize,
    writer: Mutex<TcpStream>,
    events: Mutex<Receiver<Option<ToDriver>>>,
    gone: Mutex<bool>,
}

/// Rank 0 of a torchrun / Slurm launch: a run service through which training steps use every rank.
pub struct Cluster {
    env: LaunchEnv,
    followers: Arc<Mutex<BTreeMap<usize, Arc<Follower>>>>,
    timeout: Duration,
    next_job: AtomicU64,
}

impl Cluster {
    /// Listens on `MASTER_PORT` for the other ranks (which connect as they start).
    pub fn start(env: LaunchEnv, timeout: Duration) -> Result<Arc<Cluster>> {
        ensure!(env.rank == 0, "only rank 0 drives the run");
        let listener = TcpListener::bind(("0.0.0.0", env.master_port))
            .with_context(|| {
                format!(
                    "rank 0: listening on port {} for the other ranks (MASTER_PORT, + 1 under torchrun's \
                     agent store; DUS_MASTER_PORT chooses another)",
                    env.master_port
                )
            })?;
        let followers: Arc<Mutex<BTreeMap<usize, Arc<Follower>>>> = Arc::default();
        let table = followers.clone();
        let world = env.world_size;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                let (tx, rx) = mpsc::channel();
                read_lines::<ToDriver>(reader, tx);
                // The first message says who it is.
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(Some(ToDriver::Hello { rank, local_rank })) if rank > 0 && rank < world => {
                        tracing::info!("rank {rank} joined from {:?}", stream.peer_addr().ok());
                        table.lock().unwrap_or_else(|e| e.into_inner()).insert(
                            rank,
                            Arc::new(Follower {
                                local_rank,
                                writer: Mutex::new(stream),
                                events: Mutex::new(rx),
                                gone: Mutex::new(false),
                            }),
                        );
                    }
                    other => tracing::warn!("rank 0: refused a control connection ({other:?})"),
                }
            }
        });
        Ok(Arc::new(Cluster {
            env,
            followers,
            timeout,
            next_job: AtomicU64::new(1),
        }))
    }

    /// Processes in the launch.
    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// Every follower, once all have connected (within the timeout).
    fn followers(&self) -> Result<BTreeMap<usize, Arc<Follower>>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let table = self
                .followers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if table.len() == self.env.world_size - 1 {
                return Ok(table);
            }
            if Instant::now() >= deadline {
                let missing: Vec<String> = (1..self.env.world_size)
                    .filter(|r| !table.contains_key(r))
                    .map(|r| r.to_string())
                    .collect();
                bail!(
                    "rank(s) {} of the launch never connected to rank 0 at {}:{} within {:.0?}",
                    missing.join(", "),
                    self.env.master_addr,
                    self.env.master_port,
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a training step on every rank of the launch: rank 0's worker here, the others through their
    /// followers, all meeting at a hub on this machine.
    pub fn run_step(
        &self,
        job: &WorkerJob,
        launch: &LaunchConfig,
        ctx: &StepContext,
    ) -> Result<()> {
        ensure!(
            matches!(launch.mode, LaunchMode::Processes { .. }),
            "a torchrun / Slurm launch runs ranks as processes"
        );
        let followers = self.followers()?;
        let hub = Hub::bind("0.0.0.0:0")?;
        let addr = format!("{}:{}", self.env.master_addr, hub.local_addr()?.port());
        let token = super::launch::new_token();
        let handle = hub.serve(job.world, token.clone(), launch.timeout);
        let id = self.next_job.fetch_add(1, Ordering::SeqCst);
        let mut ranks: Vec<Box<dyn RankHandle>> = Vec::with_capacity(job.world);
        let started = (|| -> Result<()> {
            ranks.push(Box::new(LocalWorker::spawn(
                &job.for_rank(0, self.env.local_rank, &addr, &token),
                launch,
            )?));
            for (&rank, f) in &followers {
                if *f.gone.lock().unwrap_or_else(|e| e.into_inner()) {
                    bail!("rank {rank}'s process has gone away");
                }
                let job = job.for_rank(rank, f.local_rank, &addr, &token);
                send_line(
                    &f.writer,
                    &ToFollower::Job {
                        id,
                        job: Box::new(job),
                    },
                )
                .with_context(|| format!("sending rank {rank} its job"))?;
                ranks.push(Box::new(RemoteRank {
                    rank,
                    id,
                    follower: f.clone(),
                }));
            }
            Ok(())
        })();
        if let Err(e) = started {
            handle.abort(&format!("{e:#}"));
            for r in &mut ranks {
                r.kill();
            }
            let _ = handle.finish();
            return Err(e);
        }
        supervise(ctx, handle, ranks)
    }

    /// Tells every follower that the run is over.
    pub fn shutdown(&self) {
        for f in self
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = send_line(&f.writer, &ToFollower::Exit);
        }
    }
}

/// A rank running on a follower.
struct RemoteRank {
    rank: usize,
    id: u64,
    follower: Arc<Follower>,
}

impl RankHandle for RemoteRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn poll(&mut self) -> Option<std::result::Result<(), String>> {
        let events = self
            .follower
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            match events.try_recv() {
                Ok(Some(ToDriver::Finished { id, ok, message })) if id == self.id => {
                    return Some(if ok { Ok(()) } else { Err(message) });
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    *self.follower.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    return Some(Err(format!(
                        "rank {}'s process went away (its machine or the launcher stopped it)",
                        self.rank
                    )));
                }
                Err(mpsc::TryRecvError::Empty) => return None,
            }
        }
    }

    fn kill(&mut self) {
        let _ = send_line(&self.follower.writer, &ToFollower::Kill { id: self.id });
    }
}

/// A rank other than 0 of a torchrun / Slurm launch: connects to rank 0 and runs the jobs it sends until it
/// says the run is over. An error when rank 0 goes away first.
pub fn follow(env: &LaunchEnv, launch: &LaunchConfig) -> Result<()> {
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let deadline = Instant::now() + launch.timeout;
    let stream = loop {
        let attempt = addr.to_socket_addrs().ok().and_then(|mut a| {
            a.find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok())
        });
        match attempt {
            Some(s) => break s,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            None => bail!(
                "rank {}: rank 0 is not listening at {addr} (waited {:.0?})",
                env.rank,
                launch.timeout
            ),
        }
    };
    tracing::info!(
        "rank {}: connected to rank 0 at {addr}; waiting for training steps",
        env.rank
    );
    let writer = Mutex::new(stream.try_clone()?);
    let (tx, rx) = mpsc::channel();
    read_lines::<ToFollower>(stream, tx);
    send_line(
        &writer,
        &ToDriver::Hello {
            rank: env.rank,
            local_rank: env.local_rank,
        },
    )?;
    loop {
        match rx.recv() {
            Ok(Some(ToFollower::Job { id, job })) => {
                let outcome = run_job(&job, launch, &rx);
                let (ok, message) = match outcome {
                    Ok(JobEnd::Finished(r)) => match r {
                        Ok(()) => (true, String::new()),
                        Err(m) => (false, m),
                    },
                    Ok(JobEnd::Exit) => return Ok(()),
                    Err(e) => (false, format!("rank {}: {e:#}", job.rank)),
                };
                send_line(&writer, &ToDriver::Finished { id, ok, message })?;
            }
            Ok(Some(ToFollower::Kill { .. })) => {}
            Ok(Some(ToFollower::Exit)) => return Ok(()),
            Ok(None) | Err(_) => bail!(
                "rank {}: rank 0 closed the connection (the run ended or failed there)",
                env.rank
            ),
        }
    }
}

enum JobEnd {
    Finished(std::result::Result<(), String>),
    Exit,
}

/// Runs one job's worker to its end, killing it when rank 0 asks or goes away.
fn run_job(
    job: &WorkerJob,
    launch: &LaunchConfig,
    rx: &Receiver<Option<ToFollower>>,
) -> Result<JobEnd> {
    let mut worker = LocalWorker::spawn(job, launch)?;
    loop {
        if let Some(outcome) = worker.poll() {
            return Ok(JobEnd::Finished(outcome));
        }
        match rx.try_recv() {
            Ok(Some(ToFollower::Kill { .. })) => {
                worker.kill();
                return Ok(JobEnd::Finished(Err(format!(
                    "rank {} was killed",
                    job.rank
                ))));
            }
            Ok(Some(ToFollower::Exit)) => {
                worker.kill();
                return Ok(JobEnd::Exit);
            }
            Ok(Some(ToFollower::Job { .. })) => bail!("a second job while one runs"),
            Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                worker.kill();
                bail!(
                    "rank 0 closed the connection while rank {} trained",
                    job.rank
                );
            }
            Err(mpsc::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
