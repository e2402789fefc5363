//! dusflow: the depth up-scaling recipe as a reproducible DAG of steps, with WebAssembly policy plugins.
//!
//! This crate holds the step kinds ([`steps`]), training on several devices ([`distributed`]) and the `dus`
//! command line ([`cli`]); everything they stand on lives in the crates below, re-exported here under the
//! names the rest of the code uses:
//!
//! | here | crate | what |
//! |---|---|---|
//! | [`spec`], [`step`] | `dusflow-core` | workflow tables, the step-kind contract (the bottom layer) |
//! | [`model`], [`device`] | `dusflow-model` | Llama/Mistral in candle, safetensors I/O, tokenizers |
//! | [`plugins`] | `dusflow-plugin-host` | the sandboxed WebAssembly plugin host |
//! | [`data`] | `dusflow-data` | datasets, filters, layouts, templates, token rows |
//! | [`train`] | `dusflow-train` | optimizer, schedule, loop, checkpoints, DPO |
//! | [`eval`] | `dusflow-eval` | lm-evaluation-harness-exact scoring |
//! | [`engine`], [`workflow`] | `dusflow-engine` | TOML workflows, plans, the artifact store, the scheduler |

pub mod cli;
pub mod distributed;
pub mod one_step;
pub mod steps;

pub use dusflow_core::{atomic, byte_size, record_format, services, spec, step};
pub use dusflow_data as data;
pub use dusflow_engine as engine;
pub use dusflow_engine::workflow;
pub use dusflow_eval as eval;
pub use dusflow_model as model;
pub use dusflow_model::device;
pub use dusflow_plugin_host as plugins;
pub use dusflow_train as train;
