//! Text tables for people: the plan (`dus plan`) and the run summary printed after `dus run`.

use super::executor::{RunSummary, StepStatus};
use super::plan::{Plan, PlanStatus};
use std::fmt::Write;

/// The plan as a table: order, step, kind, status and why.
pub fn render_plan(plan: &Plan) -> String {
    let wf = &plan.workflow;
    let mut out = String::new();
    let cached = plan.steps.len() - plan.to_run();
    let _ = writeln!(
        out,
        "workflow `{}` ({}): {} steps, {} cached, {} to run; artifacts in {}",
        wf.settings.name,
        wf.file.display(),
        plan.steps.len(),
        cached,
        plan.to_run(),
        wf.output_dir.display()
    );
    let width = plan
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "  {:>3}  {:<width$}  {:<10} {:<8} detail",
        "#", "step", "kind", "status"
    );
    for (n, s) in plan.steps.iter().enumerate() {
        let kind = wf.steps[s.index].kind.name();
        let (status, detail) = match &s.status {
            PlanStatus::Cached => (
                "cached",
                s.dir
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default(),
            ),
            PlanStatus::Run(why) => ("run", why.clone()),
            PlanStatus::Blocked(why) => ("blocked", why.clone()),
        };
        let _ = writeln!(
            out,
            "  {:>3}  {:<width$}  {:<10} {:<8} {}",
            n + 1,
            s.name,
            kind,
            status,
            detail
        );
    }
    out
}

/// The run summary: one line per step with its outcome and its own run time (and, when any step waited
/// for a job slot or the device, how long it waited), then totals.
pub fn render_summary(summary: &RunSummary) -> String {
    let mut out = String::new();
    let width = summary
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let seconds = |d: std::time::Duration| {
        if d.is_zero() {
            "-".to_string()
        } else {
            format!("{:.1}s", d.as_secs_f64())
        }
    };
    // Waits under 0.1 s are scheduling noise, not worth a column.
    let show_queue = summary.steps.iter().any(|s| s.queued.as_secs_f64() >= 0.1);
    if show_queue {
        let _ = writeln!(
            out,
            "  {:<width$}  {:<9} {:>9} {:>9}",
            "step", "status", "run", "waited"
        );
    } else {
        let _ = writeln!(out, "  {:<width$}  {:<9} {:>9}", "step", "status", "run");
    }
    for s in &summary.steps {
        if show_queue {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<9} {:>9} {:>9}",
                s.name,
                s.status.word(),
                seconds(s.duration),
                seconds(s.queued)
            );
        } else {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<9} {:>9}",
                s.name,
                s.status.word(),
                seconds(s.duration)
            );
        }
        let detail = match &s.status {
            StepStatus::Failed(m) | StepStatus::Skipped(m) | StepStatus::Blocked(m) => Some(m),
            _ => None,
        };
        if let Some(m) = detail {
            for line in m.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
    }
    let total: f64 = summary.steps.iter().map(|s| s.duration.as_secs_f64()).sum();
    let _ = writeln!(
        out,
        "{} ran, {} cached, {} failed, {} skipped, {} blocked, {} cancelled in {:.1}s ({:.1}s of step run time)",
        summary.count("ran"),
        summary.count("cached"),
        summary.count("failed"),
        summary.count("skipped"),
        summary.count("blocked"),
        summary.count("cancelled"),
        summary.wall.as_secs_f64(),
        total
    );
    out
}

/// The results a run ends with: for every step whose kind has a headline file (the `report` table) and
/// that ran or was cached, its name, the artifact folder and the file's content. Empty when there is none.
pub fn render_headlines(summary: &RunSummary) -> String {
    let mut out = String::new();
    for s in &summary.steps {
        let Some(path) = &s.headline else { continue };
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let _ = writeln!(
            out,
            "\n{} ({}): {}\n",
            s.name,
            s.status.word(),
            s.dir.display()
        );
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}
