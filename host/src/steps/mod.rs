//! Step kinds: every kind that ships with dusflow, one module each, and [`builtin_registry`].
//!
//! The contract they implement ([`StepKind`], [`StepContext`], …) is `dusflow-core`'s `step` module,
//! re-exported here.

pub mod command;
pub mod dpo;
pub mod eval;
pub mod init;
pub mod merge;
pub mod preference_pairs;
pub mod pretrain;
pub mod report;
pub mod scale;
pub mod sft;
pub mod synthetic;
pub mod training;

pub use dusflow_core::step::{
    AnyConfig, ArtifactKind, ArtifactPart, Cancelled, CheckContext, ConfigIssue, Dependencies,
    ErasedStepKind, InputArtifact, InputSlot, InputSlots, Registry, Resources, StepContext,
    StepKind,
};

/// Every kind that ships with dusflow. Adding a kind is one module and one line here.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::empty();
    r.register(command::CommandStep);
    r.register(eval::EvalStep);
    r.register(report::ReportStep);
    r.register(merge::MergeStep);
    r.register(scale::ScaleStep);
    r.register(synthetic::SyntheticStep);
    r.register(init::InitStep);
    r.register(pretrain::PretrainStep::default());
    r.register(sft::SftStep::default());
    r.register(dpo::DpoStep);
    r.register(preference_pairs::PreferencePairsStep);
    r
}
