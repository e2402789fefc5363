//! Generated guest bindings of world `layer-policy-plugin` of `dus:plugin@0.1.0`, in a crate of their own
//! because wit-bindgen exports one macro per interface at the crate root and every world exports
//! `info`. Plugin authors use them through `dusflow_sdk::layer_policy`.

#![allow(missing_docs)]

wit_bindgen::generate!({
    path: "../../wit/0.1.0",
    world: "layer-policy-plugin",
    pub_export_macro: true,
    export_macro_name: "export_world",
    default_bindings_module: "dusflow_sdk::layer_policy::bindings",
});
