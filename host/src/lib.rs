//! dusflow: the depth up-scaling recipe as a reproducible DAG of steps, with WebAssembly policy plugins.
//!
//! Start at [`workflow`] (what a TOML workflow means), then [`engine`] (how it is planned, cached, run
//! and watched), then [`steps`] (the step kinds).

pub mod cli;
pub mod data;
pub mod device;
pub mod engine;
pub mod model;
pub mod plugins;
pub mod steps;
pub mod train;
pub mod workflow;
