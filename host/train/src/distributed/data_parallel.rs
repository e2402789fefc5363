//! Data parallelism over a [`Collective`]: every rank holds the whole model, takes a disjoint share of each
//! micro-batch's rows ([`rank_rows`]), and all ranks take the same optimizer step on the summed gradients.
//!
//! - Plain: the gradients are summed with all-reduces over flat buckets (whole parameters concatenated up
//!   to [`Parallel::bucket_elems`] values), then every rank runs the same AdamW step.
//! - ZeRO-1 (`zero`): the optimizer state — f32 masters where kept, and both moments — is split across
//!   ranks. Parameters are laid out end to end in one flat index space (each starting at a multiple of
//!   [`ALIGN`] values, so 8-bit moment blocks never straddle a shard), cut into one equal shard per rank.
//!   Gradients are reduce-scattered (each rank receives the sum of its shard only), each rank updates its
//!   shard with an AdamW over the shard's pieces of parameters, and the updated weights are all-gathered
//!   into every rank's variables (in the compute dtype). The parameters themselves stay separate tensors:
//!   never views of one buffer, whose backward pass would zero-pad each gradient to the buffer's size.
//!
//! The gradient norm is summed the same way in both modes (per rank shard, then over ranks in rank order),
//! and AdamW is elementwise, so ZeRO-1 gives the same weights as plain data parallelism bit for bit (on the
//! CPU backends, whose sums run in rank order). Checkpoints hold the full state in the one-rank format,
//! written by rank 0: a run resumes with any number of ranks.

use super::collective::{Collective, Solo};
use crate::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, TrainState};
use crate::optimizer::{AdamW, Moment, MomentPrecision, Param, Quantized8, Q8_BLOCK};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;

/// Alignment of each parameter (and of the shards) in the flat layout: one 8-bit moment block.
pub const ALIGN: usize = Q8_BLOCK;

/// Values per all-reduce bucket by default (32 MiB of f32, near torch DDP's 25 MiB).
pub const DEFAULT_BUCKET_ELEMS: usize = 8 << 20;

/// How a training run is spread over ranks.
#[derive(Clone)]
pub struct Parallel {
    /// The group this rank belongs to.
    pub comm: Arc<dyn Collective>,
    /// ZeRO-1: shard the optimizer state across ranks.
    pub zero: bool,
    /// Values per gradient bucket (and per reduce-scatter / all-gather chunk, over all ranks).
    pub bucket_elems: usize,
}

impl Parallel {
    /// One rank, no sharding: the plain training loop.
    pub fn single() -> Self {
        Self::new(Arc::new(Solo), false)
    }

    /// Rank `comm.rank()` of a group, with or without ZeRO-1.
    pub fn new(comm: Arc<dyn Collective>, zero: bool) -> Self {
        Parallel {
            comm,
            zero,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether this rank writes files (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Parallel(rank {} of {}, zero = {})",
            self.rank(),
            self.world_size(),
            self.zero
        )
    }
}

/// Rank `rank`'s rows of a micro-batch: a contiguous share, sizes differing by at most one (a short last
/// micro-batch of an epoch may leave some ranks none).
pub fn rank_rows(batch: &[usize], rank: usize, world: usize) -> &[usize] {
    let k = batch.len();
    &batch[rank * k / world..(rank + 1) * k / world]
}

/// A piece of parameter `param` (elements `start..start + len` of it, flattened) inside a rank's shard,
/// at position `at` of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index of the parameter.
    pub param: usize,
    /// First element within the parameter.
    pub start: usize,
    /// Elements.
    pub len: usize,
    /// Position within the shard.
    pub at: usize,
}

/// Parameters end to end in one flat index space, each at a multiple of [`ALIGN`], cut into equal shards.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    /// (offset, length) of each parameter.
    spans: Vec<(usize, usize)>,
    /// Values per shard (a multiple of [`ALIGN`]).
    shard: usize,
}

impl FlatLayout {
    /// The layout of parameters of `sizes` elements over `world` ranks.
    pub fn new(sizes: &[usize], world: usize) -> Self {
        let mut offset = 0;
        let spans = sizes
            .iter()
            .map(|&n| {
                let span = (offset, n);
                offset += n.div_ceil(ALIGN) * ALIGN;
                span
            })
            .collect();
        let shard = (offset.div_ceil(world).div_ceil(ALIGN) * ALIGN).max(ALIGN);
        FlatLayout { spans, shard }
    }

    /// Values per shard.
    pub fn shard_len(&self) -> usize {
        self.shard
    }

    /// The pieces of parameters in rank `rank`'s shard, in order.
    pub fn segments(&self, rank: usize) -> Vec<Segment> {
        let (lo, hi) = (rank * self.shard, (rank + 1) * self.shard);
        self.spans
            .iter()
            .enumerate()
            .filter_map(|(param, &(off, n))| {
                let (s, e) = (off.max(lo), (off + n).min(hi));
                (s < e).then(|| Segment {
                    param,
                    start: s - off,
                    len: e - s,
                    at: s - lo,
                })
            })
            .collect()
    }

    /// The values of flat positions `lo..hi` taken from per-parameter tensors (any shape), zeros between
    /// parameters, as one 1-D tensor of `dtype` on `device`.
    fn flat_range(
        &self,
        tensors: &[Tensor],
        lo: usize,
        hi: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut pieces = Vec::new();
        let mut pos = lo;
        for (param, &(off, n)) in self.spans.iter().enumerate() {
            let (s, e) = (off.max(lo), (off + n).min(hi));
            if s >= e {
                continue;
            }
            if s > pos {
                pieces.push(Tensor::zeros(s - pos, dtype, device)?);
            }
            pieces.push(tensors[param].flatten_all()?.narrow(0, s - off, e - s)?);
            pos = e;
        }
        if hi > pos {
            pieces.push(Tensor::zeros(hi - pos, dtype, device)?);
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }
}

/// Summed gradients: whole parameters (plain), or this rank's shard (ZeRO-1).
pub(crate) enum Reduced {
    Full(Vec<Tensor>),
    Shard(Tensor),
}

/// This rank's part of the optimizer under ZeRO-1.
struct ZeroState {
    segments: Vec<Segment>,
    /// AdamW over the segments (each a parameter of its own).
    opt: AdamW,
    /// Whether the full optimizer kept f32 masters apart from bf16 variables.
    separate_masters: bool,
}

/// The loop's view of data parallelism for one run.
pub(crate) struct DataParallel {
    par: Parallel,
    layout: FlatLayout,
    device: Device,
    zero: Option<ZeroState>,
}

impl DataParallel {
    pub(crate) fn new(par: &Parallel, opt: &AdamW, device: &Device) -> Self {
        let sizes: Vec<usize> = opt.params.iter().map(|p| p.var.elem_count()).collect();
        DataParallel {
            layout: FlatLayout::new(&sizes, par.world_size()),
            par: par.clone(),
            device: device.clone(),
            zero: None,
        }
    }

    fn world(&self) -> usize {
        self.par.world_size()
    }

    /// Values per rank in one reduce-scatter / all-gather chunk.
    fn chunk(&self) -> usize {
        let per_rank = (self.par.bucket_elems / self.world()) / ALIGN * ALIGN;
        per_rank.clamp(ALIGN, self.layout.shard)
    }

    /// This rank's rows of a micro-batch.
    pub(crate) fn rows(&self, batch: &[usize]) -> Vec<usize> {
        rank_rows(batch, self.par.rank(), self.world()).to_vec()
    }

    /// Restores the newest checkpoint under `checkpoints` (of the run `fingerprint`), then, under ZeRO-1,
    /// shards the optimizer state. Returns the step to continue from and the tokens seen.
    pub(crate) fn resume(
        &mut self,
        checkpoints: &Path,
        opt: &mut AdamW,
        fingerprint: &str,
    ) -> Result<(usize, u64)> {
        let latest = latest_checkpoint(checkpoints)?;
        if !self.par.zero {
            let Some(dir) = latest else {
                return Ok((0, 0));
            };
            let state = load_checkpoint(&dir, opt, &self.device)?;
            check_fingerprint(&dir, &state, fingerprint)?;
            return Ok((state.step, state.tokens_seen));
        }
        let (position, source) = match latest {
            Some(dir) => {
                // Read into host memory; each rank keeps its shard.
                let mut host = host_like(opt)?;
                let state = load_checkpoint(&dir, &mut host, &Device::Cpu)?;
                check_fingerprint(&dir, &state, fingerprint)?;
                for (p, h) in opt.params.iter().zip(&host.params) {
                    let w = h.master.to_dtype(p.var.dtype())?.to_device(&self.device)?;
                    p.var.set(&w)?;
                }
                ((state.step, state.tokens_seen), Some(host))
            }
            None => ((0, 0), None),
        };
        let zero = self.shard(opt, source.as_ref().unwrap_or(&*opt))?;
        release_full_state(opt, &self.device)?;
        self.zero = Some(zero);
        Ok(position)
    }

    /// This rank's pieces of `source`'s masters and moments (the live optimizer or a checkpoint in host
    /// memory), as an AdamW of their own.
    fn shard(&self, opt: &AdamW, source: &AdamW) -> Result<ZeroState> {
        let segments = self.layout.segments(self.par.rank());
        let first = opt.params.first().context("no parameters to train")?;
        let separate_masters = opt.config.masters && first.var.dtype() != DType::F32;
        let mut params = Vec::with_capacity(segments.len());
        for seg in &segments {
            let (src, live) = (&source.params[seg.param], &opt.params[seg.param]);
            ensure!(
                (live.var.dtype() != DType::F32) == (first.var.dtype() != DType::F32),
                "ZeRO-1 needs one compute dtype for every parameter ({} is {:?})",
                live.name,
                live.var.dtype()
            );
            let master_dtype = if separate_masters {
                DType::F32
            } else {
                live.var.dtype()
            };
            let piece = |t: &Tensor| -> Result<Tensor> {
                Ok(t.flatten_all()?
                    .narrow(0, seg.start, seg.len)?
                    .to_device(&self.device)?)
            };
            let master = piece(&src.master)?.to_dtype(master_dtype)?;
            let var = Var::from_tensor(&master)?;
            let moment = |m: &Moment| -> Result<Moment> {
                Ok(match m {
                    Moment::F32(t) => Moment::F32(piece(t)?.copy()?),
                    Moment::Blockwise8(q) => {
                        let blocks = seg.start / Q8_BLOCK..(seg.start + seg.len).div_ceil(Q8_BLOCK);
                        Moment::Blockwise8(Quantized8 {
                            codes: q.codes[seg.start..seg.start + seg.len].to_vec(),
                            absmax: q.absmax[blocks].to_vec(),
                            signed: q.signed,
                            root: q.root,
                        })
                    }
                })
            };
            params.push(Param {
                name: format!("{}[{}..{}]", src.name, seg.start, seg.start + seg.len),
                master: var.as_tensor().clone(),
                var,
                m: moment(&src.m)?,
                v: moment(&src.v)?,
                decay: live.decay,
            });
        }
        let shard_opt = AdamW {
            config: opt.config,
            params,
            steps: source.steps,
            fused: opt.fused,
            noise_origins: Some(segments.iter().map(|s| (s.param, s.start)).collect()),
        };
        Ok(ZeroState {
            segments,
            opt: shard_opt,
            separate_masters,
        })
    }

    /// Sums this rank's gradients (`None`: it had no rows this step) over ranks.
    pub(crate) fn reduce(&self, opt: &AdamW, grads: Option<Vec<Tensor>>) -> Result<Reduced> {
        let grads = match grads {
            Some(g) => g,
            None => opt
                .params
                .iter()
                .map(|p| Tensor::zeros(p.var.shape(), DType::F32, &self.device))
                .collect::<candle_core::Result<_>>()?,
        };
        if self.zero.is_some() {
            return self.reduce_scatter(&grads).map(Reduced::Shard);
        }
        if self.world() == 1 {
            return Ok(Reduced::Full(grads));
        }
        let mut out = Vec::with_capacity(grads.len());
        let mut i = 0;
        while i < grads.len() {
            // Whole parameters up to the bucket size (a larger parameter is a bucket of its own).
            let mut j = i;
            let mut n = 0;
            while j < grads.len() && (j == i || n + grads[j].elem_count() <= self.par.bucket_elems)
            {
                n += grads[j].elem_count();
                j += 1;
            }
            let flats: Vec<Tensor> = grads[i..j]
                .iter()
                .map(|g| g.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let bucket = if flats.len() == 1 {
                flats[0].contiguous()?
            } else {
                Tensor::cat(&flats, 0)?
            };
            let summed = self.par.comm.all_reduce_sum(&bucket)?;
            let mut at = 0;
            for g in &grads[i..j] {
                let k = g.elem_count();
                out.push(summed.narrow(0, at, k)?.reshape(g.shape())?);
                at += k;
            }
            i = j;
        }
        Ok(Reduced::Full(out))
    }

    /// This rank's shard of the summed gradients, reduce-scattered chunk by chunk.
    fn reduce_scatter(&self, grads: &[Tensor]) -> Result<Tensor> {
        let (s, c) = (self.layout.shard, self.chunk());
        let mut parts = Vec::with_capacity(s.div_ceil(c));
        for lo in (0..s).step_by(c) {
            let hi = (lo + c).min(s);
            let per_rank: Vec<Tensor> = (0..self.world())
                .map(|r| {
                    self.layout
                        .flat_range(grads, r * s + lo, r * s + hi, DType::F32, &self.device)
                })
                .collect::<Result<_>>()?;
            let buffer = Tensor::cat(&per_rank, 0)?;
            parts.push(self.par.comm.reduce_scatter_sum(&buffer)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The L2 norm of the summed gradients: squares summed per shard segment (f32), segments in order
    /// within a rank's shard (f64), shards in rank order.
    pub(crate) fn grad_norm(&self, grads: &Reduced) -> Result<f64> {
        let seg_sum =
            |t: Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64) };
        let total = match grads {
            Reduced::Full(g) => {
                let mut total = 0f64;
                for r in 0..self.world() {
                    let mut part = 0f64;
                    for seg in self.layout.segments(r) {
                        let t = &g[seg.param];
                        part += if seg.start == 0 && seg.len == t.elem_count() {
                            seg_sum(t.clone())?
                        } else {
                            seg_sum(t.flatten_all()?.narrow(0, seg.start, seg.len)?)?
                        };
                    }
                    total += part;
                }
                total
            }
            Reduced::Shard(shard) => {
                let zero = self.zero.as_ref().expect("a shard under ZeRO-1");
                let mut part = 0f64;
                for seg in &zero.segments {
                    part += seg_sum(shard.narrow(0, seg.at, seg.len)?)?;
                }
                let t = Tensor::new(&[part], &self.device)?;
                self.par.comm.all_reduce_sum(&t)?.to_vec1::<f64>()?[0]
            }
        };
        Ok(total.sqrt())
    }

    /// Multiplies the gradients by `coef` (clipping).
    pub(crate) fn scale(&self, grads: &mut Reduced, coef: f64) -> Result<()> {
        match grads {
            Reduced::Full(g) => {
                for t in g.iter_mut() {
                    *t = (&*t * coef)?;
                }
            }
            Reduced::Shard(t) => *t = (&*t * coef)?,
        }
        Ok(())
    }

    /// The optimizer step at `lr`: on the whole model (plain), or on this rank's shard followed by an
    /// all-gather of the new weights into every rank's variables (ZeRO-1).
    pub(crate) fn step(&mut self, opt: &mut AdamW, grads: Reduced, lr: f64) -> Result<()> {
        match (grads, self.zero.as_mut()) {
            (Reduced::Full(g), None) => opt.step(&g, lr),
            (Reduced::Shard(shard), Some(zero)) => {
                let pieces: Vec<Tensor> = zero
                    .segments
                    .iter()
                    .map(|s| shard.narrow(0, s.at, s.len))
                    .collect::<candle_core::Result<_>>()?;
                zero.opt.step(&pieces, lr)?;
                opt.steps = zero.opt.steps;
                self.gather_weights(opt)
            }
            _ => bail!("gradients and optimizer sharding disagree"),
        }
    }

    /// Every rank's shard of one quantity, chunk by chunk: `piece(lo, hi)` is this rank's values at shard
    /// positions `lo..hi` (in units of `unit` values: 1, or [`ALIGN`] for one scale per block), and
    /// `sink(rank, lo, part)` receives each rank's part of each chunk.
    fn all_gather_shards(
        &self,
        unit: usize,
        piece: &dyn Fn(usize, usize) -> Result<Tensor>,
        sink: &mut dyn FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let per_rank = self.layout.shard / unit;
        let chunk = (self.chunk() / unit).max(1);
        for lo in (0..per_rank).step_by(chunk) {
            let hi = (lo + chunk).min(per_rank);
            let all = self.par.comm.all_gather(&piece(lo, hi)?)?;
            for r in 0..self.world() {
                sink(r, lo, all.narrow(0, r * (hi - lo), hi - lo)?)?;
            }
        }
        Ok(())
    }

    /// This rank's shard positions `lo..hi` (in `unit`s) of a per-segment quantity, zeros elsewhere.
    fn shard_piece(
        &self,
        lo: usize,
        hi: usize,
        unit: usize,
        dtype: DType,
        of_segment: &dyn Fn(usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let zero = self.zero.as_ref().expect("ZeRO-1 state");
        let mut pieces = Vec::new();
        let mut pos = lo;
        for (i, seg) in zero.segments.iter().enumerate() {
            let (a, b) = (seg.at / unit, (seg.at + seg.len).div_ceil(unit));
            let (s, e) = (a.max(lo), b.min(hi));
            if s >= e {
                continue;
            }
            if s > pos {
                pieces.push(Tensor::zeros(s - pos, dtype, &self.device)?);
            }
            pieces.push(of_segment(i)?.to_dtype(dtype)?.narrow(0, s - a, e - s)?);
            pos = e;
        }
        if hi > pos {
            pieces.push(Tensor::zeros(hi - pos, dtype, &self.device)?);
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// The flat parts a sink received, cut back into parameters: `(param, first element, values)`.
    fn split_part(
        &self,
        rank: usize,
        lo: usize,
        part: &Tensor,
        unit: usize,
        into: &mut [Vec<(usize, Tensor)>],
    ) -> Result<()> {
        let n = part.elem_count();
        let (flat_lo, flat_hi) = (
            rank * self.layout.shard / unit + lo,
            rank * self.layout.shard / unit + lo + n,
        );
        for (param, &(off, len)) in self.layout.spans.iter().enumerate() {
            let (a, b) = (off / unit, (off + len).div_ceil(unit));
            let (s, e) = (a.max(flat_lo), b.min(flat_hi));
            if s < e {
                into[param].push((s - a, part.narrow(0, s - flat_lo, e - s)?));
            }
        }
        Ok(())
    }

    /// After a sharded step: the new weights of every shard into every rank's variables.
    fn gather_weights(&self, opt: &AdamW) -> Result<()> {
        let zero = self.zero.as_ref().expect("ZeRO-1 state");
        let dtype = opt.params[0].var.dtype();
        let mut parts: Vec<Vec<(usize, Tensor)>> = vec![Vec::new(); opt.params.len()];
        self.all_gather_shards(
            1,
            &|lo, hi| {
                self.shard_piece(lo, hi, 1, dtype, &|i| Ok(zero.opt.params[i].master.clone()))
            },
            &mut |r, lo, part| self.split_part(r, lo, &part, 1, &mut parts),
        )?;
        for (p, pieces) in opt.params.iter().zip(parts) {
            p.var.set(&assemble(pieces, p.var.shape())?)?;
        }
        Ok(())
    }

    /// One per-segment quantity of every shard, gathered to rank 0 as per-parameter 1-D tensors in host
    /// memory (`unit`: values per position; empty on other ranks). Every rank must call it.
    fn gather_to_root(
        &self,
        unit: usize,
        dtype: DType,
        of_segment: &dyn Fn(usize) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let root = self.par.is_root();
        let mut parts: Vec<Vec<(usize, Tensor)>> = vec![Vec::new(); self.layout.spans.len()];
        self.all_gather_shards(
            unit,
            &|lo, hi| self.shard_piece(lo, hi, unit, dtype, of_segment),
            &mut |r, lo, part| {
                if root {
                    self.split_part(r, lo, &part.to_device(&Device::Cpu)?, unit, &mut parts)?;
                }
                Ok(())
            },
        )?;
        if !root {
            return Ok(Vec::new());
        }
        parts
            .into_iter()
            .map(|p| {
                let len: usize = p.iter().map(|(_, t)| t.elem_count()).sum();
                assemble(p, &[len][..])
            })
            .collect()
    }

    /// The f32 masters of every shard on rank 0 (empty elsewhere).
    fn gather_masters(&self) -> Result<Vec<Tensor>> {
        let zero = self.zero.as_ref().expect("ZeRO-1 state");
        self.gather_to_root(1, DType::F32, &|i| Ok(zero.opt.params[i].master.clone()))
    }

    /// The full optimizer state on rank 0 (`None` elsewhere), in host memory, gathered from the shards: what
    /// a checkpoint holds. Every rank must call it.
    fn gather_state(&self, opt: &AdamW) -> Result<Option<AdamW>> {
        let zero = self.zero.as_ref().expect("ZeRO-1 state");
        let root = self.par.is_root();
        let masters: Vec<Tensor> = if zero.separate_masters {
            self.gather_masters()?
        } else if root {
            // The variables are the masters, whole on every rank.
            opt.params
                .iter()
                .map(|p| Ok(p.var.as_tensor().to_device(&Device::Cpu)?))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let moments = |first: bool| -> Result<Vec<Moment>> {
            let of = |i: usize| -> &Moment {
                let p = &zero.opt.params[i];
                if first {
                    &p.m
                } else {
                    &p.v
                }
            };
            match opt.config.moments {
                MomentPrecision::F32 => Ok(self
                    .gather_to_root(1, DType::F32, &|i| match of(i) {
                        Moment::F32(t) => Ok(t.clone()),
                        Moment::Blockwise8(_) => bail!("mixed moment formats"),
                    })?
                    .into_iter()
                    .map(Moment::F32)
                    .collect()),
                MomentPrecision::Blockwise8 => {
                    let q8 = |i: usize| -> Result<&Quantized8> {
                        match of(i) {
                            Moment::Blockwise8(q) => Ok(q),
                            Moment::F32(_) => bail!("mixed moment formats"),
                        }
                    };
                    let codes = self.gather_to_root(1, DType::U8, &|i| {
                        let q = q8(i)?;
                        Ok(Tensor::from_vec(
                            q.codes.clone(),
                            q.codes.len(),
                            &self.device,
                        )?)
                    })?;
                    let scales = self.gather_to_root(ALIGN, DType::F32, &|i| {
                        let q = q8(i)?;
                        Ok(Tensor::from_vec(
                            q.absmax.clone(),
                            q.absmax.len(),
                            &self.device,
                        )?)
                    })?;
                    codes
                        .into_iter()
                        .zip(scales)
                        .map(|(c, s)| {
                            Ok(Moment::Blockwise8(Quantized8 {
                                codes: c.to_vec1::<u8>()?,
                                absmax: s.to_vec1::<f32>()?,
                                signed: first,
                                root: !first,
                            }))
                        })
                        .collect()
                }
            }
        };
        let (m, v) = (moments(true)?, moments(false)?);
        if !root {
            return Ok(None);
        }
        let mut params = Vec::with_capacity(opt.params.len());
        for (((p, master), m), v) in opt.params.iter().zip(masters).zip(m).zip(v) {
            let var = Var::from_tensor(&master.reshape(p.var.shape())?)?;
            params.push(Param {
                name: p.name.clone(),
                master: var.as_tensor().clone(),
                var,
                m: reshape_moment(m, p.var.shape())?,
                v: reshape_moment(v, p.var.shape())?,
                decay: p.decay,
            });
        }
        Ok(Some(AdamW {
            config: opt.config,
            params,
            steps: zero.opt.steps,
            fused: opt.fused,
            noise_origins: None,
        }))
    }

    /// Writes a checkpoint of the full state under `checkpoints` (rank 0 writes; every rank must call it).
    pub(crate) fn save(&self, checkpoints: &Path, opt: &AdamW, state: &TrainState) -> Result<()> {
        if self.zero.is_none() {
            if self.par.is_root() {
                save_checkpoint(checkpoints, opt, state)?;
            }
            return Ok(());
        }
        if let Some(host) = self.gather_state(opt)? {
            save_checkpoint(checkpoints, &host, state)?;
        }
        Ok(())
    }

    /// The sums over ranks of `values` (f64).
    pub(crate) fn sum(&self, values: Vec<f64>) -> Result<Vec<f64>> {
        if self.world() == 1 || values.is_empty() {
            return Ok(values);
        }
        let n = values.len();
        let t = Tensor::from_vec(values, n, &self.device)?;
        Ok(self.par.comm.all_reduce_sum(&t)?.to_vec1::<f64>()?)
    }

    /// After the last step: under ZeRO-1, rank 0's optimizer gets the full masters back (what the trained
    /// model is saved from). Every rank must call it.
    pub(crate) fn finish(&self, opt: &mut AdamW) -> Result<()> {
        let Some(zero) = &self.zero else {
            return Ok(());
        };
        opt.steps = zero.opt.steps;
        if !zero.separate_masters {
            return Ok(());
        }
        let masters = self.gather_masters()?;
        for (p, m) in opt.params.iter_mut().zip(masters) {
            p.master = m.reshape(p.var.shape())?;
        }
        Ok(())
    }
}

fn check_fingerprint(dir: &Path, state: &TrainState, fingerprint: &str) -> Result<()> {
    if state.fingerprint != fingerprint {
        bail!(
            "checkpoint {} belongs to a run with other options or data; delete it to start over",
            dir.display()
        );
    }
    tracing::info!(step = state.step, "resuming from {}", dir.display());
    Ok(())
}

/// Pieces `(first element, values)` of one tensor, in any order, concatenated and shaped as `shape`.
fn assemble(
    mut pieces: Vec<(usize, Tensor)>,
    shape: impl Into<candle_core::Shape>,
) -> Result<Tensor> {
    pieces.sort_by_key(|(start, _)| *start);
    let tensors: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
    let flat = if tensors.len() == 1 {
        tensors[0].clone()
    } else {
        Tensor::cat(&tensors, 0)?
    };
    Ok(flat.reshape(shape)?)
}

fn reshape_moment(m: Moment, shape: &candle_core::Shape) -> Result<Moment> {
    Ok(match m {
        Moment::F32(t) => Moment::F32(t.reshape(shape)?),
        q => q,
    })
}

/// An optimizer of `opt`'s parameters, shapes and moment formats in host memory, zero-filled: what a
/// checkpoint is read into before each rank takes its shard.
fn host_like(opt: &AdamW) -> Result<AdamW> {
    let cpu = Device::Cpu;
    let mut params = Vec::with_capacity(opt.params.len());
    for p in &opt.params {
        let dtype = if p.var.dtype() == DType::F32 || opt.config.masters {
            DType::F32
        } else {
            p.var.dtype()
        };
        let var = Var::zeros(p.var.shape(), dtype, &cpu)?;
        let n = p.var.elem_count();
        let moment = |first: bool| -> Result<Moment> {
            Ok(match opt.config.moments {
                MomentPrecision::F32 => {
                    Moment::F32(Tensor::zeros(p.var.shape(), DType::F32, &cpu)?)
                }
                MomentPrecision::Blockwise8 if first => {
                    Moment::Blockwise8(Quantized8::first_moment(n))
                }
                MomentPrecision::Blockwise8 => Moment::Blockwise8(Quantized8::second_moment(n)),
            })
        };
        params.push(Param {
            name: p.name.clone(),
            master: var.as_tensor().clone(),
            var,
            m: moment(true)?,
            v: moment(false)?,
            decay: p.decay,
        });
    }
    Ok(AdamW {
        config: opt.config,
        params,
        steps: 0,
        fused: opt.fused,
        noise_origins: None,
    })
}

/// Under ZeRO-1 the full optimizer keeps only the variables: its moments and separate f32 masters are
/// dropped (the shards hold them).
fn release_full_state(opt: &mut AdamW, device: &Device) -> Result<()> {
    for p in &mut opt.params {
        p.m = Moment::F32(Tensor::zeros(0, DType::F32, device)?);
        p.v = Moment::F32(Tensor::zeros(0, DType::F32, device)?);
        if p.master.dtype() != p.var.dtype() {
            p.master = p.var.as_tensor().clone();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_split_contiguously_and_unevenly_when_they_must() {
        let batch: Vec<usize> = (10..17).collect();
        let shares: Vec<&[usize]> = (0..3).map(|r| rank_rows(&batch, r, 3)).collect();
        assert_eq!(
            shares,
            vec![&[10, 11][..], &[12, 13][..], &[14, 15, 16][..]]
        );
        // Fewer rows than ranks: some ranks get none, no row is lost or repeated.
        let short = [7, 8];
        let shares: Vec<&[usize]> = (0..4).map(|r| rank_rows(&short, r, 4)).collect();
        assert_eq!(shares.concat(), vec![7, 8]);
        assert!(shares.iter().any(|s| s.is_empty()));
    }

    #[test]
    fn the_layout_aligns_parameters_and_covers_each_once() {
        let sizes = [300, 5, 1024, 17];
        for world in 1..=5 {
            let layout = FlatLayout::new(&sizes, world);
            assert_eq!(layout.shard_len() % ALIGN, 0);
            let mut covered = vec![0usize; sizes.len()];
            for r in 0..world {
                for s in layout.segments(r) {
                    assert_eq!(s.start % ALIGN, 0, "segments start on a block boundary");
                    assert!(s.at + s.len <= layout.shard_len());
                    covered[s.param] += s.len;
                }
            }
            assert_eq!(covered, sizes.to_vec(), "world {world}");
        }
        let layout = FlatLayout::new(&sizes, 2);
        let tensors: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::ones(n, DType::F32, &Device::Cpu).unwrap())
            .collect();
        let all = layout
            .flat_range(
                &tensors,
                0,
                2 * layout.shard_len(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let total: f32 = all.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(total as usize, sizes.iter().sum::<usize>());
    }
}
