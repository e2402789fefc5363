//! The in-process backend: ranks are threads of one process meeting at a shared table. Each operation is a
//! round: every rank deposits its input, the last one to arrive computes everyone's result (sums in rank
//! order, so results are deterministic), and each rank takes its own. Every wait is bounded by the group's
//! timeout; a rank that aborts, or whose handle is dropped before its peers finish a round (a thread that
//! panicked or returned early), fails the round on every rank at once.

use super::collective::{check_round, combine, Collective, HostData, Op};
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One rank's handle on an in-process group (made by [`group`]).
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
    /// Rounds this rank has completed.
    done: AtomicU64,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

struct Round {
    /// The round being filled.
    number: u64,
    inputs: Vec<Option<(Op, HostData)>>,
    results: Vec<Option<HostData>>,
    taken: usize,
    failed: Option<String>,
    left: Vec<bool>,
}

/// `world` handles on one new group, rank 0 first; each waits at most `timeout` for its peers.
pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
    assert!(world > 0, "a group has at least one rank");
    let shared = Arc::new(Shared {
        world,
        state: Mutex::new(Round {
            number: 0,
            inputs: vec![None; world],
            results: vec![None; world],
            taken: 0,
            failed: None,
            left: vec![false; world],
        }),
        changed: Condvar::new(),
    });
    (0..world)
        .map(|rank| InProcess {
            rank,
            shared: shared.clone(),
            timeout,
            done: AtomicU64::new(0),
        })
        .collect()
}

impl InProcess {
    fn lock(&self) -> MutexGuard<'_, Round> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the condition variable until `deadline`; an error (and a failed group) past it.
    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Round>,
        deadline: Instant,
        op: Op,
    ) -> Result<MutexGuard<'a, Round>> {
        let now = Instant::now();
        if now >= deadline {
            let mut guard = guard;
            let missing: Vec<String> = guard
                .inputs
                .iter()
                .enumerate()
                .filter(|(_, i)| i.is_none())
                .map(|(r, _)| r.to_string())
                .collect();
            let msg = format!(
                "rank {}: {op}: no answer from rank(s) {} within {:.0?}",
                self.rank,
                if missing.is_empty() {
                    "?".to_string()
                } else {
                    missing.join(", ")
                },
                self.timeout
            );
            guard.failed.get_or_insert(msg.clone());
            self.shared.changed.notify_all();
            bail!("collective timed out: {msg}");
        }
        let (guard, _) = self
            .shared
            .changed
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner());
        Ok(guard)
    }

    fn check(&self, round: &Round) -> Result<()> {
        if let Some(reason) = &round.failed {
            bail!("collective aborted: {reason}");
        }
        // A peer that left without depositing this round's input will never do so.
        if let Some(gone) =
            (0..self.shared.world).find(|&r| round.left[r] && round.inputs[r].is_none())
        {
            bail!("collective aborted: rank {gone} left the group (its thread ended or panicked)");
        }
        Ok(())
    }

    fn exchange(&self, op: Op, data: HostData) -> Result<HostData> {
        let deadline = Instant::now() + self.timeout;
        let mine = self.done.load(Ordering::SeqCst);
        let mut round = self.lock();
        // Until the previous round's results have all been taken.
        loop {
            if let Some(reason) = &round.failed {
                bail!("collective aborted: {reason}");
            }
            if round.number == mine {
                break;
            }
            round = self.wait(round, deadline, op)?;
        }
        round.inputs[self.rank] = Some((op, data));
        if round.inputs.iter().all(Option::is_some) {
            let inputs: Vec<(Op, &HostData)> = round
                .inputs
                .iter()
                .map(|i| {
                    let (op, d) = i.as_ref().expect("all deposited");
                    (*op, d)
                })
                .collect();
            let computed = check_round(&inputs).and_then(|()| {
                let data: Vec<&HostData> = inputs.iter().map(|(_, d)| *d).collect();
                (0..self.shared.world)
                    .map(|r| combine(op, r, &data))
                    .collect::<Result<Vec<_>>>()
            });
            match computed {
                Ok(results) => {
                    round.results = results.into_iter().map(Some).collect();
                }
                Err(e) => {
                    round.failed.get_or_insert(format!("{e:#}"));
                }
            }
            self.shared.changed.notify_all();
        }
        let result = loop {
            if let Some(result) = round.results[self.rank].take() {
                break result;
            }
            self.check(&round)?;
            round = self.wait(round, deadline, op)?;
        };
        round.taken += 1;
        if round.taken == self.shared.world {
            round.inputs.iter_mut().for_each(|i| *i = None);
            round.taken = 0;
            round.number += 1;
            self.shared.changed.notify_all();
        }
        self.done.store(mine + 1, Ordering::SeqCst);
        Ok(result)
    }

    fn run(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        let device: Device = x.device().clone();
        let out = self.exchange(op, HostData::of(x)?)?;
        out.to_tensor(&device)
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::AllReduceSum, x)
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::ReduceScatterSum, x)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::AllGather, x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.run(Op::Broadcast { root }, x)
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Op::AllReduceSum, HostData::F32(vec![0.0]))
            .map(|_| ())
    }
    fn abort(&self, reason: &str) {
        let mut round = self.lock();
        round
            .failed
            .get_or_insert_with(|| format!("rank {}: {reason}", self.rank));
        self.shared.changed.notify_all();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut round = self.lock();
        round.left[self.rank] = true;
        self.shared.changed.notify_all();
    }
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InProcess(rank {} of {})", self.rank, self.shared.world)
    }
}

/// Runs `f(rank, collective)` on `world` threads of one new group and returns every rank's result, rank 0
/// first. A panicking rank is reported as that rank's error.
pub fn run_ranks<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, Arc<dyn Collective>) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let handles = group(world, timeout);
    std::thread::scope(|scope| {
        let f = &f;
        let joins: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                let comm: Arc<dyn Collective> = Arc::new(h);
                scope.spawn(move || f(rank, comm))
            })
            .collect();
        joins
            .into_iter()
            .enumerate()
            .map(|(rank, j)| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow!("rank {rank} panicked")))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>) -> Tensor {
        let n = v.len();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    #[test]
    fn every_operation_gives_each_rank_its_share() {
        let out = run_ranks(3, Duration::from_secs(10), |rank, c| {
            let r = rank as f32;
            let sum = c.all_reduce_sum(&t(vec![r, 1.0]))?.to_vec1::<f32>()?;
            let part = c
                .reduce_scatter_sum(&t(vec![r, 1.0, 2.0 * r, 0.0, 1.0, r]))?
                .to_vec1::<f32>()?;
            let all = c.all_gather(&t(vec![r]))?.to_vec1::<f32>()?;
            let root = c.broadcast(&t(vec![r + 10.0]), 2)?.to_vec1::<f32>()?;
            c.barrier()?;
            Ok((sum, part, all, root))
        });
        for (rank, r) in out.into_iter().enumerate() {
            let (sum, part, all, root) = r.unwrap();
            assert_eq!(sum, vec![3.0, 3.0]);
            let expected = [vec![3.0, 3.0], vec![6.0, 0.0], vec![3.0, 3.0]];
            assert_eq!(part, expected[rank]);
            assert_eq!(all, vec![0.0, 1.0, 2.0]);
            assert_eq!(root, vec![12.0]);
        }
    }

    #[test]
    fn an_aborting_rank_fails_its_peers_at_once() {
        let t0 = Instant::now();
        let out = run_ranks(3, Duration::from_secs(60), |rank, c| {
            c.all_reduce_sum(&t(vec![1.0]))?;
            if rank == 1 {
                c.abort("the loss is NaN");
                bail!("the loss is NaN");
            }
            c.all_reduce_sum(&t(vec![1.0]))?;
            Ok(())
        });
        assert!(t0.elapsed() < Duration::from_secs(10));
        for r in [0, 2] {
            let err = format!("{:#}", out[r].as_ref().unwrap_err());
            assert!(err.contains("rank 1: the loss is NaN"), "{err}");
        }
    }

    #[test]
    fn a_rank_that_panics_or_hangs_fails_the_others_within_the_timeout() {
        let t0 = Instant::now();
        let out = run_ranks(2, Duration::from_secs(60), |rank, c| {
            if rank == 1 {
                panic!("boom");
            }
            c.all_reduce_sum(&t(vec![1.0]))?;
            Ok(())
        });
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(format!("{:#}", out[0].as_ref().unwrap_err()).contains("left the group"));
        assert!(format!("{:#}", out[1].as_ref().unwrap_err()).contains("panicked"));

        let out = run_ranks(2, Duration::from_millis(300), |rank, c| {
            if rank == 1 {
                std::thread::sleep(Duration::from_secs(2));
                return Ok(None);
            }
            let t0 = Instant::now();
            let err = c.all_reduce_sum(&t(vec![1.0])).unwrap_err();
            Ok(Some((t0.elapsed(), format!("{err:#}"))))
        });
        let (waited, err) = out[0].as_ref().unwrap().clone().unwrap();
        assert!(err.contains("no answer from rank(s) 1"), "{err}");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    #[test]
    fn mismatched_calls_fail_every_rank() {
        let out = run_ranks(2, Duration::from_secs(10), |rank, c| {
            if rank == 0 {
                c.all_reduce_sum(&t(vec![1.0, 2.0]))?;
            } else {
                c.all_gather(&t(vec![1.0, 2.0]))?;
            }
            Ok(())
        });
        for r in out {
            assert!(format!("{:#}", r.unwrap_err()).contains("out of step"));
        }
    }
}
