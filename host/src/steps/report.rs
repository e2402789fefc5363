//! `kind = "report"`: compares several evaluations side by side — the shape of the paper's Tab. 2-7 —
//! as a Markdown table with the H6 average and an SVG bar chart.
//!
//! ```toml
//! [steps.report]
//! kind = "report"
//! inputs = { evals = ["eval_base", "eval_dus", "eval_sft"] }   # swept steps contribute every point
//! title = "DUS stages"
//! ```
//!
//! Output: `report.md`, `report.json` (every input's `results.json`, in order) and `chart.svg`. With
//! `inputs.curves` (training steps: pretrain, sft, dpo — anything that wrote a `metrics.jsonl`), also
//! `curves.svg` with their loss curves in one chart and a loss table (first, 25 %, 50 %, final) in
//! `report.md`: how fast each run recovers, e.g. for the seam ablation.
//!
//! Seeds: inputs whose names differ only in a `seed=…` sweep label (at any depth: `eval[model=cpt[seed=3]]`)
//! are one row: each task's mean ± sample standard deviation with `n`, and one curve per group drawn as its
//! mean with a ±1 std band (`curves.svg`), the loss table likewise. `names` may name the group (the name
//! without its seed labels). Without seed labels the output is what it always was.

use crate::eval::tables::{bar_chart_svg, markdown_table, Summary};
use anyhow::{Context, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, CheckContext, ConfigIssue, InputSlot, InputSlots, StepKind,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Parameters of a `report` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Heading of the report.
    #[serde(default)]
    pub title: Option<String>,
    /// Row names by eval step or model name (default: the evaluated model's name).
    #[serde(default)]
    pub names: BTreeMap<String, String>,
}

/// The `report` step kind.
pub struct ReportStep;

const INPUTS: &[InputSlot] = &[
    InputSlot::many("evals", &[ArtifactKind::Evaluation]),
    InputSlot::many("curves", &[ArtifactKind::Model, ArtifactKind::Files]).optional(),
];

impl StepKind for ReportStep {
    type Config = ReportConfig;

    fn name(&self) -> &'static str {
        "report"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(INPUTS)
    }

    fn output(&self, _: &ReportConfig) -> ArtifactKind {
        ArtifactKind::Files
    }

    fn check(&self, c: &ReportConfig, _: &dyn CheckContext) -> Vec<ConfigIssue> {
        c.names
            .iter()
            .filter(|(_, v)| v.trim().is_empty() || v.contains('|'))
            .map(|(k, _)| {
                ConfigIssue::new(
                    format!("names.{k}"),
                    "row names must be non-empty and contain no `|`",
                )
            })
            .collect()
    }

    fn headline(&self) -> Option<&'static str> {
        Some("report.md")
    }

    fn run(&self, c: &ReportConfig, ctx: &StepContext) -> Result<()> {
        let mut loaded = Vec::new();
        for a in ctx.inputs_of("evals") {
            let path = a.path.join("results.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let summary: Summary = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an eval results.json", path.display()))?;
            loaded.push((a.name.clone(), summary));
        }
        let groups = group_by_seed(loaded);
        let seeded = groups.iter().any(|g| g.members.len() > 1);
        let rows = row_names(
            groups
                .iter()
                .map(|g| (g.key.clone(), g.members[0].1.clone()))
                .map(|(key, mut s)| {
                    s.model = strip_seed(&s.model);
                    (key, s)
                })
                .collect(),
            &c.names,
        );
        let mut md = String::new();
        if let Some(t) = &c.title {
            md.push_str(&format!("# {t}\n\n"));
        }
        if seeded {
            md.push_str(&seed_table(&rows, &groups));
        } else {
            md.push_str(&markdown_table(&rows));
        }
        let mut curves: Vec<(String, Vec<Curve>)> = Vec::new();
        let mut held_out: Vec<(String, Vec<Curve>)> = Vec::new();
        for a in ctx.inputs_of("curves") {
            let key = strip_seed(&a.name);
            let label = c
                .names
                .get(&key)
                .or_else(|| c.names.get(&a.name))
                .cloned()
                .unwrap_or_else(|| key.clone());
            let (losses, held) = read_losses(&a.path.join("metrics.jsonl"))?;
            add_run(&mut curves, &label, key != a.name, losses);
            if !held.is_empty() {
                add_run(&mut held_out, &label, key != a.name, held);
            }
        }
        if curves.iter().any(|(_, runs)| runs.len() > 1) {
            let bands = mean_curves(&curves);
            md.push('\n');
            md.push_str(&band_loss_table(&bands));
            plot_bands(
                &bands,
                c.title.as_deref().unwrap_or("training loss"),
                &ctx.out_dir.join("curves.svg"),
            )?;
        } else if !curves.is_empty() {
            let curves: Vec<(String, Vec<(f64, f64)>)> = curves
                .into_iter()
                .map(|(l, mut runs)| (l, runs.remove(0)))
                .collect();
            md.push('\n');
            md.push_str(&loss_table(&curves));
            crate::train::metrics::plot_losses(
                &curves,
                c.title.as_deref().unwrap_or("training loss"),
                &ctx.out_dir.join("curves.svg"),
            )?;
        }
        if !held_out.is_empty() {
            let bands = mean_curves(&held_out);
            md.push('\n');
            md.push_str(&held_out_table(&bands));
            plot_bands(
                &bands,
                &format!(
                    "{}: held-out loss",
                    c.title.as_deref().unwrap_or("training")
                ),
                &ctx.out_dir.join("held_out.svg"),
            )?;
        }
        std::fs::write(ctx.out_dir.join("report.md"), md)?;
        let json: Vec<serde_json::Value> = if seeded {
            rows.iter()
                .zip(&groups)
                .map(|((n, _), g)| {
                    let stats: BTreeMap<&String, serde_json::Value> = g
                        .task_stats()
                        .iter()
                        .map(|(task, (mean, std, count))| {
                            (
                                *task,
                                serde_json::json!({ "mean": mean, "std": std, "n": count }),
                            )
                        })
                        .collect();
                    serde_json::json!({
                        "name": n,
                        "n": g.members.len(),
                        "points": g.members.iter().map(|(step, _)| step).collect::<Vec<_>>(),
                        "tasks": stats,
                        "results": g.members.iter().map(|(_, s)| s).collect::<Vec<_>>(),
                    })
                })
                .collect()
        } else {
            rows.iter()
                .map(|(n, s)| serde_json::json!({ "name": n, "results": s }))
                .collect()
        };
        std::fs::write(
            ctx.out_dir.join("report.json"),
            serde_json::to_vec_pretty(&json)?,
        )?;
        let chart_rows: Vec<(String, Summary)> = if seeded {
            rows.iter()
                .zip(&groups)
                .map(|((n, s), g)| (n.clone(), g.mean_summary(s)))
                .collect()
        } else {
            rows
        };
        std::fs::write(ctx.out_dir.join("chart.svg"), bar_chart_svg(&chart_rows))?;
        Ok(())
    }
}

/// Each group's runs averaged step by step.
fn mean_curves(groups: &[(String, Vec<Curve>)]) -> Vec<(String, Vec<CurvePoint>)> {
    groups
        .iter()
        .map(|(label, runs)| (label.clone(), mean_curve(runs)))
        .collect()
}

/// Draws averaged curves with their ±1 std bands into `path`.
fn plot_bands(
    bands: &[(String, Vec<CurvePoint>)],
    title: &str,
    path: &std::path::Path,
) -> Result<()> {
    let series: Vec<(String, Vec<crate::train::metrics::BandPoint>)> = bands
        .iter()
        .map(|(l, points)| {
            (
                l.clone(),
                points.iter().map(|p| (p.step, p.mean, p.std)).collect(),
            )
        })
        .collect();
    crate::train::metrics::plot_loss_bands(&series, title, path)
}

/// Adds one run's curve to the group `label` (a seed of it when `seeded`), or starts the group.
fn add_run(groups: &mut Vec<(String, Vec<Curve>)>, label: &str, seeded: bool, run: Curve) {
    match groups.iter_mut().find(|(l, _)| l == label) {
        Some((_, runs)) if seeded => runs.push(run),
        _ => groups.push((label.to_string(), vec![run])),
    }
}

/// `(step, loss)` of every line of a `metrics.jsonl` (steps of later sDPO stages continue the count), and
/// `(step, eval_loss)` of the lines that scored held-out data.
fn read_losses(path: &std::path::Path) -> Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (curves need a training step's output)",
            path.display()
        )
    })?;
    let mut points = Vec::new();
    let mut held_out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let loss = v["loss"]
            .as_f64()
            .with_context(|| format!("{}:{}: no `loss`", path.display(), i + 1))?;
        let step = (points.len() + 1) as f64;
        points.push((step, loss));
        if let Some(held) = v[crate::train::EVAL_LOSS].as_f64() {
            held_out.push((step, held));
        }
    }
    anyhow::ensure!(!points.is_empty(), "{}: no steps logged", path.display());
    Ok((points, held_out))
}

/// The held-out loss table: one column per scored step (at most [`HELD_OUT_COLUMNS`], evenly spread
/// and always with the last), mean ± std over the seeds.
fn held_out_table(curves: &[(String, Vec<CurvePoint>)]) -> String {
    let longest = curves.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    let picks: Vec<usize> = if longest <= HELD_OUT_COLUMNS {
        (0..longest).collect()
    } else {
        let mut picks: Vec<usize> = (0..HELD_OUT_COLUMNS)
            .map(|i| (i * (longest - 1)).div_ceil(HELD_OUT_COLUMNS - 1))
            .collect();
        picks.dedup();
        picks
    };
    let steps = curves
        .iter()
        .find(|(_, p)| p.len() == longest)
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let mut md = String::from("| Run | n |");
    for &i in &picks {
        md.push_str(&format!(" step {} |", steps[i].step));
    }
    md.push_str("\n|---|---:|");
    md.push_str(&"---:|".repeat(picks.len()));
    md.push('\n');
    for (name, points) in curves {
        md.push_str(&format!(
            "| {name} | {} |",
            points.first().map_or(0, |p| p.runs)
        ));
        for &i in &picks {
            match points.get(i) {
                Some(p) if p.runs > 1 => md.push_str(&format!(" {:.4} ± {:.4} |", p.mean, p.std)),
                Some(p) => md.push_str(&format!(" {:.4} |", p.mean)),
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push_str(
        "\nHeld-out loss (mean per target token of the step's `eval_data`; exp of it is the token \
         perplexity): mean ± sample standard deviation over the n seeds after that many steps.\n",
    );
    md
}

/// Columns of the held-out loss table at most.
const HELD_OUT_COLUMNS: usize = 8;

/// Markdown table of each run's loss at its first step, a quarter, half way, and at the end.
fn loss_table(curves: &[(String, Vec<(f64, f64)>)]) -> String {
    let mut md =
        String::from("| Run | Steps | Loss (first) | Loss (25 %) | Loss (50 %) | Loss (final) |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (name, points) in curves {
        let at = |f: f64| points[((points.len() - 1) as f64 * f).round() as usize].1;
        md.push_str(&format!(
            "| {name} | {} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            points.len(),
            at(0.0),
            at(0.25),
            at(0.5),
            at(1.0)
        ));
    }
    md
}

/// `name` without its `seed=…` sweep labels, at any depth: `eval[model=cpt[policy=a,seed=3]]` →
/// `eval[model=cpt[policy=a]]`, `init[seed=2]` → `init`.
pub fn strip_seed(name: &str) -> String {
    let Some(open) = name.find('[') else {
        return name.to_string();
    };
    if !name.ends_with(']') {
        return name.to_string();
    }
    let (base, inner) = (&name[..open], &name[open + 1..name.len() - 1]);
    // Labels split at commas outside nested brackets.
    let mut labels = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, ch) in inner.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                labels.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    labels.push(&inner[start..]);
    let kept: Vec<String> = labels
        .into_iter()
        .filter_map(|label| match label.split_once('=') {
            Some(("seed", _)) => None,
            Some((k, v)) => Some(format!("{k}={}", strip_seed(v))),
            None => Some(label.to_string()),
        })
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}[{}]", kept.join(","))
    }
}

/// Mean and sample standard deviation (n − 1; `None` for fewer than two values).
pub fn mean_std(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.len() > 1)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

/// `(step, loss)` of one training run.
type Curve = Vec<(f64, f64)>;

/// A task's mean, sample std (none for one value) and number of values.
type TaskStat = (f64, Option<f64>, usize);

/// Evaluations that differ only in their seed labels, in first-seen order.
struct SeedGroup {
    /// The eval step's name without seed labels.
    key: String,
    /// `(eval step, results)` of each seed.
    members: Vec<(String, Summary)>,
}

impl SeedGroup {
    /// Per task (first-seen order): mean, sample std and how many members have it.
    fn task_stats(&self) -> Vec<(&String, TaskStat)> {
        let mut tasks: Vec<&String> = Vec::new();
        for (_, s) in &self.members {
            for t in s.tasks.keys() {
                if !tasks.contains(&t) {
                    tasks.push(t);
                }
            }
        }
        tasks
            .into_iter()
            .map(|t| {
                let values: Vec<f64> = self
                    .members
                    .iter()
                    .filter_map(|(_, s)| s.tasks.get(t).map(|x| x.score))
                    .collect();
                let (mean, std) = mean_std(&values);
                (t, (mean, std, values.len()))
            })
            .collect()
    }

    /// `first` with every score replaced by the group's mean (for the bar chart).
    fn mean_summary(&self, first: &Summary) -> Summary {
        let mut s = first.clone();
        for (task, (mean, _, _)) in self.task_stats() {
            if let Some(t) = s.tasks.get_mut(task) {
                t.score = mean;
            }
        }
        let h6: Vec<f64> = self.members.iter().filter_map(|(_, m)| m.h6).collect();
        s.h6 = (h6.len() == self.members.len()).then(|| mean_std(&h6).0);
        s
    }
}

fn group_by_seed(loaded: Vec<(String, Summary)>) -> Vec<SeedGroup> {
    let mut groups: Vec<SeedGroup> = Vec::new();
    for (step, summary) in loaded {
        let key = strip_seed(&step);
        match groups.iter_mut().find(|g| g.key == key && key != step) {
            Some(g) => g.members.push((step, summary)),
            None => groups.push(SeedGroup {
                key,
                members: vec![(step, summary)],
            }),
        }
    }
    groups
}

/// `mean ± std` in the unit of the metric (perplexities as they are, accuracies in percent).
fn stat_cell(mean: f64, std: Option<f64>, metric: &str) -> String {
    let (scale, digits) = if metric.contains("perplexity") {
        (1.0, 3)
    } else {
        (100.0, 2)
    };
    match std {
        Some(sd) => format!("{:.digits$} ± {:.digits$}", scale * mean, scale * sd),
        None => format!("{:.digits$}", scale * mean),
    }
}

/// The comparison table over seed groups: `| Model | n | task … |`, each cell mean ± sample std.
fn seed_table(rows: &[(String, Summary)], groups: &[SeedGroup]) -> String {
    let mut cols: Vec<String> = Vec::new();
    for g in groups {
        for (_, s) in &g.members {
            for t in s.tasks.keys() {
                if !cols.contains(t) {
                    cols.push(t.clone());
                }
            }
        }
    }
    let with_h6 = groups
        .iter()
        .any(|g| g.members.iter().any(|(_, s)| s.h6.is_some()));
    let mut md = String::from(if with_h6 {
        "| Model | n | H6 (Avg.) |"
    } else {
        "| Model | n |"
    });
    for c in &cols {
        md.push_str(&format!(" {} |", crate::eval::tables::task_title(c)));
    }
    md.push_str(if with_h6 {
        "\n|---|---:|---:|"
    } else {
        "\n|---|---:|"
    });
    md.push_str(&"---:|".repeat(cols.len()));
    md.push('\n');
    for ((name, _), g) in rows.iter().zip(groups) {
        md.push_str(&format!("| {name} | {} |", g.members.len()));
        if with_h6 {
            let h6: Vec<f64> = g.members.iter().filter_map(|(_, s)| s.h6).collect();
            let cell = if h6.len() == g.members.len() {
                let (m, sd) = mean_std(&h6);
                stat_cell(m / 100.0, sd.map(|x| x / 100.0), "acc")
            } else {
                "–".into()
            };
            md.push_str(&format!(" {cell} |"));
        }
        let stats = g.task_stats();
        for c in &cols {
            let cell = stats
                .iter()
                .find(|(t, _)| *t == c)
                .map(|(t, (mean, std, _))| {
                    let metric = g
                        .members
                        .iter()
                        .find_map(|(_, s)| s.tasks.get(*t))
                        .map_or("", |x| x.metric.as_str());
                    stat_cell(*mean, *std, metric)
                })
                .unwrap_or_else(|| "–".into());
            md.push_str(&format!(" {cell} |"));
        }
        md.push('\n');
    }
    let metrics: Vec<String> = cols
        .iter()
        .filter_map(|c| {
            groups
                .iter()
                .flat_map(|g| &g.members)
                .find_map(|(_, s)| s.tasks.get(c))
                .map(|t| {
                    format!(
                        "{} {} ({}-shot)",
                        crate::eval::tables::task_title(c),
                        t.metric,
                        t.num_fewshot
                    )
                })
        })
        .collect();
    md.push_str(&format!(
        "\nMean ± sample standard deviation over the n seeds of each row. Metrics: {}\n",
        metrics.join(", ")
    ));
    md
}

/// One step of a curve averaged over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CurvePoint {
    step: f64,
    mean: f64,
    /// Sample std across runs (0 for one run).
    std: f64,
    runs: usize,
}

/// The runs' mean and sample std at each step the shortest run reached.
fn mean_curve(runs: &[Vec<(f64, f64)>]) -> Vec<CurvePoint> {
    let len = runs.iter().map(Vec::len).min().unwrap_or(0);
    (0..len)
        .map(|i| {
            let values: Vec<f64> = runs.iter().map(|r| r[i].1).collect();
            let (mean, std) = mean_std(&values);
            CurvePoint {
                step: runs[0][i].0,
                mean,
                std: std.unwrap_or(0.0),
                runs: runs.len(),
            }
        })
        .collect()
}

/// The loss table over seed groups: mean ± std of the loss at the first step, a quarter, half way, the end.
fn band_loss_table(curves: &[(String, Vec<CurvePoint>)]) -> String {
    let mut md = String::from(
        "| Run | n | Steps | Loss (first) | Loss (25 %) | Loss (50 %) | Loss (final) |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (name, points) in curves {
        let at = |f: f64| {
            let p = points[((points.len() - 1) as f64 * f).round() as usize];
            if p.runs > 1 {
                format!("{:.4} ± {:.4}", p.mean, p.std)
            } else {
                format!("{:.4}", p.mean)
            }
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            points[0].runs,
            points.len(),
            at(0.0),
            at(0.25),
            at(0.5),
            at(1.0)
        ));
    }
    md.push_str("\nLoss: mean ± sample standard deviation over the n seeds at that step.\n");
    md
}

/// Row names: `names` by eval step or model name, else the evaluated model's name, else (when two
/// evaluations share a model) the eval step's name.
fn row_names(
    loaded: Vec<(String, Summary)>,
    names: &BTreeMap<String, String>,
) -> Vec<(String, Summary)> {
    let shared = |model: &str| loaded.iter().filter(|(_, s)| s.model == model).count() > 1;
    let named: Vec<String> = loaded
        .iter()
        .map(|(step, s)| {
            names
                .get(step)
                .or_else(|| names.get(&s.model))
                .cloned()
                .unwrap_or_else(|| {
                    if shared(&s.model) {
                        step.clone()
                    } else {
                        s.model.clone()
                    }
                })
        })
        .collect();
    named
        .into_iter()
        .zip(loaded.into_iter().map(|(_, s)| s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(model: &str) -> Summary {
        Summary {
            model: model.into(),
            mode: crate::eval::fewshot::Mode::Harness,
            limit: None,
            tasks: Default::default(),
            h6: None,
        }
    }

    #[test]
    fn seed_labels_are_dropped_at_every_depth_and_nothing_else() {
        assert_eq!(
            strip_seed("eval[model=cpt[model=solar,seed=3]]"),
            "eval[model=cpt[model=solar]]"
        );
        assert_eq!(strip_seed("init[seed=2]"), "init");
        assert_eq!(
            strip_seed("eval[model=scratch[model=init[seed=5]]]"),
            "eval[model=scratch[model=init]]"
        );
        assert_eq!(strip_seed("dpo[chunks=2,seed=1]"), "dpo[chunks=2]");
        assert_eq!(strip_seed("dpo[seed=1,chunks=2]"), "dpo[chunks=2]");
        assert_eq!(strip_seed("sft[lr=1e-5]"), "sft[lr=1e-5]");
        assert_eq!(strip_seed("plain"), "plain");
        // `seeds` and `myseed` are other parameters.
        assert_eq!(strip_seed("x[seeds=2,myseed=1]"), "x[seeds=2,myseed=1]");
    }

    #[test]
    fn mean_and_sample_standard_deviation() {
        let (mean, std) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(mean, 5.0);
        // Σ (x − 5)² = 32; the sample std divides by n − 1 = 7 (the population std, 2, would divide by 8).
        assert!((std.unwrap() - (32.0f64 / 7.0).sqrt()).abs() < 1e-15);
        assert_eq!(mean_std(&[3.5]), (3.5, None));
        assert_eq!(stat_cell(0.25, Some(0.0125), "acc"), "25.00 ± 1.25");
        assert_eq!(
            stat_cell(12.5, Some(0.25), "word_perplexity"),
            "12.500 ± 0.250"
        );
        assert_eq!(stat_cell(12.5, None, "word_perplexity"), "12.500");
    }

    #[test]
    fn curves_of_several_seeds_average_step_by_step_up_to_the_shortest() {
        let runs = vec![
            vec![(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)],
            vec![(1.0, 5.0), (2.0, 4.0)],
        ];
        let mean = mean_curve(&runs);
        assert_eq!(mean.len(), 2);
        assert_eq!((mean[0].mean, mean[1].mean), (4.0, 3.0));
        assert!((mean[0].std - 2f64.sqrt()).abs() < 1e-15);
        assert_eq!(mean[1].runs, 2);
    }

    #[test]
    fn the_loss_table_samples_each_curve_at_fixed_fractions() {
        let curve: Vec<(f64, f64)> = (1..=9).map(|s| (s as f64, 10.0 - s as f64)).collect();
        let md = loss_table(&[("solar".into(), curve)]);
        assert!(
            md.contains("| solar | 9 | 9.0000 | 7.0000 | 5.0000 | 1.0000 |"),
            "{md}"
        );
    }

    #[test]
    fn the_held_out_table_has_a_column_per_scored_step_up_to_eight_always_with_the_last() {
        let run = |offset: f64, every: usize, n: usize| -> Curve {
            (1..=n)
                .map(|i| ((i * every) as f64, offset + 1.0 / i as f64))
                .collect()
        };
        let few = mean_curves(&[("solar".into(), vec![run(0.0, 20, 6), run(0.1, 20, 6)])]);
        let md = held_out_table(&few);
        assert!(
            md.contains(
                "| Run | n | step 20 | step 40 | step 60 | step 80 | step 100 | step 120 |"
            ),
            "{md}"
        );
        // Step 20: 1.0 and 1.1 → 1.05 ± 0.0707.
        assert!(md.contains("| solar | 2 | 1.0500 ± 0.0707 |"), "{md}");
        let many = mean_curves(&[("long".into(), vec![run(0.0, 5, 30)])]);
        let md = held_out_table(&many);
        let header = md.lines().next().unwrap();
        assert_eq!(header.matches("step").count(), HELD_OUT_COLUMNS, "{header}");
        assert!(
            header.contains("| step 5 |") && header.ends_with("| step 150 |"),
            "{header}"
        );
        assert!(
            md.contains("| long | 1 | 1.0000 |"),
            "one run: no ± column\n{md}"
        );
    }

    #[test]
    fn rows_are_named_after_models_unless_a_model_repeats_or_a_name_is_given() {
        let loaded = vec![
            ("eval[model=a]".to_string(), summary("a")),
            ("eval[model=b]".to_string(), summary("b")),
            ("other[model=b]".to_string(), summary("b")),
            ("eval[model=c]".to_string(), summary("c")),
        ];
        let names = BTreeMap::from([("c".to_string(), "Cand. C".to_string())]);
        let rows: Vec<String> = row_names(loaded, &names)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(rows, ["a", "eval[model=b]", "other[model=b]", "Cand. C"]);
    }
}
