//! Progress bars (one per running step) and a log writer that draws around them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::time::Duration;

/// Where step progress is drawn. Hidden in tests and when stderr is not a terminal.
#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
}

impl Progress {
    /// Draws nothing.
    pub fn hidden() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
        }
    }

    /// Draws on stderr when it is a terminal.
    pub fn stderr() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        }
    }

    /// A new bar for a step; the step sets its length, position and message.
    pub fn step_bar(&self, step: &str) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{spinner:.green} {prefix:<28.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg} ({elapsed} elapsed, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let bar = self.multi.add(
            ProgressBar::no_length()
                .with_style(style)
                .with_prefix(step.to_string()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A `tracing` writer that prints log lines above the bars instead of through them.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: self.multi.clone(),
        }
    }
}

/// Writes log output to stderr without tearing progress bars (see [`Progress::log_writer`]).
#[derive(Clone)]
pub struct LogWriter {
    multi: MultiProgress,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.multi.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
