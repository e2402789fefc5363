//! What a workflow says about a plugin: capability grants and resource limits (`[plugins.NAME]`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Capabilities a workflow grants a plugin. Everything is denied by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// Host directories the plugin may read (preopened read-only, at the same path inside the guest).
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Host directories the plugin may read and write.
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// Environment variables passed through to the plugin.
    #[serde(default)]
    pub env: Vec<String>,
    /// Whether the plugin may read the wall clock.
    #[serde(default)]
    pub clock: bool,
}

/// Resource limits for one plugin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Time budget of a single call, in milliseconds of wall-clock time (enforced with epoch interruption).
    #[serde(default = "PluginLimits::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Maximum linear memory of the plugin instance, in MiB.
    #[serde(default = "PluginLimits::default_memory_mb")]
    pub memory_mb: u64,
}

impl PluginLimits {
    fn default_timeout_ms() -> u64 {
        10_000
    }
    fn default_memory_mb() -> u64 {
        512
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            timeout_ms: Self::default_timeout_ms(),
            memory_mb: Self::default_memory_mb(),
        }
    }
}
