//! Write dusflow plugins in Rust: a layer policy, a data filter or a merge rule is a type that
//! implements one trait, plus one macro line.
//!
//! ```no_run
//! use dusflow_sdk::data_filter::{DataFilter, Verdict};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Params { min_chars: usize }
//!
//! #[derive(Deserialize)]
//! struct Record { text: String }
//!
//! struct MinLength(Params);
//!
//! impl DataFilter for MinLength {
//!     type Params = Params;
//!     type Record = Record;
//!     fn new(params: Params) -> Result<Self, String> { Ok(Self(params)) }
//!     fn filter(&mut self, record: Record) -> Result<Verdict, String> {
//!         Ok(if record.text.chars().count() >= self.0.min_chars { Verdict::Keep } else { Verdict::Drop })
//!     }
//! }
//!
//! dusflow_sdk::data_filter!(MinLength);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`), or let
//! `dus plugin build` do it. Each kind's module has a complete example:
//! [`layer_policy`](mod@layer_policy), [`data_filter`](mod@data_filter), [`merge_rule`](mod@merge_rule).
//!
//! Params are the step's TOML table, serialised to JSON and deserialised into your `Params`
//! type with serde; a mismatch fails the step with serde's message. Use [`NoParams`] when the
//! plugin takes none. The plugin's name, version and description in `info` come from its
//! Cargo.toml.
//!
//! The contract itself is the WIT package `dus:plugin@0.1.0` in `sdk/wit/0.1.0/`.

extern crate self as dusflow_sdk;

pub mod data_filter;
pub mod layer_policy;
pub mod merge_rule;
mod params;

pub use params::NoParams;

/// Version of the WIT package this SDK implements.
pub const WIT_VERSION: &str = "0.1.0";

/// Items used by the macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::params::parse_params;
    pub use wit_bindgen;
}
