//! The CUDA side of the fused attention: the Triton kernels of `host/model/kernels/attention/`, compiled
//! ahead of time to PTX by its `generate.py` and embedded here, loaded once per device through candle's
//! module cache and launched on candle's stream. The kernels take every pointer 16-byte aligned and every
//! stride a multiple of 16 elements ([`kernel_inputs`] pads or copies inputs that are not).

use super::cpu::Problem;
use super::mask::AttentionMask;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, StorageRef, Tensor};
use half::{bf16, f16};

/// One compiled kernel variant (see `kernels/attention/ptx/manifest.json`).
struct TritonKernel {
    /// Triton function name (`attn_fwd`, `attn_bwd_delta`, `attn_bwd_dkdv`, `attn_bwd_dq`).
    kernel: &'static str,
    /// The PTX entry point.
    entry: &'static str,
    dtype: &'static str,
    block_d: usize,
    block_m: usize,
    block_n: usize,
    num_warps: usize,
    /// Dynamic shared memory in bytes.
    shared: usize,
    /// User arguments (Triton appends two scratch pointers).
    args: usize,
    ptx: &'static str,
}

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/kernels/attention/ptx/kernels.rs"
));

/// The widest head dimension the kernels handle.
const MAX_HEAD_DIM: usize = 128;

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        d => candle_core::bail!("attention on CUDA: unsupported dtype {d:?} (f32, bf16, f16)"),
    })
}

fn find(kernel: &str, dtype: DType, head_dim: usize) -> Result<&'static TritonKernel> {
    let name = dtype_name(dtype)?;
    KERNELS
        .iter()
        .filter(|k| k.kernel == kernel && k.dtype == name && k.block_d >= head_dim)
        .min_by_key(|k| k.block_d)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "attention on CUDA: head_dim {head_dim} is above the kernels' {MAX_HEAD_DIM}"
            ))
        })
}

/// Queries, keys and values as the kernels take them, and the head dimension to cut the output back to:
/// the head dimension padded with zeros to a multiple of 16 (zeros change no dot product), and a
/// contiguous copy of any tensor whose strides or offset break the 16-element alignment.
pub(super) fn kernel_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> anyhow::Result<(Tensor, Tensor, Tensor, usize)> {
    let hd = q.dim(3)?;
    anyhow::ensure!(
        hd <= MAX_HEAD_DIM,
        "attention on CUDA: head_dim {hd} is above the kernels' {MAX_HEAD_DIM}"
    );
    dtype_name(q.dtype())?;
    let padded = hd.div_ceil(16) * 16;
    let prepare = |x: &Tensor| -> anyhow::Result<Tensor> {
        let x = if padded != hd {
            x.pad_with_zeros(3, 0, padded - hd)?
        } else {
            x.clone()
        };
        let l = x.layout();
        let aligned = l.stride()[3] == 1
            && l.stride()[..3].iter().all(|s| s % 16 == 0)
            && (l.start_offset() * x.dtype().size_in_bytes()) % 16 == 0;
        let fits = l
            .stride()
            .iter()
            .zip(l.dims())
            .all(|(s, d)| s * d < i32::MAX as usize);
        anyhow::ensure!(
            fits,
            "attention on CUDA: tensor too large for 32-bit indexing"
        );
        Ok(if aligned { x } else { x.contiguous()? })
    };
    Ok((prepare(q)?, prepare(k)?, prepare(v)?, hd))
}

/// A device view of a storage from `offset` (elements).
fn view<'a, T: CudaDType>(s: &'a CudaStorage, offset: usize) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(offset..))
}

/// The mask's arrays (or a stand-in pointer when absent) and its flags.
struct MaskArgs {
    key_mask: Option<Tensor>,
    docs: Option<Tensor>,
    offset: i32,
    causal: i32,
    window: i32,
    has_key_mask: i32,
    has_docs: i32,
}

impl MaskArgs {
    fn of(mask: &AttentionMask) -> Result<Self> {
        // The kernels index the arrays from their first element.
        let at_zero = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) if t.layout().start_offset() != 0 || !t.is_contiguous() => Some(t.copy()?),
                other => other.clone(),
            })
        };
        Ok(MaskArgs {
            key_mask: at_zero(&mask.key_mask)?,
            docs: at_zero(&mask.document_ids)?,
            offset: mask.query_offset as i32,
            causal: mask.causal as i32,
            window: mask.sliding_window.unwrap_or(0) as i32,
            has_key_mask: mask.key_mask.is_some() as i32,
            has_docs: mask.document_ids.is_some() as i32,
        })
    }
}

/// Loads (once per device) and returns the kernel, with its shared-memory limit raised when it needs
/// more than the default 48 KiB.
fn load(dev: &CudaDevice, k: &TritonKernel) -> Result<CudaFunction> {
    let module = format!("dusflow_{}_{}_d{}", k.kernel, k.dtype, k.block_d);
    let func = dev
        .get_or_load_custom_func(k.entry, &module, k.ptx)?
        .into_cuda_function();
    if k.shared > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            k.shared as i32,
        )
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    }
    Ok(func)
}

fn launch_config(k: &TritonKernel, grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (k.num_warps as u32 * 32, 1, 1),
        shared_mem_bytes: k.shared as u32,
    }
}

/// The strides (batch, position, head) of a 4-d layout, as the kernels' i32 arguments.
fn strides(l: &Layout) -> [i32; 3] {
    let s = l.stride();
    [s[0] as i32, s[1] as i32, s[2] as i32]
}

fn cuda_storage(t: &Tensor) -> Result<(StorageRef<'_>, &Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        candle_core::bail!("attention: tensors on different devices");
    }
    Ok((s, l))
}

fn as_cuda(s: &Storage) -> &CudaStorage {
    match s {
        Storage::Cuda(c) => c,
        _ => unreachable!("checked by cuda_storage"),
    }
}

fn tensor<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The forward: the output storage and the log-sum-exps `(batch, heads, seq)` f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    p: &Problem,
    mask: &AttentionMask,
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
) -> Result<(CudaStorage, Tensor)> {
    match q.dtype() {
        DType::BF16 => forward_typed::<bf16>(p, mask, q, lq, k, lk, v, lv),
        DType::F16 => forward_typed::<f16>(p, mask, q, lq, k, lk, v, lv),
        DType::F32 => forward_typed::<f32>(p, mask, q, lq, k, lk, v, lv),
        d => candle_core::bail!("attention on CUDA: unsupported dtype {d:?} (f32, bf16, f16)"),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    p: &Problem,
    mask: &AttentionMask,
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
) -> Result<(CudaStorage, Tensor)> {
    let dev = q.device().clone();
    let stream = dev.cuda_stream();
    let kern = find("attn_fwd", q.dtype(), p.head_dim)?;
    let func = load(&dev, kern)?;
    let m = MaskArgs::of(mask)?;
    let mut out = dev.alloc_zeros::<T>(p.batch * p.seq * p.heads * p.head_dim)?;
    let mut lse = dev.alloc_zeros::<f32>(p.batch * p.heads * p.seq)?;
    let (qv, kv, vv) = (
        view::<T>(q, lq.start_offset())?,
        view::<T>(k, lk.start_offset())?,
        view::<T>(v, lv.start_offset())?,
    );
    let km_guard = m.key_mask.as_ref().map(|t| t.storage_and_layout());
    let dc_guard = m.docs.as_ref().map(|t| t.storage_and_layout());
    // Absent arrays: a small zeroed stand-in (the kernels read neither when its flag is 0).
    let (km_none, dc_none) = (dev.alloc_zeros::<u8>(16)?, dev.alloc_zeros::<u32>(4)?);
    let km = match &km_guard {
        Some((s, _)) => view::<u8>(as_cuda(s), 0)?,
        None => km_none.slice(0..),
    };
    let dc = match &dc_guard {
        Some((s, _)) => view::<u32>(as_cuda(s), 0)?,
        None => dc_none.slice(0..),
    };
    let ints = [
        p.seq as i32,
        p.keys as i32,
        p.heads as i32,
        (p.heads / p.kv_heads) as i32,
        p.head_dim as i32,
        m.offset,
        m.causal,
        m.window,
        m.has_key_mask,
        m.has_docs,
    ];
    let (sq, sk, sv) = (strides(lq), strides(lk), strides(lv));
    let scale = p.scale as f32;
    let scratch = 0u64;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&mut out).arg(&mut lse);
    b.arg(&km).arg(&dc);
    for s in sq.iter().chain(&sk).chain(&sv) {
        b.arg(s);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&scale).arg(&scratch).arg(&scratch);
    debug_assert_eq!(kern.args, 27);
    // SAFETY: the arguments match the kernel's signature (kernels.rs, generated with the PTX), every
    // pointer covers the elements the kernel addresses (from the layouts checked by `kernel_inputs`).
    unsafe {
        b.launch(launch_config(
            kern,
            (p.seq.div_ceil(kern.block_m), p.batch * p.heads),
        ))
    }
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    drop(b);
    let lse = tensor(lse, &dev, &[p.batch, p.heads, p.seq]);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), lse))
}

/// The gradients `(dq, dk, dv)`, contiguous.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    p: &Problem,
    mask: &AttentionMask,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d_o = d_o.contiguous()?;
    let o = o.contiguous()?;
    match q.dtype() {
        DType::BF16 => backward_typed::<bf16>(p, mask, q, k, v, &o, &d_o, lse),
        DType::F16 => backward_typed::<f16>(p, mask, q, k, v, &o, &d_o, lse),
        DType::F32 => backward_typed::<f32>(p, mask, q, k, v, &o, &d_o, lse),
        d => candle_core::bail!("attention on CUDA: unsupported dtype {d:?} (f32, bf16, f16)"),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    p: &Problem,
    mask: &AttentionMask,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = MaskArgs::of(mask)?;
    let (sq, lq) = cuda_storage(q)?;
    let (sk, lk) = cuda_storage(k)?;
    let (sv, lv) = cuda_storage(v)?;
    let (so, lo) = cuda_storage(o)?;
    let (sd, ld) = cuda_storage(d_o)?;
    let (sl, ll) = cuda_storage(lse)?;
    let (sq, sk, sv, so, sd, sl) = (
        as_cuda(&sq),
        as_cuda(&sk),
        as_cuda(&sv),
        as_cuda(&so),
        as_cuda(&sd),
        as_cuda(&sl),
    );
    let dev = sq.device().clone();
    let stream = dev.cuda_stream();
    let (qv, kv, vv, ov, dov) = (
        view::<T>(sq, lq.start_offset())?,
        view::<T>(sk, lk.start_offset())?,
        view::<T>(sv, lv.start_offset())?,
        view::<T>(so, lo.start_offset())?,
        view::<T>(sd, ld.start_offset())?,
    );
    let lsev = view::<f32>(sl, ll.start_offset())?;
    let km_guard = m.key_mask.as_ref().map(|t| t.storage_and_layout());
    let dc_guard = m.docs.as_ref().map(|t| t.storage_and_layout());
    // Absent arrays: a small zeroed stand-in (the kernels read neither when its flag is 0).
    let (km_none, dc_none) = (dev.alloc_zeros::<u8>(16)?, dev.alloc_zeros::<u32>(4)?);
    let km = match &km_guard {
        Some((s, _)) => view::<u8>(as_cuda(s), 0)?,
        None => km_none.slice(0..),
    };
    let dc = match &dc_guard {
        Some((s, _)) => view::<u32>(as_cuda(s), 0)?,
        None => dc_none.slice(0..),
    };
    let ints = [
        p.seq as i32,
        p.keys as i32,
        p.heads as i32,
        (p.heads / p.kv_heads) as i32,
        p.head_dim as i32,
        m.offset,
        m.causal,
        m.window,
        m.has_key_mask,
        m.has_docs,
    ];
    let all_strides = [strides(lq), strides(lk), strides(lv)];
    let scale = p.scale as f32;
    let scratch = 0u64;
    let cuda_err = |e| candle_core::Error::Cuda(Box::new(e));

    // D = rowsum(dO ⊙ O).
    let mut delta = dev.alloc_zeros::<f32>(p.batch * p.heads * p.seq)?;
    let kern = find("attn_bwd_delta", q.dtype(), p.head_dim)?;
    let func = load(&dev, kern)?;
    let (seq, heads, hd) = (p.seq as i32, p.heads as i32, p.head_dim as i32);
    let mut b = stream.launch_builder(&func);
    b.arg(&ov).arg(&dov).arg(&mut delta);
    b.arg(&seq).arg(&heads).arg(&hd).arg(&scratch).arg(&scratch);
    // SAFETY: as in `forward_typed`; O and dO are contiguous (batch, seq, heads, head_dim).
    unsafe {
        b.launch(launch_config(
            kern,
            (p.seq.div_ceil(kern.block_m), p.batch * p.heads),
        ))
    }
    .map_err(cuda_err)?;
    drop(b);

    // dK, dV: one program per key tile and KV head, summing over the group's query heads.
    let mut dk = dev.alloc_zeros::<T>(p.batch * p.keys * p.kv_heads * p.head_dim)?;
    let mut dv = dev.alloc_zeros::<T>(p.batch * p.keys * p.kv_heads * p.head_dim)?;
    let kern = find("attn_bwd_dkdv", q.dtype(), p.head_dim)?;
    let func = load(&dev, kern)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv)
        .arg(&kv)
        .arg(&vv)
        .arg(&dov)
        .arg(&lsev)
        .arg(&delta);
    b.arg(&mut dk).arg(&mut dv).arg(&km).arg(&dc);
    for s in all_strides.iter().flatten() {
        b.arg(s);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&scale).arg(&scratch).arg(&scratch);
    // SAFETY: as in `forward_typed`.
    unsafe {
        b.launch(launch_config(
            kern,
            (p.keys.div_ceil(kern.block_n), p.batch * p.kv_heads),
        ))
    }
    .map_err(cuda_err)?;
    drop(b);

    // dQ: one program per query tile and head.
    let mut dq = dev.alloc_zeros::<T>(p.batch * p.seq * p.heads * p.head_dim)?;
    let kern = find("attn_bwd_dq", q.dtype(), p.head_dim)?;
    let func = load(&dev, kern)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv)
        .arg(&kv)
        .arg(&vv)
        .arg(&dov)
        .arg(&lsev)
        .arg(&delta);
    b.arg(&mut dq).arg(&km).arg(&dc);
    for s in all_strides.iter().flatten() {
        b.arg(s);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&scale).arg(&scratch).arg(&scratch);
    // SAFETY: as in `forward_typed`.
    unsafe {
        b.launch(launch_config(
            kern,
            (p.seq.div_ceil(kern.block_m), p.batch * p.heads),
        ))
    }
    .map_err(cuda_err)?;
    drop(b);

    Ok((
        tensor(dq, &dev, &[p.batch, p.seq, p.heads, p.head_dim]),
        tensor(dk, &dev, &[p.batch, p.keys, p.kv_heads, p.head_dim]),
        tensor(dv, &dev, &[p.batch, p.keys, p.kv_heads, p.head_dim]),
    ))
}
