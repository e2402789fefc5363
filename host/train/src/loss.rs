//! The causal language-modelling loss as a sum over weighted targets, so that gradient accumulation can
//! divide by the token count of the whole optimizer step.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// `-Σ w_i · log p(target_i)` over all positions, for logits `(batch, seq, vocab)` and flattened `targets`
/// (u32) and `weights` (f32) of length `batch·seq`. Computed in f32.
pub fn weighted_nll_sum(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let logits = logits.reshape((b * s, v))?.to_dtype(DType::F32)?;
    let logp = log_softmax(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((picked * weights)?.sum_all()?.neg()?)
}

/// Log-softmax over the last dimension; the max is detached (it cancels out of the gradient).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
