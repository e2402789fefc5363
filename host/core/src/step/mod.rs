//! The step-kind contract: the [`StepKind`] trait, what a running step sees ([`StepContext`]), and the
//! [`Registry`] of kinds a workflow may use.

mod context;
mod kind;
mod registry;

pub use context::{Cancelled, InputArtifact, StepContext};
pub use kind::{
    AnyConfig, ArtifactKind, ArtifactPart, CheckContext, ConfigIssue, Dependencies, ErasedStepKind,
    InputSlot, InputSlots, ParseFailure, Resources, StepKind,
};
pub use registry::Registry;
