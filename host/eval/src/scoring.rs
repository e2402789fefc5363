//! Scoring requests with the model: log-likelihoods of continuations (batched, with the shared context
//! computed once per document), greedy generation with stop strings, and rolling log-likelihoods for
//! perplexity. Tokenisation follows lm-evaluation-harness: trailing spaces of a context move to the
//! continuation, the pair is encoded whole and split at the context's length, and over-long inputs are
//! truncated from the left.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use dusflow_model::{
    generate, loglikelihood, GenerateOptions, KvCache, Llama, Sampling, Tokenizer,
};

/// The model, its tokenizer and the scoring settings.
pub struct Scorer<'a> {
    /// The network.
    pub model: &'a Llama,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Encode with the tokenizer's special tokens (BOS) — harness mode; leaderboard-v1 encodes without.
    pub add_special_tokens: bool,
    /// Longest input the model takes (`max_position_embeddings`).
    pub max_length: usize,
    /// Sequences per forward pass where requests cannot share a context.
    pub batch_size: usize,
    /// Compute a context shared by several continuations once (off = every pair scored on its own).
    pub prefix_reuse: bool,
    /// Polled between forward passes; returning true stops scoring with [`dusflow_core::step::Cancelled`].
    pub cancelled: Option<&'a (dyn Fn() -> bool + Sync)>,
}

/// One context and the continuations scored after it.
#[derive(Debug, Clone)]
pub struct ContextGroup {
    /// The context text.
    pub context: String,
    /// Continuation texts.
    pub continuations: Vec<String>,
}

impl Scorer<'_> {
    fn check_cancelled(&self) -> Result<()> {
        if self.cancelled.is_some_and(|c| c()) {
            return Err(dusflow_core::step::Cancelled.into());
        }
        Ok(())
    }

    /// Token ids of `text` as the harness's `tok_encode` makes them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, self.add_special_tokens)
    }

    /// `(context, continuation)` ids the way the harness's `_encode_pair` splits them.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if context.is_empty() {
            let prefix = self
                .tokenizer
                .bos_id()
                .or(self.tokenizer.eos_id())
                .unwrap_or(0);
            return Ok((vec![prefix], self.encode(continuation)?));
        }
        let trimmed = context.trim_end();
        let (context, continuation) = (
            trimmed,
            format!("{}{continuation}", &context[trimmed.len()..]),
        );
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let ctx = self.encode(context)?;
        ensure!(
            whole.len() > ctx.len(),
            "continuation {continuation:?} encodes to no tokens"
        );
        let cont = whole[ctx.len()..].to_vec();
        Ok((ctx, cont))
    }

    /// Log-likelihood (sum of token log-probabilities) of every continuation of every group, in order.
    pub fn loglikelihoods(
        &self,
        groups: &[ContextGroup],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f64>>> {
        let mut out: Vec<Vec<f64>> = groups
            .iter()
            .map(|g| vec![f64::NAN; g.continuations.len()])
            .collect();
        // Pairs that cannot share a context computation, scored in plain batches.
        let mut plain: Vec<(usize, usize, Vec<u32>, Vec<u32>)> = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            self.check_cancelled()?;
            let pairs: Vec<(Vec<u32>, Vec<u32>)> = g
                .continuations
                .iter()
                .map(|c| self.encode_pair(&g.context, c))
                .collect::<Result<_>>()?;
            let shared = pairs.iter().all(|(c, _)| *c == pairs[0].0);
            let fits = pairs
                .iter()
                .all(|(c, k)| c.len() + k.len() <= self.max_length + 1);
            if self.prefix_reuse && shared && fits && pairs.len() > 1 {
                let conts: Vec<Vec<u32>> = pairs.iter().map(|(_, k)| k.clone()).collect();
                out[gi] = self.shared_context(&pairs[0].0, &conts)?;
                progress(1);
            } else {
                for (ci, (ctx, cont)) in pairs.into_iter().enumerate() {
                    let (ctx, cont) = self.truncate(ctx, cont)?;
                    plain.push((gi, ci, ctx, cont));
                }
                if plain.len() >= self.batch_size.max(1) * 4 {
                    self.flush_plain(&mut plain, &mut out)?;
                }
                progress(1);
            }
        }
        self.flush_plain(&mut plain, &mut out)?;
        Ok(out)
    }

    fn flush_plain(
        &self,
        plain: &mut Vec<(usize, usize, Vec<u32>, Vec<u32>)>,
        out: &mut [Vec<f64>],
    ) -> Result<()> {
        if plain.is_empty() {
            return Ok(());
        }
        // Similar lengths together keep padding small.
        plain.sort_by_key(|(_, _, c, k)| std::cmp::Reverse(c.len() + k.len()));
        let requests: Vec<(Vec<u32>, Vec<u32>)> = plain
            .iter()
            .map(|(_, _, c, k)| (c.clone(), k.clone()))
            .collect();
        let lls = loglikelihood(self.model, &requests, self.batch_size.max(1))?;
        for ((gi, ci, _, _), ll) in plain.drain(..).zip(lls) {
            out[gi][ci] = ll.logprob;
        }
        Ok(())
    }

    /// The harness's `(context + continuation)[-(max_length + 1):]` with the last token dropped as input.
    fn truncate(&self, mut ctx: Vec<u32>, cont: Vec<u32>) -> Result<(Vec<u32>, Vec<u32>)> {
        ensure!(
            cont.len() <= self.max_length,
            "continuation of {} tokens exceeds the model's {} positions",
            cont.len(),
            self.max_length
        );
        let total = ctx.len() + cont.len();
        if total > self.max_length + 1 {
            ctx.drain(..total - self.max_length - 1);
        }
        Ok((ctx, cont))
    }

    /// One forward over the context, then all continuations together on copies of its KV cache.
    fn shared_context(&self, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<f64>> {
        let dev = self.model.device();
        let mut cache = KvCache::new(self.model.config().num_hidden_layers);
        let input = Tensor::from_slice(ctx, (1, ctx.len()), dev)?;
        let last = self
            .model
            .forward_cached(&input, &mut cache, &Default::default(), true)?;
        let first: Vec<f32> = candle_nn::ops::log_softmax(&last.to_dtype(DType::F32)?, D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        let mut lls: Vec<f64> = conts
            .iter()
            .map(|c| f64::from(first[c[0] as usize]))
            .collect();
        let longest = conts.iter().map(Vec::len).max().unwrap_or(1);
        if longest > 1 {
            let n = conts.len();
            let width = longest - 1;
            let flat: Vec<u32> = conts
                .iter()
                .flat_map(|c| {
                    c[..c.len() - 1]
                        .iter()
                        .copied()
                        .chain(std::iter::repeat_n(0, width + 1 - c.len()))
                })
                .collect();
            let input = Tensor::from_vec(flat, (n, width), dev)?;
            let mut batch_cache = cache.repeat_batch(n)?;
            let logits =
                self.model
                    .forward_cached(&input, &mut batch_cache, &Default::default(), false)?;
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            for (i, c) in conts.iter().enumerate() {
                if c.len() < 2 {
                    continue;
                }
                let rows: Vec<Vec<f32>> = logp.get(i)?.narrow(0, 0, c.len() - 1)?.to_vec2()?;
                for (row, &t) in rows.iter().zip(&c[1..]) {
                    lls[i] += f64::from(row[t as usize]);
                }
            }
        }
        Ok(lls)
    }

    /// Greedy continuations of `prompts`, each cut at the first of `until` (and at EOS), at most
    /// `max_gen_toks` tokens; contexts are truncated from the left to leave room for them.
    pub fn generate_until(
        &self,
        prompts: &[String],
        until: &[String],
        max_gen_toks: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<String>> {
        let keep = self.max_length.saturating_sub(max_gen_toks).max(1);
        let mut out = vec![String::new(); prompts.len()];
        // Longest prompts first, in batches (as the harness orders them); results go back in order.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        let encoded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut ids = self.encode(p)?;
                if ids.len() > keep {
                    ids.drain(..ids.len() - keep);
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let opts = GenerateOptions {
            max_new_tokens: max_gen_toks,
            sampling: Sampling::Greedy,
            stop_strings: until.to_vec(),
            stop_token_ids: vec![],
        };
        for chunk in order.chunks(self.batch_size.max(1)) {
            self.check_cancelled()?;
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let gens = generate(self.model, self.tokenizer, &batch, &opts)?;
            for (&i, g) in chunk.iter().zip(gens) {
                out[i] = g.text;
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Sum of log-probabilities of all tokens of `text` (the first predicted from EOS/BOS) and the token
    /// count, over consecutive windows of at most `max_length` tokens.
    pub fn rolling_loglikelihood(&self, text: &str) -> Result<(f64, usize)> {
        let ids = self.tokenizer.encode(text, false)?;
        ensure!(!ids.is_empty(), "empty text");
        let prefix = self
            .tokenizer
            .eos_id()
            .or(self.tokenizer.bos_id())
            .unwrap_or(0);
        // Disjoint windows of `max_length` predicted tokens; each input is the one token before the window
        // followed by the window minus its last token (the harness's rolling windows with context 1).
        let mut requests = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            let end = (start + self.max_length).min(ids.len());
            let ctx = if start == 0 {
                vec![prefix]
            } else {
                vec![ids[start - 1]]
            };
            requests.push((ctx, ids[start..end].to_vec()));
            start = end;
        }
        let lls = loglikelihood(self.model, &requests, self.batch_size.max(1))?;
        Ok((lls.iter().map(|l| l.logprob).sum(), ids.len()))
    }
}
