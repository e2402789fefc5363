//! The materialised attention, kept as the oracle of the fused op's tests: repeated keys and values per
//! query head, the whole `(batch, heads, seq, keys)` score tensor, an additive mask, softmax through
//! candle's differentiable ops, and the probabilities times the values. Slow and memory-hungry by design;
//! nothing but tests and checks call it.

use super::mask::{AttentionMask, HostMask};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

/// Value added to the scores of hidden keys: finite, so a row that hides every key stays finite.
const HIDDEN: f32 = f32::MIN;

/// Which keys each query sees, as an additive bias `(batch, 1, seq, keys)` (0 or a huge negative value)
/// and a `(batch, 1, seq, 1)` factor that is 0 for queries that see no key at all, 1 otherwise.
pub fn mask_bias(
    mask: &AttentionMask,
    batch: usize,
    seq: usize,
    keys: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    mask.check(batch, seq, keys, device)?;
    let host = |t: &Option<Tensor>, dtype| -> Result<Option<Tensor>> {
        Ok(match t {
            Some(t) => Some(t.to_device(&Device::Cpu)?.to_dtype(dtype)?.flatten_all()?),
            None => None,
        })
    };
    let key_mask: Option<Vec<u8>> = host(&mask.key_mask, DType::U8)?
        .map(|t| t.to_vec1())
        .transpose()?;
    let docs: Option<Vec<u32>> = host(&mask.document_ids, DType::U32)?
        .map(|t| t.to_vec1())
        .transpose()?;
    let view = HostMask {
        causal: mask.causal,
        window: mask.sliding_window,
        offset: mask.query_offset,
        keys,
        key_mask: key_mask.as_deref(),
        docs: docs.as_deref(),
    };
    let mut bias = vec![HIDDEN; batch * seq * keys];
    let mut any = vec![0f32; batch * seq];
    for b in 0..batch {
        for i in 0..seq {
            for j in 0..keys {
                if view.visible(b, i, j) {
                    bias[(b * seq + i) * keys + j] = 0.0;
                    any[b * seq + i] = 1.0;
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(bias, (batch, 1, seq, keys), device)?,
        Tensor::from_vec(any, (batch, 1, seq, 1), device)?,
    ))
}

/// `softmax(scale · q·kᵀ + mask)·v` computed the obvious way (same shapes and semantics as
/// [`super::attention`]: queries that see no key give zeros). Scores are computed in f32 for half-precision
/// inputs, in the input's dtype otherwise; differentiable through candle's autograd.
pub fn attention_materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, nh, hd) = q.dims4()?;
    let (_, t, nkv, _) = k.dims4()?;
    ensure!(nh % nkv == 0, "heads not a multiple of KV heads");
    let rep = nh / nkv;
    let work = match q.dtype() {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    };
    let per_head = |x: &Tensor| -> Result<Tensor> {
        // (b, t, nkv, hd) -> (b, nh, t, hd), each KV head repeated for its group.
        Ok(x.to_dtype(work)?
            .transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((b, nkv, rep, t, hd))?
            .reshape((b, nh, t, hd))?)
    };
    let (kh, vh) = (per_head(k)?, per_head(v)?);
    let qh = q.to_dtype(work)?.transpose(1, 2)?.contiguous()?;
    let scores = (qh.matmul(&kh.t()?)? * scale)?;
    let (bias, any) = mask_bias(mask, b, s, t, q.device())?;
    let scores = scores.broadcast_add(&bias.to_dtype(work)?)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.broadcast_mul(&any.to_dtype(work)?)?;
    Ok(probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .to_dtype(q.dtype())?
        .contiguous()?)
}
