//! Running a plan: independent steps concurrently, bounded by job slots and one exclusive device.
//!
//! Each executing step is registered by its artifact folder name while it runs, so a later plan (watch
//! mode) that contains the same step with the same key waits for it instead of starting it again, and a
//! plan that no longer contains it cancels it.

use super::events::{Event, EventSink};
use super::plan::{last_record_path, Plan, PlanStatus, PlannedStep};
use super::progress::Progress;
use super::store::{ArtifactStore, Manifest};
use dusflow_core::services::Services;
use dusflow_core::step::{Cancelled, StepContext};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How a step ended in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepStatus {
    /// It executed and its artifact is complete.
    Ran,
    /// Its artifact already existed.
    Cached,
    /// It failed with this message.
    Failed(String),
    /// It did not run because a step it needs failed or was cancelled.
    Skipped(String),
    /// It could not run: an input is missing.
    Blocked(String),
    /// It was stopped (Ctrl-C, or its inputs changed in watch mode).
    Cancelled,
}

impl StepStatus {
    /// One lowercase word for logs and tables.
    pub fn word(&self) -> &'static str {
        match self {
            StepStatus::Ran => "ran",
            StepStatus::Cached => "cached",
            StepStatus::Failed(_) => "failed",
            StepStatus::Skipped(_) => "skipped",
            StepStatus::Blocked(_) => "blocked",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// Whether dependents may use the artifact.
    pub fn is_success(&self) -> bool {
        matches!(self, StepStatus::Ran | StepStatus::Cached)
    }
}

/// One line of the run summary.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Step name.
    pub name: String,
    /// Its kind's name.
    pub kind: String,
    /// How it ended.
    pub status: StepStatus,
    /// Its own run time: from the moment it started (a job slot and, if it needs one, the device held)
    /// to its end; zero when it did not execute.
    pub duration: Duration,
    /// Time it waited for a job slot or the device before starting.
    pub queued: Duration,
    /// Its artifact folder.
    pub dir: PathBuf,
    /// The file of its artifact to show people at the end of a run (its kind's headline), when it has
    /// one and the step succeeded.
    pub headline: Option<PathBuf>,
}

/// How one execution of a step ended and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    /// How it ended.
    pub status: StepStatus,
    /// Run time, from acquiring its job slot (and the device) to the end.
    pub run: Duration,
    /// Time spent waiting for the job slot and the device.
    pub queued: Duration,
}

impl StepOutcome {
    fn decided(status: StepStatus) -> Self {
        StepOutcome {
            status,
            run: Duration::ZERO,
            queued: Duration::ZERO,
        }
    }
}

/// What one run did, step by step, in plan order.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// One report per step.
    pub steps: Vec<StepReport>,
    /// Whether the run was superseded (watch mode) before every step finished.
    pub superseded: bool,
    /// Wall time of the whole run.
    pub wall: Duration,
}

impl RunSummary {
    /// Whether every step ended with a usable artifact.
    pub fn succeeded(&self) -> bool {
        !self.superseded && self.steps.iter().all(|s| s.status.is_success())
    }

    /// Steps with the given status word.
    pub fn count(&self, word: &str) -> usize {
        self.steps
            .iter()
            .filter(|s| s.status.word() == word)
            .count()
    }

    /// The report of step `name`.
    pub fn step(&self, name: &str) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// Settings for an [`Executor`].
#[derive(Clone)]
pub struct ExecutorOptions {
    /// Steps that may run at once.
    pub jobs: usize,
    /// Where events go.
    pub events: EventSink,
    /// Progress display.
    pub progress: Progress,
    /// Services every step's context carries (the plugin host).
    pub services: Services,
}

struct InFlight {
    cancel: CancellationToken,
    done: watch::Receiver<Option<StepOutcome>>,
}

struct Inner {
    store: ArtifactStore,
    jobs: Arc<Semaphore>,
    device: Arc<Semaphore>,
    inflight: Mutex<HashMap<String, InFlight>>,
    events: EventSink,
    progress: Progress,
    services: Services,
    shutdown: CancellationToken,
}

/// Runs plans against one artifact store. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl Executor {
    /// An executor writing into `store`. Cancelling `shutdown` (Ctrl-C) cancels every running step.
    pub fn new(
        store: ArtifactStore,
        options: ExecutorOptions,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                jobs: Arc::new(Semaphore::new(options.jobs.max(1))),
                device: Arc::new(Semaphore::new(1)),
                inflight: Mutex::new(HashMap::new()),
                events: options.events,
                progress: options.progress,
                services: options.services,
                shutdown,
            }),
        }
    }

    /// The store it writes into.
    pub fn store(&self) -> &ArtifactStore {
        &self.inner.store
    }

    /// Cancels running steps whose artifact folder is not in `keep` (their inputs changed).
    pub fn cancel_except(&self, keep: &HashSet<String>) {
        for (folder, flight) in self.inner.inflight.lock().expect("inflight").iter() {
            if !keep.contains(folder) {
                tracing::info!(step = %folder, "inputs changed: cancelling");
                flight.cancel.cancel();
            }
        }
    }

    /// Executes `plan`. Cancelling `superseded` stops scheduling new steps and returns at once, leaving
    /// running steps to finish (a newer plan may adopt them).
    pub async fn run(&self, plan: Arc<Plan>, superseded: CancellationToken) -> RunSummary {
        let inner = &self.inner;
        let run_started = Instant::now();
        inner.events.emit(Event::RunStarted {
            steps: plan.steps.len(),
        });
        let n = plan.steps.len();
        let mut results: Vec<Option<StepOutcome>> = vec![None; n];
        let mut launched = vec![false; n];
        let mut waiting: JoinSet<(usize, StepOutcome)> = JoinSet::new();
        loop {
            for i in 0..n {
                if launched[i] || results[i].is_some() {
                    continue;
                }
                let step = &plan.steps[i];
                if step.upstream.iter().any(|&u| results[u].is_none()) {
                    continue;
                }
                if let Some(&bad) = step
                    .upstream
                    .iter()
                    .find(|&&u| !results[u].as_ref().expect("done").status.is_success())
                {
                    let reason = format!("`{}` did not succeed", plan.steps[bad].name);
                    self.finish(
                        step,
                        StepOutcome::decided(StepStatus::Skipped(reason)),
                        &mut results,
                    );
                    continue;
                }
                if inner.shutdown.is_cancelled() {
                    self.finish(
                        step,
                        StepOutcome::decided(StepStatus::Cancelled),
                        &mut results,
                    );
                    continue;
                }
                match &step.status {
                    PlanStatus::Cached => {
                        self.finish(step, StepOutcome::decided(StepStatus::Cached), &mut results)
                    }
                    PlanStatus::Blocked(reason) => self.finish(
                        step,
                        StepOutcome::decided(StepStatus::Blocked(reason.clone())),
                        &mut results,
                    ),
                    PlanStatus::Run(_)
                        if !step.forced
                            && inner.store.complete(&step.name, &step.key).is_some() =>
                    {
                        self.finish(step, StepOutcome::decided(StepStatus::Cached), &mut results)
                    }
                    PlanStatus::Run(_) => {
                        launched[i] = true;
                        let mut done = self.launch(&plan, i);
                        waiting.spawn(async move {
                            let outcome = match done.wait_for(Option::is_some).await {
                                Ok(s) => s.clone().expect("some"),
                                Err(_) => StepOutcome::decided(StepStatus::Failed(
                                    "step task ended without a result".into(),
                                )),
                            };
                            (i, outcome)
                        });
                    }
                }
            }
            if waiting.is_empty() {
                break;
            }
            tokio::select! {
                joined = waiting.join_next() => {
                    if let Some(Ok((i, outcome))) = joined {
                        self.finish(&plan.steps[i], outcome, &mut results);
                    }
                }
                _ = superseded.cancelled() => {
                    return self.summary(&plan, results, true, run_started.elapsed());
                }
            }
        }
        let summary = self.summary(&plan, results, false, run_started.elapsed());
        inner.events.emit(Event::RunFinished {
            ran: summary.count("ran"),
            cached: summary.count("cached"),
            failed: summary.steps.len() - summary.count("ran") - summary.count("cached"),
        });
        summary
    }

    fn finish(
        &self,
        step: &PlannedStep,
        outcome: StepOutcome,
        results: &mut [Option<StepOutcome>],
    ) {
        if !matches!(
            outcome.status,
            StepStatus::Ran | StepStatus::Failed(_) | StepStatus::Cancelled
        ) {
            // Executed steps report their own end; here only the ones decided without running.
            self.inner.events.emit(Event::StepFinished {
                step: step.name.clone(),
                status: outcome.status.word().into(),
                seconds: 0.0,
            });
        }
        results[step.index] = Some(outcome);
    }

    fn summary(
        &self,
        plan: &Plan,
        results: Vec<Option<StepOutcome>>,
        superseded: bool,
        wall: Duration,
    ) -> RunSummary {
        let steps = plan
            .steps
            .iter()
            .zip(results)
            .map(|(s, r)| {
                let outcome = r.unwrap_or(StepOutcome::decided(StepStatus::Cancelled));
                let kind = &plan.workflow.steps[s.index].kind;
                let headline = kind
                    .headline()
                    .filter(|_| outcome.status.is_success())
                    .map(|file| s.dir.join(file));
                StepReport {
                    name: s.name.clone(),
                    kind: kind.name().to_string(),
                    status: outcome.status,
                    duration: outcome.run,
                    queued: outcome.queued,
                    dir: s.dir.clone(),
                    headline,
                }
            })
            .collect();
        RunSummary {
            steps,
            superseded,
            wall,
        }
    }

    /// Starts step `i` unless the same artifact is already being built; returns its completion signal.
    fn launch(&self, plan: &Arc<Plan>, i: usize) -> watch::Receiver<Option<StepOutcome>> {
        let step = &plan.steps[i];
        let folder = ArtifactStore::folder_name(&step.name, &step.key);
        let mut inflight = self.inner.inflight.lock().expect("inflight");
        if let Some(existing) = inflight.get(&folder) {
            if !existing.cancel.is_cancelled() {
                return existing.done.clone();
            }
        }
        let (tx, rx) = watch::channel(None);
        let cancel = self.inner.shutdown.child_token();
        inflight.insert(
            folder.clone(),
            InFlight {
                cancel: cancel.clone(),
                done: rx.clone(),
            },
        );
        drop(inflight);
        let this = self.clone();
        let plan = plan.clone();
        tokio::spawn(async move {
            let outcome = this.execute(&plan, i, cancel).await;
            this.inner
                .inflight
                .lock()
                .expect("inflight")
                .remove(&folder);
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    async fn execute(&self, plan: &Arc<Plan>, i: usize, cancel: CancellationToken) -> StepOutcome {
        let inner = &self.inner;
        let planned = &plan.steps[i];
        let step = &plan.workflow.steps[planned.index];
        let queued_at = Instant::now();
        let cancelled_waiting = || StepOutcome {
            status: StepStatus::Cancelled,
            run: Duration::ZERO,
            queued: queued_at.elapsed(),
        };
        let _job = tokio::select! {
            permit = inner.jobs.clone().acquire_owned() => permit.expect("semaphore open"),
            _ = cancel.cancelled() => return cancelled_waiting(),
        };
        let _device = if step.resources.exclusive_device {
            Some(tokio::select! {
                permit = inner.device.clone().acquire_owned() => permit.expect("semaphore open"),
                _ = cancel.cancelled() => return cancelled_waiting(),
            })
        } else {
            None
        };
        let queued = queued_at.elapsed();
        inner.events.emit(Event::StepStarted {
            step: planned.name.clone(),
            key: planned.key.clone(),
        });
        let started_ms = unix_ms();
        let started = Instant::now();
        let resumable = step.kind.resumable();
        let status = match inner.store.begin(&planned.name, &planned.key, resumable) {
            Err(e) => StepStatus::Failed(format!("{e:#}")),
            Ok(partial) => {
                let bar = inner.progress.step_bar(&planned.name);
                let ctx = StepContext {
                    step: planned.name.clone(),
                    out_dir: partial.clone(),
                    workflow_dir: plan.workflow.dir.clone(),
                    settings: plan.workflow.settings.clone(),
                    inputs: planned.inputs.clone(),
                    plugins: step_plugins(plan, planned),
                    progress: bar.clone(),
                    cancel: cancel.clone(),
                    services: inner.services.clone(),
                };
                let kind = step.kind.clone();
                let config = step.config.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    prepare_merged_inputs(&ctx)?;
                    kind.run(&config, &ctx)
                })
                .await;
                bar.finish_and_clear();
                let status = match outcome {
                    Ok(Ok(())) if cancel.is_cancelled() => StepStatus::Cancelled,
                    Ok(Ok(())) => {
                        let manifest = Manifest {
                            step: planned.name.clone(),
                            key: planned.key.clone(),
                            output: step.output,
                            material: planned.material.clone(),
                            started_unix_ms: started_ms,
                            finished_unix_ms: unix_ms(),
                        };
                        match inner.store.commit(&partial, &manifest) {
                            Ok(_) => {
                                let record = last_record_path(&inner.store, &planned.name);
                                let _ = dusflow_core::atomic::write_file_atomic(
                                    &record,
                                    &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
                                );
                                StepStatus::Ran
                            }
                            Err(e) => StepStatus::Failed(format!("saving the artifact: {e:#}")),
                        }
                    }
                    Ok(Err(e)) if e.is::<Cancelled>() || cancel.is_cancelled() => {
                        StepStatus::Cancelled
                    }
                    Ok(Err(e)) => StepStatus::Failed(format!("{e:#}")),
                    Err(join) if join.is_panic() => StepStatus::Failed(format!(
                        "step panicked: {}",
                        panic_message(join.into_panic())
                    )),
                    Err(join) => StepStatus::Failed(format!("step task failed: {join}")),
                };
                if status != StepStatus::Ran {
                    inner.store.abandon(&partial, resumable);
                }
                status
            }
        };
        let elapsed = started.elapsed();
        match &status {
            StepStatus::Failed(msg) => tracing::error!(step = %planned.name, "failed: {msg}"),
            StepStatus::Cancelled => tracing::warn!(step = %planned.name, "cancelled"),
            _ => tracing::info!(step = %planned.name, "done in {:.1}s", elapsed.as_secs_f64()),
        }
        inner.events.emit(Event::StepFinished {
            step: planned.name.clone(),
            status: status.word().into(),
            seconds: elapsed.as_secs_f64(),
        });
        StepOutcome {
            status,
            run: elapsed,
            queued,
        }
    }
}

/// The plugins a step may load: its own dependencies plus the filters of the datasets it reads.
fn step_plugins(
    plan: &Plan,
    planned: &PlannedStep,
) -> std::collections::BTreeMap<String, crate::workflow::PluginSpec> {
    let step = &plan.workflow.steps[planned.index];
    let filters = planned
        .inputs
        .values()
        .flatten()
        .filter_map(|a| a.dataset.as_ref())
        .flat_map(|d| d.filters.iter());
    step.dependencies
        .plugins
        .iter()
        .chain(filters)
        .filter_map(|name| {
            plan.workflow
                .plugins
                .get(name)
                .map(|spec| (name.clone(), spec.clone()))
        })
        .collect()
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Makes the merged folder of every model input that has an adapter (`[models.X] adapter = ...`), unless an
/// earlier step made it: written to a temporary folder and renamed, so concurrent steps and a killed run
/// never see a partial one.
fn prepare_merged_inputs(ctx: &StepContext) -> anyhow::Result<()> {
    for input in ctx.inputs.values().flatten() {
        let Some((base, adapter)) = &input.merge else {
            continue;
        };
        if input.path.join("config.json").is_file() {
            continue;
        }
        let parent = input
            .path
            .parent()
            .expect("merged inputs live under the state folder");
        std::fs::create_dir_all(parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".merging-")
            .tempdir_in(parent)?;
        let staged = tmp.path().join("model");
        ctx.progress
            .set_message(format!("merging the adapter of model `{}`", input.name));
        dusflow_model::lora::merge_adapter_folder(base, adapter, &staged)
            .map_err(|e| e.context(format!("model `{}`", input.name)))?;
        match std::fs::rename(&staged, &input.path) {
            Ok(()) => {}
            // Another step made it meanwhile.
            Err(_) if input.path.join("config.json").is_file() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
