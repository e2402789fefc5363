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

/// Draws loss against step as an SVG file, with the held-out loss as a second line when it was logged.
pub fn plot_loss(history: &[StepMetrics], title: &str, path: &Path) -> Result<()> {
    let points: Vec<(f64, f64)> = history.iter().map(|m| (m.step as f64, m.loss)).collect();
    let held_out: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| Some((m.step as f64, *m.extra.get(crate::EVAL_LOSS)?)))
        .collect();
    if held_out.is_empty() {
        return plot_losses(&[(String::new(), points)], title, path);
    }
    plot_losses(
        &[
            ("training batch".to_string(), points),
            ("held-out data".to_string(), held_out),
        ],
        title,
        path,
    )
}

/// Draws several loss curves `(label, [(step, loss)])` in one SVG chart, with a legend when labelled.
/// Non-finite losses are skipped.
pub fn plot_losses(series: &[(String, Vec<(f64, f64)>)], title: &str, path: &Path) -> Result<()> {
    let lines: Vec<(String, Vec<BandPoint>)> = series
        .iter()
        .map(|(label, points)| {
            (
                label.clone(),
                points.iter().map(|p| (p.0, p.1, 0.0)).collect(),
            )
        })
        .collect();
    draw_curves(&lines, title, "loss", false, path)
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
    draw_curves(series, title, "loss (mean ± std over seeds)", true, path)
}

/// When the highest point is this many times the lowest, the y axis is logarithmic: a control that
/// never recovers (a model trained from scratch next to up-scaled ones) would otherwise squeeze every
/// other curve into one flat line at the bottom.
const LOG_AXIS_SPAN: f64 = 8.0;

/// The y range that shows every point (bands included) with a 5 % margin, and whether it is logarithmic.
fn y_range(series: &[(&str, Vec<BandPoint>)]) -> (f64, f64, bool) {
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1 - p.2), hi.max(p.1 + p.2))
        });
    if !lo.is_finite() {
        return (0.0, 1.0, false);
    }
    // A band may reach below zero where a loss cannot; the log axis starts at the lowest mean then.
    let lowest_mean = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min);
    if lowest_mean > 0.0 && hi / lowest_mean > LOG_AXIS_SPAN {
        return (lo.max(lowest_mean * 0.9), hi * 1.1, true);
    }
    (lo.min(hi - 1e-6) * 0.95, hi * 1.05, false)
}

fn draw_curves(
    series: &[(String, Vec<BandPoint>)],
    title: &str,
    y_label: &str,
    always_legend: bool,
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
    let max_step = finite
        .iter()
        .flat_map(|(_, p)| p.iter())
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let (lo, hi, log_axis) = y_range(&finite);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let legend = always_legend || finite.iter().any(|(l, _)| !l.is_empty());
    if log_axis {
        let chart = builder
            .build_cartesian_2d(0.0..max_step, (lo..hi).log_scale())
            .map_err(plot_err)?;
        let y_label = format!("{y_label}, log scale");
        fill_chart(chart, &finite, &y_label, legend, lo)?;
    } else {
        let chart = builder
            .build_cartesian_2d(0.0..max_step, lo..hi)
            .map_err(plot_err)?;
        fill_chart(chart, &finite, y_label, legend, lo)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draws the mesh, each band (where a point has a spread) and line, and the legend on a chart of either
/// y scale. `floor` is the bottom of the axis: a band is clipped there so a log axis never sees a
/// value at or below zero.
fn fill_chart<'a, Y>(
    mut chart: plotters::chart::ChartContext<
        'a,
        plotters::backend::SVGBackend<'a>,
        plotters::coord::cartesian::Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &[(&str, Vec<BandPoint>)],
    y_label: &str,
    legend: bool,
    floor: f64,
) -> Result<()>
where
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>
        + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    use plotters::prelude::*;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_label)
        .draw()
        .map_err(plot_err)?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if points.iter().any(|p| p.2 > 0.0) {
            let band: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.0, p.1 + p.2))
                .chain(points.iter().rev().map(|p| (p.0, (p.1 - p.2).max(floor))))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled())))
                .map_err(plot_err)?;
        }
        let drawn = chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?;
        if legend {
            drawn.label(*label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the loss curve: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y_axis_turns_logarithmic_only_when_one_curve_dwarfs_the_others() {
        let recovered = vec![(1.0, 0.8, 0.02), (40.0, 0.58, 0.02)];
        let scratch = vec![(1.0, 5.5, 0.03), (40.0, 3.8, 0.03)];
        let (lo, hi, log) = y_range(&[("solar", recovered.clone())]);
        assert!(!log);
        assert!(lo < 0.56 && hi > 0.82 && lo > 0.5, "{lo}..{hi}");
        let (lo, hi, log) = y_range(&[("solar", recovered), ("scratch", scratch)]);
        assert!(log, "0.58 .. 5.5 spans more than {LOG_AXIS_SPAN}x");
        assert!(lo > 0.0 && lo < 0.56 && hi > 5.53, "{lo}..{hi}");
    }

    #[test]
    fn a_band_reaching_below_zero_keeps_a_log_axis_positive() {
        let noisy = vec![(1.0, 0.1, 0.5), (2.0, 0.1, 0.5)];
        let high = vec![(1.0, 9.0, 0.0)];
        let (lo, _, log) = y_range(&[("noisy", noisy), ("high", high)]);
        assert!(log);
        assert!(lo > 0.0, "{lo}");
    }

    #[test]
    fn both_axes_draw_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        for (name, scratch_loss) in [("linear", 0.9), ("log", 5.5)] {
            let path = dir.path().join(format!("{name}.svg"));
            let series = vec![
                (
                    "solar".to_string(),
                    vec![(1.0, 0.8, 0.02), (40.0, 0.58, 0.02)],
                ),
                (
                    "scratch".to_string(),
                    vec![(1.0, scratch_loss, 0.03), (40.0, 0.7, 0.03)],
                ),
            ];
            plot_loss_bands(&series, "seam", &path).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.contains("solar") && svg.contains("scratch"));
            assert_eq!(svg.contains("log scale"), name == "log", "{name}");
        }
    }
}
