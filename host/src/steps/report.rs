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
//! Output: `report.md`, `report.json` (every input's `results.json`, in order) and `chart.svg`.

use super::context::StepContext;
use super::kind::{ArtifactKind, CheckContext, ConfigIssue, InputSlot, InputSlots, StepKind};
use crate::eval::tables::{bar_chart_svg, markdown_table, Summary};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Parameters of a `report` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Heading of the report.
    #[serde(default)]
    pub title: Option<String>,
    /// Row names replacing the inputs' names (input name → row name).
    #[serde(default)]
    pub names: BTreeMap<String, String>,
}

/// The `report` step kind.
pub struct ReportStep;

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "evals",
    accepts: &[ArtifactKind::Evaluation],
    many: true,
    required: true,
}];

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

    fn run(&self, c: &ReportConfig, ctx: &StepContext) -> Result<()> {
        let mut rows = Vec::new();
        for a in ctx.inputs_of("evals") {
            let path = a.path.join("results.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let summary: Summary = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an eval results.json", path.display()))?;
            let name = c
                .names
                .get(&a.name)
                .cloned()
                .unwrap_or_else(|| a.name.clone());
            rows.push((name, summary));
        }
        let mut md = String::new();
        if let Some(t) = &c.title {
            md.push_str(&format!("# {t}\n\n"));
        }
        md.push_str(&markdown_table(&rows));
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
