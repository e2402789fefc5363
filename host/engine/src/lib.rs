//! The engine: plans a workflow against the artifact store, runs it, and watches it.
//!
//! [`plan::plan`] computes each step's cache key (its parameters, its inputs' keys and content hashes,
//! plugin bytes and the runtime version) and whether `<out>/<step>-<hash>/` is complete;
//! [`executor::Executor`] runs what is not; [`watch`] reruns what a file change affects.

pub mod events;
pub mod executor;
pub mod hashing;
pub mod plan;
pub mod progress;
pub mod store;
pub mod summary;
pub mod watch;
pub mod workflow;

pub use events::{Event, EventSink, Stamped};
pub use executor::{Executor, ExecutorOptions, RunSummary, StepReport, StepStatus};
pub use plan::{Plan, PlanStatus};
pub use progress::Progress;
pub use store::{ArtifactStore, Manifest};

use crate::workflow::Workflow;
use anyhow::Result;
use dusflow_core::services::Services;
use dusflow_core::step::Registry;
use dusflow_plugin_host::SharedPluginHost;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Options shared by `dus run`, `dus plan` and `dus watch`.
#[derive(Clone)]
pub struct RunOptions {
    /// Steps (names or swept bases) to rerun even when cached.
    pub force: HashSet<String>,
    /// Steps that may run at once (default: the workflow's `jobs`, else the number of cores).
    pub jobs: Option<usize>,
    /// Artifact directory overriding the workflow's.
    pub output: Option<PathBuf>,
    /// Where events go (a JSONL log in `<out>/.dus/events.jsonl` is always added).
    pub events: EventSink,
    /// Progress display.
    pub progress: Progress,
    /// Services handed to every step: by default the process's one plugin host, started on first use.
    pub services: Services,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            force: HashSet::new(),
            jobs: None,
            output: None,
            events: EventSink::default(),
            progress: Progress::hidden(),
            services: default_services(),
        }
    }
}

/// Loads and validates a workflow, applying the output override.
pub fn load(path: &Path, registry: &Registry, options: &RunOptions) -> Result<Arc<Workflow>> {
    let mut workflow = Workflow::load(path, registry)?;
    if let Some(out) = &options.output {
        workflow.output_dir = std::path::absolute(out)?;
    }
    Ok(Arc::new(workflow))
}

/// Plans a loaded workflow against its artifact store.
pub fn plan_workflow(workflow: Arc<Workflow>, options: &RunOptions) -> Result<Plan> {
    let store = ArtifactStore::new(&workflow.output_dir);
    let hasher = hashing::FileHasher::persistent(store.state_dir().join("file-hashes.json"));
    let plan = plan::plan(workflow, &store, &hasher, &options.force);
    // Kept from the first plan on, output folder or not: without it every `dus plan` of a workflow that
    // has not run yet would read its inputs again (minutes for a large model). A cache that cannot be
    // written only costs that time.
    if let Err(e) = hasher.save() {
        tracing::warn!("cannot keep the file-hash cache: {e:#}");
    }
    Ok(plan)
}

/// Loads, plans and runs a workflow once. Cancelling `shutdown` stops running steps cleanly.
pub async fn run(
    path: &Path,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary> {
    let workflow = load(path, registry, &options)?;
    let store = ArtifactStore::new(&workflow.output_dir);
    let _lock = store.lock()?;
    for removed in store.clean_incomplete()? {
        tracing::info!("removed incomplete artifact {}", removed.display());
    }
    let plan = Arc::new(plan_workflow(workflow.clone(), &options)?);
    let executor = Executor::new(
        store.clone(),
        executor_options(&workflow, &options),
        shutdown,
    );
    Ok(executor.run(plan, CancellationToken::new()).await)
}

fn executor_options(workflow: &Workflow, options: &RunOptions) -> ExecutorOptions {
    let jobs = options
        .jobs
        .or(workflow.settings.jobs)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let log = ArtifactStore::new(&workflow.output_dir)
        .state_dir()
        .join("events.jsonl");
    ExecutorOptions {
        jobs,
        events: options.events.clone().with_log(log),
        progress: options.progress.clone(),
        services: options.services.clone(),
    }
}

/// The services a run hands to its steps: one plugin host (started when a step first needs it).
pub fn default_services() -> Services {
    let mut services = Services::new();
    services.insert(Arc::new(SharedPluginHost::new()));
    services
}
