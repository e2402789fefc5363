//! The WebAssembly plugin host: loads plugin components, sandboxes them and calls them (issue 4).

pub mod spec;

pub use spec::{PluginGrants, PluginLimits};
