//! The [`StepKind`] trait every step kind implements, and its type-erased form the engine stores.

use super::context::StepContext;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// What an artifact (a step's output, a model or a dataset) is, for input type checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A Hugging Face model folder (config.json + safetensors).
    Model,
    /// Records (JSONL / Parquet) read through a dataset spec or written by a data step.
    Dataset,
    /// Evaluation results (JSON + tables).
    Evaluation,
    /// Anything else: a folder of files.
    Files,
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArtifactKind::Model => "model",
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Evaluation => "evaluation",
            ArtifactKind::Files => "files",
        })
    }
}

/// A named sub-folder of a step's artifact that other steps may use on its own, referenced as
/// `"STEP/PART"` (e.g. sDPO's intermediate model `"sdpo/stage-1"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactPart {
    /// The name after the slash.
    pub name: String,
    /// Its folder, relative to the artifact (empty = the artifact itself).
    pub path: PathBuf,
    /// What it is.
    pub kind: ArtifactKind,
}

/// One named input of a step kind (`inputs = { model = "base" }` fills slot `model`).
#[derive(Debug, Clone, Copy)]
pub struct InputSlot {
    /// Slot name as written in `inputs`.
    pub name: &'static str,
    /// Artifact kinds the slot accepts.
    pub accepts: &'static [ArtifactKind],
    /// Whether the slot takes a list (and a swept step expands to all its points).
    pub many: bool,
    /// Whether the slot must be filled.
    pub required: bool,
}

impl InputSlot {
    /// A required slot taking exactly one artifact of the `accepts` kinds.
    pub const fn one(name: &'static str, accepts: &'static [ArtifactKind]) -> Self {
        Self {
            name,
            accepts,
            many: false,
            required: true,
        }
    }

    /// A required slot taking one or more artifacts of the `accepts` kinds.
    pub const fn many(name: &'static str, accepts: &'static [ArtifactKind]) -> Self {
        Self {
            name,
            accepts,
            many: true,
            required: true,
        }
    }

    /// The same slot, which may be left out.
    pub const fn optional(self) -> Self {
        Self {
            required: false,
            ..self
        }
    }
}

/// Which inputs a step kind takes.
#[derive(Debug, Clone, Copy)]
pub enum InputSlots {
    /// Exactly these slots.
    Fixed(&'static [InputSlot]),
    /// Any slot names, each taking one or more artifacts of any kind (e.g. `command`).
    Any,
}

/// A parameter problem found by a kind's own checks: a dotted key path inside the step and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Path of the offending key relative to the step table (e.g. `lr` or `schedule.warmup`); empty = whole step.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigIssue {
    /// An issue with key `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// What the workflow declares, for a kind's checks (e.g. "is `decon` a plugin?").
pub trait CheckContext {
    /// Whether `[plugins.NAME]` exists.
    fn has_plugin(&self, name: &str) -> bool;
    /// How many artifacts the step's input slot `slot` receives (a swept step counts all its points);
    /// `None` when unknown. Lets a kind check per-input parameters (e.g. one merge weight per model).
    fn input_count(&self, _slot: &str) -> Option<usize> {
        None
    }
    /// The `[datasets.*]` tables (name, spec) among the inputs of slot `slot`; inputs made by steps are not
    /// listed. Empty when unknown.
    fn input_datasets(&self, _slot: &str) -> Vec<(String, crate::spec::DatasetSpec)> {
        Vec::new()
    }
}

/// Things beyond inputs that a step reads, whose content enters its cache key and that watch mode watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dependencies {
    /// Names of `[plugins.*]` the step calls.
    pub plugins: Vec<String>,
    /// Extra files or folders, relative to the workflow file.
    pub files: Vec<PathBuf>,
}

/// How much of the machine a step occupies while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Holds the workflow's compute device exclusively (one such step per device at a time).
    pub exclusive_device: bool,
}

/// A kind of step: its parameters, inputs, checks, and what running it does.
///
/// Adding a kind: write one module with a serde `Config` and an impl of this trait, and register it in
/// the registry ([`super::Registry`]).
pub trait StepKind: Send + Sync + 'static {
    /// The step's parameters: every key of the step table except `kind`, `inputs`, `sweep`, `description`.
    /// Use `#[serde(deny_unknown_fields)]` so typos are reported.
    type Config: DeserializeOwned + Serialize + Send + Sync + 'static;

    /// The `kind = "..."` name.
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's output for the same config changes; part of every cache key.
    fn version(&self) -> u32 {
        1
    }
    /// The inputs this kind takes.
    fn inputs(&self) -> InputSlots;
    /// What the step writes.
    fn output(&self, config: &Self::Config) -> ArtifactKind;
    /// Sub-folders of the output that other steps may reference as `"STEP/PART"` (default: none).
    fn parts(&self, _config: &Self::Config) -> Vec<ArtifactPart> {
        Vec::new()
    }
    /// Semantic checks beyond types (ranges, combinations, referenced plugins).
    fn check(&self, _config: &Self::Config, _ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        Vec::new()
    }
    /// Plugins and extra files the step reads.
    fn dependencies(&self, _config: &Self::Config) -> Dependencies {
        Dependencies::default()
    }
    /// What the step occupies while it runs.
    fn resources(&self, _config: &Self::Config) -> Resources {
        Resources::default()
    }
    /// Whether an interrupted run's work folder is kept so a rerun can resume from checkpoints in it.
    fn resumable(&self) -> bool {
        false
    }
    /// A file of the artifact that `dus run` shows at its end, the step's result for people (the `report`
    /// kind's table); `None` for kinds whose output is for other steps.
    fn headline(&self) -> Option<&'static str> {
        None
    }
    /// Does the work, writing outputs into `ctx.out_dir`. Blocking; check `ctx.check_cancelled()` often.
    fn run(&self, config: &Self::Config, ctx: &StepContext) -> anyhow::Result<()>;
}

/// A parsed step configuration of some kind, type-erased.
pub type AnyConfig = Arc<dyn Any + Send + Sync>;

/// Deserialization failure of a step's parameters: the key path inside the step and the toml error.
pub struct ParseFailure {
    /// Dotted path of the offending key (may be empty).
    pub path: String,
    /// toml's error, carrying the span of the offending text.
    pub error: toml::de::Error,
}

/// The object-safe face of a [`StepKind`], stored in the registry and in parsed workflows.
pub trait ErasedStepKind: Send + Sync {
    /// See [`StepKind::name`].
    fn name(&self) -> &'static str;
    /// See [`StepKind::version`].
    fn version(&self) -> u32;
    /// See [`StepKind::inputs`].
    fn inputs(&self) -> InputSlots;
    /// Deserializes the parameters; on success also returns them normalised as JSON (defaults filled in).
    fn parse(
        &self,
        params: toml::de::ValueDeserializer<'_>,
    ) -> Result<(AnyConfig, serde_json::Value), ParseFailure>;
    /// See [`StepKind::output`].
    fn output(&self, config: &AnyConfig) -> ArtifactKind;
    /// See [`StepKind::parts`].
    fn parts(&self, config: &AnyConfig) -> Vec<ArtifactPart>;
    /// See [`StepKind::check`].
    fn check(&self, config: &AnyConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue>;
    /// See [`StepKind::dependencies`].
    fn dependencies(&self, config: &AnyConfig) -> Dependencies;
    /// See [`StepKind::resources`].
    fn resources(&self, config: &AnyConfig) -> Resources;
    /// See [`StepKind::resumable`].
    fn resumable(&self) -> bool;
    /// See [`StepKind::headline`].
    fn headline(&self) -> Option<&'static str>;
    /// See [`StepKind::run`].
    fn run(&self, config: &AnyConfig, ctx: &StepContext) -> anyhow::Result<()>;
}

pub(crate) struct Erased<K>(pub(crate) K);

impl<K: StepKind> Erased<K> {
    fn config<'a>(&self, config: &'a AnyConfig) -> &'a K::Config {
        config
            .downcast_ref::<K::Config>()
            .expect("step config of another kind")
    }
}

impl<K: StepKind> ErasedStepKind for Erased<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn version(&self) -> u32 {
        self.0.version()
    }
    fn inputs(&self) -> InputSlots {
        self.0.inputs()
    }
    fn parse(
        &self,
        params: toml::de::ValueDeserializer<'_>,
    ) -> Result<(AnyConfig, serde_json::Value), ParseFailure> {
        let config: K::Config =
            serde_path_to_error::deserialize(params).map_err(|e| ParseFailure {
                path: path_string(e.path()),
                error: e.into_inner(),
            })?;
        let json = serde_json::to_value(&config).expect("step configs serialize to JSON");
        Ok((Arc::new(config), json))
    }
    fn output(&self, config: &AnyConfig) -> ArtifactKind {
        self.0.output(self.config(config))
    }
    fn parts(&self, config: &AnyConfig) -> Vec<ArtifactPart> {
        self.0.parts(self.config(config))
    }
    fn check(&self, config: &AnyConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        self.0.check(self.config(config), ctx)
    }
    fn dependencies(&self, config: &AnyConfig) -> Dependencies {
        self.0.dependencies(self.config(config))
    }
    fn resources(&self, config: &AnyConfig) -> Resources {
        self.0.resources(self.config(config))
    }
    fn resumable(&self) -> bool {
        self.0.resumable()
    }
    fn headline(&self) -> Option<&'static str> {
        self.0.headline()
    }
    fn run(&self, config: &AnyConfig, ctx: &StepContext) -> anyhow::Result<()> {
        self.0.run(self.config(config), ctx)
    }
}

fn path_string(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}
