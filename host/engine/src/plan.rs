//! Planning: the cache key of every step, whether its artifact already exists, and why it would run.

use super::hashing::{hash_json, FileHasher};
use super::store::{ArtifactStore, KeyMaterial, Manifest};
use crate::workflow::{DatasetSpec, InputRef, Step, Workflow};
use dusflow_core::step::{ArtifactKind, InputArtifact};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// The runtime identity that enters every key.
pub fn runtime_version() -> String {
    format!("dusflow/{}", env!("CARGO_PKG_VERSION"))
}

/// What will happen to a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanStatus {
    /// Its artifact exists; nothing to do.
    Cached,
    /// It will run, for the given reason.
    Run(String),
    /// It cannot run: an input is missing (the reason says which).
    Blocked(String),
}

/// One step with its key and status.
pub struct PlannedStep {
    /// Index into the workflow's steps.
    pub index: usize,
    /// Step name.
    pub name: String,
    /// Cache key (hex BLAKE3 of [`KeyMaterial`]).
    pub key: String,
    /// What the key covers.
    pub material: KeyMaterial,
    /// Where its artifact is (or will be).
    pub dir: PathBuf,
    /// What will happen.
    pub status: PlanStatus,
    /// Whether `--force` named it.
    pub forced: bool,
    /// Indices of the steps it reads from.
    pub upstream: Vec<usize>,
    /// Resolved inputs by slot.
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
}

/// The whole workflow, planned.
pub struct Plan {
    /// The workflow.
    pub workflow: Arc<Workflow>,
    /// Steps in execution order (same order as the workflow's steps).
    pub steps: Vec<PlannedStep>,
    /// Files and folders the plan read; watch mode watches them.
    pub watched: Vec<PathBuf>,
}

impl Plan {
    /// Artifact folder names of every step, for matching in-flight work across plans.
    pub fn folder_names(&self) -> HashSet<String> {
        self.steps
            .iter()
            .map(|s| ArtifactStore::folder_name(&s.name, &s.key))
            .collect()
    }

    /// How many steps would run.
    pub fn to_run(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| !matches!(s.status, PlanStatus::Cached))
            .count()
    }
}

/// Computes keys and statuses. `force` names steps (or swept bases) to rerun regardless of the cache.
pub fn plan(
    workflow: Arc<Workflow>,
    store: &ArtifactStore,
    hasher: &FileHasher,
    force: &HashSet<String>,
) -> Plan {
    let mut planner = Planner {
        workflow: &workflow,
        hasher,
        watched: vec![workflow.file.clone()],
        input_keys: HashMap::new(),
        plugin_keys: HashMap::new(),
        steps: Vec::with_capacity(workflow.steps.len()),
        index_of: workflow
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect(),
        merged_root: store.state_dir().join("merged-inputs"),
    };
    for (index, step) in workflow.steps.iter().enumerate() {
        let planned = planner.plan_step(index, step, store, force);
        planner.steps.push(planned);
    }
    let Planner {
        mut watched, steps, ..
    } = planner;
    watched.sort();
    watched.dedup();
    Plan {
        workflow: workflow.clone(),
        steps,
        watched,
    }
}

/// The state of one planning pass: content hashes computed so far (each input and plugin is hashed once),
/// the files read (for watch mode) and the steps planned so far (in order, so inputs come first).
struct Planner<'a> {
    workflow: &'a Workflow,
    hasher: &'a FileHasher,
    watched: Vec<PathBuf>,
    input_keys: HashMap<InputRef, Result<String, String>>,
    plugin_keys: HashMap<String, Result<String, String>>,
    steps: Vec<PlannedStep>,
    index_of: HashMap<&'a str, usize>,
    /// Where models with an adapter are merged (`<out>/.dus/merged-inputs/<key>`).
    merged_root: PathBuf,
}

impl Planner<'_> {
    /// Key material, key and status of one step, all of whose inputs are planned.
    fn plan_step(
        &mut self,
        index: usize,
        step: &Step,
        store: &ArtifactStore,
        force: &HashSet<String>,
    ) -> PlannedStep {
        let mut blocked: Option<String> = None;
        let mut inputs_material = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        let mut upstream = Vec::new();
        for (slot, refs) in &step.inputs {
            let mut keys = Vec::new();
            let mut artifacts = Vec::new();
            for r in refs {
                let (key, artifact) = self.input(r, &mut upstream);
                match key {
                    Ok(k) => keys.push(format!("{}:{k}", artifact.name)),
                    Err(e) => {
                        blocked.get_or_insert(e);
                        keys.push(format!("{}:missing", artifact.name));
                    }
                }
                artifacts.push(artifact);
            }
            inputs_material.insert(slot.clone(), keys);
            inputs.insert(slot.clone(), artifacts);
        }
        let mut plugins = BTreeMap::new();
        for name in &step.dependencies.plugins {
            match self.plugin_key(name) {
                Ok(k) => {
                    plugins.insert(name.clone(), k);
                }
                Err(e) => {
                    blocked.get_or_insert(e);
                }
            }
        }
        let mut files = BTreeMap::new();
        for file in &step.dependencies.files {
            self.watched.push(file.clone());
            match self.hasher.hash_path(file) {
                Ok(k) => {
                    files.insert(file.display().to_string(), k);
                }
                Err(e) => {
                    blocked.get_or_insert(format!("{e:#}"));
                }
            }
        }
        upstream.sort_unstable();
        upstream.dedup();
        let settings = &self.workflow.settings;
        let material = KeyMaterial {
            runtime: runtime_version(),
            kind: step.kind.name().to_string(),
            kind_version: step.kind.version(),
            config: step.config_json.clone(),
            settings: serde_json::json!({ "dtype": settings.dtype, "seed": settings.seed }),
            inputs: inputs_material,
            plugins,
            files,
        };
        let key = hash_json(&serde_json::to_value(&material).expect("key material is JSON"));
        let forced = force.contains(&step.name) || force.contains(&step.base);
        let status = if let Some(reason) = blocked {
            PlanStatus::Blocked(reason)
        } else if forced {
            PlanStatus::Run("forced".into())
        } else if store.complete(&step.name, &key).is_some() {
            PlanStatus::Cached
        } else {
            PlanStatus::Run(why_run(store, &step.name, &material))
        };
        PlannedStep {
            index,
            name: step.name.clone(),
            dir: store.artifact_dir(&step.name, &key),
            key,
            material,
            status,
            forced,
            upstream,
            inputs,
        }
    }

    /// The key (or why it is missing) and the run-time artifact of one input reference; an upstream step's
    /// index is added to `upstream`.
    fn input(
        &mut self,
        r: &InputRef,
        upstream: &mut Vec<usize>,
    ) -> (Result<String, String>, InputArtifact) {
        let workflow = self.workflow;
        match r {
            InputRef::Model(name) => {
                let spec = &workflow.models[name];
                self.watched.push(spec.path.clone());
                self.watched.extend(spec.adapter.clone());
                let hasher = self.hasher;
                let key = self
                    .input_keys
                    .entry(r.clone())
                    .or_insert_with(|| {
                        let base = hasher
                            .hash_path(&spec.path)
                            .map_err(|e| format!("model `{name}`: {e:#}"))?;
                        match &spec.adapter {
                            None => Ok(base),
                            Some(adapter) => {
                                let adapter = hasher
                                    .hash_path(adapter)
                                    .map_err(|e| format!("model `{name}` adapter: {e:#}"))?;
                                Ok(hash_json(&serde_json::json!({
                                    "base": base,
                                    "adapter": adapter,
                                })))
                            }
                        }
                    })
                    .clone();
                // A base with an adapter is read merged: from a folder the executor makes once per content.
                let (path, merge) = match (&spec.adapter, &key) {
                    (Some(adapter), Ok(k)) => (
                        self.merged_root.join(&k[..16]),
                        Some((spec.path.clone(), adapter.clone())),
                    ),
                    _ => (spec.path.clone(), None),
                };
                let artifact = InputArtifact {
                    name: name.clone(),
                    kind: ArtifactKind::Model,
                    path,
                    dataset: None,
                    merge,
                };
                (key, artifact)
            }
            InputRef::Dataset(name) => {
                let spec = &workflow.datasets[name];
                let key = match self.input_keys.get(r) {
                    Some(k) => k.clone(),
                    None => {
                        let k = self.dataset_key(name, spec);
                        self.input_keys.insert(r.clone(), k.clone());
                        k
                    }
                };
                let path = spec.path.paths().into_iter().next().unwrap_or_default();
                let artifact = InputArtifact {
                    name: name.clone(),
                    kind: ArtifactKind::Dataset,
                    path,
                    dataset: Some(spec.clone()),
                    merge: None,
                };
                (key, artifact)
            }
            InputRef::Step(name) | InputRef::Part(name, _) => {
                let up = self.index_of[name.as_str()];
                upstream.push(up);
                let planned = &self.steps[up];
                let key = match &planned.status {
                    PlanStatus::Blocked(_) => Err(format!("needs step `{name}`, which is blocked")),
                    _ => Ok(planned.key.clone()),
                };
                let artifact = match r {
                    InputRef::Part(_, part) => {
                        let p = workflow.steps[up]
                            .parts
                            .iter()
                            .find(|p| &p.name == part)
                            .expect("parts are resolved when the workflow loads");
                        InputArtifact {
                            name: r.display_name(),
                            kind: p.kind,
                            path: planned.dir.join(&p.path),
                            dataset: None,
                            merge: None,
                        }
                    }
                    _ => InputArtifact {
                        name: name.clone(),
                        kind: workflow.steps[up].output,
                        path: planned.dir.clone(),
                        dataset: None,
                        merge: None,
                    },
                };
                (key, artifact)
            }
        }
    }

    /// The content key of plugin `name` (hashed once per plan).
    fn plugin_key(&mut self, name: &str) -> Result<String, String> {
        if let Some(key) = self.plugin_keys.get(name) {
            return key.clone();
        }
        let spec = &self.workflow.plugins[name];
        self.watched.push(spec.path.clone());
        let key = self
            .hasher
            .hash_path(&spec.path)
            .map_err(|e| format!("plugin `{name}`: {e:#}"));
        self.plugin_keys.insert(name.to_string(), key.clone());
        key
    }

    /// A dataset's key: its files' contents, its filter plugins and its spec.
    fn dataset_key(&mut self, name: &str, spec: &DatasetSpec) -> Result<String, String> {
        let mut files = Vec::new();
        for path in spec.path.paths() {
            self.watched.push(path.clone());
            files.push(
                self.hasher
                    .hash_path(&path)
                    .map_err(|e| format!("dataset `{name}`: {e:#}"))?,
            );
        }
        let mut filters = Vec::new();
        for f in &spec.filters {
            filters.push(self.plugin_key(f)?);
        }
        let spec_json = serde_json::to_value(spec).expect("dataset spec is JSON");
        Ok(hash_json(
            &serde_json::json!({ "files": files, "filters": filters, "spec": spec_json }),
        ))
    }
}

/// Why a step without a cached artifact runs, compared with the last artifact recorded for its name.
fn why_run(store: &ArtifactStore, step: &str, material: &KeyMaterial) -> String {
    let Some(last) = last_manifest(store, step) else {
        return "new".into();
    };
    let old = &last.material;
    let mut reasons = Vec::new();
    if old.runtime != material.runtime
        || old.kind_version != material.kind_version
        || old.kind != material.kind
    {
        reasons.push("runtime or step kind changed".to_string());
    }
    let changed = changed_keys(&old.config, &material.config);
    if !changed.is_empty() {
        reasons.push(format!("params changed: {}", changed.join(", ")));
    }
    if old.settings != material.settings {
        reasons.push("workflow dtype/seed changed".into());
    }
    for (slot, keys) in &material.inputs {
        if old.inputs.get(slot) != Some(keys) {
            reasons.push(format!("input `{slot}` changed"));
        }
    }
    if old.plugins != material.plugins {
        reasons.push("plugin changed".into());
    }
    if old.files != material.files {
        reasons.push("files changed".into());
    }
    if reasons.is_empty() {
        reasons.push("artifact missing".into());
    }
    reasons.join("; ")
}

fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    match (old.as_object(), new.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<String> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect();
            keys.sort();
            keys.dedup();
            keys
        }
        _ if old != new => vec!["(all)".into()],
        _ => Vec::new(),
    }
}

/// Path of the record of the last artifact completed for a step name.
pub fn last_record_path(store: &ArtifactStore, step: &str) -> PathBuf {
    store
        .state_dir()
        .join("last")
        .join(format!("{}.json", ArtifactStore::folder_name(step, "")))
}

fn last_manifest(store: &ArtifactStore, step: &str) -> Option<Manifest> {
    serde_json::from_slice(&std::fs::read(last_record_path(store, step)).ok()?).ok()
}
