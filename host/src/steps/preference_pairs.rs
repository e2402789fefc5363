//! `kind = "preference-pairs"`: preference triplets from two aligned question-answer datasets, as the
//! paper's Synth. Math-Alignment (Sec. 3): the answer of the `chosen` dataset (e.g. a rephrased, better
//! solution) is preferred over the answer of the `rejected` dataset (e.g. the original) for the same
//! question.
//!
//! ```toml
//! [steps.math-alignment]
//! kind = "preference-pairs"
//! inputs = { chosen = "rephrased", rejected = "gsm8k" }
//! key = "question"          # align by this field; without `key`, by row order (questions must match)
//! template = "gsm8k"        # prompt `Question: {q}\nAnswer:`, completions ` {answer}` (default: plain)
//! ```
//!
//! Records pair up by the `key` field (every record of either side must find its partner; a duplicate
//! or missing key is an error naming the record's file and line) or, without `key`, by position (same
//! count, and the same question text in both). Pairs whose two answers are identical carry no preference
//! and are left out (counted in `info.json`). Output: `data.jsonl` of `{prompt, chosen, rejected}` and
//! `info.json` (`format = "preference"`, counts).
//!
//! A dataset's `filters` run after pairing (so the pairing is checked on the data as it is): a pair is
//! left out when a filter drops either of its records, and uses the rewritten records where a filter
//! rewrites them; `filter_params` configures the filters, as in the training steps. A dataset's own
//! `max_samples` is refused: capping each side separately would break the pairs (cap the pairs with the
//! step's `max_samples`).

use crate::data::{
    filter_records, read_records, DatasetSource, FilterCount, Origin, RawRecord, ReadStats,
};
use crate::steps::training::{check_filter_plugins, dependencies, plugin_filters, FilterParams};
use anyhow::{bail, Context, Result};
use dusflow_core::atomic::write_file_atomic;
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, InputSlot, InputSlots, StepKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;

/// How prompt and completions are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairTemplate {
    /// The question as the prompt, the answers as they are.
    #[default]
    Plain,
    /// `Question: {question}\nAnswer:` and ` {answer}` (the GSM8K format the sft and eval steps use).
    Gsm8k,
}

/// Parameters of a `preference-pairs` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePairsConfig {
    /// Field that identifies a record in both datasets; none = align by row order.
    #[serde(default)]
    pub key: Option<String>,
    /// Field holding the question.
    #[serde(default = "PreferencePairsConfig::default_question")]
    pub question: String,
    /// Field holding the answer.
    #[serde(default = "PreferencePairsConfig::default_answer")]
    pub answer: String,
    /// Prompt/completion rendering.
    #[serde(default)]
    pub template: PairTemplate,
    /// Keep at most this many pairs: a random subset (seeded by the workflow seed), in input order — the
    /// paper's cap of 20.1K Synth. Math-Alignment pairs.
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Seed of the `max_samples` subset, combined with the workflow seed (`sweep = { seed = [1, 2, 3] }`
    /// draws a different subset per point); without it the subset is seeded by the step's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Parameters of the data-filter plugins the two datasets name, by plugin name (`{}` when absent).
    #[serde(default)]
    pub filter_params: FilterParams,
}

impl PreferencePairsConfig {
    fn default_question() -> String {
        "question".into()
    }
    fn default_answer() -> String {
        "answer".into()
    }
}

const INPUTS: &[InputSlot] = &[
    InputSlot::one("chosen", &[ArtifactKind::Dataset]),
    InputSlot::one("rejected", &[ArtifactKind::Dataset]),
];

/// The `preference-pairs` step kind.
pub struct PreferencePairsStep;

impl StepKind for PreferencePairsStep {
    type Config = PreferencePairsConfig;

    fn name(&self) -> &'static str {
        "preference-pairs"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(INPUTS)
    }

    fn output(&self, _: &PreferencePairsConfig) -> ArtifactKind {
        ArtifactKind::Dataset
    }

    fn check(&self, c: &PreferencePairsConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        for (key, v) in [("question", &c.question), ("answer", &c.answer)] {
            if v.is_empty() {
                issues.push(ConfigIssue::new(key, "must name a field"));
            }
        }
        if c.max_samples == Some(0) {
            issues.push(ConfigIssue::new("max_samples", "must be at least 1"));
        }
        if c.key.as_deref() == Some("") {
            issues.push(ConfigIssue::new(
                "key",
                "must name a field (or leave it out to align by row order)",
            ));
        }
        issues.extend(check_filter_plugins(&c.filter_params, ctx));
        for slot in ["chosen", "rejected"] {
            for (name, spec) in ctx.input_datasets(slot) {
                if let Some(cap) = spec.max_samples {
                    issues.push(ConfigIssue::new(
                        format!("inputs.{slot}"),
                        format!(
                            "dataset {name:?} has max_samples = {cap}: sampling each side separately would \
                             break the pairs; cap the pairs with `max_samples` here (declare the file again \
                             as a dataset without a cap for this step)"
                        ),
                    ));
                }
            }
        }
        issues
    }

    fn dependencies(&self, c: &PreferencePairsConfig) -> super::Dependencies {
        dependencies(&c.filter_params)
    }

    fn run(&self, c: &PreferencePairsConfig, ctx: &StepContext) -> Result<()> {
        let read = |slot: &str| -> Result<(Vec<RawRecord>, DatasetSource)> {
            // (A capped dataset was refused when the workflow was checked.)
            let source = DatasetSource::from_input(ctx.input(slot)?)?;
            let mut stats = ReadStats::default();
            Ok((
                read_records(&source.files, source.on_error, &mut stats)?,
                source,
            ))
        };
        let ((chosen, chosen_source), (rejected, rejected_source)) =
            (read("chosen")?, read("rejected")?);
        let aligned = match &c.key {
            Some(key) => align_by_key(&chosen, &rejected, key)?,
            None => align_by_row(&chosen, &rejected, &c.question)?,
        };
        let mut make_filter = plugin_filters(&c.filter_params, ctx);
        let (chosen_kept, chosen_counts) = run_filters(&chosen, &chosen_source, &mut make_filter)?;
        let (rejected_kept, rejected_counts) =
            run_filters(&rejected, &rejected_source, &mut make_filter)?;
        let mut lines = Vec::new();
        let mut identical = 0usize;
        let mut filtered_out = 0usize;
        for (ch, rj) in aligned {
            // The records as the filters left them (a pair without either is left out).
            let (Some(ch), Some(rj)) = (kept(&chosen_kept, ch), kept(&rejected_kept, rj)) else {
                filtered_out += 1;
                continue;
            };
            let question = text_field(ch, &c.question)?;
            let (good, bad) = (text_field(ch, &c.answer)?, text_field(rj, &c.answer)?);
            if good == bad {
                identical += 1;
                continue;
            }
            let (prompt, good, bad) = match c.template {
                PairTemplate::Plain => (question.to_string(), good.to_string(), bad.to_string()),
                PairTemplate::Gsm8k => (
                    crate::data::template::question_prompt(question),
                    format!(" {good}"),
                    format!(" {bad}"),
                ),
            };
            lines.push(serde_json::to_string(
                &json!({ "prompt": prompt, "chosen": good, "rejected": bad }),
            )?);
        }
        if lines.is_empty() {
            bail!(
                "no preference pairs: of {} aligned pairs, {identical} have identical answers and {filtered_out} \
                 were dropped by filters",
                identical + filtered_out
            );
        }
        let paired = lines.len();
        if let Some(max) = c.max_samples {
            let stream = match c.seed {
                Some(seed) => format!("preference-pairs/seed={seed}"),
                None => format!("preference-pairs/{}", ctx.step),
            };
            let seed = crate::data::derive_seed(ctx.settings.seed, &stream);
            lines = crate::data::load::sample_in_order(lines, max, seed);
        }
        let written = lines.len();
        let mut text = lines.join("\n");
        text.push('\n');
        write_file_atomic(&ctx.out_dir.join("data.jsonl"), text.as_bytes())?;
        let info = json!({
            "format": "preference",
            "count": written,
            "paired": paired,
            "identical_left_out": identical,
            "filtered_out": filtered_out,
            "filters": { "chosen": chosen_counts, "rejected": rejected_counts },
            "aligned_by": c.key.clone().unwrap_or_else(|| "row order".into()),
            "chosen": ctx.input("chosen")?.name,
            "rejected": ctx.input("rejected")?.name,
        });
        write_file_atomic(
            &ctx.out_dir.join("info.json"),
            &serde_json::to_vec_pretty(&info)?,
        )?;
        Ok(())
    }
}

/// The records of one side after its dataset's filters, by origin (`None` when it names no filters).
type Kept = Option<HashMap<(std::path::PathBuf, usize), RawRecord>>;

/// Runs `source`'s filters over `records`; returns the survivors by origin and the filters' counts.
fn run_filters(
    records: &[RawRecord],
    source: &DatasetSource,
    make_filter: &mut crate::data::FilterFactory<'_>,
) -> Result<(Kept, Vec<FilterCount>)> {
    if source.filters.is_empty() {
        return Ok((None, Vec::new()));
    }
    let (survivors, counts) = filter_records(records.to_vec(), source, make_filter)
        .with_context(|| format!("dataset {:?}", source.name))?;
    let by_origin = survivors
        .into_iter()
        .map(|r| ((r.origin.file.clone(), r.origin.line), r))
        .collect();
    Ok((Some(by_origin), counts))
}

/// `record` as the filters left it: itself when there are no filters, its rewrite, or `None` if dropped.
fn kept<'a>(kept: &'a Kept, record: &'a RawRecord) -> Option<&'a RawRecord> {
    match kept {
        None => Some(record),
        Some(map) => map.get(&(record.origin.file.clone(), record.origin.line)),
    }
}

/// The string in field `name` of a record, or an error naming the record.
fn text_field<'a>(r: &'a RawRecord, name: &str) -> Result<&'a str> {
    let by = match &r.rewritten_by {
        Some(filter) => format!(" (in the rewrite of this record by filter plugin {filter:?})"),
        None => String::new(),
    };
    match r.value.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "{}: field {name:?} must be a string, got {other}{by}",
            r.origin
        ),
        None => bail!("{}: missing field {name:?}{by}", r.origin),
    }
}

/// The key of a record as text (strings as they are, numbers and others as JSON).
fn key_of(r: &RawRecord, key: &str) -> Result<String> {
    match r.value.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => bail!("{}: missing key field {key:?}", r.origin),
        Some(other) => Ok(other.to_string()),
    }
}

/// Pairs every chosen record with the rejected record of the same key, in chosen order.
fn align_by_key<'a>(
    chosen: &'a [RawRecord],
    rejected: &'a [RawRecord],
    key: &str,
) -> Result<Vec<(&'a RawRecord, &'a RawRecord)>> {
    let mut by_key: HashMap<String, &RawRecord> = HashMap::with_capacity(rejected.len());
    for r in rejected {
        let k = key_of(r, key)?;
        if let Some(first) = by_key.insert(k.clone(), r) {
            bail!(
                "{}: duplicate {key} {k:?} (first at {})",
                r.origin,
                first.origin
            );
        }
    }
    let mut seen: HashMap<String, &Origin> = HashMap::with_capacity(chosen.len());
    let mut out = Vec::with_capacity(chosen.len());
    for c in chosen {
        let k = key_of(c, key)?;
        if let Some(first) = seen.insert(k.clone(), &c.origin) {
            bail!("{}: duplicate {key} {k:?} (first at {first})", c.origin);
        }
        match by_key.get(&k) {
            Some(r) => out.push((c, *r)),
            None => bail!(
                "{}: {key} {k:?} has no record in the rejected dataset",
                c.origin
            ),
        }
    }
    if let Some(r) = rejected
        .iter()
        .find(|r| key_of(r, key).is_ok_and(|k| !seen.contains_key(&k)))
    {
        bail!(
            "{}: {key} {:?} has no record in the chosen dataset",
            r.origin,
            key_of(r, key)?
        );
    }
    Ok(out)
}

/// Pairs records by position; both sides must have the same count and the same question in each row.
fn align_by_row<'a>(
    chosen: &'a [RawRecord],
    rejected: &'a [RawRecord],
    question: &str,
) -> Result<Vec<(&'a RawRecord, &'a RawRecord)>> {
    if chosen.len() != rejected.len() {
        let extra = if chosen.len() > rejected.len() {
            &chosen[rejected.len()].origin
        } else {
            &rejected[chosen.len()].origin
        };
        bail!(
            "aligning by row order needs the same number of records, but chosen has {} and rejected {} \
             (first unmatched: {extra}); set `key` to align by a field",
            chosen.len(),
            rejected.len()
        );
    }
    for (c, r) in chosen.iter().zip(rejected) {
        if text_field(c, question)? != text_field(r, question)? {
            bail!(
                "{} and {}: the questions differ, so the rows are not aligned (set `key` to align by a field)",
                c.origin,
                r.origin
            );
        }
    }
    Ok(chosen.iter().zip(rejected).collect())
}
