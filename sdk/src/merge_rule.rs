//! Merge rules: decide per tensor how several models are merged.
//!
//! For each tensor the host asks [`MergeRule::plan`] and runs the answer natively (linear
//! combination, SLERP, copy), which is fast for any tensor size. A plan of
//! [`MergePlan::Custom`] streams the tensor through [`MergeRule::merge`] in chunks instead;
//! the SDK converts the chunks from and to the tensor's dtype, so `merge` always sees `f32`.
//!
//! ```no_run
//! use dusflow_sdk::merge_rule::{MergePlan, MergeRule, TensorInfo};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Params { t: f32 }
//!
//! /// SLERP for layer tensors, the element-wise maximum for everything else.
//! struct SlerpOrMax(Params);
//!
//! impl MergeRule for SlerpOrMax {
//!     type Params = Params;
//!
//!     fn new(params: Params) -> Result<Self, String> {
//!         Ok(Self(params))
//!     }
//!
//!     fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String> {
//!         Ok(match tensor.layer {
//!             Some(_) => MergePlan::Slerp(self.0.t),
//!             None => MergePlan::Custom,
//!         })
//!     }
//!
//!     fn merge(&self, _: &TensorInfo, _offset: u64, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), String> {
//!         for (i, o) in out.iter_mut().enumerate() {
//!             *o = inputs.iter().map(|x| x[i]).fold(f32::NEG_INFINITY, f32::max);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! dusflow_sdk::merge_rule!(SlerpOrMax);
//! ```

use half::{bf16, f16};
use serde::de::DeserializeOwned;
use std::cell::RefCell;

/// Generated bindings of world `merge-rule-plugin`; used by [`merge_rule!`](crate::merge_rule!).
#[doc(hidden)]
pub use dusflow_sdk_bindings_merge_rule as bindings;

pub use bindings::exports::dus::plugin::merge_rule::{Dtype, MergePlan, TensorInfo, TensorStats};

/// A merge rule. Implement it, then call [`merge_rule!`](crate::merge_rule!) once.
pub trait MergeRule: Sized + 'static {
    /// The step's params, deserialised from JSON.
    type Params: DeserializeOwned;
    /// Builds the rule for one job.
    fn new(params: Self::Params) -> Result<Self, String>;
    /// Chooses how `tensor` is merged.
    fn plan(&self, tensor: &TensorInfo) -> Result<MergePlan, String>;
    /// Merges one chunk of a tensor planned [`MergePlan::Custom`]: `inputs[m][i]` is element
    /// `offset + i` of model `m`; write the merged elements to `out` (same length).
    fn merge(
        &self,
        tensor: &TensorInfo,
        offset: u64,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), String> {
        let _ = (offset, inputs, out);
        Err(format!(
            "tensor {} was planned custom but this rule has no element-wise merge",
            tensor.name
        ))
    }
}

thread_local! {
    /// Decoded input chunks and the output chunk, reused across calls.
    static SCRATCH: RefCell<(Vec<Vec<f32>>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Float32 => 4,
        Dtype::Float16 | Dtype::Bfloat16 => 2,
    }
}

fn decode(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        Dtype::Float32 => {
            out.resize(bytes.len() / 4, 0.0);
            for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::Float16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::Bfloat16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let size = dtype_size(dtype);
    let mut out = vec![0u8; values.len() * size];
    let chunks = out.chunks_exact_mut(size).zip(values);
    match dtype {
        Dtype::Float32 => chunks.for_each(|(b, v)| b.copy_from_slice(&v.to_le_bytes())),
        Dtype::Float16 => {
            chunks.for_each(|(b, v)| b.copy_from_slice(&f16::from_f32(*v).to_le_bytes()))
        }
        Dtype::Bfloat16 => {
            chunks.for_each(|(b, v)| b.copy_from_slice(&bf16::from_f32(*v).to_le_bytes()))
        }
    }
    out
}

#[doc(hidden)]
pub fn __merge_chunk<R: MergeRule>(
    rule: &R,
    tensor: &TensorInfo,
    offset: u64,
    inputs: Vec<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let size = dtype_size(tensor.dtype);
    let len = inputs.first().map_or(0, Vec::len);
    if inputs.iter().any(|x| x.len() != len) || !len.is_multiple_of(size) {
        return Err(format!(
            "merge-chunk of {}: inputs must have equal lengths that are multiples of {size} bytes",
            tensor.name
        ));
    }
    if let Some(out) = merge_f32_in_place(rule, tensor, offset, &inputs) {
        return out;
    }
    SCRATCH.with(|scratch| {
        let (decoded, out) = &mut *scratch.borrow_mut();
        decoded.resize_with(inputs.len(), Vec::new);
        for (bytes, values) in inputs.iter().zip(decoded.iter_mut()) {
            decode(tensor.dtype, bytes, values);
        }
        out.clear();
        out.resize(len / size, 0.0);
        let views: Vec<&[f32]> = decoded.iter().map(Vec::as_slice).collect();
        rule.merge(tensor, offset, &views, out)?;
        Ok(encode(tensor.dtype, out))
    })
}

/// The zero-copy path for float32 on little-endian targets (wasm is): the input bytes are read as
/// `f32` where they are suitably aligned, and the output is written straight into the returned
/// buffer. `None` when a buffer is misaligned (then the caller copies).
fn merge_f32_in_place<R: MergeRule>(
    rule: &R,
    tensor: &TensorInfo,
    offset: u64,
    inputs: &[Vec<u8>],
) -> Option<Result<Vec<u8>, String>> {
    if !matches!(tensor.dtype, Dtype::Float32) || cfg!(target_endian = "big") {
        return None;
    }
    let mut views = Vec::with_capacity(inputs.len());
    for bytes in inputs {
        // SAFETY: every bit pattern is a valid f32, and on a little-endian target the bytes of a
        // little-endian f32 are its in-memory representation.
        let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
        if !head.is_empty() || !tail.is_empty() {
            return None;
        }
        views.push(values);
    }
    let len = inputs.first().map_or(0, Vec::len);
    let mut out = vec![0u8; len];
    // SAFETY: as above; writing f32 values writes their little-endian bytes.
    let (head, values, tail) = unsafe { out.align_to_mut::<f32>() };
    if !head.is_empty() || !tail.is_empty() {
        return None;
    }
    Some(rule.merge(tensor, offset, &views, values).map(|()| out))
}

/// Exports a [`MergeRule`] type as the plugin's component exports. Use once per plugin crate.
#[macro_export]
macro_rules! merge_rule {
    ($ty:ty) => {
        const _: () = {
            struct DusflowMergeRule;
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            fn with_rule<T>(
                f: impl FnOnce(&$ty) -> ::core::result::Result<T, ::std::string::String>,
            ) -> ::core::result::Result<T, ::std::string::String> {
                STATE.with(|state| match state.borrow().as_ref() {
                    ::core::option::Option::Some(rule) => f(rule),
                    ::core::option::Option::None => ::core::result::Result::Err("called before configure".into()),
                })
            }
            impl $crate::merge_rule::bindings::exports::dus::plugin::info::Guest for DusflowMergeRule {
                fn describe() -> $crate::merge_rule::bindings::exports::dus::plugin::info::PluginInfo {
                    $crate::merge_rule::bindings::exports::dus::plugin::info::PluginInfo {
                        name: env!("CARGO_PKG_NAME").into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        description: env!("CARGO_PKG_DESCRIPTION").into(),
                    }
                }
            }
            impl $crate::merge_rule::bindings::exports::dus::plugin::merge_rule::Guest for DusflowMergeRule {
                fn configure(params: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    let rule = <$ty as $crate::merge_rule::MergeRule>::new($crate::__private::parse_params(&params)?)?;
                    STATE.with(|state| *state.borrow_mut() = ::core::option::Option::Some(rule));
                    ::core::result::Result::Ok(())
                }
                fn plan_tensor(
                    tensor: $crate::merge_rule::TensorInfo,
                ) -> ::core::result::Result<$crate::merge_rule::MergePlan, ::std::string::String> {
                    with_rule(|rule| $crate::merge_rule::MergeRule::plan(rule, &tensor))
                }
                fn merge_chunk(
                    tensor: $crate::merge_rule::TensorInfo,
                    offset: u64,
                    inputs: ::std::vec::Vec<::std::vec::Vec<u8>>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    with_rule(|rule| $crate::merge_rule::__merge_chunk(rule, &tensor, offset, inputs))
                }
            }
            $crate::merge_rule::bindings::export_world!(DusflowMergeRule with_types_in $crate::merge_rule::bindings);
        };
    };
}
