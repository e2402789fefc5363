//! `dus watch`: run, then rerun exactly the steps a change affects, whenever a file the workflow reads
//! changes (the workflow itself, datasets, models, plugin sources, extra files).
//!
//! Every change re-validates and re-plans. Steps whose key is unchanged keep their artifact (or, if still
//! running, keep running and are adopted by the new run); running steps whose key changed are cancelled.
//! A workflow that stops validating prints its errors and the watcher keeps going.

use super::events::Event;
use super::executor::Executor;
use super::hashing::{FileHasher, IGNORED_DIRS};
use super::store::{ArtifactStore, RunLock};
use super::summary::{render_headlines, render_summary};
use super::{executor_options, load, plan_workflow, RunOptions};
use anyhow::Result;
use dusflow_core::step::Registry;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Whether a file-system event can mean new content. Opening, reading and closing a file without writing
/// cannot, and watch mode itself opens every file it watches when it re-plans (the workflow, inputs being
/// hashed): counting those would re-plan forever.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn new_watcher() -> Result<(
    notify::RecommendedWatcher,
    mpsc::UnboundedReceiver<Vec<PathBuf>>,
)> {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if may_change_content(&event.kind) {
                let _ = tx.send(event.paths);
            }
        }
    })?;
    Ok((watcher, rx))
}

/// How long file events are debounced before a rerun.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The content of every path a plan read: file hashes (cached by size, mtime and inode, so unchanged
/// files cost a `stat`), `None` for a path that is missing. Two equal fingerprints mean nothing to redo.
fn fingerprint(watched: &[PathBuf], hasher: &FileHasher) -> HashMap<PathBuf, Option<String>> {
    watched
        .iter()
        .map(|p| (p.clone(), hasher.hash_path(p).ok()))
        .collect()
}

/// The paths a workflow reads, and how to tell whether a changed path is one of them.
#[derive(Default, PartialEq)]
struct WatchSet {
    files: HashSet<PathBuf>,
    dirs: Vec<PathBuf>,
    ignore: Option<PathBuf>,
}

impl WatchSet {
    fn new(paths: &[PathBuf], output_dir: Option<&Path>) -> Self {
        let mut set = WatchSet {
            ignore: output_dir.map(Path::to_path_buf),
            ..Default::default()
        };
        for p in paths {
            if p.is_dir() {
                set.dirs.push(p.clone());
            } else {
                set.files.insert(p.clone());
            }
        }
        set
    }

    fn is_relevant(&self, path: &Path) -> bool {
        if self
            .ignore
            .as_deref()
            .is_some_and(|out| path.starts_with(out))
        {
            return false;
        }
        if self.files.contains(path) {
            return true;
        }
        self.dirs.iter().any(|d| {
            path.strip_prefix(d).is_ok_and(|rel| {
                rel.components().all(|c| {
                    let name = c.as_os_str().to_string_lossy();
                    !name.starts_with('.') && !IGNORED_DIRS.contains(&name.as_ref())
                })
            })
        })
    }

    /// Registers OS watches: folders recursively, files through their parent folder (editors replace files).
    fn install(&self, watcher: &mut dyn Watcher) {
        let mut parents: HashSet<&Path> = HashSet::new();
        for f in &self.files {
            if let Some(parent) = f.parent() {
                parents.insert(parent);
            }
        }
        for p in parents {
            if let Err(e) = watcher.watch(p, RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", p.display());
            }
        }
        for d in &self.dirs {
            if let Err(e) = watcher.watch(d, RecursiveMode::Recursive) {
                tracing::warn!("cannot watch {}: {e}", d.display());
            }
        }
    }
}

/// Runs the workflow at `path`, then reruns affected steps on every relevant change until `shutdown`.
pub async fn watch(
    path: &Path,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let file = std::path::absolute(path)?;
    let mut os_watch: Option<(
        notify::RecommendedWatcher,
        mpsc::UnboundedReceiver<Vec<PathBuf>>,
    )> = None;
    let mut executor: Option<(Executor, RunLock)> = None;
    let mut current: Option<CancellationToken> = None;
    let mut watch_set = WatchSet::default();
    let mut force = options.force.clone();
    // Content hashes for telling real edits from touches, kept in memory for the whole session.
    let hasher = FileHasher::in_memory();
    let mut last_watched = vec![file.clone()];
    loop {
        // What the plan below will read, at least this new: hashed before planning, so an edit made while
        // planning shows as a difference afterwards instead of being taken for the planned content.
        let mut planned_content = fingerprint(&last_watched, &hasher);
        let mut watched = vec![file.clone()];
        let mut output_dir = None;
        match load(&file, registry, &options).and_then(|wf| {
            let opts = RunOptions {
                force: std::mem::take(&mut force),
                ..options.clone()
            };
            plan_workflow(wf, &opts)
        }) {
            Ok(plan) => {
                let plan = Arc::new(plan);
                watched.extend(plan.watched.iter().cloned());
                output_dir = Some(plan.workflow.output_dir.clone());
                let same_store = executor
                    .as_ref()
                    .is_some_and(|(e, _)| e.store().root() == plan.workflow.output_dir);
                if !same_store {
                    let store = ArtifactStore::new(&plan.workflow.output_dir);
                    let lock = store.lock()?;
                    store.clean_incomplete()?;
                    let exec = Executor::new(
                        store,
                        executor_options(&plan.workflow, &options),
                        shutdown.clone(),
                    );
                    if let Some((old, _)) = executor.take() {
                        old.cancel_except(&HashSet::new());
                    }
                    executor = Some((exec, lock));
                }
                let (exec, _) = executor.as_ref().expect("executor");
                exec.cancel_except(&plan.folder_names());
                if let Some(previous) = current.take() {
                    previous.cancel();
                }
                let token = CancellationToken::new();
                current = Some(token.clone());
                let exec = exec.clone();
                let stopping = shutdown.clone();
                tokio::spawn(async move {
                    let summary = exec.run(plan, token).await;
                    if !summary.superseded && !stopping.is_cancelled() {
                        eprint!("{}", render_summary(&summary));
                        print!("{}", render_headlines(&summary));
                        eprintln!("watching for changes (Ctrl-C to stop)");
                    }
                });
            }
            Err(e) => {
                eprintln!("{e:#}");
                eprintln!("watching for changes (Ctrl-C to stop)");
                options.events.emit(Event::WorkflowInvalid {
                    errors: format!("{e:#}"),
                });
                // Keep watching what the last valid plan read, plus the workflow file.
                watched.extend(watch_set.files.iter().cloned());
                watched.extend(watch_set.dirs.iter().cloned());
            }
        }
        watched.sort();
        watched.dedup();
        let new_set = WatchSet::new(
            &watched,
            output_dir.as_deref().or(watch_set.ignore.as_deref()),
        );
        if new_set != watch_set || os_watch.is_none() {
            // Re-create watches from scratch: the simplest way to drop paths no longer read.
            drop(os_watch.take());
            let (mut watcher, rx) = new_watcher()?;
            new_set.install(&mut watcher);
            os_watch = Some((watcher, rx));
            watch_set = new_set;
        }
        let added: Vec<PathBuf> = watched
            .iter()
            .filter(|p| !planned_content.contains_key(*p))
            .cloned()
            .collect();
        planned_content.extend(fingerprint(&added, &hasher));
        planned_content.retain(|p, _| watched.binary_search(p).is_ok());
        last_watched = watched.clone();
        let changes = &mut os_watch.as_mut().expect("watcher").1;

        // Wait for a change of content that matters.
        loop {
            tokio::select! {
                batch = changes.recv() => {
                    let Some(mut paths) = batch else { return Ok(()) };
                    // Debounce: an editor's save is several events; take them all.
                    tokio::time::sleep(DEBOUNCE).await;
                    while let Ok(more) = changes.try_recv() {
                        paths.extend(more);
                    }
                    let mut relevant: Vec<PathBuf> = paths.into_iter().filter(|p| watch_set.is_relevant(p)).collect();
                    if relevant.is_empty() {
                        continue;
                    }
                    let content = fingerprint(&watched, &hasher);
                    if content == planned_content {
                        tracing::debug!("touched but unchanged: {}", relevant[0].display());
                        continue;
                    }
                    relevant.sort();
                    relevant.dedup();
                    tracing::info!("changed: {}", relevant.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
                    options.events.emit(Event::FilesChanged { paths: relevant });
                    break;
                }
                _ = shutdown.cancelled() => {
                    if let Some(token) = current.take() {
                        token.cancel();
                    }
                    return Ok(());
                }
            }
        }
    }
}
