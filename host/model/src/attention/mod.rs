//! Fused attention: one candle op, forward and backward, that never materialises the `(seq, keys)` scores
//! (the FlashAttention-2 algorithm). Every forward of the model calls it: training, KV-cache inference,
//! log-likelihood scoring and generation.
//!
//! [`attention`] takes queries `(batch, seq, heads, head_dim)` and keys/values `(batch, keys, kv_heads,
//! head_dim)` in the layout the projections produce (any strides with a contiguous last dimension, e.g. a
//! view into a KV cache), `heads` a multiple of `kv_heads` (grouped-query attention reads each KV head once
//! for its whole group). Scores accumulate in f32 (f64 for f64 inputs) whatever the input dtype. The
//! forward keeps only each query's log-sum-exp for the backward, which recomputes the probabilities tile
//! by tile. The [`AttentionMask`] kinds — causal, sliding window, a query offset into cached keys, a key
//! (padding) mask and packed documents — are applied inside the tiles; whole tiles they hide are skipped.
//! A query that sees no key at all (a padding row) gets a zero output and zero gradients.
//!
//! CPU: [`cpu`] (rayon tasks over tiles). CUDA (feature `cuda`): kernels written in Triton, compiled ahead
//! of time to PTX (`host/model/kernels/attention/`), launched through candle's CUDA device. The
//! materialised computation, [`reference::attention_materialised`], is kept as the tests' oracle.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod mask;
pub mod reference;
#[cfg(test)]
mod tests;

pub use mask::AttentionMask;

use anyhow::{ensure, Context};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use cpu::{Element, Problem, Strided};
use mask::HostMask;
use std::sync::Mutex;

/// Scaled dot-product attention `softmax(scale · q·kᵀ + mask)·v`, fused (see the module docs).
///
/// `q`: `(batch, seq, heads, head_dim)`; `k`, `v`: `(batch, keys, kv_heads, head_dim)`; returns
/// `(batch, seq, heads, head_dim)`, contiguous, in the inputs' dtype. Differentiable in `q`, `k` and `v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> anyhow::Result<Tensor> {
    let (b, s, nh, hd) = q
        .dims4()
        .context("attention: queries must be (batch, seq, heads, head_dim)")?;
    let (kb, t, nkv, khd) = k
        .dims4()
        .context("attention: keys must be (batch, keys, kv_heads, head_dim)")?;
    ensure!(
        v.dims() == k.dims(),
        "attention: values {:?} and keys {:?} differ in shape",
        v.dims(),
        k.dims()
    );
    ensure!(
        kb == b && khd == hd,
        "attention: keys {:?} do not match queries {:?}",
        k.dims(),
        q.dims()
    );
    ensure!(
        nkv > 0 && nh % nkv == 0,
        "attention: {nh} query heads are not a multiple of {nkv} KV heads"
    );
    ensure!(
        q.dtype() == k.dtype() && q.dtype() == v.dtype(),
        "attention: queries, keys and values must share a dtype ({:?}, {:?}, {:?})",
        q.dtype(),
        k.dtype(),
        v.dtype()
    );
    ensure!(
        matches!(
            q.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        ),
        "attention: unsupported dtype {:?}",
        q.dtype()
    );
    ensure!(
        q.device().same_device(k.device()) && q.device().same_device(v.device()),
        "attention: queries, keys and values must be on one device"
    );
    mask.check(b, s, t, q.device())?;
    let op = FusedAttention {
        mask: mask.contiguous()?,
        scale,
        lse: Mutex::new(None),
    };
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let (q, k, v, head_dim) = cuda::kernel_inputs(q, k, v)?;
        let out = q.apply_op3(&k, &v, op)?;
        return Ok(if out.dim(3)? == head_dim {
            out
        } else {
            out.narrow(3, 0, head_dim)?.contiguous()?
        });
    }
    Ok(unit_last_stride(q)?.apply_op3(&unit_last_stride(k)?, &unit_last_stride(v)?, op)?)
}

/// `x` itself when its last dimension is contiguous (what the kernels need), else a contiguous copy.
fn unit_last_stride(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.stride().last() == Some(&1) || x.dims().last() == Some(&1) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// The op recorded in the graph. It keeps the forward's log-sum-exps for its backward.
struct FusedAttention {
    mask: AttentionMask,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
}

/// Sizes of a call from the layouts of `q` and `k`.
fn problem(q: &Layout, k: &Layout, scale: f64) -> candle_core::Result<Problem> {
    let (batch, seq, heads, head_dim) = q.shape().dims4()?;
    let (_, keys, kv_heads, _) = k.shape().dims4()?;
    Ok(Problem {
        batch,
        seq,
        keys,
        heads,
        kv_heads,
        head_dim,
        scale,
    })
}

fn strided<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<Strided<'a, T>> {
    let st = layout.stride();
    if st.len() != 4 || (st[3] != 1 && layout.dims()[3] != 1) {
        candle_core::bail!("attention: the last dimension must be contiguous")
    }
    Ok(Strided {
        data,
        offset: layout.start_offset(),
        batch_stride: st[0],
        pos_stride: st[1],
        head_stride: st[2],
    })
}

/// The mask's per-key arrays on the host (the tensors are contiguous, see [`AttentionMask::contiguous`]).
struct HostArrays {
    key_mask: Option<Vec<u8>>,
    docs: Option<Vec<u32>>,
}

impl HostArrays {
    fn of(mask: &AttentionMask) -> candle_core::Result<Self> {
        Ok(HostArrays {
            key_mask: match &mask.key_mask {
                Some(t) => Some(t.flatten_all()?.to_vec1::<u8>()?),
                None => None,
            },
            docs: match &mask.document_ids {
                Some(t) => Some(t.flatten_all()?.to_vec1::<u32>()?),
                None => None,
            },
        })
    }

    fn view<'a>(&'a self, mask: &AttentionMask, keys: usize) -> HostMask<'a> {
        HostMask {
            causal: mask.causal,
            window: mask.sliding_window,
            offset: mask.query_offset,
            keys,
            key_mask: self.key_mask.as_deref(),
            docs: self.docs.as_deref(),
        }
    }
}

fn cpu_tensor(storage: CpuStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cpu(storage), shape, BackpropOp::none(), false)
}

impl FusedAttention {
    fn cpu_forward<T: Element + WithDType>(
        &self,
        q: &[T],
        lq: &Layout,
        k: &[T],
        lk: &Layout,
        v: &[T],
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)>
    where
        T::C: WithDType,
    {
        let p = problem(lq, lk, self.scale)?;
        let arrays = HostArrays::of(&self.mask)?;
        let (out, lse) = cpu::forward(
            &p,
            strided(q, lq)?,
            strided(k, lk)?,
            strided(v, lv)?,
            arrays.view(&self.mask, p.keys),
        );
        *self.lse.lock().expect("attention lse lock") = Some(cpu_tensor(
            T::C::to_cpu_storage_owned(lse),
            (p.batch, p.heads, p.seq),
        ));
        Ok((T::to_cpu_storage_owned(out), lq.shape().clone()))
    }

    /// The gradients on the CPU.
    fn cpu_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let p = problem(q.layout(), k.layout(), self.scale)?;
        let arrays = HostArrays::of(&self.mask)?;
        let mask = arrays.view(&self.mask, p.keys);
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (so, lo) = o.storage_and_layout();
        let (sd, ld) = d_o.storage_and_layout();
        let (sl, ll) = lse.storage_and_layout();
        macro_rules! run {
            ($t:ty, $variant:ident, $c:ty) => {{
                let (q_, k_, v_, o_, d_) = (
                    storage_slice::<$t>(&sq)?,
                    storage_slice::<$t>(&sk)?,
                    storage_slice::<$t>(&sv)?,
                    storage_slice::<$t>(&so)?,
                    storage_slice::<$t>(&sd)?,
                );
                let l_ = storage_slice::<$c>(&sl)?;
                let l_ = &l_[ll.start_offset()..ll.start_offset() + p.batch * p.heads * p.seq];
                let (dq, dk, dv) = cpu::backward::<$t>(
                    &p,
                    strided(q_, lq)?,
                    strided(k_, lk)?,
                    strided(v_, lv)?,
                    strided(o_, lo)?,
                    strided(d_, ld)?,
                    l_,
                    mask,
                );
                (
                    CpuStorage::$variant(dq),
                    CpuStorage::$variant(dk),
                    CpuStorage::$variant(dv),
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32, F32, f32),
            DType::F64 => run!(f64, F64, f64),
            DType::BF16 => run!(half::bf16, BF16, f32),
            DType::F16 => run!(half::f16, F16, f32),
            d => candle_core::bail!("attention: unsupported dtype {d:?}"),
        };
        Ok((
            cpu_tensor(dq, q.shape().clone()),
            cpu_tensor(dk, k.shape().clone()),
            cpu_tensor(dv, v.shape().clone()),
        ))
    }
}

/// The host slice of a CPU storage of element type `T`.
fn storage_slice<T: candle_core::WithDType>(s: &Storage) -> candle_core::Result<&[T]> {
    match s {
        Storage::Cpu(c) => c.as_slice::<T>(),
        _ => candle_core::bail!("attention backward: tensors on different devices"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use CpuStorage::{BF16, F16, F32, F64};
        match (s1, s2, s3) {
            (F32(q), F32(k), F32(v)) => self.cpu_forward(q, l1, k, l2, v, l3),
            (F64(q), F64(k), F64(v)) => self.cpu_forward(q, l1, k, l2, v, l3),
            (BF16(q), BF16(k), BF16(v)) => self.cpu_forward(q, l1, k, l2, v, l3),
            (F16(q), F16(k), F16(v)) => self.cpu_forward(q, l1, k, l2, v, l3),
            _ => candle_core::bail!("attention: unsupported dtype {:?}", s1.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = problem(l1, l2, self.scale)?;
        let (out, lse) = cuda::forward(&p, &self.mask, s1, l1, s2, l2, s3, l3)?;
        *self.lse.lock().expect("attention lse lock") = Some(lse);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .expect("attention lse lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("attention backward before forward".into()))?;
        let d_o = unit_last_stride(&d_o.to_dtype(o.dtype())?)?;
        let (dq, dk, dv) = if q.device().is_cpu() {
            self.cpu_backward(q, k, v, o, &d_o, &lse)?
        } else {
            #[cfg(feature = "cuda")]
            {
                let p = problem(q.layout(), k.layout(), self.scale)?;
                cuda::backward(&p, &self.mask, q, k, v, o, &d_o, &lse)?
            }
            #[cfg(not(feature = "cuda"))]
            candle_core::bail!("attention backward: no kernel for {:?}", q.device())
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
