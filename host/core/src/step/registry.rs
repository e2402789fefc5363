//! The step kinds a workflow may use, by name.

use super::kind::{Erased, ErasedStepKind, StepKind};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The step kinds a workflow may use, by `kind` name. `dusflow::steps::builtin_registry` fills one with
/// every kind that ships; tests register their own.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedStepKind>>,
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a kind.
    pub fn register<K: StepKind>(&mut self, kind: K) -> &mut Self {
        self.kinds.insert(kind.name(), Arc::new(Erased(kind)));
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
