//! Layer policies: choose the layers of an up-scaled model.
//!
//! The host passes the config of every input model of the `scale` step and the step's params;
//! the policy returns the new model's layers, each copied from (model, layer) and optionally
//! transformed. SOLAR's depth up-scaling with `m` layers trimmed:
//!
//! ```no_run
//! use dusflow_sdk::layer_policy::{LayerPlan, LayerPolicy, LayerSource, LayerSourceExt, ModelConfig};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Params { m: u32 }
//!
//! struct SolarDus;
//!
//! impl LayerPolicy for SolarDus {
//!     type Params = Params;
//!
//!     fn plan(models: &[ModelConfig], params: Params) -> Result<LayerPlan, String> {
//!         let n = models.first().ok_or("needs one base model")?.num_layers;
//!         if 2 * params.m > n {
//!             return Err(format!("m = {} trims more than half of {n} layers", params.m));
//!         }
//!         let bottom = (0..n - params.m).map(|l| LayerSource::copy(0, l));
//!         let top = (params.m..n).map(|l| LayerSource::copy(0, l));
//!         Ok(LayerPlan { base_model: 0, layers: bottom.chain(top).collect() })
//!     }
//! }
//!
//! dusflow_sdk::layer_policy!(SolarDus);
//! ```

use serde::de::DeserializeOwned;

/// Generated bindings of world `layer-policy-plugin`; used by [`layer_policy!`](crate::layer_policy!).
#[doc(hidden)]
pub use dusflow_sdk_bindings_layer_policy as bindings;

pub use bindings::exports::dus::plugin::layer_policy::{
    LayerPlan, LayerSource, ModelConfig, TensorTransform, Transform,
};

/// Shorthands for building a [`LayerSource`].
pub trait LayerSourceExt: Sized {
    /// Layer `layer` of input model `model`, copied unchanged.
    fn copy(model: u32, layer: u32) -> Self;
    /// Adds a transform for the tensors whose name (relative to the layer) ends with `suffix`.
    fn with(self, suffix: &str, transform: Transform) -> Self;
}

impl LayerSourceExt for LayerSource {
    fn copy(model: u32, layer: u32) -> Self {
        LayerSource {
            model,
            layer,
            transforms: Vec::new(),
        }
    }

    fn with(mut self, suffix: &str, transform: Transform) -> Self {
        self.transforms.push(TensorTransform {
            tensor_suffix: suffix.to_string(),
            transform,
        });
        self
    }
}

/// A layer policy. Implement it, then call [`layer_policy!`](crate::layer_policy!) once.
pub trait LayerPolicy: 'static {
    /// The step's params, deserialised from JSON.
    type Params: DeserializeOwned;
    /// Plans the new model's layers from the input models (in the step's order).
    fn plan(models: &[ModelConfig], params: Self::Params) -> Result<LayerPlan, String>;
}

#[doc(hidden)]
pub fn __plan<P: LayerPolicy>(models: Vec<ModelConfig>, params: &str) -> Result<LayerPlan, String> {
    P::plan(&models, crate::params::parse_params(params)?)
}

/// Exports a [`LayerPolicy`] type as the plugin's component exports. Use once per plugin crate.
#[macro_export]
macro_rules! layer_policy {
    ($ty:ty) => {
        const _: () = {
            struct DusflowLayerPolicy;
            impl $crate::layer_policy::bindings::exports::dus::plugin::info::Guest for DusflowLayerPolicy {
                fn describe() -> $crate::layer_policy::bindings::exports::dus::plugin::info::PluginInfo {
                    $crate::layer_policy::bindings::exports::dus::plugin::info::PluginInfo {
                        name: env!("CARGO_PKG_NAME").into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        description: env!("CARGO_PKG_DESCRIPTION").into(),
                    }
                }
            }
            impl $crate::layer_policy::bindings::exports::dus::plugin::layer_policy::Guest for DusflowLayerPolicy {
                fn plan(
                    models: ::std::vec::Vec<$crate::layer_policy::ModelConfig>,
                    params: ::std::string::String,
                ) -> ::core::result::Result<$crate::layer_policy::LayerPlan, ::std::string::String> {
                    $crate::layer_policy::__plan::<$ty>(models, &params)
                }
            }
            $crate::layer_policy::bindings::export_world!(DusflowLayerPolicy with_types_in $crate::layer_policy::bindings);
        };
    };
}
