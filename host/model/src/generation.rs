//! Batched generation (greedy or sampled, with stop strings) and log-likelihood scoring, as evaluation needs.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::llama::{key_mask, ForwardOptions, KvCache, Llama};
use super::tokenizer::Tokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Highest-probability token (ties: lowest id).
    Greedy,
    /// Draw from the softmax at `temperature`, restricted to the `top_k` most likely tokens (0 = all) and to
    /// the smallest set whose probability reaches `top_p` (1.0 = all). Row `i` of a batch uses the RNG seeded
    /// with `seed + i`, so results do not depend on batch composition.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Keep only the k most likely tokens; 0 disables.
        top_k: usize,
        /// Nucleus threshold in (0, 1].
        top_p: f64,
        /// Base RNG seed.
        seed: u64,
    },
}

/// Settings of one [`generate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops when the decoded continuation contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Stop at the tokenizer's EOS (or any of these extra ids).
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            stop_strings: vec![],
            stop_token_ids: vec![],
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_new_tokens`.
    Length,
    /// Produced a stop token (not included in `tokens` or `text`).
    StopToken,
    /// The text contained a stop string (text cut before it; `tokens` holds everything generated).
    StopString,
}

/// The continuation generated for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (without the prompt and without a final stop token).
    pub tokens: Vec<u32>,
    /// Decoded text (special tokens skipped), cut before the first stop string.
    pub text: String,
    /// Why generation stopped.
    pub finish: FinishReason,
}

/// Generates continuations of token-id prompts in one batch, left-padded, with a KV cache.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    ensure!(!prompts.is_empty(), "no prompts");
    ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "empty prompt (add BOS or some text)"
    );
    let dev = model.device().clone();
    let b = prompts.len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Padding positions are masked out; id 0 exists in every vocabulary.
    let pad = 0u32;
    let mut stop_ids = opts.stop_token_ids.clone();
    stop_ids.extend(tok.eos_id());

    let mut ids = Vec::with_capacity(b * max_len);
    let mut positions = Vec::with_capacity(b * max_len);
    let mut key_valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    let mut next_pos = Vec::with_capacity(b);
    for p in prompts {
        let padding = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        positions.extend(std::iter::repeat_n(0u32, padding).chain(0..p.len() as u32));
        key_valid.push(
            std::iter::repeat_n(false, padding)
                .chain(std::iter::repeat_n(true, p.len()))
                .collect(),
        );
        next_pos.push(p.len() as u32);
    }
    let mut cache = KvCache::with_headroom(model.config().num_hidden_layers, opts.max_new_tokens);
    let mut input = Tensor::from_vec(ids, (b, max_len), &dev)?;
    let mut fwd = ForwardOptions {
        position_ids: Some(Tensor::from_vec(positions, (b, max_len), &dev)?),
        key_mask: Some(key_mask(&key_valid, &dev)?),
        document_ids: None,
    };
    let mut rngs: Vec<StdRng> = (0..b)
        .map(|i| match opts.sampling {
            Sampling::Sample { seed, .. } => StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
            Sampling::Greedy => StdRng::seed_from_u64(0),
        })
        .collect();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: vec![],
            text: String::new(),
            finish: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; b];
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache, &fwd, true)?;
        let logits: Vec<Vec<f32>> = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (i, row) in logits.iter().enumerate() {
            if done[i] {
                next.push(pad);
                continue;
            }
            let t = choose(row, &opts.sampling, &mut rngs[i]);
            if stop_ids.contains(&t) {
                done[i] = true;
                out[i].finish = FinishReason::StopToken;
            } else {
                out[i].tokens.push(t);
                if !opts.stop_strings.is_empty() {
                    let text = tok.decode(&out[i].tokens, true)?;
                    if let Some(cut) = opts
                        .stop_strings
                        .iter()
                        .filter_map(|s| text.find(s.as_str()))
                        .min()
                    {
                        out[i].text = text[..cut].to_string();
                        out[i].finish = FinishReason::StopString;
                        done[i] = true;
                    }
                }
            }
            next.push(t);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        // Finished rows keep decoding padding; their new keys are masked.
        for (i, valid) in key_valid.iter_mut().enumerate() {
            valid.push(!done[i]);
        }
        input = Tensor::from_vec(next, (b, 1), &dev)?;
        fwd = ForwardOptions {
            position_ids: Some(Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?),
            key_mask: Some(key_mask(&key_valid, &dev)?),
            document_ids: None,
        };
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    for g in out.iter_mut() {
        if g.finish != FinishReason::StopString {
            g.text = tok.decode(&g.tokens, true)?;
        }
    }
    Ok(out)
}

fn choose(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            let t = temperature.max(1e-6);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            if *top_k > 0 {
                order.truncate(*top_k);
            }
            let max = logits[order[0]] as f64;
            let weights: Vec<f64> = order
                .iter()
                .map(|&i| ((logits[i] as f64 - max) / t).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut keep = order.len();
            let mut acc = 0.0;
            for (k, w) in weights.iter().enumerate() {
                acc += w / total;
                if acc >= *top_p {
                    keep = k + 1;
                    break;
                }
            }
            let total: f64 = weights[..keep].iter().sum();
            let mut u = rng.random::<f64>() * total;
            for k in 0..keep {
                u -= weights[k];
                if u <= 0.0 {
                    return order[k] as u32;
                }
            }
            order[keep - 1] as u32
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-likelihood of a continuation given its context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLikelihood {
    /// Sum of the log-probabilities of the continuation tokens.
    pub logprob: f64,
    /// Whether every continuation token is the greedy (argmax) choice.
    pub is_greedy: bool,
}

/// Scores `(context, continuation)` token-id pairs, `batch_size` at a time (right-padded), returning results
/// in request order. Requests are batched longest first so that batches hold similar lengths. The context
/// must be non-empty (it holds BOS when the evaluation adds one).
pub fn loglikelihood(
    model: &Llama,
    requests: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<LogLikelihood>> {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].0.len() + requests[i].1.len()));
    let sorted: Vec<(Vec<u32>, Vec<u32>)> = order.iter().map(|&i| requests[i].clone()).collect();
    let scored = loglikelihood_in_order(model, &sorted, batch_size)?;
    let mut results = vec![
        LogLikelihood {
            logprob: 0.0,
            is_greedy: false
        };
        requests.len()
    ];
    for (r, i) in scored.into_iter().zip(order) {
        results[i] = r;
    }
    Ok(results)
}

fn loglikelihood_in_order(
    model: &Llama,
    requests: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<LogLikelihood>> {
    let dev = model.device().clone();
    let mut results = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(ctx, cont)| {
                ensure!(
                    !ctx.is_empty() && !cont.is_empty(),
                    "context and continuation must be non-empty"
                );
                let mut s = ctx.clone();
                s.extend_from_slice(cont);
                s.pop();
                Ok(s)
            })
            .collect::<Result<_>>()?;
        let len = seqs.iter().map(Vec::len).max().unwrap_or(1);
        let flat: Vec<u32> = seqs
            .iter()
            .flat_map(|s| {
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, len - s.len()))
            })
            .collect();
        let input = Tensor::from_vec(flat, (chunk.len(), len), &dev)?;
        // Logits only for the continuation rows: the (batch, seq, vocab) tensor would dominate memory.
        let hidden = model.forward_hidden(&input, &ForwardOptions::default())?;
        for (r, (ctx, cont)) in chunk.iter().enumerate() {
            let rows = hidden.get(r)?.narrow(0, ctx.len() - 1, cont.len())?;
            let logp =
                candle_nn::ops::log_softmax(&model.head(&rows)?.to_dtype(DType::F32)?, D::Minus1)?;
            let rows: Vec<Vec<f32>> = logp.to_vec2()?;
            let mut total = 0.0;
            let mut greedy = true;
            for (row, &t) in rows.iter().zip(cont) {
                total += row[t as usize] as f64;
                greedy &= argmax(row) == t;
            }
            results.push(LogLikelihood {
                logprob: total,
                is_greedy: greedy,
            });
        }
    }
    Ok(results)
}
