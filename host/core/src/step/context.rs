//! What a running step sees: its resolved inputs, its output folder, progress and cancellation.

use super::kind::ArtifactKind;
use crate::services::Services;
use crate::spec::{DatasetSpec, PluginSpec, WorkflowSettings};
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// One artifact bound to an input slot.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// The name it was referenced by (a model, a dataset or a step).
    pub name: String,
    /// What it is.
    pub kind: ArtifactKind,
    /// Where it is: a model folder, a step's artifact folder, or the dataset's first path.
    pub path: PathBuf,
    /// For `[datasets.*]` inputs: the spec, with paths made absolute.
    pub dataset: Option<DatasetSpec>,
    /// For a `[models.*]` input with an `adapter`: (base folder, adapter folder) that the engine merges into
    /// `path` before the step runs.
    pub merge: Option<(PathBuf, PathBuf)>,
}

/// The run-time view of one step.
pub struct StepContext {
    /// The step's name (with its sweep point, e.g. `sft[lr=1e-5]`).
    pub step: String,
    /// Folder to write outputs into. It becomes the artifact when the step succeeds.
    pub out_dir: PathBuf,
    /// The workflow file's folder; relative paths in parameters are relative to it.
    pub workflow_dir: PathBuf,
    /// The `[workflow]` settings (device, dtype, seed).
    pub settings: WorkflowSettings,
    /// Input artifacts by slot, in the order written.
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
    /// The plugins the step declared as dependencies, by name, with paths made absolute.
    pub plugins: BTreeMap<String, PluginSpec>,
    /// This step's progress bar (hidden when not on a terminal).
    pub progress: ProgressBar,
    /// Cancelled on Ctrl-C, or in watch mode when the step's inputs changed.
    pub cancel: CancellationToken,
    /// Process-wide services the engine owns (the plugin host), shared by every step.
    pub services: Services,
}

impl StepContext {
    /// The single artifact in slot `slot`.
    pub fn input(&self, slot: &str) -> Result<&InputArtifact> {
        match self.inputs.get(slot).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some([]) | None => bail!("step `{}` has no input `{slot}`", self.step),
            Some(many) => bail!(
                "step `{}` input `{slot}` has {} artifacts, expected one",
                self.step,
                many.len()
            ),
        }
    }

    /// All artifacts in slot `slot` (empty when the slot is not filled).
    pub fn inputs_of(&self, slot: &str) -> &[InputArtifact] {
        self.inputs.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Resolves a path written in the workflow relative to the workflow file.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.workflow_dir.join(path)
    }

    /// Whether the step has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Returns an error when the step has been asked to stop; call it between units of work.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.is_cancelled() {
            bail!(Cancelled);
        }
        Ok(())
    }
}

/// The error a step returns when it stopped because it was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}
