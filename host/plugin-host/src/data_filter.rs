//! Typed handle of a `data-filter` plugin, for the data steps.

use super::bindings::v0_1_0::data_filter as wit;
use super::host::{Job, Plugin};
use super::types::{PluginKind, Verdict};
use anyhow::Result;
use wit::exports::dus::plugin::data_filter as api;

/// Records per `filter-batch` call that amortise the call overhead without holding much memory.
pub const DEFAULT_BATCH: usize = 1000;

/// Rewrites may exceed `output_ratio` times their batch's input by this much (small batches).
const REWRITE_SLACK: u64 = 64 << 10;

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
        job.call("data-filter.configure", async |store, _| {
            bindings
                .dus_plugin_data_filter()
                .call_configure(store, params_json)
                .await
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
        let verdicts = self.job.call(FUNCTION, async |store, _| {
            bindings
                .dus_plugin_data_filter()
                .call_filter_batch(store, records)
                .await
        })?;
        if verdicts.len() != records.len() {
            let msg = format!("{} verdicts for {} records", verdicts.len(), records.len());
            return Err(self.job.malformed(FUNCTION, msg));
        }
        // The guest's memory limit bounds one answer, not what the host accumulates over a dataset:
        // rewrites are held by the host, so their size is bounded relative to the input.
        let given: usize = records.iter().map(String::len).sum();
        let returned: usize = verdicts
            .iter()
            .map(|v| match v {
                api::Verdict::Rewrite(json) => json.len(),
                _ => 0,
            })
            .sum();
        let ratio = self.job.limits().output_ratio;
        let allowed = (given as u64)
            .saturating_mul(ratio)
            .saturating_add(REWRITE_SLACK);
        if returned as u64 > allowed {
            let msg = format!(
                "its rewrites of {} records total {returned} bytes, more than limits.output_ratio = {ratio} times \
                 the {given} bytes it was given (plus {} KiB); the host keeps rewritten records in memory \
                 (raise [plugins.{}] limits.output_ratio if the growth is legitimate)",
                records.len(),
                REWRITE_SLACK >> 10,
                self.job.name()
            );
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
