//! Data-filter plugins as [`RecordFilter`]s: a thin adapter over the plugin host's typed handle, so the
//! filter stage does not care whether a filter is native or WebAssembly.

use super::filter::{RecordFilter, Verdict};
use anyhow::{Context, Result};
use dusflow_plugin_host::{DataFilterPlugin, Plugin, Verdict as PluginVerdict};

/// A loaded, configured data-filter plugin.
pub struct PluginFilter {
    name: String,
    handle: DataFilterPlugin,
}

impl PluginFilter {
    /// Starts a filtering job of the loaded `[plugins.NAME]` `plugin`, configured with `params_json`.
    pub fn start(plugin: &Plugin, name: &str, params_json: &str) -> Result<Self> {
        let handle = plugin
            .data_filter(params_json)
            .with_context(|| format!("configuring plugin {name:?}"))?;
        Ok(PluginFilter {
            name: name.to_string(),
            handle,
        })
    }
}

impl RecordFilter for PluginFilter {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter_batch(&mut self, records: &[String]) -> Result<Vec<Verdict>> {
        Ok(self
            .handle
            .filter_batch(records)?
            .into_iter()
            .map(|v| match v {
                PluginVerdict::Keep => Verdict::Keep,
                PluginVerdict::Drop => Verdict::Drop,
                PluginVerdict::Rewrite(json) => Verdict::Rewrite(json),
            })
            .collect())
    }
}
