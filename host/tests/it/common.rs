//! Step kinds and helpers for the engine tests: they record what ran, so tests can count executions.
#![allow(dead_code)]

use anyhow::{bail, Result};
use dusflow::steps::{ArtifactKind, InputSlot, InputSlots, Registry, StepContext, StepKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shared record of executed steps (in start order) with start/end instants.
#[derive(Clone, Default)]
pub(crate) struct Log(pub Arc<Mutex<Vec<(String, Instant, Instant)>>>);

impl Log {
    pub(crate) fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect()
    }
    pub(crate) fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// `kind = "text"`: writes `out.txt` = its `text` param followed by each input's `out.txt`.
pub(crate) struct TextStep {
    pub log: Log,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TextConfig {
    pub text: String,
    #[serde(default)]
    pub repeat: u32,
    #[serde(default)]
    pub fail: bool,
    /// Also write `part-1/out.txt` .. `part-N/out.txt`, declared as parts `part-1` .. `part-N`.
    #[serde(default)]
    pub parts: u32,
    /// Sleep this long before finishing.
    #[serde(default)]
    pub sleep_ms: u64,
}

const TEXT_INPUTS: &[InputSlot] =
    &[InputSlot::many("from", &[ArtifactKind::Files, ArtifactKind::Dataset]).optional()];

impl StepKind for TextStep {
    type Config = TextConfig;
    fn name(&self) -> &'static str {
        "text"
    }
    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(TEXT_INPUTS)
    }
    fn output(&self, _: &TextConfig) -> ArtifactKind {
        ArtifactKind::Files
    }
    fn parts(&self, c: &TextConfig) -> Vec<dusflow::steps::ArtifactPart> {
        (1..=c.parts)
            .map(|i| dusflow::steps::ArtifactPart {
                name: format!("part-{i}"),
                path: format!("part-{i}").into(),
                kind: ArtifactKind::Files,
            })
            .collect()
    }
    fn check(
        &self,
        c: &TextConfig,
        _: &dyn dusflow::steps::CheckContext,
    ) -> Vec<dusflow::steps::ConfigIssue> {
        if c.repeat > 100 {
            vec![dusflow::steps::ConfigIssue::new("repeat", "at most 100")]
        } else {
            vec![]
        }
    }
    fn run(&self, c: &TextConfig, ctx: &StepContext) -> Result<()> {
        let start = Instant::now();
        if c.fail {
            bail!("asked to fail");
        }
        std::thread::sleep(Duration::from_millis(c.sleep_ms));
        let mut out = c.text.repeat(c.repeat.max(1) as usize);
        for input in ctx.inputs_of("from") {
            let p = if input.path.is_dir() {
                input.path.join("out.txt")
            } else {
                input.path.clone()
            };
            out.push('|');
            out.push_str(&std::fs::read_to_string(&p)?);
        }
        for i in 1..=c.parts {
            let dir = ctx.out_dir.join(format!("part-{i}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("out.txt"), format!("{}{i}", c.text))?;
        }
        std::fs::write(ctx.out_dir.join("out.txt"), out)?;
        self.log
            .0
            .lock()
            .unwrap()
            .push((ctx.step.clone(), start, Instant::now()));
        Ok(())
    }
}

/// `kind = "meet"`: each step waits (up to 20 s) until `parties` meet steps are running at once.
pub(crate) struct MeetStep {
    pub state: Arc<(Mutex<usize>, Condvar)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MeetConfig {
    pub parties: usize,
}

impl StepKind for MeetStep {
    type Config = MeetConfig;
    fn name(&self) -> &'static str {
        "meet"
    }
    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(&[])
    }
    fn output(&self, _: &MeetConfig) -> ArtifactKind {
        ArtifactKind::Files
    }
    fn run(&self, c: &MeetConfig, _ctx: &StepContext) -> Result<()> {
        let (lock, cv) = &*self.state;
        let mut n = lock.lock().unwrap();
        *n += 1;
        cv.notify_all();
        let (n, timeout) = cv
            .wait_timeout_while(n, Duration::from_secs(20), |n| *n < c.parties)
            .unwrap();
        if timeout.timed_out() {
            bail!(
                "only {} of {} steps were running at the same time",
                *n,
                c.parties
            );
        }
        Ok(())
    }
}

/// `kind = "hold"`: runs until cancelled (or 30 s), then reports cancellation.
pub(crate) struct HoldStep {
    pub started: Arc<(Mutex<usize>, Condvar)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoldConfig {
    #[serde(default)]
    pub tag: String,
}

impl StepKind for HoldStep {
    type Config = HoldConfig;
    fn name(&self) -> &'static str {
        "hold"
    }
    fn inputs(&self) -> InputSlots {
        InputSlots::Any
    }
    fn output(&self, _: &HoldConfig) -> ArtifactKind {
        ArtifactKind::Files
    }
    fn run(&self, _c: &HoldConfig, ctx: &StepContext) -> Result<()> {
        std::fs::write(ctx.out_dir.join("partial.txt"), "half")?;
        {
            let (lock, cv) = &*self.started;
            *lock.lock().unwrap() += 1;
            cv.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            ctx.check_cancelled()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("hold step was never cancelled")
    }
}

/// A registry with the built-in kinds plus the test kinds, and their shared state.
pub(crate) struct TestKinds {
    pub registry: Registry,
    pub log: Log,
    pub hold_started: Arc<(Mutex<usize>, Condvar)>,
}

pub(crate) fn test_kinds() -> TestKinds {
    let log = Log::default();
    let hold_started = Arc::new((Mutex::new(0), Condvar::new()));
    let mut registry = dusflow::steps::builtin_registry();
    registry.register(TextStep { log: log.clone() });
    registry.register(MeetStep {
        state: Arc::new((Mutex::new(0), Condvar::new())),
    });
    registry.register(HoldStep {
        started: hold_started.clone(),
    });
    TestKinds {
        registry,
        log,
        hold_started,
    }
}

/// Waits until `count` hold steps have started.
pub(crate) fn wait_hold_started(state: &Arc<(Mutex<usize>, Condvar)>, count: usize) {
    let (lock, cv) = &**state;
    let guard = lock.lock().unwrap();
    let (_guard, t) = cv
        .wait_timeout_while(guard, Duration::from_secs(20), |n| *n < count)
        .unwrap();
    assert!(!t.timed_out(), "hold step did not start");
}

/// A temp folder with a workflow file.
pub(crate) struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new(workflow: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flow.toml"), workflow).unwrap();
        Self { dir }
    }
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub(crate) fn workflow(&self) -> PathBuf {
        self.path("flow.toml")
    }
    pub(crate) fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    pub(crate) fn edit(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.workflow()).unwrap();
        assert!(text.contains(from), "workflow has no `{from}`");
        std::fs::write(self.workflow(), text.replacen(from, to, 1)).unwrap();
    }
}

/// Reads `out.txt` of a step's artifact.
pub(crate) fn output_of(summary: &dusflow::engine::RunSummary, step: &str) -> String {
    let report = summary
        .step(step)
        .unwrap_or_else(|| panic!("no step {step}"));
    std::fs::read_to_string(Path::new(&report.dir).join("out.txt")).unwrap()
}

/// The complete artifact folder of `step` under the output folder `out` (the one with a manifest).
pub(crate) fn artifact(out: &Path, step: &str) -> PathBuf {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{step}-"))
                && p.join("manifest.json").exists()
        })
        .unwrap_or_else(|| panic!("no artifact for {step} in {}", out.display()))
}

/// The artifact folder of `step`, which must have succeeded.
pub(crate) fn dir_of(summary: &dusflow::engine::RunSummary, step: &str) -> PathBuf {
    let report = summary
        .step(step)
        .unwrap_or_else(|| panic!("no step {step}"));
    assert!(report.status.is_success(), "{step}: {:?}", report.status);
    report.dir.clone()
}

/// The failure message of `step`, which must have failed.
pub(crate) fn failure_of(summary: &dusflow::engine::RunSummary, step: &str) -> String {
    match &summary
        .step(step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .status
    {
        dusflow::engine::StepStatus::Failed(m) => m.clone(),
        other => panic!("{step} did not fail: {other:?}"),
    }
}

/// The largest absolute difference between two tensors of the same shape, as f32.
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// The largest |x| of an f32 tensor.
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the workflow `dir/flow.toml` with every built-in kind and default options.
pub(crate) async fn run_flow(dir: &Path) -> dusflow::engine::RunSummary {
    dusflow::engine::run(
        &dir.join("flow.toml"),
        &dusflow::steps::builtin_registry(),
        dusflow::engine::RunOptions::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// A workflow run in a child process — this test binary re-run for one test, with an environment variable
/// naming the folder — so that a test can SIGKILL it mid-step. (The shared `dus` binary of the target folder
/// may belong to another build, so the tests do not use it.)
pub(crate) struct ChildRun {
    /// The full name of the test that runs it (`module::test`).
    pub test: &'static str,
    /// The variable that tells the child which folder's `flow.toml` to run.
    pub env: &'static str,
}

impl ChildRun {
    /// In the child: runs the workflow (which must succeed) and returns true. In the parent: false.
    pub(crate) fn run_if_child(&self) -> bool {
        let Ok(dir) = std::env::var(self.env) else {
            return false;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let summary = rt.block_on(run_flow(Path::new(&dir)));
        assert!(summary.succeeded(), "{summary:?}");
        true
    }

    /// Starts the child on `dir` (its stderr goes to `dir/stderr.txt`).
    pub(crate) fn spawn(&self, dir: &Path) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", self.test, "--nocapture", "--test-threads=1"])
            .env(self.env, dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap())
            .spawn()
            .unwrap()
    }

    /// Runs the child on `dir` to the end; it must succeed.
    pub(crate) fn run(&self, dir: &Path) {
        assert!(self.spawn(dir).wait().unwrap().success());
    }

    /// Starts the child on `dir` and SIGKILLs it as soon as `ready()` returns something (within two
    /// minutes; `what` names it in failures). Returns that something.
    pub(crate) fn kill_when<T>(
        &self,
        dir: &Path,
        what: &str,
        mut ready: impl FnMut() -> Option<T>,
    ) -> T {
        let mut child = self.spawn(dir);
        let deadline = Instant::now() + Duration::from_secs(120);
        let found = loop {
            if let Some(found) = ready() {
                break found;
            }
            assert!(Instant::now() < deadline, "{what} never appeared");
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
                panic!("the run ended ({status}) before {what} appeared: {log}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        found
    }
}
