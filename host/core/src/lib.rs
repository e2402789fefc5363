//! dusflow's bottom layer: what every other crate shares and nothing here imports from above.
//!
//! - [`spec`]: the typed tables of a workflow file (`[workflow]`, `[models.*]`, `[datasets.*]`,
//!   `[plugins.*]` with their grants and limits), device and dtype choices, the error policy;
//! - [`record_format`]: dataset record layouts (`format = "alpaca"`, …);
//! - [`step`]: the step-kind contract ([`step::StepKind`]), what a running step sees
//!   ([`step::StepContext`]), the kind registry, cancellation;
//! - [`services`]: process-wide services the engine hands to steps (the plugin host), by type;
//! - [`atomic`]: write-temp-then-rename file writes;
//! - [`byte_size`]: sizes written as `"5GB"` / `"500MiB"`.
//!
//! The layers above: `dusflow-model` and `dusflow-plugin-host` import only this crate; `dusflow-data`
//! imports those; `dusflow-train` and `dusflow-eval` import data; `dusflow-engine` runs steps through the
//! contract here without knowing any kind; `dusflow` holds the kinds and the CLI.

pub mod atomic;
pub mod byte_size;
pub mod record_format;
pub mod services;
pub mod spec;
pub mod step;
