//! The typed sections of a workflow file: `[workflow]`, `[models.*]`, `[datasets.*]`, `[plugins.*]`.
//!
//! Step tables are not here: their parameters belong to each step kind (see [`crate::step::StepKind`]).

use crate::record_format::FormatChoice;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where steps run their tensor work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this binary has it and a GPU answers, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// A CUDA GPU; an error when this binary or machine has none.
    Cuda,
}

/// Compute / storage precision of model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float (`f32`, also `float32`).
    #[default]
    #[serde(alias = "float32")]
    F32,
    /// bfloat16 (`bf16`, also `bfloat16`).
    #[serde(alias = "bfloat16")]
    Bf16,
    /// IEEE half precision (`f16`, also `float16`).
    #[serde(alias = "float16")]
    F16,
}

impl DType {
    /// The spelling of `torch_dtype` in a Hugging Face `config.json` (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

/// The `[workflow]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSettings {
    /// Workflow name, used for the default output directory.
    pub name: String,
    /// One-line description.
    #[serde(default)]
    pub description: Option<String>,
    /// Device for tensor work.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Default dtype for models the steps write.
    #[serde(default)]
    pub dtype: DType,
    /// Global seed; steps derive their own seeds from it.
    #[serde(default)]
    pub seed: u64,
    /// Artifact directory, relative to the workflow file (default `runs/<name>`).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// How many steps may run at once (default: number of CPU cores).
    #[serde(default)]
    pub jobs: Option<usize>,
    /// fsync model files before they become artifacts (default true). `false` skips it, for scratch or
    /// tmpfs outputs: artifacts still appear only when complete (a killed run leaves no partial one), but
    /// may be lost on power failure. Not part of artifact hashes.
    #[serde(default = "durable_by_default")]
    pub durable: bool,
}

fn durable_by_default() -> bool {
    true
}

/// A `[models.NAME]` table: a Hugging Face model folder on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The folder with `config.json` and safetensors weights (relative to the workflow file).
    pub path: PathBuf,
    /// A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for this base: steps
    /// read the base with the adapter merged in (as mergekit's `base+adapter`), made once per content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// What to do with a malformed dataset record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the step with the file and line of the record.
    #[default]
    Fail,
    /// Skip the record and count it.
    Skip,
}

/// One or several paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PathList {
    /// A single file or folder.
    One(PathBuf),
    /// Several files read in order (e.g. shards).
    Many(Vec<PathBuf>),
}

impl PathList {
    /// The paths, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            PathList::One(p) => vec![p.clone()],
            PathList::Many(v) => v.clone(),
        }
    }
}

/// A `[datasets.NAME]` table: records on disk (JSONL or Parquet) plus how to read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// File(s) or folder (relative to the workflow file).
    pub path: PathList,
    /// Record layout: `text`, `alpaca`, `prompt-completion`, `chat`, `preference`, `orca-dpo`, `ultrafeedback`,
    /// `gsm8k`, `arc`, or `auto` (detected from the first record).
    #[serde(default)]
    pub format: FormatChoice,
    /// Use at most this many records (after filters), sampled deterministically with the seed.
    #[serde(default)]
    pub max_samples: Option<u64>,
    /// Data-filter plugins applied in order when the data is loaded (names of `[plugins.*]`).
    #[serde(default)]
    pub filters: Vec<String>,
    /// Field mapping from the layout's names to this file's names, e.g. `{ prompt = "question" }`.
    #[serde(default)]
    pub fields: indexmap::IndexMap<String, String>,
    /// What to do with malformed records.
    #[serde(default)]
    pub on_error: OnError,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// A `[plugins.NAME]` table: a WebAssembly component or a plugin source folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// A `.wasm` component or a source folder, relative to the workflow file.
    pub path: PathBuf,
    /// Whether a source folder may be built when its current sources have no cached build. Building
    /// runs the folder's build command (`plugin.toml` `[build] command`, or cargo with the crate's build
    /// scripts) on this machine, outside the sandbox, so it happens only when the workflow says so here
    /// (or after an explicit `dus plugin build`). A `.wasm` component never builds anything.
    #[serde(default)]
    pub build: bool,
    /// Capabilities granted to the plugin (none by default).
    #[serde(default)]
    pub grants: PluginGrants,
    /// Time and memory limits per call.
    #[serde(default)]
    pub limits: PluginLimits,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// Capabilities a workflow grants a plugin. Everything is denied by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// Host directories the plugin may read (preopened read-only, at the same path inside the guest).
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Host directories the plugin may read and write.
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// Environment variables passed through to the plugin.
    #[serde(default)]
    pub env: Vec<String>,
    /// Whether the plugin may read the wall clock.
    #[serde(default)]
    pub clock: bool,
}

/// Resource limits for one plugin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Time budget of a single call, in milliseconds of wall-clock time, whatever the plugin does: guest code
    /// is interrupted at an epoch tick, a wait in WASI (sleep, poll, read) is abandoned.
    #[serde(default = "PluginLimits::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Maximum linear memory of the plugin instance, in MiB.
    #[serde(default = "PluginLimits::default_memory_mb")]
    pub memory_mb: u64,
    /// What the host keeps for a data filter: the rewritten records of one batch may total at most this
    /// many times the batch's input bytes (plus 64 KiB), so a plugin cannot make the host hold more than
    /// a multiple of the dataset, whatever its own memory limit.
    #[serde(default = "PluginLimits::default_output_ratio")]
    pub output_ratio: u64,
}

impl PluginLimits {
    fn default_output_ratio() -> u64 {
        4
    }
    fn default_timeout_ms() -> u64 {
        10_000
    }
    fn default_memory_mb() -> u64 {
        512
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            timeout_ms: Self::default_timeout_ms(),
            memory_mb: Self::default_memory_mb(),
            output_ratio: Self::default_output_ratio(),
        }
    }
}

#[cfg(test)]
mod durable_tests {
    use super::WorkflowSettings;

    #[test]
    fn dtypes_accept_the_short_and_the_torch_spelling() {
        #[derive(serde::Deserialize)]
        struct T {
            d: super::DType,
        }
        for (text, d) in [
            ("bf16", super::DType::Bf16),
            ("bfloat16", super::DType::Bf16),
            ("f16", super::DType::F16),
            ("float16", super::DType::F16),
            ("f32", super::DType::F32),
            ("float32", super::DType::F32),
        ] {
            let t: T = toml::from_str(&format!("d = {text:?}")).unwrap();
            assert_eq!(t.d, d, "{text}");
        }
    }

    #[test]
    fn durable_defaults_to_true_and_can_be_turned_off() {
        let default: WorkflowSettings = toml::from_str("name = \"w\"").unwrap();
        assert!(default.durable);
        let off: WorkflowSettings = toml::from_str("name = \"w\"\ndurable = false").unwrap();
        assert!(!off.durable);
    }
}
