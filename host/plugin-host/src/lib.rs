//! The WebAssembly plugin host (issue 4): loads plugin components, sandboxes them and calls them.
//!
//! Plugins implement one world of the WIT package `dus:plugin` (`sdk/wit/<version>/`):
//! a **layer policy** (scale step), a **data filter** (data steps) or a **merge rule** (merge
//! step). They are written in any language that builds WebAssembly components; the Rust SDK is
//! the crate `dusflow-sdk`.
//!
//! # Using a plugin from a step
//!
//! ```no_run
//! use dusflow_plugin_host::{PluginGrants, PluginHost, PluginLimits, Verdict};
//! # fn main() -> anyhow::Result<()> {
//! // One host per process (clone it or share it in an Arc): engine, epoch ticker, caches.
//! let host = PluginHost::new()?;
//! // `[plugins.dedup]` of the workflow deserialises into grants and limits.
//! let grants = PluginGrants { read: vec!["benchmarks".into()], ..Default::default() };
//! let limits = PluginLimits::default();
//! // A `.wasm` component, or a source folder: `load` takes its cached build, `load_or_build` builds it
//! // if needed (running its build outside the sandbox).
//! let plugin = host.load_or_build("plugins/decontaminate".as_ref(), &grants, &limits)?;
//! println!("{} {} is a {}", plugin.info().name, plugin.info().version, plugin.kind());
//!
//! // Each typed handle is one job: a fresh sandboxed instance.
//! let mut filter = plugin.data_filter(r#"{"benchmarks_dir": "benchmarks"}"#)?;
//! let verdicts = filter.filter_batch(&[r#"{"text": "hello"}"#.to_string()])?;
//! assert_eq!(verdicts.len(), 1);
//! # let _ = Verdict::Keep;
//! # Ok(()) }
//! ```
//!
//! - Layer policies: [`Plugin::layer_policy`] → [`LayerPolicyPlugin::plan`]`(&[ModelDescription], params_json)`
//!   → [`LayerPlan`] (validated: indices in range).
//! - Data filters: [`Plugin::data_filter`]`(params_json)` → [`DataFilterPlugin::filter_batch`]`(&[String])`
//!   → `Vec<`[`Verdict`]`>` (one per record; rewrites are valid JSON). Batches of ~1000 records.
//! - Merge rules: [`Plugin::merge_rule`]`(params_json)` → [`MergeRulePlugin::plan_tensor`]`(&TensorInfo)`
//!   → [`MergePlan`]; the step runs `Linear`/`Slerp`/`CopyFrom` natively and streams `Custom`
//!   tensors through [`MergeRulePlugin::merge_custom`] (or chunk by chunk with `merge_chunk`).
//!
//! Params are the step's TOML table serialised to JSON: [`params_json`]`(&table)`.
//!
//! # Sandbox
//!
//! Every job gets a fresh store: WASI with nothing preopened, no env, no sockets, frozen clocks,
//! unless [`PluginGrants`] says otherwise (`read` dirs are preopened read-only at the same
//! path); links cannot be created; a memory cap and a per-call deadline from [`PluginLimits`] that
//! holds whatever the guest does (guest code is interrupted at a 10 ms epoch tick; a call waiting in
//! WASI is abandoned: calls are futures raced against the deadline), and [`Plugin::cancelled_by`] stops
//! calls on cancellation the same way. A data filter's rewrites are bounded relative to its input
//! (`limits.output_ratio`). A trap, time-out, memory exhaustion or malformed answer becomes an
//! `anyhow` error naming the plugin, the function, the message and the plugin's captured
//! stdout/stderr; the failed job refuses further calls, the host and other jobs are unaffected.
//!
//! # Building and caching
//!
//! Building runs a folder's build command on the host, outside the sandbox, so it happens only when
//! asked: [`PluginHost::load_or_build`], [`PluginHost::load_spec`] of a `build = true` table, or
//! `dus plugin build`. [`build::ensure_built`] turns a source folder into a component, cached under
//! `<cache>/builds/<content-hash>.wasm` ([`build::source_files`] lists what is hashed and
//! watched). [`PluginHost`] keeps precompiled artifacts under `<cache>/precompiled/` and an
//! in-memory instance-pre per component. The cache is [`build::default_cache_dir`]
//! (`$DUS_PLUGIN_CACHE`, else `$XDG_CACHE_HOME/dusflow/plugins`) or the one given to
//! [`PluginHost::with_cache_dir`].
//!
//! # CLI
//!
//! [`cli::PluginCommand`] (`dus plugin new | build | check`) and [`cli::run`].

mod bindings;
pub mod build;
pub mod cli;
mod data_filter;
mod host;
mod layer_policy;
mod merge_rule;
mod output;
mod runtime;
mod sandbox;
mod scaffold;
mod shared;
pub mod types;

pub use bindings::SUPPORTED_VERSIONS;
pub use data_filter::{DataFilterPlugin, DEFAULT_BATCH};
pub use dusflow_core::spec::{PluginGrants, PluginLimits};
pub use host::{Plugin, PluginHost};
pub use layer_policy::LayerPolicyPlugin;
pub use merge_rule::{MergeRulePlugin, DEFAULT_CHUNK_ELEMENTS};
pub use scaffold::{languages as scaffold_languages, Lang};
pub use shared::{SharedPluginHost, StepPluginHost};
pub use types::{
    params_json, DType, LayerPlan, LayerSpec, MergePlan, ModelDescription, PluginInfo, PluginKind,
    TensorInfo, TensorStats, TensorTransform, TransformOp, Verdict,
};
