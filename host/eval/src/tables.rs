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
/// percent with two decimals; `–` where a model lacks a task. The H6 column appears when some row has all six.
pub fn markdown_table(summaries: &[(String, Summary)]) -> String {
    let cols = columns(summaries);
    // The H6 average only when some row has all six tasks.
    let with_h6 = summaries.iter().any(|(_, s)| s.h6.is_some());
    let mut out = String::from(if with_h6 {
        "| Model | H6 (Avg.) |"
    } else {
        "| Model |"
    });
    for c in &cols {
        let _ = write!(out, " {} |", task_title(c));
    }
    out.push_str(if with_h6 { "\n|---|---:|" } else { "\n|---|" });
    for _ in &cols {
        out.push_str("---:|");
    }
    out.push('\n');
    for (name, s) in summaries {
        let _ = write!(out, "| {name} |");
        if with_h6 {
            let h6 =
                s.h6.map(|h| format!("{h:.2}"))
                    .unwrap_or_else(|| "–".into());
            let _ = write!(out, " {h6} |");
        }
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
    render_bars(&groups, summaries).unwrap_or_else(|e| {
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\"><text y=\"20\">chart failed: {}</text></svg>\n", xml_escape(&e))
    })
}

/// Draws the grouped bars with plotters: x runs over groups (one slot per model plus a gap), y is percent.
fn render_bars(
    groups: &[(String, Vec<Option<f64>>)],
    summaries: &[(String, Summary)],
) -> Result<String, String> {
    use plotters::prelude::*;
    const PALETTE: [RGBColor; 8] = [
        RGBColor(0x4e, 0x79, 0xa7),
        RGBColor(0xf2, 0x8e, 0x2b),
        RGBColor(0xe1, 0x57, 0x59),
        RGBColor(0x76, 0xb7, 0xb2),
        RGBColor(0x59, 0xa1, 0x4f),
        RGBColor(0xed, 0xc9, 0x48),
        RGBColor(0xb0, 0x7a, 0xa1),
        RGBColor(0x9c, 0x75, 0x5f),
    ];
    let models = summaries.len().max(1);
    let slot = models as f64 + 1.0;
    let width = (120 + 24 * (models + 1) * groups.len().max(1)) as u32;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width.max(480), 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let titles: Vec<String> = groups.iter().map(|(t, _)| t.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..slot * groups.len().max(1) as f64, 0.0..100.0)
            .map_err(|e| e.to_string())?;
        let label = move |x: &f64| {
            let g = (*x / slot).floor() as usize;
            let centre = (g as f64 + 0.5) * slot;
            if (x - centre).abs() < 1e-6 {
                titles.get(g).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len().max(1) * 2 + 1)
            .x_label_formatter(&label)
            .y_desc("score (%)")
            .draw()
            .map_err(|e| e.to_string())?;
        for (mi, (name, _)) in summaries.iter().enumerate() {
            let color = PALETTE[mi % PALETTE.len()];
            let bars = groups
                .iter()
                .enumerate()
                .filter_map(move |(gi, (_, vals))| {
                    vals[mi].map(|v| {
                        let x0 = gi as f64 * slot + 0.5 + mi as f64;
                        Rectangle::new([(x0, 0.0), (x0 + 0.9, v.clamp(0.0, 100.0))], color.filled())
                    })
                });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
