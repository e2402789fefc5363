//! Fused training ops: RMSNorm, SwiGLU and RoPE as one graph node each (forward and backward in one pass
//! over their data instead of 6-10 composed ops and their intermediate tensors), and a cross-entropy over the
//! vocabulary that never holds the logits of the whole batch.
//!
//! Each op computes exactly what the composed candle ops of the model compute in the forward — the same
//! roundings in the same order for bf16/f16, so a fused forward is bit-identical to the composed one — and
//! its backward in f32 with one rounding at the end (the composed backward rounds after every op). The
//! composed forms stay as the test oracle (`tests.rs`) and as the path on devices the fused kernels do
//! not cover yet (see [`fused_on`]).

mod cpu;
mod cross_entropy;
#[cfg(test)]
mod tests;

pub use cross_entropy::linear_cross_entropy_sum;

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};

/// Whether the fused ops run for tensors of `dtype` on `device` (the CPU, f32/bf16/f16); elsewhere the model
/// uses the composed ops. `DUS_FUSED_OPS=0` in the environment turns them off, for side-by-side timing.
pub fn fused_on(device: &Device, dtype: DType) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("DUS_FUSED_OPS").map_or(true, |v| v != "0"));
    enabled && device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// RMSNorm as transformers computes it, `w · (x / √(mean(x²) + eps))` with the normalisation in f32 and
/// cast back to `x`'s dtype before the scale, over the last dimension of `x`. One node; its backward gives
/// `x`'s and `w`'s gradients in one pass.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// `silu(gate) · up` (SwiGLU's gating), one node.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Rotary position embedding (transformers' `rotate_half` form) of `x` `(batch, seq, heads, head_dim)` with
/// `cos`, `sin` `(batch or 1, seq, head_dim / 2)`, one node (the tables get no gradient).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let tables = std::sync::Arc::new(RopeTables::new(x, cos, sin)?);
    x.contiguous()?.apply_op1(Rope {
        tables,
        inverse: false,
    })
}

/// A CPU tensor from a storage made here (no graph).
fn cpu_tensor(storage: CpuStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cpu(storage), shape, BackpropOp::none(), false)
}

/// Runs `$body` with `$t` bound to the element type of a CPU storage `$s` (f32, bf16 or f16).
macro_rules! with_float {
    ($s:expr, $op:expr, |$slice:ident: $t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($slice) => {
                type $t = f32;
                $body
            }
            CpuStorage::BF16($slice) => {
                type $t = half::bf16;
                $body
            }
            CpuStorage::F16($slice) => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!(
                "{}: unsupported dtype {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

/// The contiguous host slice of a CPU tensor's storage of element type `T` (borrowed, not copied).
fn host_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(c) => slice_of(c.as_slice::<T>()?, layout),
        _ => candle_core::bail!("fused op: expected a CPU tensor"),
    }
}

/// A two-input op's CPU backward: the inputs' gradients from the inputs and the output's gradient.
trait Backward2 {
    const NAME: &'static str;
    fn run<T: cpu::Float>(&self, a: &[T], b: &[T], dy: &[T]) -> (Vec<T>, Vec<T>);
}

/// Runs `k` on the contiguous storages of `a`, `b` and `dy`: the gradients as tensors of `a`'s and `b`'s shapes.
fn cpu_grads2<K: Backward2>(
    k: &K,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sd, ld) = dy.storage_and_layout();
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let (da, db) = k.run::<$t>(
                host_slice(&sa, la)?,
                host_slice(&sb, lb)?,
                host_slice(&sd, ld)?,
            );
            (CpuStorage::$variant(da), CpuStorage::$variant(db))
        }};
    }
    let (da, db) = match a.dtype() {
        DType::F32 => run!(f32, F32),
        DType::BF16 => run!(half::bf16, BF16),
        DType::F16 => run!(half::f16, F16),
        d => candle_core::bail!("{} backward: unsupported dtype {d:?}", K::NAME),
    };
    Ok((
        cpu_tensor(da, a.shape().clone()),
        cpu_tensor(db, b.shape().clone()),
    ))
}

/// The slice of `s` a contiguous layout `l` covers.
fn slice_of<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s[start..end]),
        None => candle_core::bail!("fused op: expected a contiguous tensor"),
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hidden = lw.shape().elem_count();
        if lx.dims().last() != Some(&hidden) {
            candle_core::bail!("rms_norm: weight of {hidden} for input {:?}", lx.shape());
        }
        with_float!(x, "rms_norm", |xs: T| {
            let ws = w.as_slice::<T>()?;
            let y = cpu::rms_norm_forward(slice_of(xs, lx)?, slice_of(ws, lw)?, self.eps);
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = cpu_grads2(self, x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl Backward2 for RmsNorm {
    const NAME: &'static str = "rms_norm";
    fn run<T: cpu::Float>(&self, x: &[T], w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        cpu::rms_norm_backward(x, w, dy, self.eps)
    }
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lg.shape() != lu.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?}", lg.shape(), lu.shape());
        }
        with_float!(g, "swiglu", |gs: T| {
            let us = u.as_slice::<T>()?;
            let y = cpu::swiglu_forward(slice_of(gs, lg)?, slice_of(us, lu)?);
            Ok((T::to_cpu_storage_owned(y), lg.shape().clone()))
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = cpu_grads2(self, g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

impl Backward2 for Swiglu {
    const NAME: &'static str = "swiglu";
    fn run<T: cpu::Float>(&self, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        cpu::swiglu_backward(g, u, dy)
    }
}

/// cos/sin tables on the host in f32 with the shape they rotate.
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// (batch, seq, heads, head_dim)
    dims: (usize, usize, usize, usize),
    /// Whether the tables are per batch row (else shared by all rows).
    per_row: bool,
}

impl RopeTables {
    fn new(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (b, s, h, d) = x.dims4()?;
        let half = d / 2;
        if d % 2 != 0 {
            candle_core::bail!("rope: odd head dimension {d}");
        }
        let (cb, cs, cd) = cos.dims3()?;
        if (cs, cd) != (s, half) || !(cb == b || cb == 1) || cos.dims() != sin.dims() {
            candle_core::bail!(
                "rope: tables {:?}/{:?} for input {:?}",
                cos.dims(),
                sin.dims(),
                x.dims()
            );
        }
        // The tables are cast to x's dtype by the model; values as stored.
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        Ok(RopeTables {
            cos: host(cos)?,
            sin: host(sin)?,
            dims: (b, s, h, d),
            per_row: cb == b && b > 1,
        })
    }
}

struct Rope {
    tables: std::sync::Arc<RopeTables>,
    /// The backward: rotation by −θ.
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        with_float!(x, "rope", |xs: T| {
            let y = cpu::rope::<T>(slice_of(xs, lx)?, &self.tables, self.inverse);
            Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
        })
    }

    /// A rotation's gradient is the inverse rotation of the output's gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            tables: self.tables.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}
