//! dusflow: the depth up-scaling recipe as a reproducible DAG of steps, with WebAssembly policy plugins.
//!
//! Start at [`workflow`] (what a TOML workflow means), then [`engine`] (how it runs).

pub mod model;
pub mod plugins;
