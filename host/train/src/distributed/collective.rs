//! The collective operations data parallelism needs, as one interface over its backends (NCCL on GPUs, the
//! in-process and TCP hubs on the CPU), and the host-side arithmetic the CPU backends share.
//!
//! Every operation is called by every rank of the group in the same order with tensors of the same dtype
//! and length (a mismatch is an error on every rank). Sums run in rank order (`((x₀ + x₁) + x₂) + …`) in
//! the CPU backends, so their results are deterministic and the same on every rank.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

/// A group of ranks that exchange tensors. Implementations bound every wait: a rank that errors, dies or
/// stops answering makes the operation fail on every other rank within the group's timeout.
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// The elementwise sum over ranks of `x` (f32 or f64), on every rank.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// `x` (1-D, f32 or f64, a multiple of `world_size()` long) is cut into `world_size()` equal segments;
    /// returns the sum over ranks of segment `rank()`.
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Every rank's `x` (1-D, equally long), concatenated in rank order, on every rank.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `x`, on every rank.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// Fails the group: pending and later operations return an error naming this rank and `reason` on
    /// every rank. Called by a rank that hit an error, so its peers stop instead of waiting for it.
    fn abort(&self, reason: &str);
}

/// The group of one: every operation returns its input.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}

/// One collective operation, as the CPU backends exchange it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Collective::all_reduce_sum`].
    AllReduceSum,
    /// [`Collective::reduce_scatter_sum`].
    ReduceScatterSum,
    /// [`Collective::all_gather`].
    AllGather,
    /// [`Collective::broadcast`] from `root`.
    Broadcast {
        /// The rank whose value everyone gets.
        root: usize,
    },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AllReduceSum => f.write_str("all-reduce"),
            Op::ReduceScatterSum => f.write_str("reduce-scatter"),
            Op::AllGather => f.write_str("all-gather"),
            Op::Broadcast { root } => write!(f, "broadcast from rank {root}"),
        }
    }
}

/// A 1-D buffer in host memory.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// f32 values.
    F32(Vec<f32>),
    /// f64 values.
    F64(Vec<f64>),
    /// bf16 values.
    Bf16(Vec<half::bf16>),
    /// Bytes (8-bit optimizer codes).
    U8(Vec<u8>),
}

impl HostData {
    /// The flattened values of `t`, copied to host memory.
    pub fn of(t: &Tensor) -> Result<Self> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F32 => HostData::F32(t.to_vec1()?),
            DType::F64 => HostData::F64(t.to_vec1()?),
            DType::BF16 => HostData::Bf16(t.to_vec1()?),
            DType::U8 => HostData::U8(t.to_vec1()?),
            other => bail!("collectives carry f32, f64, bf16 or u8 tensors, not {other:?}"),
        })
    }

    /// A 1-D tensor of these values on `device`.
    pub fn to_tensor(self, device: &Device) -> Result<Tensor> {
        let n = self.len();
        Ok(match self {
            HostData::F32(v) => Tensor::from_vec(v, n, device)?,
            HostData::F64(v) => Tensor::from_vec(v, n, device)?,
            HostData::Bf16(v) => Tensor::from_vec(v, n, device)?,
            HostData::U8(v) => Tensor::from_vec(v, n, device)?,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F64(v) => v.len(),
            HostData::Bf16(v) => v.len(),
            HostData::U8(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype's name, for messages and the wire format.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            HostData::F32(_) => "f32",
            HostData::F64(_) => "f64",
            HostData::Bf16(_) => "bf16",
            HostData::U8(_) => "u8",
        }
    }

    fn slice(&self, lo: usize, hi: usize) -> HostData {
        match self {
            HostData::F32(v) => HostData::F32(v[lo..hi].to_vec()),
            HostData::F64(v) => HostData::F64(v[lo..hi].to_vec()),
            HostData::Bf16(v) => HostData::Bf16(v[lo..hi].to_vec()),
            HostData::U8(v) => HostData::U8(v[lo..hi].to_vec()),
        }
    }

    fn add_assign(&mut self, other: &HostData, lo: usize) -> Result<()> {
        match (self, other) {
            (HostData::F32(a), HostData::F32(b)) => {
                a.iter_mut().zip(&b[lo..]).for_each(|(x, y)| *x += y)
            }
            (HostData::F64(a), HostData::F64(b)) => {
                a.iter_mut().zip(&b[lo..]).for_each(|(x, y)| *x += y)
            }
            (a, _) => bail!("sums are over f32 or f64 values, not {}", a.dtype_name()),
        }
        Ok(())
    }

    fn extend(&mut self, other: &HostData) {
        match (self, other) {
            (HostData::F32(a), HostData::F32(b)) => a.extend_from_slice(b),
            (HostData::F64(a), HostData::F64(b)) => a.extend_from_slice(b),
            (HostData::Bf16(a), HostData::Bf16(b)) => a.extend_from_slice(b),
            (HostData::U8(a), HostData::U8(b)) => a.extend_from_slice(b),
            _ => unreachable!("dtypes are checked before concatenating"),
        }
    }
}

/// Checks that every rank called the same operation on data of the same dtype and length.
pub fn check_round(inputs: &[(Op, &HostData)]) -> Result<()> {
    let (op0, d0) = inputs[0];
    for (rank, (op, d)) in inputs.iter().enumerate().skip(1) {
        ensure!(
            *op == op0,
            "rank 0 called {op0} while rank {rank} called {op}: the ranks are out of step"
        );
        ensure!(
            d.dtype_name() == d0.dtype_name() && d.len() == d0.len(),
            "{op0}: rank 0 sent {} {} values, rank {rank} sent {} {}",
            d0.len(),
            d0.dtype_name(),
            d.len(),
            d.dtype_name()
        );
    }
    let world = inputs.len();
    match op0 {
        Op::ReduceScatterSum => ensure!(
            d0.len() % world == 0,
            "reduce-scatter of {} values over {world} ranks: not a multiple",
            d0.len()
        ),
        Op::Broadcast { root } => ensure!(root < world, "broadcast from rank {root} of {world}"),
        _ => {}
    }
    Ok(())
}

/// What rank `rank` receives from `op` over every rank's `inputs` (already checked by [`check_round`]).
pub fn combine(op: Op, rank: usize, inputs: &[&HostData]) -> Result<HostData> {
    let world = inputs.len();
    Ok(match op {
        Op::AllReduceSum => {
            let mut out = inputs[0].clone();
            for x in &inputs[1..] {
                out.add_assign(x, 0)?;
            }
            out
        }
        Op::ReduceScatterSum => {
            let seg = inputs[0].len() / world;
            let lo = rank * seg;
            let mut out = inputs[0].slice(lo, lo + seg);
            for x in &inputs[1..] {
                out.add_assign(x, lo)?;
            }
            out
        }
        Op::AllGather => {
            let mut out = inputs[0].clone();
            for x in &inputs[1..] {
                out.extend(x);
            }
            out
        }
        Op::Broadcast { root } => inputs[root].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_sums_in_rank_order_and_cuts_segments() {
        let a = HostData::F32(vec![1.0, 2.0, 3.0, 4.0]);
        let b = HostData::F32(vec![10.0, 20.0, 30.0, 40.0]);
        let ins = [&a, &b];
        assert_eq!(
            combine(Op::AllReduceSum, 1, &ins).unwrap(),
            HostData::F32(vec![11.0, 22.0, 33.0, 44.0])
        );
        assert_eq!(
            combine(Op::ReduceScatterSum, 1, &ins).unwrap(),
            HostData::F32(vec![33.0, 44.0])
        );
        assert_eq!(combine(Op::AllGather, 0, &ins).unwrap().len(), 8);
        assert_eq!(combine(Op::Broadcast { root: 1 }, 0, &ins).unwrap(), b);
        // Rank order: 1e8 + 1 - 1e8 in f32 loses the 1 only if summed in that order.
        let x = [
            HostData::F32(vec![1e8]),
            HostData::F32(vec![1.0]),
            HostData::F32(vec![-1e8]),
        ];
        let refs: Vec<&HostData> = x.iter().collect();
        assert_eq!(
            combine(Op::AllReduceSum, 0, &refs).unwrap(),
            HostData::F32(vec![(1e8f32 + 1.0) - 1e8])
        );
    }

    #[test]
    fn mismatched_rounds_are_refused_with_both_ranks() {
        let a = HostData::F32(vec![1.0; 4]);
        let b = HostData::F32(vec![1.0; 3]);
        let err = check_round(&[(Op::AllReduceSum, &a), (Op::AllReduceSum, &b)]).unwrap_err();
        assert!(err.to_string().contains("rank 1 sent 3 f32"), "{err}");
        let err = check_round(&[(Op::AllReduceSum, &a), (Op::AllGather, &a)]).unwrap_err();
        assert!(err.to_string().contains("out of step"), "{err}");
        let err = check_round(&[(Op::ReduceScatterSum, &b), (Op::ReduceScatterSum, &b)]);
        assert!(err.is_err());
        let bytes = HostData::U8(vec![1, 2]);
        assert!(combine(Op::AllReduceSum, 0, &[&bytes, &bytes]).is_err());
    }
}
