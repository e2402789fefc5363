//! Workflows: TOML files parsed, validated and expanded into a DAG of steps before anything runs.
//!
//! A workflow file has six kinds of tables:
//! `[workflow]` (name, device, dtype, seed, output), `[defaults.KIND]` (parameters shared by every step of a
//! kind), `[models.NAME]`, `[datasets.NAME]`, `[plugins.NAME]`, and `[steps.NAME]` (`kind`, `inputs`,
//! optional `sweep` and `description`, and the kind's own parameters); `[variants.NAME]` tables overlay the
//! others when a run names the variant. [`Workflow::load`] reports every
//! problem at once with file, line, column and key.

mod diagnostics;
mod load;
pub mod render;

pub use diagnostics::{Diagnostic, WorkflowError};
pub use dusflow_core::spec::{
    DType, DatasetSpec, DeviceChoice, ModelSpec, OnError, PathList, PluginSpec, WorkflowSettings,
};

use dusflow_core::step::{
    AnyConfig, ArtifactKind, ArtifactPart, Dependencies, ErasedStepKind, Registry, Resources,
};
use indexmap::IndexMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A validated workflow: every reference resolved, sweeps expanded, steps in dependency order.
pub struct Workflow {
    /// The workflow file (absolute).
    pub file: PathBuf,
    /// Its folder; relative paths in the file are relative to it.
    pub dir: PathBuf,
    /// The `[workflow]` table.
    pub settings: WorkflowSettings,
    /// Where artifacts go (absolute).
    pub output_dir: PathBuf,
    /// `[models.*]`, paths absolute.
    pub models: IndexMap<String, ModelSpec>,
    /// `[datasets.*]`, paths absolute.
    pub datasets: IndexMap<String, DatasetSpec>,
    /// `[plugins.*]`, paths absolute.
    pub plugins: IndexMap<String, PluginSpec>,
    /// Steps (sweeps expanded), in a dependency order that keeps the file's order where it can.
    pub steps: Vec<Step>,
    /// The `[variants.NAME]` applied, if any.
    pub variant: Option<String>,
}

/// What a step input names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputRef {
    /// A `[models.NAME]`.
    Model(String),
    /// A `[datasets.NAME]`.
    Dataset(String),
    /// Another step's output, by expanded name.
    Step(String),
    /// A named part (sub-folder) of another step's output: `"STEP/PART"`.
    Part(String, String),
}

impl InputRef {
    /// The reference as written: `NAME`, or `STEP/PART` for a part.
    pub fn display_name(&self) -> String {
        match self {
            InputRef::Model(n) | InputRef::Dataset(n) | InputRef::Step(n) => n.clone(),
            InputRef::Part(step, part) => format!("{step}/{part}"),
        }
    }
}

/// One step of the expanded DAG.
pub struct Step {
    /// Unique name; swept steps carry their point, e.g. `sft[lr=1e-5]`.
    pub name: String,
    /// The `[steps.NAME]` it came from.
    pub base: String,
    /// The sweep point as `(key, value)` pairs (empty without a sweep).
    pub point: Vec<(String, String)>,
    /// Its kind.
    pub kind: Arc<dyn ErasedStepKind>,
    /// The parsed parameters.
    pub config: AnyConfig,
    /// The parameters as normalised JSON (defaults filled in); hashed into the cache key, given to plugins.
    pub config_json: serde_json::Value,
    /// Inputs by slot.
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Plugins and extra files it reads (file paths absolute).
    pub dependencies: Dependencies,
    /// What it writes.
    pub output: ArtifactKind,
    /// Named sub-folders of its output that other steps may reference (`STEP/PART`).
    pub parts: Vec<ArtifactPart>,
    /// What it occupies while running.
    pub resources: Resources,
    /// Free text.
    pub description: Option<String>,
}

impl Step {
    /// Names of the steps this one reads from.
    pub fn upstream(&self) -> impl Iterator<Item = &str> {
        self.inputs.values().flatten().filter_map(|r| match r {
            InputRef::Step(s) | InputRef::Part(s, _) => Some(s.as_str()),
            _ => None,
        })
    }
}

impl Workflow {
    /// Reads, validates and expands the workflow at `path` against the step kinds in `registry`.
    pub fn load(path: &Path, registry: &Registry) -> Result<Workflow, WorkflowError> {
        load::load(path, registry, None)
    }

    /// As [`Workflow::load`], with the file's `[variants.NAME]` overlaid on it (`None`: the file as written).
    pub fn load_variant(
        path: &Path,
        registry: &Registry,
        variant: Option<&str>,
    ) -> Result<Workflow, WorkflowError> {
        load::load(path, registry, variant)
    }

    /// The step called `name` (an expanded name).
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Position of step `name` in [`Workflow::steps`].
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}
