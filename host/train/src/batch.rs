//! Micro-batch tensors from token rows: right-padded ids, next-token targets with per-token weights, and
//! for packed rows the document ids (the attention keeps documents apart) and restarting positions.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use dusflow_data::TrainSequence;
use dusflow_model::{document_ids, packed_position_ids, ForwardOptions};

/// One micro-batch ready for the model.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `(batch, seq)` u32 token ids, right-padded.
    pub input_ids: Tensor,
    /// `(batch·seq)` u32: the next token at each position (0 where there is none).
    pub targets: Tensor,
    /// `(batch·seq)` f32: 1 where the target counts in the loss, else 0.
    pub weights: Tensor,
    /// Positions and mask for packed rows.
    pub forward: ForwardOptions,
    /// Number of targets that count (non-zero weights).
    pub target_count: usize,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
}

/// Builds a micro-batch from `rows`, padding on the right with `pad` to the longest row. Right padding
/// needs no mask for causal rows (real tokens never attend to later pads); packed rows get document ids,
/// padding forming its own document.
pub fn build_micro_batch(rows: &[&TrainSequence], pad: u32, device: &Device) -> Result<MicroBatch> {
    ensure!(!rows.is_empty(), "empty micro-batch");
    let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    ensure!(seq >= 2, "rows need at least two tokens");
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * seq);
    let mut targets = Vec::with_capacity(b * seq);
    let mut weights = Vec::with_capacity(b * seq);
    let packed = rows.iter().any(|r| r.doc_ids.is_some());
    let mut docs = Vec::with_capacity(if packed { b } else { 0 });
    let (mut target_count, mut tokens) = (0, 0);
    for r in rows {
        let n = r.ids.len();
        tokens += n;
        ids.extend(&r.ids);
        ids.extend(std::iter::repeat_n(pad, seq - n));
        for i in 0..seq {
            let learn = i + 1 < n && r.learn[i + 1];
            targets.push(if i + 1 < n { r.ids[i + 1] } else { 0 });
            weights.push(if learn { 1.0f32 } else { 0.0 });
            target_count += learn as usize;
        }
        if packed {
            let mut d = r.doc_ids.clone().unwrap_or_else(|| vec![0; n]);
            d.extend(std::iter::repeat_n(u32::MAX, seq - n));
            docs.push(d);
        }
    }
    let forward = if packed {
        ForwardOptions {
            position_ids: Some(packed_position_ids(&docs, device)?),
            key_mask: None,
            document_ids: Some(document_ids(&docs, device)?),
        }
    } else {
        ForwardOptions::default()
    };
    Ok(MicroBatch {
        input_ids: Tensor::from_vec(ids, (b, seq), device)?,
        targets: Tensor::from_vec(targets, b * seq, device)?,
        weights: Tensor::from_vec(weights, b * seq, device)?,
        forward,
        target_count,
        tokens,
    })
}
