//! Shared by the `plugins_*` integration tests: one host per test binary, plugin folders by
//! name, and skipping (with a printed notice) when a non-Rust toolchain is not installed.

#![allow(dead_code)]

use dusflow::plugins::build::MissingTool;
use dusflow::plugins::{Plugin, PluginGrants, PluginHost, PluginLimits};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The process-wide plugin host (default cache dir, so built plugins are reused across runs).
pub(crate) fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(|| PluginHost::new().expect("plugin host"))
}

/// `plugins/NAME` of this repository.
pub(crate) fn plugin_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name)
}

/// Loads `plugins/NAME` with the given grants and limits, building it if needed.
pub(crate) fn load_with(name: &str, grants: &PluginGrants, limits: &PluginLimits) -> Plugin {
    host()
        .load_or_build(&plugin_dir(name), grants, limits)
        .unwrap_or_else(|e| panic!("loading plugin {name}: {e:#}"))
}

/// Loads `plugins/NAME` with no grants and default limits.
pub(crate) fn load(name: &str) -> Plugin {
    load_with(name, &PluginGrants::default(), &PluginLimits::default())
}

/// Loads `plugins/NAME`, or prints a notice and returns None when its toolchain is missing.
pub(crate) fn load_or_skip(name: &str) -> Option<Plugin> {
    match host().load_or_build(
        &plugin_dir(name),
        &PluginGrants::default(),
        &PluginLimits::default(),
    ) {
        Ok(p) => Some(p),
        Err(e) if e.downcast_ref::<MissingTool>().is_some() => {
            eprintln!("SKIPPED {name}: {e}");
            None
        }
        Err(e) => panic!("loading plugin {name}: {e:#}"),
    }
}

/// A small LLaMA-style config.json with `layers` layers.
pub(crate) fn llama_config(layers: u32) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 172,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": {layers}, "vocab_size": 256}}"#
    )
}

/// Little-endian f32 bytes.
pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
