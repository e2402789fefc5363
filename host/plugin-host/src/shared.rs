//! The process's one plugin host, owned by the engine and handed to steps through their context.

use crate::host::{Plugin, PluginHost};
use anyhow::{anyhow, Context, Result};
use dusflow_core::spec::PluginSpec;
use dusflow_core::step::StepContext;
use std::path::PathBuf;
use std::sync::Mutex;

/// The plugin host of a process, started on first use: a workflow that uses no plugin never starts the
/// wasmtime engine or its epoch ticker. The engine puts one in every step's [`StepContext::services`].
#[derive(Default)]
pub struct SharedPluginHost {
    cache_dir: Option<PathBuf>,
    started: Mutex<Option<PluginHost>>,
}

impl SharedPluginHost {
    /// A host caching under the default plugin cache ([`crate::build::default_cache_dir`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A host caching under `cache_dir`.
    pub fn with_cache_dir(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: Some(cache_dir.into()),
            started: Mutex::default(),
        }
    }

    /// The host, started now if this is the first use.
    pub fn get(&self) -> Result<PluginHost> {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = started.as_ref() {
            return Ok(host.clone());
        }
        let host = match &self.cache_dir {
            Some(dir) => PluginHost::with_cache_dir(dir.clone()),
            None => PluginHost::new(),
        }
        .context("starting the plugin host")?;
        *started = Some(host.clone());
        Ok(host)
    }
}

/// The plugin host as a step sees it.
pub trait StepPluginHost {
    /// The engine's plugin host (one per process, shared by every step).
    fn plugin_host(&self) -> Result<PluginHost>;

    /// Loads `[plugins.NAME]` (`spec`, path absolute) for this step: built only if the table says
    /// `build = true`, its calls stopped when the step is cancelled. Errors name the plugin.
    fn load_plugin(&self, name: &str, spec: &PluginSpec) -> Result<Plugin>;
}

impl StepPluginHost for StepContext {
    fn plugin_host(&self) -> Result<PluginHost> {
        self.services
            .get::<SharedPluginHost>()
            .ok_or_else(|| {
                anyhow!(
                    "step `{}` needs the plugin host, but the engine running it provides none",
                    self.step
                )
            })?
            .get()
    }

    fn load_plugin(&self, name: &str, spec: &PluginSpec) -> Result<Plugin> {
        let plugin = self
            .plugin_host()?
            .load_spec(spec)
            .with_context(|| format!("loading plugin `{name}` ({})", spec.path.display()))?;
        Ok(plugin.cancelled_by(self.cancel.clone()))
    }
}
