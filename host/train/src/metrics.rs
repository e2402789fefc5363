//! Per-step metrics: a JSONL log that survives resumption, and a loss-curve SVG drawn with plotters.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, 1-based.
    pub step: usize,
    /// Mean loss over the step's target tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Loss units in the step: target tokens (language modelling) or preference pairs (DPO).
    pub targets: usize,
    /// Input tokens processed in the step.
    pub tokens: usize,
    /// Input tokens per second over the step.
    pub tokens_per_s: f64,
    /// Objective-specific means over the step's units (e.g. DPO's `rewards/accuracies`), by name.
    #[serde(
        flatten,
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// The `metrics.jsonl` file, one [`StepMetrics`] per line.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    /// Every logged step, including those before a resume.
    pub history: Vec<StepMetrics>,
}

impl MetricsLog {
    /// Opens `path`, keeping only lines of steps `<= keep_until` (the resumed checkpoint's step).
    pub fn open(path: &Path, keep_until: usize) -> Result<Self> {
        let mut history = Vec::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                match serde_json::from_str::<StepMetrics>(line) {
                    Ok(m) if m.step <= keep_until => history.push(m),
                    _ => {}
                }
            }
        }
        let mut body = String::new();
        for m in &history {
            body.push_str(&serde_json::to_string(m)?);
            body.push('\n');
        }
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            history,
        })
    }

    /// Appends one step.
    pub fn log(&mut self, m: &StepMetrics) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(m)?)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.history.push(m.clone());
        Ok(())
    }
}

/// Draws loss against step as an SVG file.
pub fn plot_loss(history: &[StepMetrics], title: &str, path: &Path) -> Result<()> {
    let points = history.iter().map(|m| (m.step as f64, m.loss)).collect();
    plot_losses(&[(String::new(), points)], title, path)
}

/// Draws several loss curves `(label, [(step, loss)])` in one SVG chart, with a legend when labelled.
/// Non-finite losses are skipped.
pub fn plot_losses(series: &[(String, Vec<(f64, f64)>)], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let finite: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(label, points)| {
            let kept = points.iter().copied().filter(|p| p.1.is_finite()).collect();
            (label.as_str(), kept)
        })
        .collect();
    let all = finite.iter().flat_map(|(_, p)| p.iter());
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(hi - 1e-6) * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss")
        .draw()
        .map_err(plot_err)?;
    let labelled = finite.iter().any(|(l, _)| !l.is_empty());
    for (i, (label, points)) in finite.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_err)?;
        if labelled {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One point of a curve averaged over seeds: `(step, mean, std)`.
pub type BandPoint = (f64, f64, f64);

/// Draws curves `(label, [(step, mean, std)])` averaged over seeds: each mean as a line inside a shaded
/// band from mean − std to mean + std. Non-finite points are skipped.
pub fn plot_loss_bands(
    series: &[(String, Vec<BandPoint>)],
    title: &str,
    path: &Path,
) -> Result<()> {
    use plotters::prelude::*;
    let finite: Vec<(&str, Vec<BandPoint>)> = series
        .iter()
        .map(|(label, points)| {
            let kept = points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite() && p.2.is_finite())
                .collect();
            (label.as_str(), kept)
        })
        .collect();
    let all = finite.iter().flat_map(|(_, p)| p.iter());
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1 - p.2), hi.max(p.1 + p.2))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(hi - 1e-6) * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (mean ± std over seeds)")
        .draw()
        .map_err(plot_err)?;
    for (i, (label, points)) in finite.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let band: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.0, p.1 + p.2))
            .chain(points.iter().rev().map(|p| (p.0, p.1 - p.2)))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled())))
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the loss curve: {e}")
}
