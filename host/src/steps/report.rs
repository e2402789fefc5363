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
        let rows = row_names(loaded, &c.names);
        let mut md = String::new();
        if let Some(t) = &c.title {
            md.push_str(&format!("# {t}\n\n"));
        }
        md.push_str(&markdown_table(&rows));
        let mut curves = Vec::new();
        for a in ctx.inputs_of("curves") {
            let label = c
                .names
                .get(&a.name)
                .cloned()
                .unwrap_or_else(|| a.name.clone());
            curves.push((label, read_losses(&a.path.join("metrics.jsonl"))?));
        }
        if !curves.is_empty() {
            md.push('\n');
            md.push_str(&loss_table(&curves));
            crate::train::metrics::plot_losses(
                &curves,
                c.title.as_deref().unwrap_or("training loss"),
                &ctx.out_dir.join("curves.svg"),
            )?;
        }
        std::fs::write(ctx.out_dir.join("report.md"), md)?;
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, s)| serde_json::json!({ "name": n, "results": s }))
            .collect();
        std::fs::write(
            ctx.out_dir.join("report.json"),
            serde_json::to_vec_pretty(&json)?,
        )?;
        std::fs::write(ctx.out_dir.join("chart.svg"), bar_chart_svg(&rows))?;
        Ok(())
    }
}

/// `(step, loss)` of every line of a `metrics.jsonl` (steps of later sDPO stages continue the count).
fn read_losses(path: &std::path::Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (curves need a training step's output)",
            path.display()
        )
    })?;
    let mut points = Vec::new();
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
        points.push(((points.len() + 1) as f64, loss));
    }
    anyhow::ensure!(!points.is_empty(), "{}: no steps logged", path.display());
    Ok(points)
}

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
    fn the_loss_table_samples_each_curve_at_fixed_fractions() {
        let curve: Vec<(f64, f64)> = (1..=9).map(|s| (s as f64, 10.0 - s as f64)).collect();
        let md = loss_table(&[("solar".into(), curve)]);
        assert!(
            md.contains("| solar | 9 | 9.0000 | 7.0000 | 5.0000 | 1.0000 |"),
            "{md}"
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
