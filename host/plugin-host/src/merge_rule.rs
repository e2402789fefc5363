//! Typed handle of a `merge-rule` plugin, for the `merge` step.

use super::bindings::v0_1_0::merge_rule as wit;
use super::host::{Job, Plugin};
use super::types::{DType, MergePlan, PluginKind, TensorInfo};
use anyhow::{bail, Result};
use wasmtime::component::{ComponentExportIndex, WasmList};
use wit::exports::dus::plugin::merge_rule as api;

/// Elements per `merge-chunk` call: large enough to amortise the call, small enough that the
/// inputs, output and the guest's f32 copies stay far below the memory limit.
pub const DEFAULT_CHUNK_ELEMENTS: usize = 1 << 18;

/// One merge job: a fresh sandboxed instance, configured once, then asked per tensor.
pub struct MergeRulePlugin {
    job: Job,
    bindings: wit::MergeRulePlugin,
    merge_chunk: ComponentExportIndex,
    chunk_elements: usize,
}

impl Plugin {
    /// Starts a merge job: instantiates the plugin and calls `configure(params_json)`.
    pub fn merge_rule(&self, params_json: &str) -> Result<MergeRulePlugin> {
        self.expect_kind(PluginKind::MergeRule)?;
        let merge_chunk = self.export_index("merge-rule", "merge-chunk")?;
        let mut job = Job::start(self)?;
        let bindings = wit::MergeRulePlugin::new(&mut job.sandbox.store, &job.instance)?;
        job.call("merge-rule.configure", async |store, _| {
            bindings
                .dus_plugin_merge_rule()
                .call_configure(store, params_json)
                .await
        })?;
        // Per element the guest holds each input, its f32 copy, the output and its f32 copy: keep
        // a chunk well under a quarter of the memory limit.
        let budget = (self.limits().memory_mb as usize).saturating_mul(1 << 20) / 4;
        let chunk_elements = DEFAULT_CHUNK_ELEMENTS.min((budget / 64).max(1024));
        Ok(MergeRulePlugin {
            job,
            bindings,
            merge_chunk,
            chunk_elements,
        })
    }
}

fn to_wit(t: &TensorInfo) -> api::TensorInfo {
    api::TensorInfo {
        name: t.name.clone(),
        shape: t.shape.clone(),
        dtype: match t.dtype {
            DType::F32 => api::Dtype::Float32,
            DType::F16 => api::Dtype::Float16,
            DType::BF16 => api::Dtype::Bfloat16,
        },
        layer: t.layer,
        num_layers: t.num_layers,
        stats: t
            .stats
            .iter()
            .map(|s| api::TensorStats {
                l2_norm: s.l2_norm,
                mean: s.mean,
                std: s.std,
                abs_max: s.abs_max,
            })
            .collect(),
    }
}

impl MergeRulePlugin {
    /// Asks the plugin how to merge `tensor`; the plan is validated against the number of
    /// inputs (`tensor.stats.len()`).
    pub fn plan_tensor(&mut self, tensor: &TensorInfo) -> Result<MergePlan> {
        const FUNCTION: &str = "merge-rule.plan-tensor";
        let info = to_wit(tensor);
        let bindings = &self.bindings;
        let plan = self.job.call(FUNCTION, async |store, _| {
            bindings
                .dus_plugin_merge_rule()
                .call_plan_tensor(store, &info)
                .await
        })?;
        let plan = match plan {
            api::MergePlan::Linear(c) => MergePlan::Linear(c),
            api::MergePlan::Slerp(t) => MergePlan::Slerp(t),
            api::MergePlan::CopyFrom(i) => MergePlan::CopyFrom(i as usize),
            api::MergePlan::Custom => MergePlan::Custom,
        };
        plan.validate(tensor.stats.len()).map_err(|e| {
            self.job
                .malformed(FUNCTION, format!("plan for {}: {e}", tensor.name))
        })?;
        Ok(plan)
    }

    /// Runs the plugin's element-wise function on one chunk: `inputs` are the same elements
    /// (raw little-endian bytes of `tensor.dtype`) of every input model, starting at element
    /// `offset`; the merged bytes are written to `out` (same length as each input).
    pub fn merge_chunk(
        &mut self,
        tensor: &TensorInfo,
        offset: u64,
        inputs: &[&[u8]],
        out: &mut [u8],
    ) -> Result<()> {
        const FUNCTION: &str = "merge-rule.merge-chunk";
        if inputs.iter().any(|x| x.len() != out.len())
            || !out.len().is_multiple_of(tensor.dtype.size())
        {
            bail!("merge_chunk of {}: every input must have the output's length, a multiple of the dtype", tensor.name);
        }
        let info = to_wit(tensor);
        let index = self.merge_chunk;
        // Called through a typed function rather than the generated binding so the inputs are
        // lowered straight from the borrowed slices and the result is copied straight out of
        // guest memory, with no intermediate Vecs.
        let mut wrong_len = None;
        self.job.call(FUNCTION, async |store, instance| {
            let f = instance
                .get_typed_func::<(&api::TensorInfo, u64, &[&[u8]]), (Result<WasmList<u8>, String>,)>(
                    &mut *store,
                    &index,
                )?;
            let (result,) = f.call_async(&mut *store, (&info, offset, inputs)).await?;
            Ok(result.map(|list| {
                let bytes = list.as_le_slice(&*store);
                if bytes.len() == out.len() {
                    out.copy_from_slice(bytes);
                } else {
                    wrong_len = Some(bytes.len());
                }
            }))
        })?;
        if let Some(len) = wrong_len {
            return Err(self.job.malformed(
                FUNCTION,
                format!("{len} bytes returned for a {}-byte chunk", out.len()),
            ));
        }
        Ok(())
    }

    /// Elements per `merge-chunk` call used by [`merge_custom`](Self::merge_custom).
    pub fn chunk_elements(&self) -> usize {
        self.chunk_elements
    }

    /// Sets the elements per `merge-chunk` call (at least 1).
    pub fn set_chunk_elements(&mut self, elements: usize) {
        self.chunk_elements = elements.max(1);
    }

    /// Streams a whole tensor planned [`MergePlan::Custom`] through [`merge_chunk`](Self::merge_chunk)
    /// in chunks of at most [`DEFAULT_CHUNK_ELEMENTS`] elements (fewer under a small memory limit).
    pub fn merge_custom(
        &mut self,
        tensor: &TensorInfo,
        inputs: &[&[u8]],
        out: &mut [u8],
    ) -> Result<()> {
        if inputs.iter().any(|x| x.len() != out.len()) {
            bail!(
                "merge_custom of {}: every input must have the output's length",
                tensor.name
            );
        }
        let size = tensor.dtype.size();
        let chunk_bytes = self.chunk_elements * size;
        let mut offset = 0;
        while offset < out.len() {
            let end = (offset + chunk_bytes).min(out.len());
            let chunk: Vec<&[u8]> = inputs.iter().map(|x| &x[offset..end]).collect();
            self.merge_chunk(
                tensor,
                (offset / size) as u64,
                &chunk,
                &mut out[offset..end],
            )?;
            offset = end;
        }
        Ok(())
    }
}
