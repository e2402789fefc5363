//! Evaluating one task: plan documents and few-shot examples, build the prompts, score them, compute the
//! per-document metrics and their means. Every document's prompts and log-likelihoods are kept.

use super::data::TaskData;
use super::fewshot::{plan, Mode, ShotPool};
use super::metrics::{acc, acc_norm, extract, extract_v1, gsm8k_exact_match, mc2, Extraction};
use super::prompts::{mmlu_description, DocKind, Formatted, Gold};
use super::scoring::{ContextGroup, Scorer};
use super::tasks::{DocFormat, Metric, TaskSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Settings of an evaluation run.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Whose behaviour to reproduce.
    pub mode: Mode,
    /// Evaluate at most this many documents per task (per subject for MMLU).
    pub limit: Option<usize>,
    /// GSM8K answer extraction (harness mode; leaderboard-v1 always uses its strict rule).
    pub extraction: Extraction,
}

/// One evaluated document: its prompts, scores and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocRecord {
    /// Index of the document in the evaluated split (within its group for MMLU).
    pub doc_id: usize,
    /// Group (MMLU subject), if the task is grouped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Indices of the few-shot examples in their split, in prompt order.
    pub fewshot: Vec<usize>,
    /// `(context, continuation)` pairs scored (log-likelihood tasks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<(String, String)>,
    /// Log-likelihood of each request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loglikelihoods: Vec<f64>,
    /// The generation prompt (generation tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Generated text, cut at the stop strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// The answer extracted from the generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    /// Metric values of this document.
    pub metrics: BTreeMap<String, f64>,
}

/// A task's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task name.
    pub task: String,
    /// The metric the tables show.
    pub metric: String,
    /// Its value (for grouped tasks: the mean over groups, as the leaderboard averages MMLU subjects).
    pub score: f64,
    /// Every metric's mean over documents (grouped tasks: mean of group means).
    pub metrics: BTreeMap<String, f64>,
    /// Per-group metric means (MMLU subjects).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, BTreeMap<String, f64>>,
    /// Documents evaluated.
    pub num_docs: usize,
    /// Few-shot examples per document.
    pub num_fewshot: usize,
    /// Mode used.
    pub mode: Mode,
    /// Per-document records.
    pub docs: Vec<DocRecord>,
}

/// A prepared document: its prompts, before scoring.
struct Prepared {
    record: DocRecord,
    formatted: Formatted,
    groups: Vec<ContextGroup>,
}

/// Progress of a task: how much work there is, then how much got done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Units of work of this task (contexts scored, generations, texts).
    Total(usize),
    /// This many more units are done.
    Done(usize),
}

/// Evaluates `spec` on `data`, reporting progress.
pub fn evaluate_task(
    spec: &TaskSpec,
    data: &TaskData,
    scorer: &Scorer,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<TaskResult> {
    let docs = data
        .split(&spec.eval_split)
        .with_context(|| format!("task `{}`", spec.name))?;
    // Examples from a separate split; from the evaluated documents themselves (never the current one)
    // when the data is one file or the few-shot split is the evaluated split.
    let shot_split = match &spec.fewshot_split {
        Some(s) if spec.num_fewshot > 0 && !data.is_single_file() && *s != spec.eval_split => Some(
            data.split(s)
                .with_context(|| format!("task `{}` few-shot examples", spec.name))?,
        ),
        _ => None,
    };
    let mut prepared = Vec::new();
    for (group, members) in &group_documents(spec, docs)? {
        let group_docs: Vec<&Value> = members.iter().map(|&i| &docs[i]).collect();
        prepared.extend(prepare_group(spec, opts, group, &group_docs, shot_split)?);
    }
    score(spec, scorer, &mut prepared, progress)?;
    for p in prepared.iter_mut() {
        document_metrics(spec, opts, scorer, p, progress)?;
    }
    let records: Vec<DocRecord> = prepared.into_iter().map(|p| p.record).collect();
    summarise(spec, opts.mode, records)
}

/// The documents of each group (MMLU subjects; one unnamed group without `group_by`), by index. Groups are
/// separate tasks to the harness: their own order, shots and limit.
fn group_documents(spec: &TaskSpec, docs: &[Value]) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut grouped: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    match &spec.group_by {
        Some(g) => {
            for (i, d) in docs.iter().enumerate() {
                let key = super::data::str_field(d, g)
                    .with_context(|| format!("task `{}` document {i}", spec.name))?;
                grouped.entry(key.to_string()).or_default().push(i);
            }
        }
        None => {
            grouped.insert(String::new(), (0..docs.len()).collect());
        }
    }
    Ok(grouped)
}

/// One group's documents in evaluation order, each with its few-shot prefix and its requests.
fn prepare_group(
    spec: &TaskSpec,
    opts: &EvalOptions,
    group: &str,
    group_docs: &[&Value],
    shot_split: Option<&[Value]>,
) -> Result<Vec<Prepared>> {
    let group_pool: Vec<&Value> = match (shot_split, &spec.group_by) {
        (Some(pool), Some(g)) => pool
            .iter()
            .filter(|d| super::data::str_field(d, g).ok() == Some(group))
            .collect(),
        (Some(pool), None) => pool.iter().collect(),
        (None, _) => group_docs.to_vec(),
    };
    let pool_kind = match (shot_split.is_some(), spec.fewshot_first_n) {
        (true, true) => ShotPool::FirstN(group_pool.len()),
        (true, false) if spec.harness_draws_one_more => {
            ShotPool::SeparateDrawOneMore(group_pool.len())
        }
        (true, false) => ShotPool::Separate(group_pool.len()),
        (false, _) => ShotPool::SameAsEval,
    };
    let k = if spec.fewshot_split.is_some() {
        spec.num_fewshot
    } else {
        0
    };
    if k > 0
        && matches!(pool_kind, ShotPool::Separate(n) | ShotPool::SeparateDrawOneMore(n) | ShotPool::FirstN(n) if n < k)
    {
        anyhow::bail!(
            "task `{}`{}: {k} few-shot examples requested, only {} available",
            spec.name,
            group_label(group),
            group_pool.len()
        );
    }
    let same = |p: usize, e: usize| group_pool[p] == group_docs[e];
    let shot_plan = plan(opts.mode, group_docs.len(), opts.limit, k, pool_kind, &same);
    let description = match (&spec.format, &spec.group_by) {
        (DocFormat::Builtin(super::prompts::Format::Mmlu), Some(_)) => mmlu_description(group),
        _ => spec.description.clone(),
    };
    let mut prepared = Vec::with_capacity(shot_plan.order.len());
    for (&doc_idx, shots) in shot_plan.order.iter().zip(&shot_plan.shots) {
        let formatted = spec.format(group_docs[doc_idx]).with_context(|| {
            format!(
                "task `{}`{} document {doc_idx}",
                spec.name,
                group_label(group)
            )
        })?;
        let mut prefix = description.clone();
        for &s in shots {
            let ex = spec
                .format(group_pool[s])
                .with_context(|| format!("task `{}` few-shot example {s}", spec.name))?;
            prefix.push_str(&format!("{} {}\n\n", ex.text, ex.target));
        }
        let mut record = DocRecord {
            doc_id: doc_idx,
            group: spec.group_by.as_ref().map(|_| group.to_string()),
            fewshot: shots.clone(),
            requests: vec![],
            loglikelihoods: vec![],
            prompt: None,
            generation: None,
            extracted: None,
            metrics: BTreeMap::new(),
        };
        let groups = requests(&formatted, &prefix, &mut record);
        prepared.push(Prepared {
            record,
            formatted,
            groups,
        });
    }
    Ok(prepared)
}

/// The log-likelihood requests of one formatted document after its few-shot `prefix` (recorded in
/// `record`), or its generation prompt.
fn requests(formatted: &Formatted, prefix: &str, record: &mut DocRecord) -> Vec<ContextGroup> {
    match &formatted.kind {
        DocKind::Choice { choices, .. } => {
            let context = format!("{prefix}{}", formatted.text);
            let continuations: Vec<String> = choices.iter().map(|c| format!(" {c}")).collect();
            record.requests = continuations
                .iter()
                .map(|c| (context.clone(), c.clone()))
                .collect();
            vec![ContextGroup {
                context,
                continuations,
            }]
        }
        DocKind::Partial {
            prefixes, suffix, ..
        } => {
            let groups: Vec<ContextGroup> = prefixes
                .iter()
                .map(|p| ContextGroup {
                    context: format!("{prefix}{p}"),
                    continuations: vec![format!(" {suffix}")],
                })
                .collect();
            record.requests = groups
                .iter()
                .map(|g| (g.context.clone(), g.continuations[0].clone()))
                .collect();
            groups
        }
        DocKind::Generate { .. } => {
            record.prompt = Some(format!("{prefix}{}", formatted.text));
            vec![]
        }
        DocKind::Rolling => vec![],
    }
}

/// Scores every prepared document: all log-likelihood groups in one pass, all generations in batches
/// (rolling texts are scored with their metrics).
fn score(
    spec: &TaskSpec,
    scorer: &Scorer,
    prepared: &mut [Prepared],
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let all_groups: Vec<ContextGroup> = prepared
        .iter()
        .flat_map(|p| p.groups.iter().cloned())
        .collect();
    let n_other = prepared.iter().filter(|p| p.groups.is_empty()).count();
    progress(Progress::Total(all_groups.len() + n_other));
    let lls = scorer.loglikelihoods(&all_groups, |n| progress(Progress::Done(n)))?;
    let mut lls = lls.into_iter();
    for p in prepared.iter_mut() {
        for _ in 0..p.groups.len() {
            p.record
                .loglikelihoods
                .extend(lls.next().expect("one result per group"));
        }
    }
    let gen_idx: Vec<usize> = (0..prepared.len())
        .filter(|&i| prepared[i].record.prompt.is_some())
        .collect();
    if !gen_idx.is_empty() {
        let prompts: Vec<String> = gen_idx
            .iter()
            .map(|&i| prepared[i].record.prompt.clone().expect("prompt"))
            .collect();
        let gens = scorer.generate_until(&prompts, &spec.until, spec.max_gen_toks, |n| {
            progress(Progress::Done(n))
        })?;
        for (&i, g) in gen_idx.iter().zip(gens) {
            prepared[i].record.generation = Some(g);
        }
    }
    Ok(())
}

/// The per-document metrics of a scored document.
fn document_metrics(
    spec: &TaskSpec,
    opts: &EvalOptions,
    scorer: &Scorer,
    p: &mut Prepared,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let m = &mut p.record.metrics;
    match &p.formatted.kind {
        DocKind::Choice { choices, gold } => match gold {
            Gold::Index(g) => {
                m.insert("acc".into(), acc(&p.record.loglikelihoods, *g));
                m.insert(
                    "acc_norm".into(),
                    acc_norm(&p.record.loglikelihoods, choices, *g),
                );
            }
            Gold::FirstTrue(n) => {
                m.insert("mc2".into(), mc2(&p.record.loglikelihoods, *n));
            }
        },
        DocKind::Partial { gold, .. } => {
            m.insert("acc".into(), acc(&p.record.loglikelihoods, *gold));
        }
        DocKind::Generate { reference } => {
            let generation = p.record.generation.clone().unwrap_or_default();
            let (extracted, em) = score_generation(spec, opts, &generation, reference)?;
            p.record.extracted = Some(extracted);
            m.insert("exact_match".into(), em);
        }
        DocKind::Rolling => {
            let (ll, _) = scorer.rolling_loglikelihood(&p.formatted.text)?;
            let words = p.formatted.text.split_whitespace().count().max(1) as f64;
            let bytes = p.formatted.text.len().max(1) as f64;
            p.record.loglikelihoods = vec![ll];
            m.insert("word_perplexity".into(), (-ll / words).exp());
            m.insert("byte_perplexity".into(), (-ll / bytes).exp());
            m.insert("bits_per_byte".into(), -ll / bytes / std::f64::consts::LN_2);
            m.insert("words".into(), words);
            m.insert("bytes".into(), bytes);
            progress(Progress::Done(1));
        }
    }
    Ok(())
}

fn group_label(group: &str) -> String {
    if group.is_empty() {
        String::new()
    } else {
        format!(" ({group})")
    }
}

/// Extracts the answer of a generation and scores it against the reference.
fn score_generation(
    spec: &TaskSpec,
    opts: &EvalOptions,
    generation: &str,
    reference: &str,
) -> Result<(String, f64)> {
    if spec.gsm8k_answers {
        return Ok(match opts.mode {
            Mode::LeaderboardV1 => {
                let pred = extract_v1(generation);
                let gold = extract_v1(reference);
                anyhow::ensure!(
                    gold != super::metrics::INVALID,
                    "reference answer has no `#### N`: {reference:?}"
                );
                let em = f64::from(u8::from(pred == gold));
                (pred, em)
            }
            Mode::Harness => {
                let pred = extract(generation, opts.extraction);
                let em = gsm8k_exact_match(&pred, reference);
                (pred, em)
            }
        });
    }
    let DocFormat::Custom(task) = &spec.format else {
        unreachable!("only GSM8K and custom tasks generate")
    };
    let pick = |s: &str| -> String {
        match &task.answer_regex {
            Some(re) => regex::Regex::new(re)
                .ok()
                .and_then(|r| {
                    r.captures(s)
                        .and_then(|c| c.get(1).or(c.get(0)).map(|m| m.as_str().trim().to_string()))
                })
                .unwrap_or_else(|| super::metrics::INVALID.to_string()),
            None => s.trim().to_string(),
        }
    };
    let pred = pick(generation);
    let em = f64::from(u8::from(
        pred == pick(reference) && pred != super::metrics::INVALID,
    ));
    Ok((pred, em))
}

/// Means per metric (per group, then over groups) and the headline score.
fn summarise(spec: &TaskSpec, mode: Mode, docs: Vec<DocRecord>) -> Result<TaskResult> {
    let mut per_group: BTreeMap<String, BTreeMap<String, (f64, usize)>> = BTreeMap::new();
    for d in &docs {
        let g = per_group
            .entry(d.group.clone().unwrap_or_default())
            .or_default();
        for (k, v) in &d.metrics {
            let e = g.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    let means: BTreeMap<String, BTreeMap<String, f64>> = per_group
        .into_iter()
        .map(|(g, m)| {
            (
                g,
                m.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect(),
            )
        })
        .collect();
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in means.values() {
        for (k, v) in m {
            *metrics.entry(k.clone()).or_default() += v;
            *counts.entry(k.clone()).or_default() += 1;
        }
    }
    for (k, v) in metrics.iter_mut() {
        *v /= counts[k] as f64;
    }
    if spec.metric == Metric::WordPerplexity {
        // Corpus-level perplexities: total log-likelihood over total words / bytes.
        let ll: f64 = docs.iter().map(|d| d.loglikelihoods[0]).sum();
        let words: f64 = docs.iter().map(|d| d.metrics["words"]).sum();
        let bytes: f64 = docs.iter().map(|d| d.metrics["bytes"]).sum();
        metrics.insert("word_perplexity".into(), (-ll / words).exp());
        metrics.insert("byte_perplexity".into(), (-ll / bytes).exp());
        metrics.insert("bits_per_byte".into(), -ll / bytes / std::f64::consts::LN_2);
        metrics.remove("words");
        metrics.remove("bytes");
    }
    let score = *metrics
        .get(spec.metric.name())
        .with_context(|| format!("task `{}` produced no `{}`", spec.name, spec.metric.name()))?;
    let groups = if spec.group_by.is_some() {
        means
    } else {
        BTreeMap::new()
    };
    Ok(TaskResult {
        task: spec.name.clone(),
        metric: spec.metric.name().to_string(),
        score,
        metrics,
        groups,
        num_docs: docs.len(),
        num_fewshot: spec.num_fewshot,
        mode,
        docs,
    })
}
