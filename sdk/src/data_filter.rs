//! Data filters: keep, drop or rewrite JSON records of any schema.
//!
//! The host calls `configure` once per job with the step's params, then hands over batches of
//! records. Each record is deserialised into your `Record` type (declare only the fields you
//! need; unknown ones are ignored, or use `serde_json::Value` to see everything).
//!
//! ```no_run
//! use dusflow_sdk::data_filter::{DataFilter, Verdict};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Params { min_chars: usize, #[serde(default)] trim: bool }
//!
//! struct MinLength(Params);
//!
//! impl DataFilter for MinLength {
//!     type Params = Params;
//!     type Record = serde_json::Value;
//!
//!     fn new(params: Params) -> Result<Self, String> {
//!         Ok(Self(params))
//!     }
//!
//!     fn filter(&mut self, mut record: serde_json::Value) -> Result<Verdict, String> {
//!         let text = record["text"].as_str().ok_or("record has no string field `text`")?;
//!         if text.chars().count() < self.0.min_chars {
//!             return Ok(Verdict::Drop);
//!         }
//!         if self.0.trim && text.trim().len() != text.len() {
//!             record["text"] = text.trim().into();
//!             return Ok(Verdict::rewrite(&record));
//!         }
//!         Ok(Verdict::Keep)
//!     }
//! }
//!
//! dusflow_sdk::data_filter!(MinLength);
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Generated bindings of world `data-filter-plugin`; used by [`data_filter!`](crate::data_filter!).
#[doc(hidden)]
pub use dusflow_sdk_bindings_data_filter as bindings;

use bindings::exports::dus::plugin::data_filter as wit;

/// What happens to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the record unchanged.
    Keep,
    /// Remove the record.
    Drop,
    /// Replace the record by this JSON text (see [`Verdict::rewrite`]).
    Rewrite(String),
}

impl Verdict {
    /// Rewrites the record to `value` serialised as JSON.
    pub fn rewrite<T: Serialize>(value: &T) -> Verdict {
        Verdict::Rewrite(serde_json::to_string(value).expect("a JSON-serialisable record"))
    }
}

/// A data filter. Implement it, then call [`data_filter!`](crate::data_filter!) once.
pub trait DataFilter: Sized + 'static {
    /// The step's params, deserialised from JSON.
    type Params: DeserializeOwned;
    /// One record, deserialised from its JSON text.
    type Record: DeserializeOwned;
    /// Builds the filter for one job (read grant-ed files here, compile patterns, ...).
    fn new(params: Self::Params) -> Result<Self, String>;
    /// Judges one record.
    fn filter(&mut self, record: Self::Record) -> Result<Verdict, String>;
}

#[doc(hidden)]
pub fn __configure<F: DataFilter>(params: &str) -> Result<F, String> {
    F::new(crate::params::parse_params(params)?)
}

#[doc(hidden)]
pub fn __filter_batch<F: DataFilter>(
    filter: &mut F,
    records: Vec<String>,
) -> Result<Vec<wit::Verdict>, String> {
    records
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let record: F::Record = serde_json::from_str(text).map_err(|e| {
                format!("record {i} of the batch does not fit the filter's record type: {e}")
            })?;
            Ok(match filter.filter(record)? {
                Verdict::Keep => wit::Verdict::Keep,
                Verdict::Drop => wit::Verdict::Drop,
                Verdict::Rewrite(json) => wit::Verdict::Rewrite(json),
            })
        })
        .collect()
}

/// Exports a [`DataFilter`] type as the plugin's component exports. Use once per plugin crate.
#[macro_export]
macro_rules! data_filter {
    ($ty:ty) => {
        const _: () = {
            struct DusflowDataFilter;
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::data_filter::bindings::exports::dus::plugin::info::Guest for DusflowDataFilter {
                fn describe() -> $crate::data_filter::bindings::exports::dus::plugin::info::PluginInfo {
                    $crate::data_filter::bindings::exports::dus::plugin::info::PluginInfo {
                        name: env!("CARGO_PKG_NAME").into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        description: env!("CARGO_PKG_DESCRIPTION").into(),
                    }
                }
            }
            impl $crate::data_filter::bindings::exports::dus::plugin::data_filter::Guest for DusflowDataFilter {
                fn configure(params: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    let filter = $crate::data_filter::__configure::<$ty>(&params)?;
                    STATE.with(|state| *state.borrow_mut() = ::core::option::Option::Some(filter));
                    ::core::result::Result::Ok(())
                }
                fn filter_batch(
                    records: ::std::vec::Vec<::std::string::String>,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::data_filter::bindings::exports::dus::plugin::data_filter::Verdict>,
                    ::std::string::String,
                > {
                    STATE.with(|state| match state.borrow_mut().as_mut() {
                        ::core::option::Option::Some(filter) => $crate::data_filter::__filter_batch(filter, records),
                        ::core::option::Option::None => {
                            ::core::result::Result::Err("filter-batch called before configure".into())
                        }
                    })
                }
            }
            $crate::data_filter::bindings::export_world!(DusflowDataFilter with_types_in $crate::data_filter::bindings);
        };
    };
}
