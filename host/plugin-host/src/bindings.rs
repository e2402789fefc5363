//! Host bindings generated from the WIT package, one module per published version and world.
//! Only this module and the typed handles see these types; everything else uses [`super::types`].
//!
//! Adding version 0.2.0: create `sdk/wit/0.2.0/` (0.1.0 stays byte for byte), add a `v0_2_0`
//! module here and "0.2.0" to [`SUPPORTED_VERSIONS`], and let each typed handle pick its
//! bindings by [`Plugin::wit_version`](super::Plugin::wit_version), converting both to the same
//! [`super::types`]. Plugins built against 0.1.0 keep loading unchanged.

/// `dus:plugin@0.1.0`.
pub(crate) mod v0_1_0 {
    /// World `layer-policy-plugin`.
    pub(crate) mod layer_policy {
        wasmtime::component::bindgen!({
            path: "../../sdk/wit/0.1.0",
            world: "layer-policy-plugin",
            exports: { default: async },
        });
    }

    /// World `data-filter-plugin`.
    pub(crate) mod data_filter {
        wasmtime::component::bindgen!({
            path: "../../sdk/wit/0.1.0",
            world: "data-filter-plugin",
            exports: { default: async },
        });
    }

    /// World `merge-rule-plugin`.
    pub(crate) mod merge_rule {
        wasmtime::component::bindgen!({
            path: "../../sdk/wit/0.1.0",
            world: "merge-rule-plugin",
            exports: { default: async },
        });
    }
}

/// Versions of `dus:plugin` this host implements; a plugin built against any of them loads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0"];

#[cfg(test)]
mod tests {
    /// BLAKE3 of each published `sdk/wit/<version>/plugin.wit`. A published contract never
    /// changes: plugins built against it must keep loading. To add something, create the next
    /// minor version beside it (new folder, new bindings module, new entry in
    /// `SUPPORTED_VERSIONS`) and keep this one.
    const PUBLISHED: &[(&str, &str)] = &[(
        "0.1.0",
        "d8b3aad08ffd2de60b2455a6cae2662e9ef01269ae2bcbe8369ea02800bee232",
    )];

    #[test]
    fn published_wit_versions_are_unchanged() {
        for (version, hash) in PUBLISHED {
            let path = format!(
                "{}/../../sdk/wit/{version}/plugin.wit",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read(&path).unwrap();
            assert_eq!(
                blake3::hash(&text).to_hex().as_str(),
                *hash,
                "{path} was edited, but published WIT versions are immutable: add the next version instead"
            );
            assert!(
                super::SUPPORTED_VERSIONS.contains(version),
                "the host must keep supporting {version}"
            );
        }
    }
}
