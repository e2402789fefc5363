//! The NCCL collective (the engine torch.distributed uses on NVIDIA GPUs), through cudarc's raw NCCL API
//! on the stream candle computes on, so collectives are ordered with the kernels around them.
//!
//! Rendezvous: rank 0 creates the 128-byte NCCL id and the hub broadcasts it (the ranks' TCP link stays
//! open as their liveness channel). Failure: every operation waits for its completion polling the stream
//! and NCCL's asynchronous error, bounded by the collective timeout; past it the communicator is aborted
//! and the operation fails. A group failed elsewhere (the hub says a rank died or aborted) ends this
//! process at once — as torch's NCCL watchdog tears down the process — since a rank blocked inside NCCL
//! cannot be interrupted safely otherwise; checkpoints are written atomically, so nothing is left half
//! written. `ncclCommInitRank` is bounded the same way: a rank whose peers never arrive exits after the
//! timeout.

use crate::train::distributed::TcpCollective;
use crate::train::Collective;
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{DType, Device, Layout, Tensor};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One rank's NCCL communicator.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    device: Device,
    rank: usize,
    world: usize,
    timeout: Duration,
    failed: Mutex<Option<String>>,
    /// Serialises operations (NCCL calls on one communicator must not interleave).
    busy: Mutex<()>,
}

// SAFETY: the communicator handle is only used under `busy` (operations) or in `Drop`; NCCL allows a
// communicator to be used from any thread as long as calls do not overlap.
unsafe impl Send for NcclCollective {}
// SAFETY: as above.
unsafe impl Sync for NcclCollective {}

/// The NCCL library's version, e.g. 22809 for 2.28.9.
pub fn nccl_version() -> Result<i32> {
    result::get_nccl_version().map_err(|e| anyhow::anyhow!("ncclGetVersion: {e:?}"))
}

impl NcclCollective {
    /// Creates rank `rank` of `world` on the GPU `device`: the NCCL id travels from rank 0 through the hub
    /// (`link`), then every rank initialises its communicator (bounded by `timeout`: see the module).
    pub fn join(
        link: &TcpCollective,
        rank: usize,
        world: usize,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            bail!("NCCL needs a GPU device");
        };
        let mut id = [0u8; 128];
        if rank == 0 {
            let unique =
                result::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            for (b, c) in id.iter_mut().zip(unique.internal.iter()) {
                *b = *c as u8;
            }
        }
        let shared = link.broadcast(&Tensor::new(&id[..], &Device::Cpu)?, 0)?;
        let shared: Vec<u8> = shared.to_vec1()?;
        ensure!(
            shared.len() == 128,
            "the NCCL id arrived with {} bytes",
            shared.len()
        );
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (c, b) in unique.internal.iter_mut().zip(&shared) {
            *c = *b as ::core::ffi::c_char;
        }
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread()?;
        let initialised = Arc::new(AtomicBool::new(false));
        let watch = initialised.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if watch.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !watch.load(Ordering::SeqCst) {
                eprintln!(
                    "error: rank {rank}: NCCL initialisation did not complete within {timeout:.0?} (a peer never joined); exiting"
                );
                std::process::exit(1);
            }
        });
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id is the group's.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world as i32, unique, rank as i32)
                .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
            comm.assume_init()
        };
        initialised.store(true, Ordering::SeqCst);
        Ok(NcclCollective {
            comm,
            stream,
            device: device.clone(),
            rank,
            world,
            timeout,
            failed: Mutex::new(None),
            busy: Mutex::new(()),
        })
    }

    /// The group failed elsewhere: report and end this process (see the module).
    pub fn abort_from_outside(&self, reason: &str) {
        eprintln!("error: rank {}: collective aborted: {reason}", self.rank);
        std::process::exit(1);
    }

    fn run(&self, op: NcclOp, x: &Tensor) -> Result<Tensor> {
        if let Some(reason) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            bail!("collective aborted: {reason}");
        }
        ensure!(
            x.device().same_device(&self.device),
            "NCCL: a tensor on {:?}, not this rank's GPU",
            x.device()
        );
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let x = x.flatten_all()?.contiguous()?;
        let n = x.elem_count();
        let out_len = match op {
            NcclOp::AllReduceSum | NcclOp::Broadcast(_) => n,
            NcclOp::ReduceScatterSum => {
                ensure!(
                    n % self.world == 0,
                    "reduce-scatter of {n} values over {} ranks",
                    self.world
                );
                n / self.world
            }
            NcclOp::AllGather => n * self.world,
        };
        let out = Tensor::zeros(out_len, x.dtype(), &self.device)?;
        out.inplace_op2(
            &x,
            &Call {
                comm: self.comm,
                stream: self.stream.clone(),
                op,
            },
        )?;
        self.wait(op)?;
        Ok(out)
    }

    /// Waits for the stream's work up to the timeout, watching NCCL's asynchronous error.
    fn wait(&self, op: NcclOp) -> Result<()> {
        let event = self.stream.record_event(None)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if event.try_is_complete()? {
                return Ok(());
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; NCCL writes one result code.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            let why = if async_err != sys::ncclResult_t::ncclSuccess {
                Some(format!("NCCL reported {async_err:?} during {op:?}"))
            } else if Instant::now() >= deadline {
                Some(format!(
                    "{op:?} did not complete within {:.0?}",
                    self.timeout
                ))
            } else {
                None
            };
            if let Some(why) = why {
                let reason = format!("rank {}: {why}", self.rank);
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(reason.clone());
                // SAFETY: aborting frees the communicator's resources and stops its kernels; it is not
                // used again (`failed` is set).
                unsafe {
                    let _ = result::comm_abort(self.comm);
                }
                bail!("collective aborted: {reason}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            // SAFETY: the communicator is live and unused from here on.
            unsafe {
                let _ = result::comm_abort(self.comm);
            }
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(NcclOp::AllReduceSum, x)
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(NcclOp::ReduceScatterSum, x)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.run(NcclOp::AllGather, x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.run(NcclOp::Broadcast(root), x)
    }
    fn barrier(&self) -> Result<()> {
        let one = Tensor::zeros(1, DType::F32, &self.device)?;
        self.run(NcclOp::AllReduceSum, &one).map(|_| ())
    }
    fn abort(&self, reason: &str) {
        let reason = format!("rank {}: {reason}", self.rank);
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
    }
}

#[derive(Debug, Clone, Copy)]
enum NcclOp {
    AllReduceSum,
    ReduceScatterSum,
    AllGather,
    Broadcast(usize),
}

/// One NCCL call, as a candle in-place op: the output tensor's storage is written from the input's.
struct Call {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    op: NcclOp,
}

impl Call {
    fn launch<T: CudaDType + cudarc::driver::DeviceRepr>(
        &self,
        dtype: sys::ncclDataType_t,
        out: &mut CudaStorage,
        out_l: &Layout,
        input: &CudaStorage,
        in_l: &Layout,
    ) -> candle_core::Result<()> {
        let err = |what: &str| candle_core::Error::Msg(format!("NCCL: {what}"));
        let (a, b) = in_l
            .contiguous_offsets()
            .ok_or_else(|| err("a non-contiguous input"))?;
        let (c, d) = out_l
            .contiguous_offsets()
            .ok_or_else(|| err("a non-contiguous output"))?;
        let src = T::as_cuda_slice(input)?.slice(a..b);
        let mut dst_slice = T::as_cuda_slice_mut(out)?.slice_mut(c..d);
        let (sp, _src_guard) = src.device_ptr(&self.stream);
        let (dp, _dst_guard) = dst_slice.device_ptr_mut(&self.stream);
        let (send, recv) = (
            sp as *const ::core::ffi::c_void,
            dp as *mut ::core::ffi::c_void,
        );
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let sum = sys::ncclRedOp_t::ncclSum;
        // SAFETY: device pointers of live, contiguous buffers of the sizes NCCL is told, on the stream whose
        // events guard them.
        let status = unsafe {
            match self.op {
                NcclOp::AllReduceSum => {
                    result::all_reduce(send, recv, b - a, dtype, sum, self.comm, stream)
                }
                NcclOp::ReduceScatterSum => {
                    result::reduce_scatter(send, recv, d - c, dtype, sum, self.comm, stream)
                }
                NcclOp::AllGather => {
                    result::all_gather(send, recv, b - a, dtype, self.comm, stream)
                }
                NcclOp::Broadcast(root) => {
                    result::broadcast(send, recv, b - a, dtype, root as i32, self.comm, stream)
                }
            }
        };
        status
            .map(|_| ())
            .map_err(|e| err(&format!("{:?}: {e:?}", self.op)))
    }
}

impl candle_core::InplaceOp2 for Call {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives take GPU tensors")
    }

    fn cuda_fwd(
        &self,
        out: &mut CudaStorage,
        out_l: &Layout,
        input: &CudaStorage,
        in_l: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use sys::ncclDataType_t as N;
        match input.dtype() {
            DType::F32 => self.launch::<f32>(N::ncclFloat32, out, out_l, input, in_l),
            DType::F64 => self.launch::<f64>(N::ncclFloat64, out, out_l, input, in_l),
            DType::BF16 => self.launch::<half::bf16>(N::ncclBfloat16, out, out_l, input, in_l),
            DType::U8 => self.launch::<u8>(N::ncclUint8, out, out_l, input, in_l),
            other => candle_core::bail!("NCCL collectives of {other:?} tensors are not used"),
        }
    }
}

/// Runs `f` with a world-size-1 NCCL group on `device` (this machine's hub, then NCCL initialised through
/// it), and closes the group after. One GPU cannot hold two ranks (NCCL refuses a duplicate GPU), so this is
/// the NCCL path a one-GPU machine can exercise.
pub fn with_world_one<T>(
    device: &Device,
    timeout: Duration,
    f: impl FnOnce(Arc<NcclCollective>) -> Result<T>,
) -> Result<T> {
    use crate::train::distributed::Hub;
    let hub = Hub::bind("127.0.0.1:0")?;
    let addr = hub.local_addr()?.to_string();
    let token = super::launch::new_token();
    let handle = hub.serve(1, token.clone(), timeout);
    let link = TcpCollective::connect(&addr, 0, 1, &token, timeout)?;
    let comm = Arc::new(NcclCollective::join(&link, 0, 1, device, timeout).context("NCCL init")?);
    let out = f(comm.clone());
    drop(comm);
    match &out {
        Ok(_) => link.done()?,
        Err(e) => link.abort(&format!("{e:#}")),
    }
    handle.finish()?;
    out
}

/// The world-size-1 NCCL path on `device`, for `gpu_check nccl`: NCCL initialised through a hub, then an
/// all-reduce, reduce-scatter, all-gather and broadcast, each of which must return its input.
pub fn self_check(device: &Device, timeout: Duration) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    with_world_one(device, timeout, |comm| {
        let init_s = t0.elapsed().as_secs_f64();
        let x = Tensor::arange(0f32, 1024f32, device)?;
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok(a.to_dtype(DType::F32)?.to_vec1::<f32>()?
                == b.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let reduced = comm.all_reduce_sum(&x)?;
        let scattered = comm.reduce_scatter_sum(&x)?;
        let gathered = comm.all_gather(&x.to_dtype(DType::BF16)?)?;
        let broadcast = comm.broadcast(&x, 0)?;
        comm.barrier()?;
        let ok = same(&reduced, &x)?
            && same(&scattered, &x)?
            && same(&gathered, &x)?
            && same(&broadcast, &x)?;
        Ok(serde_json::json!({
            "nccl_version": nccl_version()?,
            "init_seconds": init_s,
            "collectives_return_their_input": ok,
        }))
    })
}
