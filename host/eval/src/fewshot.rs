//! Which documents are evaluated in which order, and which few-shot examples each one gets — reproducing
//! lm-evaluation-harness's random sequences exactly (see [`Mode`]).

use super::pyrandom::PyRandom;
use serde::{Deserialize, Serialize};

/// Whose behaviour to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The Open LLM Leaderboard v1 pin (lm-eval b281b09), which the paper's H6 numbers use: no BOS; the
    /// evaluated documents are shuffled with `random.Random(42)` and the same generator then draws
    /// `sample(train, k)` per document in that order; GSM8K stops at `:`, `Question:`, `Question`.
    #[default]
    LeaderboardV1,
    /// lm-evaluation-harness 0.4 (pip): BOS when the tokenizer adds one; documents in dataset order;
    /// few-shot examples from `random.Random(1234)`, one `sample` per document; GSM8K stops at `Question:`.
    Harness,
}

/// Where a task's few-shot examples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShotPool {
    /// Random examples from a separate split of `n` documents.
    Separate(usize),
    /// Like `Separate`, but the harness draws `k + 1` and drops the evaluated document if drawn. lm-eval 0.4
    /// does this when a task's few-shot split equals its test split, which includes tasks with neither set
    /// (HellaSwag, Winogrande: both `None`); the extra draw changes the random sequence.
    SeparateDrawOneMore(usize),
    /// Random examples from the evaluated documents themselves (excluding the current one).
    SameAsEval,
    /// The first `k` documents of a separate split of `n`, in order (MMLU's dev shots).
    FirstN(usize),
}

/// The evaluation plan of one task: documents in evaluation order and their few-shot examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShotPlan {
    /// Indices of the evaluated documents, in the order they are evaluated.
    pub order: Vec<usize>,
    /// For each entry of `order`, the few-shot example indices (into the pool) in prompt order.
    pub shots: Vec<Vec<usize>>,
}

/// Plans `n_eval` documents (the first `limit` after ordering) with `k` shots each from `pool`.
/// `same(pool_index, eval_index)` says whether a pool document equals an evaluated one (the harness
/// compares documents by value when it removes the current document from its examples).
pub fn plan(
    mode: Mode,
    n_eval: usize,
    limit: Option<usize>,
    k: usize,
    pool: ShotPool,
    same: &dyn Fn(usize, usize) -> bool,
) -> ShotPlan {
    let take = limit.unwrap_or(n_eval).min(n_eval);
    let mut order: Vec<usize> = (0..n_eval).collect();
    let mut shots = Vec::with_capacity(take);
    match mode {
        Mode::LeaderboardV1 => {
            let mut rnd = PyRandom::new(42);
            rnd.shuffle(&mut order);
            order.truncate(take);
            for &doc in &order {
                shots.push(match pool {
                    _ if k == 0 => vec![],
                    ShotPool::FirstN(n) => (0..k.min(n)).collect(),
                    ShotPool::Separate(n) | ShotPool::SeparateDrawOneMore(n) => {
                        rnd.sample_indices(n, k)
                    }
                    ShotPool::SameAsEval => {
                        let picked = rnd.sample_indices(n_eval, (k + 1).min(n_eval));
                        picked
                            .into_iter()
                            .filter(|&x| !same(x, doc))
                            .take(k)
                            .collect()
                    }
                });
            }
        }
        Mode::Harness => {
            let mut rnd = PyRandom::new(1234);
            order.truncate(take);
            for &doc in &order {
                shots.push(match pool {
                    _ if k == 0 => vec![],
                    ShotPool::FirstN(n) => (0..k.min(n)).collect(),
                    ShotPool::Separate(n) => rnd.sample_indices(n, k),
                    ShotPool::SeparateDrawOneMore(_) | ShotPool::SameAsEval => {
                        let n = match pool {
                            ShotPool::SeparateDrawOneMore(n) => n,
                            _ => n_eval,
                        };
                        let picked = rnd.sample_indices(n, (k + 1).min(n));
                        let mut res: Vec<usize> = picked
                            .into_iter()
                            .filter(|&x| !same(x, doc))
                            .take(k)
                            .collect();
                        if res.len() < k {
                            // Too few left: sample again from the pool without the document.
                            let pool: Vec<usize> = (0..n).filter(|&x| !same(x, doc)).collect();
                            res = rnd
                                .sample_indices(pool.len(), k.min(pool.len()))
                                .into_iter()
                                .map(|i| pool[i])
                                .collect();
                        }
                        res
                    }
                });
            }
        }
    }
    ShotPlan { order, shots }
}
