//! Result files and tables: `results.json` ([`Summary`]), the Markdown table with the H6 average, and the
//! comparison of several evaluations (the shape of the paper's Tab. 2-7) as Markdown and an SVG bar chart.

use super::evaluate::TaskResult;
use super::fewshot::Mode;
use super::tasks::H6;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// One task's headline numbers in `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    /// The metric the tables show.
    pub metric: String,
    /// Its value (a fraction for accuracies).
    pub score: f64,
    /// All metric means.
    pub metrics: BTreeMap<String, f64>,
    /// Documents evaluated.
    pub num_docs: usize,
    /// Few-shot examples per document.
    pub num_fewshot: usize,
}

/// `results.json`: what was evaluated and the scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The model's name (its input name in the workflow).
    pub model: String,
    /// Mode used.
    pub mode: Mode,
    /// Document limit per task, if any.
    pub limit: Option<usize>,
    /// Scores by task, in evaluation order.
    pub tasks: indexmap::IndexMap<String, TaskScore>,
    /// Mean of the six H6 scores in percent, when all six were evaluated.
    pub h6: Option<f64>,
}

impl Summary {
    /// Builds the summary of a model's task results.
    pub fn new(model: &str, mode: Mode, limit: Option<usize>, results: &[TaskResult]) -> Self {
        let tasks: indexmap::IndexMap<String, TaskScore> = results
            .iter()
            .map(|r| {
                (
                    r.task.clone(),
                    TaskScore {
                        metric: r.metric.clone(),
                        score: r.score,
                        metrics: r.metrics.clone(),
                        num_docs: r.num_docs,
                        num_fewshot: r.num_fewshot,
                    },
                )
            })
            .collect();
        let h6 = h6_average(&tasks.iter().map(|(k, v)| (k.clone(), v.score)).collect());
        Summary {
            model: model.to_string(),
            mode,
            limit,
            tasks,
            h6,
        }
    }
}

/// The H6 average in percent: the plain mean of the six task scores, if all are present.
pub fn h6_average(scores: &BTreeMap<String, f64>) -> Option<f64> {
    let values: Option<Vec<f64>> = H6.iter().map(|t| scores.get(*t).copied()).collect();
    values.map(|v| 100.0 * v.iter().sum::<f64>() / v.len() as f64)
}

/// Column title of a task in tables.
pub fn task_title(task: &str) -> String {
    match task {
        "arc_challenge" => "ARC".into(),
        "hellaswag" => "HellaSwag".into(),
        "mmlu" => "MMLU".into(),
        "truthfulqa_mc2" => "TruthfulQA".into(),
        "winogrande" => "Winogrande".into(),
        "gsm8k" => "GSM8K".into(),
        other => other.into(),
    }
}

/// Columns of a comparison: H6 tasks first (paper order), then other tasks in first-seen order.
fn columns(summaries: &[(String, Summary)]) -> Vec<String> {
    let mut cols: Vec<String> = H6
        .iter()
        .filter(|t| summaries.iter().any(|(_, s)| s.tasks.contains_key(**t)))
        .map(|t| t.to_string())
        .collect();
    for (_, s) in summaries {
        for t in s.tasks.keys() {
            if !cols.contains(t) {
                cols.push(t.clone());
            }
        }
    }
    cols
}

fn cell(score: f64, metric: &str) -> String {
    if metric.contains("perplexity") {
        format!("{score:.3}")
    } else {
        format!("{:.2}", 100.0 * score)
    }
}

/// A Markdown table with one row per `(name, summary)`: `| Model | H6 (Avg.) | ARC | ... |`, accuracies in
/// percent with two decimals; `–` where a model lacks a task or the H6 set is incomplete.
pub fn markdown_table(summaries: &[(String, Summary)]) -> String {
    let cols = columns(summaries);
    let mut out = String::from("| Model | H6 (Avg.) |");
    for c in &cols {
        let _ = write!(out, " {} |", task_title(c));
    }
    out.push_str("\n|---|---:|");
    for _ in &cols {
        out.push_str("---:|");
    }
    out.push('\n');
    for (name, s) in summaries {
        let _ = write!(
            out,
            "| {name} | {} |",
            s.h6.map(|h| format!("{h:.2}"))
                .unwrap_or_else(|| "–".into())
        );
        for c in &cols {
            let v = s
                .tasks
                .get(c)
                .map(|t| cell(t.score, &t.metric))
                .unwrap_or_else(|| "–".into());
            let _ = write!(out, " {v} |");
        }
        out.push('\n');
    }
    out.push_str("\nMetrics: ");
    let metrics: Vec<String> = cols
        .iter()
        .filter_map(|c| {
            summaries
                .iter()
                .find_map(|(_, s)| s.tasks.get(c))
                .map(|t| format!("{} {} ({}-shot)", task_title(c), t.metric, t.num_fewshot))
        })
        .collect();
    out.push_str(&metrics.join(", "));
    out.push('\n');
    out
}

/// A grouped bar chart (SVG) of the accuracy-like scores in percent: one group per task (H6 average
/// first when available), one bar per model.
pub fn bar_chart_svg(summaries: &[(String, Summary)]) -> String {
    const PALETTE: [&str; 8] = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
    ];
    let mut groups: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    if summaries.iter().any(|(_, s)| s.h6.is_some()) {
        groups.push((
            "H6 (Avg.)".into(),
            summaries.iter().map(|(_, s)| s.h6).collect(),
        ));
    }
    for c in columns(summaries) {
        let vals: Vec<Option<f64>> = summaries
            .iter()
            .map(|(_, s)| {
                s.tasks
                    .get(&c)
                    .filter(|t| !t.metric.contains("perplexity"))
                    .map(|t| 100.0 * t.score)
            })
            .collect();
        if vals.iter().any(Option::is_some) {
            groups.push((task_title(&c), vals));
        }
    }
    let n = summaries.len().max(1);
    let (bar_w, gap, left, top, plot_h) = (18.0, 24.0, 50.0, 20.0, 240.0);
    let group_w = bar_w * n as f64 + gap;
    let legend_h = 18.0 * n as f64 + 10.0;
    let width = left + group_w * groups.len().max(1) as f64 + 20.0;
    let height = top + plot_h + 40.0 + legend_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for tick in (0..=100).step_by(20) {
        let y = top + plot_h * (1.0 - tick as f64 / 100.0);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{tick}</text>"##,
            width - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (gi, (title, vals)) in groups.iter().enumerate() {
        let x0 = left + gap / 2.0 + group_w * gi as f64;
        for (mi, v) in vals.iter().enumerate() {
            if let Some(v) = v {
                let h = plot_h * v.clamp(0.0, 100.0) / 100.0;
                let x = x0 + bar_w * mi as f64;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {v:.2}</title></rect>"#,
                    top + plot_h - h,
                    bar_w - 2.0,
                    PALETTE[mi % PALETTE.len()],
                    xml_escape(&summaries[mi].0)
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + bar_w * n as f64 / 2.0,
            top + plot_h + 16.0,
            xml_escape(title)
        );
    }
    for (mi, (name, _)) in summaries.iter().enumerate() {
        let y = top + plot_h + 40.0 + 18.0 * mi as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{left}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 10.0,
            PALETTE[mi % PALETTE.len()],
            left + 18.0,
            y,
            xml_escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
