//! Direct preference optimisation with TRL's semantics (TRL 1.16 `DPOTrainer`): preference pairs
//! tokenised like TRL, sequence log-probabilities summed over completion tokens only, chosen and rejected
//! in one concatenated forward pass, the `sigmoid`, `ipo`, `hinge` and `robust` losses, TRL's metric names,
//! and a no-grad reference pass whose log-probabilities are stored so that no reference model stays in
//! memory while training (TRL's `precompute_ref_log_probs = True`).
//!
//! Tokenisation ([`tokenize_pair`]), as TRL's `_prepare_dataset` + `DataCollatorForPreference`: EOS text
//! appended to chosen and rejected (unless already there); `prompt`, `prompt + chosen` and
//! `prompt + rejected` encoded with the tokenizer's specials (BOS); the completion starts where the prompt's
//! ids and the full ids diverge; `prompt + completion` is cut to `max_length` keeping the start, and a pair
//! whose prompt alone fills `max_length` is dropped. `max_prompt_length` (older TRL; not in 1.16) first
//! cuts the prompt keeping its end, and its leading BOS if it has one.

use super::metrics::StepMetrics;
use super::trainer::{MicroLoss, Objective};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use dusflow_model::{ForwardOptions, Llama, Tokenizer};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The preference loss (TRL `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossKind {
    /// `−(1−ε)·log σ(βδ) − ε·log σ(−βδ)` (DPO; with label smoothing ε the conservative cDPO form of
    /// TRL < 1.0 — TRL 1.16's `sigmoid` ignores ε and computes this form as `aot` for single pairs).
    #[default]
    Sigmoid,
    /// `(δ̄ − 1/(2β))²` on per-token-averaged log-ratios (IPO).
    Ipo,
    /// `relu(1 − βδ)` (SLiC).
    Hinge,
    /// `[−(1−ε)·log σ(βδ) + ε·log σ(−βδ)] / (1 − 2ε)` (robust DPO).
    Robust,
}

/// The loss and its constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoLossConfig {
    /// Which loss.
    pub kind: DpoLossKind,
    /// β: the strength of the implicit KL penalty (IPO: its τ).
    pub beta: f64,
    /// ε: the assumed fraction of flipped labels (`sigmoid`, `robust`).
    pub label_smoothing: f64,
}

/// `log σ(x)` as `x/2 − |x|/2 − log(1 + exp(−|x|))`: stable for any x, and its gradient is `σ(−x)`
/// everywhere, including x = 0 (where every policy starts, being its own reference), whatever
/// subgradient the autodiff picks for `|x|` at 0 — the `−relu(−x) − …` form would give 1.5 there.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let tail = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok((((x - &abs)? * 0.5)? - tail)?)
}

/// Per-pair losses `(B,)` from policy and reference sequence log-probs and completion lengths, all `(B,)`
/// f32 tensors. Differentiable in the policy log-probs.
pub fn dpo_losses(
    cfg: &DpoLossConfig,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    chosen_len: &Tensor,
    rejected_len: &Tensor,
) -> Result<Tensor> {
    let chosen_ratio = (policy_chosen - ref_chosen)?;
    let rejected_ratio = (policy_rejected - ref_rejected)?;
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let scaled = (&delta * beta)?;
    Ok(match cfg.kind {
        DpoLossKind::Sigmoid => {
            let clean = (log_sigmoid(&scaled)? * -(1.0 - eps))?;
            if eps == 0.0 {
                clean
            } else {
                (clean - (log_sigmoid(&scaled.neg()?)? * eps)?)?
            }
        }
        DpoLossKind::Hinge => (scaled.neg()? + 1.0)?.relu()?,
        DpoLossKind::Ipo => {
            let avg = ((chosen_ratio / chosen_len)? - (rejected_ratio / rejected_len)?)?;
            (avg - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLossKind::Robust => {
            let clean = (log_sigmoid(&scaled)? * -(1.0 - eps))?;
            let flipped = (log_sigmoid(&scaled.neg()?)? * -eps)?;
            ((clean - flipped)? / (1.0 - 2.0 * eps))?
        }
    })
}

/// One tokenised preference pair: prompt ids (with the tokenizer's BOS) and the two completions (each
/// ending in EOS), already truncated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Shown, not scored.
    pub prompt: Vec<u32>,
    /// Preferred completion.
    pub chosen: Vec<u32>,
    /// Dispreferred completion.
    pub rejected: Vec<u32>,
}

/// Length limits of [`tokenize_pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairLimits {
    /// Prompt + completion tokens at most (keeps the start); `None` = no limit.
    pub max_length: Option<usize>,
    /// Prompt tokens at most (keeps the end); `None` = no limit.
    pub max_prompt_length: Option<usize>,
}

/// Tokenises a pair as TRL does (see the module docs). `None` when the prompt alone fills `max_length`.
/// `add_special_tokens` adds the tokenizer's specials (BOS) to plain text; text a model's chat template
/// rendered already holds them and is tokenised without (as `apply_chat_template` tokenises).
pub fn tokenize_pair(
    tok: &Tokenizer,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    add_special_tokens: bool,
    limits: PairLimits,
) -> Result<Option<PreferencePair>> {
    let Some(eos) = tok.eos_id() else {
        bail!("the tokenizer has no EOS token; DPO appends one to every completion")
    };
    let eos_text = tok
        .inner()
        .id_to_token(eos)
        .context("the EOS id has no token text")?;
    let with_eos = |c: &str| {
        if c.ends_with(&eos_text) {
            c.to_string()
        } else {
            format!("{c}{eos_text}")
        }
    };
    let prompt_ids = tok.encode(prompt, add_special_tokens)?;
    let full_chosen = tok.encode(&format!("{prompt}{}", with_eos(chosen)), add_special_tokens)?;
    let full_rejected = tok.encode(
        &format!("{prompt}{}", with_eos(rejected)),
        add_special_tokens,
    )?;
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let prompt_len = common(&prompt_ids, &full_chosen).min(common(&prompt_ids, &full_rejected));
    let mut prompt_part = prompt_ids[..prompt_len].to_vec();
    let mut chosen_part = full_chosen[prompt_len..].to_vec();
    let mut rejected_part = full_rejected[prompt_len..].to_vec();
    if let Some(max) = limits.max_prompt_length {
        if prompt_part.len() > max {
            // Keep the end, and a leading BOS (older TRL cut it away with the start).
            let bos = tok.bos_id().filter(|b| prompt_part.first() == Some(b));
            let keep = max - bos.is_some() as usize;
            let tail = prompt_part.split_off(prompt_part.len() - keep);
            prompt_part = bos.into_iter().chain(tail).collect();
        }
    }
    if let Some(max) = limits.max_length {
        if prompt_part.len() >= max {
            return Ok(None);
        }
        chosen_part.truncate(max - prompt_part.len());
        rejected_part.truncate(max - prompt_part.len());
    }
    Ok(Some(PreferencePair {
        prompt: prompt_part,
        chosen: chosen_part,
        rejected: rejected_part,
    }))
}

/// Sequence log-probs of a batch of pairs from one concatenated forward pass (chosen rows, then rejected
/// rows, right-padded): the sum over completion tokens of `log p(token | prefix)`.
pub struct SequenceLogps {
    /// `(B,)` f32: chosen completions.
    pub chosen: Tensor,
    /// `(B,)` f32: rejected completions.
    pub rejected: Tensor,
    /// `(B,)` f32: completion tokens of each chosen completion.
    pub chosen_len: Tensor,
    /// `(B,)` f32: completion tokens of each rejected completion.
    pub rejected_len: Tensor,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
}

/// Computes [`SequenceLogps`] for `pairs` with `model`'s differentiable forward (its graph is recorded
/// only when the model's weights are variables). Logits are computed for completion positions only.
pub fn sequence_logps(model: &Llama, pairs: &[&PreferencePair], pad: u32) -> Result<SequenceLogps> {
    ensure!(!pairs.is_empty(), "empty batch of preference pairs");
    let device = model.device();
    let b = pairs.len();
    let rows: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        )
        .collect();
    let seq = rows
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    ensure!(seq >= 2, "preference rows need at least two tokens");
    let mut ids = Vec::with_capacity(rows.len() * seq);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut owner = Vec::new();
    let mut lens = Vec::with_capacity(rows.len());
    let mut tokens = 0;
    for (r, (prompt, completion)) in rows.iter().enumerate() {
        let n = prompt.len() + completion.len();
        tokens += n;
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(completion);
        ids.extend(std::iter::repeat_n(pad, seq - n));
        // Position i predicts token i + 1; completion tokens at index 0 have no prefix and are not scored.
        for (k, &t) in completion.iter().enumerate() {
            let i = prompt.len() + k;
            if i == 0 {
                continue;
            }
            positions.push((r * seq + i - 1) as u32);
            targets.push(t);
            owner.push(r);
        }
        lens.push(completion.len() as f32);
    }
    let n = positions.len();
    let sums = if n == 0 {
        Tensor::zeros(rows.len(), DType::F32, device)?
    } else {
        let input = Tensor::from_vec(ids, (rows.len(), seq), device)?;
        let hidden = model.forward_hidden_train(&input, &ForwardOptions::default())?;
        let h = hidden.dim(D::Minus1)?;
        let picked = hidden
            .reshape((rows.len() * seq, h))?
            .index_select(&Tensor::from_vec(positions, n, device)?, 0)?;
        let logits = model.head(&picked)?.to_dtype(DType::F32)?;
        let logp = log_softmax(&logits)?.gather(&Tensor::from_vec(targets, (n, 1), device)?, 1)?;
        let mut member = vec![0f32; rows.len() * n];
        for (j, &r) in owner.iter().enumerate() {
            member[r * n + j] = 1.0;
        }
        Tensor::from_vec(member, (rows.len(), n), device)?
            .matmul(&logp)?
            .squeeze(1)?
    };
    let lens = Tensor::from_vec(lens, rows.len(), device)?;
    Ok(SequenceLogps {
        chosen: sums.narrow(0, 0, b)?,
        rejected: sums.narrow(0, b, b)?,
        chosen_len: lens.narrow(0, 0, b)?,
        rejected_len: lens.narrow(0, b, b)?,
        tokens,
    })
}

/// Log-softmax over the last dimension; the max is detached (it cancels out of the gradient).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The reference model's sequence log-probs of every pair, in pair order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogps {
    /// Of each chosen completion.
    pub chosen: Vec<f32>,
    /// Of each rejected completion.
    pub rejected: Vec<f32>,
}

/// One no-grad pass of `model` over `pairs` in batches of `batch` pairs; `on_batch(done)` is called after
/// each batch (progress, cancellation).
pub fn reference_pass(
    model: &Llama,
    pairs: &[PreferencePair],
    batch: usize,
    pad: u32,
    on_batch: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<ReferenceLogps> {
    let mut out = ReferenceLogps {
        chosen: Vec::with_capacity(pairs.len()),
        rejected: Vec::with_capacity(pairs.len()),
    };
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let lp = sequence_logps(model, &refs, pad)?;
        out.chosen.extend(lp.chosen.detach().to_vec1::<f32>()?);
        out.rejected.extend(lp.rejected.detach().to_vec1::<f32>()?);
        on_batch(out.chosen.len())?;
    }
    Ok(out)
}

/// The DPO objective over `pairs` against precomputed reference log-probs: units are pairs.
pub struct DpoObjective<'a> {
    /// The pairs.
    pub pairs: &'a [PreferencePair],
    /// The reference's log-probs of `pairs`, in the same order.
    pub reference: &'a ReferenceLogps,
    /// The loss.
    pub loss: DpoLossConfig,
    /// Padding id.
    pub pad_id: u32,
}

/// The names under which DPO metrics are logged (TRL's).
pub const DPO_METRICS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
];

impl Objective for DpoObjective<'_> {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn units(&self, idx: &[usize]) -> usize {
        idx.len()
    }

    fn micro_batch_loss(&self, model: &Llama, idx: &[usize]) -> Result<MicroLoss> {
        let device = model.device();
        let picked: Vec<&PreferencePair> = idx.iter().map(|&i| &self.pairs[i]).collect();
        let lp = sequence_logps(model, &picked, self.pad_id)?;
        let gather = |v: &[f32]| -> Result<Tensor> {
            let vals: Vec<f32> = idx.iter().map(|&i| v[i]).collect();
            Ok(Tensor::from_vec(vals, idx.len(), device)?)
        };
        let (ref_c, ref_r) = (
            gather(&self.reference.chosen)?,
            gather(&self.reference.rejected)?,
        );
        let losses = dpo_losses(
            &self.loss,
            &lp.chosen,
            &lp.rejected,
            &ref_c,
            &ref_r,
            &lp.chosen_len,
            &lp.rejected_len,
        )?;
        let metric_sums = pair_metric_sums(
            self.loss.beta,
            &lp.chosen.detach().to_vec1::<f32>()?,
            &lp.rejected.detach().to_vec1::<f32>()?,
            &ref_c.to_vec1::<f32>()?,
            &ref_r.to_vec1::<f32>()?,
        );
        Ok(MicroLoss {
            loss_sum: losses.sum_all()?,
            tokens: lp.tokens,
            metric_sums,
        })
    }

    fn metric_names(&self) -> &'static [&'static str] {
        &DPO_METRICS
    }

    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(format!("{:?}", self.loss).as_bytes());
        for (i, p) in self.pairs.iter().enumerate() {
            for part in [&p.prompt, &p.chosen, &p.rejected] {
                for id in part {
                    h.update(&id.to_le_bytes());
                }
                h.update(b"|");
            }
            h.update(&self.reference.chosen[i].to_le_bytes());
            h.update(&self.reference.rejected[i].to_le_bytes());
        }
    }
}

/// Sums over pairs of TRL's DPO metrics ([`DPO_METRICS`]): rewards `β·(policy − reference)` of chosen and
/// rejected, their margin, whether chosen's reward is higher, and the policy log-probs.
pub fn pair_metric_sums(
    beta: f64,
    policy_chosen: &[f32],
    policy_rejected: &[f32],
    ref_chosen: &[f32],
    ref_rejected: &[f32],
) -> Vec<(&'static str, f64)> {
    let mut sums = [0f64; 6];
    for i in 0..policy_chosen.len() {
        // TRL computes rewards in the log-probs' dtype (f32).
        let rc = (beta as f32 * (policy_chosen[i] - ref_chosen[i])) as f64;
        let rr = (beta as f32 * (policy_rejected[i] - ref_rejected[i])) as f64;
        sums[0] += rc;
        sums[1] += rr;
        sums[2] += rc - rr;
        sums[3] += (rc > rr) as u8 as f64;
        sums[4] += policy_chosen[i] as f64;
        sums[5] += policy_rejected[i] as f64;
    }
    DPO_METRICS.into_iter().zip(sums).collect()
}

/// Draws the DPO curves of all stages against the global optimizer step: loss (top), reward accuracy and
/// mean reward margin (bottom), with a dashed line where each later stage starts.
pub fn plot_dpo(history: &[(usize, StepMetrics)], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the DPO curves: {e}");
    let points = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .enumerate()
            .filter_map(|(i, (_, m))| f(m).filter(|v| v.is_finite()).map(|v| ((i + 1) as f64, v)))
            .collect()
    };
    let loss = points(&|m| Some(m.loss));
    let acc = points(&|m| m.extra.get("rewards/accuracies").copied());
    let margin = points(&|m| m.extra.get("rewards/margins").copied());
    let max_x = (history.len() as f64).max(1.0);
    let range = |series: &[&[(f64, f64)]]| {
        let (lo, hi) = series
            .iter()
            .flat_map(|s| s.iter())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        if lo.is_finite() {
            let pad = ((hi - lo) * 0.05).max(1e-3);
            (lo - pad, hi + pad)
        } else {
            (0.0, 1.0)
        }
    };
    let stage_starts: Vec<f64> = history
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0].0 != w[1].0)
        .map(|(i, _)| (i + 1) as f64 + 0.5)
        .collect();
    let root = SVGBackend::new(path, (800, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(340);
    type Series<'a> = Vec<(&'a [(f64, f64)], RGBColor, &'static str)>;
    let panels: [(_, &str, Series); 2] = [
        (top, "loss", vec![(loss.as_slice(), BLUE, "loss")]),
        (
            bottom,
            "reward accuracy / margin",
            vec![
                (acc.as_slice(), GREEN, "rewards/accuracies"),
                (margin.as_slice(), RED, "rewards/margins"),
            ],
        ),
    ];
    for (area, y_desc, series) in panels {
        let all: Vec<&[(f64, f64)]> = series.iter().map(|s| s.0).collect();
        let (lo, hi) = range(&all);
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_x + 0.5, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step (all stages)")
            .y_desc(y_desc)
            .draw()
            .map_err(|e| err(&e))?;
        for x in &stage_starts {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(*x, lo), (*x, hi)],
                    4,
                    4,
                    BLACK.mix(0.5).stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
        }
        for (pts, color, label) in series {
            chart
                .draw_series(LineSeries::new(pts.to_vec(), color))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A `(B,)` f32 tensor on `device`.
pub fn vector(values: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, values.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(kind: DpoLossKind, delta: f32) -> f32 {
        let d = Device::Cpu;
        let cfg = DpoLossConfig {
            kind,
            beta: 0.1,
            label_smoothing: 0.0,
        };
        let v = |x: f32| vector(&[x], &d).unwrap();
        dpo_losses(&cfg, &v(delta), &v(0.0), &v(0.0), &v(0.0), &v(1.0), &v(1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn sigmoid_is_ln2_at_zero_and_log_sigmoid_is_stable() {
        assert!((losses(DpoLossKind::Sigmoid, 0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert!((losses(DpoLossKind::Hinge, 0.0) - 1.0).abs() < 1e-7);
        let big = log_sigmoid(&vector(&[-1000.0, 1000.0], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(big, vec![-1000.0, 0.0]);
    }

    #[test]
    fn log_sigmoid_gradient_is_sigmoid_of_minus_x_also_at_zero() {
        let xs = [-30.0f32, -2.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 40.0];
        let x = candle_core::Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let grad = y.sum_all().unwrap().backward().unwrap();
        let g = grad.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let sigmoid_neg = 1.0 / (1.0 + (x as f64).exp());
            assert!(
                (g[i] as f64 - sigmoid_neg).abs() < 1e-6,
                "d/dx at {x}: {}",
                g[i]
            );
            let want = -(1.0 + (-(x as f64)).exp()).ln();
            assert!(
                (v[i] as f64 - want).abs() < 1e-6 * want.abs().max(1.0),
                "at {x}: {}",
                v[i]
            );
        }
    }

    #[test]
    fn pairs_tokenise_like_trl() {
        let tok = Tokenizer::byte_level();
        let p = tokenize_pair(&tok, "Q?", " yes", " no</s>", true, PairLimits::default())
            .unwrap()
            .unwrap();
        let eos = tok.eos_id().unwrap();
        assert_eq!(
            p.prompt,
            vec![tok.bos_id().unwrap(), b'Q' as u32, b'?' as u32]
        );
        assert_eq!(
            p.chosen,
            vec![b' ' as u32, b'y' as u32, b'e' as u32, b's' as u32, eos]
        );
        assert_eq!(p.rejected, vec![b' ' as u32, b'n' as u32, b'o' as u32, eos]);
        let cut = PairLimits {
            max_length: Some(5),
            max_prompt_length: Some(2),
        };
        let p = tokenize_pair(&tok, "Q?", " yes", " no", true, cut)
            .unwrap()
            .unwrap();
        assert_eq!(p.prompt, vec![tok.bos_id().unwrap(), b'?' as u32]);
        assert_eq!(p.chosen.len(), 3);
        let none = PairLimits {
            max_length: Some(3),
            max_prompt_length: None,
        };
        assert!(tokenize_pair(&tok, "Q?", " a", " b", true, none)
            .unwrap()
            .is_none());
    }
}
