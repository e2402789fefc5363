//! Typed handle of a `data-filter` plugin, for the data steps.

use super::bindings::v0_1_0::data_filter as wit;
use super::host::{Job, Plugin};
use super::types::{PluginKind, Verdict};
use anyhow::Result;
use wit::exports::dus::plugin::data_filter as api;

/// Records per `filter-batch` call that amortise the call overhead without holding much memory.
pub const DEFAULT_BATCH: usize = 1000;

/// One filtering job: a fresh sandboxed instance, configured once, then fed batches.
pub struct DataFilterPlugin {
    job: Job,
    bindings: wit::DataFilterPlugin,
}

impl Plugin {
    /// Starts a data-filter job: instantiates the plugin and calls `configure(params_json)`.
    pub fn data_filter(&self, params_json: &str) -> Result<DataFilterPlugin> {
        self.expect_kind(PluginKind::DataFilter)?;
        let mut job = Job::start(self)?;
        let bindings = wit::DataFilterPlugin::new(&mut job.sandbox.store, &job.instance)?;
        job.call("data-filter.configure", |store, _| {
            bindings
                .dus_plugin_data_filter()
                .call_configure(store, params_json)
        })?;
        Ok(DataFilterPlugin { job, bindings })
    }
}

impl DataFilterPlugin {
    /// Judges a batch of JSON records; one verdict per record, in order. Rewrites are checked to
    /// be valid JSON. Batches of about [`DEFAULT_BATCH`] records are the efficient size.
    pub fn filter_batch(&mut self, records: &[String]) -> Result<Vec<Verdict>> {
        const FUNCTION: &str = "data-filter.filter-batch";
        let bindings = &self.bindings;
        let verdicts = self.job.call(FUNCTION, |store, _| {
            bindings
                .dus_plugin_data_filter()
                .call_filter_batch(store, records)
        })?;
        if verdicts.len() != records.len() {
            let msg = format!("{} verdicts for {} records", verdicts.len(), records.len());
            return Err(self.job.malformed(FUNCTION, msg));
        }
        verdicts
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                api::Verdict::Keep => Ok(Verdict::Keep),
                api::Verdict::Drop => Ok(Verdict::Drop),
                api::Verdict::Rewrite(json) => {
                    match serde_json::from_str::<serde::de::IgnoredAny>(&json) {
                        Ok(_) => Ok(Verdict::Rewrite(json)),
                        Err(e) => Err(self.job.malformed(
                            FUNCTION,
                            format!("record {i} rewritten to invalid JSON ({e})"),
                        )),
                    }
                }
            })
            .collect()
    }
}
