//! What the engine reports while it works: a typed event stream for tests and the CLI, and a JSONL log.

use serde::Serialize;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedSender;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A run (or a watch-mode rerun) began.
    RunStarted {
        /// Steps in the plan.
        steps: usize,
    },
    /// A step began executing (not emitted for cached steps).
    StepStarted {
        /// Step name.
        step: String,
        /// Its cache key.
        key: String,
    },
    /// A step ended.
    StepFinished {
        /// Step name.
        step: String,
        /// `ran`, `cached`, `failed`, `skipped`, `cancelled` or `blocked`.
        status: String,
        /// Wall time in seconds (0 when cached).
        seconds: f64,
    },
    /// A run ended.
    RunFinished {
        /// Steps that executed.
        ran: usize,
        /// Steps reused from the cache.
        cached: usize,
        /// Steps that failed, were skipped, blocked or cancelled.
        failed: usize,
    },
    /// Watch mode saw relevant files change.
    FilesChanged {
        /// The changed paths.
        paths: Vec<PathBuf>,
    },
    /// Watch mode found the edited workflow invalid and keeps watching.
    WorkflowInvalid {
        /// The rendered errors.
        errors: String,
    },
}

/// A timestamped event as delivered to subscribers.
#[derive(Debug, Clone, Serialize)]
pub struct Stamped {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u128,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// Where events go: an optional channel and an optional JSONL file.
#[derive(Clone, Default)]
pub struct EventSink {
    channel: Option<UnboundedSender<Stamped>>,
    log: Option<Arc<Mutex<PathBuf>>>,
}

impl EventSink {
    /// Sends events to `channel` too.
    pub fn with_channel(mut self, channel: UnboundedSender<Stamped>) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Appends events as JSON lines to `path` too.
    pub fn with_log(mut self, path: PathBuf) -> Self {
        self.log = Some(Arc::new(Mutex::new(path)));
        self
    }

    /// Delivers one event.
    pub fn emit(&self, event: Event) {
        let stamped = Stamped {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            event,
        };
        if let Some(log) = &self.log {
            let path = log.lock().expect("event log lock");
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&*path) {
                let _ = writeln!(f, "{}", serde_json::to_string(&stamped).unwrap_or_default());
            }
        }
        if let Some(ch) = &self.channel {
            let _ = ch.send(stamped);
        }
    }
}
