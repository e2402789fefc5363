//! Several ranks training one model: the collective operations they need ([`Collective`]) and two CPU
//! backends — threads of one process ([`in_process`]) and processes meeting at a hub over TCP ([`tcp`];
//! also the rendezvous and liveness channel of NCCL ranks, whose backend lives in the `dusflow` crate behind
//! the `cuda` feature) — and data parallelism over any of them ([`data_parallel`]: row shards, bucketed
//! gradient sums, ZeRO-1). The training loop takes a [`Parallel`]; [`Parallel::single`] is one rank.

pub mod collective;
pub mod data_parallel;
pub mod in_process;
pub mod tcp;

pub use collective::{Collective, HostData, Op, Solo};
pub use data_parallel::{rank_rows, FlatLayout, Parallel, Segment, ALIGN, DEFAULT_BUCKET_ELEMS};
pub use in_process::{run_ranks, InProcess};
pub use tcp::{Hub, HubHandle, TcpCollective};

#[cfg(test)]
mod tests;
