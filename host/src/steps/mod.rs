//! Step kinds: the [`StepKind`] trait, the registry of kinds, and the built-in kinds.

pub mod command;
pub mod context;
pub mod dpo;
pub mod eval;
pub mod init;
pub mod kind;
pub mod merge;
pub mod preference_pairs;
pub mod pretrain;
pub mod report;
pub mod scale;
pub mod sft;
pub mod synthetic;

pub use context::{Cancelled, InputArtifact, StepContext};
pub use kind::{
    AnyConfig, ArtifactKind, ArtifactPart, CheckContext, ConfigIssue, Dependencies, ErasedStepKind,
    InputSlot, InputSlots, Resources, StepKind,
};

use std::collections::BTreeMap;
use std::sync::Arc;

/// The step kinds a workflow may use, by `kind` name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedStepKind>>,
}

impl Registry {
    /// An empty registry (tests register their own kinds).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every kind that ships with dusflow.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(command::CommandStep);
        r.register(eval::EvalStep);
        r.register(report::ReportStep);
        r.register(merge::MergeStep);
        r.register(scale::ScaleStep);
        r.register(synthetic::SyntheticStep);
        r.register(init::InitStep);
        r.register(pretrain::PretrainStep);
        r.register(sft::SftStep);
        r.register(dpo::DpoStep);
        r.register(preference_pairs::PreferencePairsStep);
        r
    }

    /// Adds (or replaces) a kind.
    pub fn register<K: StepKind>(&mut self, kind: K) -> &mut Self {
        self.kinds.insert(kind.name(), Arc::new(kind::Erased(kind)));
        self
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn ErasedStepKind>> {
        self.kinds.get(name)
    }

    /// All kind names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}
