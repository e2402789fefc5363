//! The language-model loss straight from the final hidden states: `−Σᵢ wᵢ log softmax(hᵢ Wᵀ)[tᵢ]` computed a
//! chunk of rows at a time, in the forward and again in the backward, so the f32 logits of the whole batch
//! (4096 × 32000 × 4 bytes = 0.5 GB per sequence at the paper's size, and their gradient) never exist at
//! once. The projection runs in the compute dtype and the softmax in f32, as the composed head + loss do.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

/// Logit elements per chunk: 16 Mi f32 values = 64 MB of logits and as much of their gradient.
const CHUNK_ELEMENTS: usize = 16 << 20;

/// `−Σᵢ wᵢ log p(tᵢ)` (f32 scalar) for `hidden` `(rows, hidden)` and the head's `weight` `(vocab, hidden)`,
/// both in the compute dtype, `targets` `(rows,)` u32 and `weights` `(rows,)` f32. Differentiable in `hidden`
/// and `weight`.
pub fn linear_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let vocab = weight.dim(0)?;
    linear_cross_entropy_sum_chunked(
        hidden,
        weight,
        targets,
        weights,
        (CHUNK_ELEMENTS / vocab.max(1)).max(1),
    )
}

/// As [`linear_cross_entropy_sum`] with `chunk` rows per chunk (tests use small ones).
pub(crate) fn linear_cross_entropy_sum_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    if targets.dims() != [rows] || weights.dims() != [rows] {
        candle_core::bail!(
            "cross-entropy: {rows} rows, targets {:?}, weights {:?}",
            targets.dims(),
            weights.dims()
        );
    }
    let problem = Problem {
        targets: targets.unsqueeze(1)?,
        weights: weights.to_dtype(DType::F32)?.unsqueeze(1)?,
        chunk: chunk.max(1),
    };
    let (h, w) = (hidden.detach(), weight.detach());
    let mut loss = Tensor::zeros((), DType::F32, hidden.device())?;
    for start in (0..rows).step_by(problem.chunk) {
        let n = problem.chunk.min(rows - start);
        let logits = h
            .narrow(0, start, n)?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?;
        let lse = log_sum_exp(&logits)?;
        let picked = logits.gather(&problem.targets.narrow(0, start, n)?, 1)?;
        let nll = ((lse - picked)? * problem.weights.narrow(0, start, n)?)?.sum_all()?;
        loss = (loss + nll)?;
    }
    if !(hidden.track_op() || weight.track_op()) {
        return Ok(loss);
    }
    hidden.apply_op2_arc(
        weight,
        Arc::new(Box::new(CrossEntropyNode {
            problem,
            loss: loss.clone(),
        })),
    )
}

/// `log Σ exp` over the last dimension, `(rows, 1)`.
fn log_sum_exp(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)
}

struct Problem {
    /// `(rows, 1)` u32.
    targets: Tensor,
    /// `(rows, 1)` f32.
    weights: Tensor,
    chunk: usize,
}

/// The loss as a graph node over `hidden` and `weight`: its forward hands back the loss computed above,
/// its backward recomputes each chunk's logits.
struct CrossEntropyNode {
    problem: Problem,
    loss: Tensor,
}

impl CrossEntropyNode {
    fn grads(&self, h: &Tensor, w: &Tensor, dloss: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = &self.problem;
        let rows = h.dim(0)?;
        let dtype = h.dtype();
        let dloss = dloss.to_dtype(DType::F32)?;
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..rows).step_by(p.chunk) {
            let n = p.chunk.min(rows - start);
            let hc = h.narrow(0, start, n)?;
            let logits = hc.matmul(&w.t()?)?.to_dtype(DType::F32)?;
            let probs = logits.broadcast_sub(&log_sum_exp(&logits)?)?.exp()?;
            let scale = p.weights.narrow(0, start, n)?.broadcast_mul(&dloss)?;
            // d(−w log softmax[t]) / d logits = w (softmax − onehot(t)).
            let dlogits = probs
                .broadcast_mul(&scale)?
                .scatter_add(&p.targets.narrow(0, start, n)?, &scale.neg()?, 1)?
                .to_dtype(dtype)?;
            dh.push(dlogits.matmul(w)?);
            let part = dlogits.t()?.matmul(&hc)?.to_dtype(DType::F32)?;
            dw = Some(match dw {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        let dw = match dw {
            Some(t) => t.to_dtype(w.dtype())?,
            None => w.zeros_like()?,
        };
        let dh = if dh.is_empty() {
            h.zeros_like()?
        } else {
            Tensor::cat(&dh, 0)?
        };
        Ok((dh, dw))
    }
}

impl CustomOp2 for CrossEntropyNode {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.loss.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.try_clone(layout)?, Shape::from(()))),
            _ => candle_core::bail!("cross-entropy: the loss is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.loss.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, Shape::from(()))),
            _ => candle_core::bail!("cross-entropy: the loss is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw) = self.grads(h, w, dloss)?;
        Ok((Some(dh), Some(dw)))
    }
}
