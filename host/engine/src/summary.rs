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

/// The run summary: one line per step with its outcome and wall time, then totals.
pub fn render_summary(summary: &RunSummary) -> String {
    let mut out = String::new();
    let width = summary
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(out, "  {:<width$}  {:<9} {:>9}", "step", "status", "time");
    for s in &summary.steps {
        let time = if s.duration.is_zero() {
            "-".to_string()
        } else {
            format!("{:.1}s", s.duration.as_secs_f64())
        };
        let _ = writeln!(
            out,
            "  {:<width$}  {:<9} {:>9}",
            s.name,
            s.status.word(),
            time
        );
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
        "{} ran, {} cached, {} failed, {} skipped, {} blocked, {} cancelled ({:.1}s of step time)",
        summary.count("ran"),
        summary.count("cached"),
        summary.count("failed"),
        summary.count("skipped"),
        summary.count("blocked"),
        summary.count("cancelled"),
        total
    );
    out
}
