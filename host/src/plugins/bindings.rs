//! Host bindings generated from the WIT package, one module per published version and world.
//! Only this module and the typed handles see these types; everything else uses [`super::types`].

/// `dus:plugin@0.1.0`.
pub(crate) mod v0_1_0 {
    /// World `layer-policy-plugin`.
    pub(crate) mod layer_policy {
        wasmtime::component::bindgen!({
            path: "../sdk/wit/0.1.0",
            world: "layer-policy-plugin",
        });
    }

    /// World `data-filter-plugin`.
    pub(crate) mod data_filter {
        wasmtime::component::bindgen!({
            path: "../sdk/wit/0.1.0",
            world: "data-filter-plugin",
        });
    }

    /// World `merge-rule-plugin`.
    pub(crate) mod merge_rule {
        wasmtime::component::bindgen!({
            path: "../sdk/wit/0.1.0",
            world: "merge-rule-plugin",
        });
    }
}

/// Versions of `dus:plugin` this host implements; a plugin built against any of them loads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0"];
