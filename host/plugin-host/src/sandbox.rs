//! The sandbox of one plugin job: a fresh store with WASI limited to the workflow's grants, a
//! memory cap, a per-call deadline, captured stdout/stderr, and errors that say what went wrong.
//!
//! The deadline holds whatever the guest does. Guest code is interrupted by the engine's epoch: a
//! callback every [`EPOCH_TICK`] traps once the call's deadline has passed or its cancellation token
//! fired. A guest blocked in a WASI call (a sleep, a poll, a read) runs no guest code, so the call is
//! driven as a future ([`crate::host::Job::call`]) raced against the deadline and the token: when
//! either wins, the future is dropped, which abandons the pending WASI operation and unwinds the guest.

use super::output::CapturedOutput;
use anyhow::{Context, Result};
use dusflow_core::spec::{PluginGrants, PluginLimits};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the host's ticker thread advances the engine epoch; the granularity of deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of plugin stdout+stderr kept per job and quoted in errors: the tail, where tracebacks end.
const OUTPUT_KEPT: usize = 4096;

/// The data of one plugin store.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// When the current call must end (set before every entry into the guest).
    pub(crate) deadline: Option<Instant>,
    /// Stops the current call early (Ctrl-C, or watch mode superseding the step).
    pub(crate) cancel: Option<CancellationToken>,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A wall clock frozen at the Unix epoch: what a plugin without the `clock` grant sees.
struct FrozenWallClock;

impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that never advances: what a plugin without the `clock` grant sees.
struct FrozenMonotonicClock;

impl wasmtime_wasi::HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The error that stops a call whose cancellation token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallCancelled;

impl std::fmt::Display for CallCancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call was cancelled")
    }
}

impl std::error::Error for CallCancelled {}

/// A store for one job, with the output pipe that captures what the plugin prints.
pub(crate) struct Sandbox {
    pub store: Store<StoreState>,
    output: CapturedOutput,
    timeout: Duration,
}

impl Sandbox {
    /// Creates a store that grants the plugin exactly `grants` and enforces `limits`; `cancel`
    /// stops any call in progress.
    pub(crate) fn new(
        engine: &Engine,
        grants: &PluginGrants,
        limits: &PluginLimits,
        cancel: Option<CancellationToken>,
    ) -> Result<Sandbox> {
        let output = CapturedOutput::new(OUTPUT_KEPT);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(output.clone()).stderr(output.clone());
        for dir in &grants.read {
            wasi.preopened_dir(dir, guest_path(dir)?, FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot grant read access to {}", dir.display()))?;
        }
        for dir in &grants.write {
            wasi.preopened_dir(dir, guest_path(dir)?, FsPerms::ReadWrite)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot grant write access to {}", dir.display()))?;
        }
        for var in &grants.env {
            if let Ok(value) = std::env::var(var) {
                wasi.env(var, value);
            }
        }
        if !grants.clock {
            wasi.wall_clock(FrozenWallClock)
                .monotonic_clock(FrozenMonotonicClock);
        }
        let limits_state = StoreLimitsBuilder::new()
            .memory_size(
                usize::try_from(limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            )
            .trap_on_grow_failure(true)
            .build();
        let timeout = Duration::from_millis(limits.timeout_ms.max(1));
        let state = StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: limits_state,
            deadline: Some(Instant::now() + timeout),
            cancel,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        // Checked every tick while guest code runs: past the deadline it traps as an interrupt (the
        // same trap a plain epoch deadline raises), on cancellation with `CallCancelled`.
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if state.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(CallCancelled.into());
            }
            if state.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Trap::Interrupt.into());
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        Ok(Sandbox {
            store,
            output,
            timeout,
        })
    }

    /// Starts the deadline of a call; returns when it ends. Call before every entry into the plugin.
    pub(crate) fn arm_deadline(&mut self) -> Instant {
        let deadline = Instant::now() + self.timeout;
        self.store.data_mut().deadline = Some(deadline);
        self.store.set_epoch_deadline(1);
        deadline
    }

    /// The token that cancels this job's calls, if any.
    pub(crate) fn cancel_token(&self) -> Option<CancellationToken> {
        self.store.data().cancel.clone()
    }

    /// The tail of what the plugin printed so far.
    pub(crate) fn output_tail(&self) -> String {
        self.output.text()
    }
}

/// Granted directories appear inside the guest at the same absolute path.
fn guest_path(dir: &std::path::Path) -> Result<String> {
    let abs =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    abs.to_str()
        .map(str::to_owned)
        .with_context(|| format!("granted path {} is not UTF-8", abs.display()))
}

/// What went wrong in a plugin call.
pub(crate) enum Failure {
    /// The plugin returned an error (`result::err`); its instance is still usable.
    Returned(String),
    /// The call trapped, ran out of time or memory; the instance is unusable.
    Trapped(anyhow::Error),
    /// The plugin answered something the host cannot accept.
    Malformed(String),
    /// The deadline passed while the plugin waited in a WASI call; the instance is unusable.
    TimedOut,
}

/// Builds the error a step reports: plugin, function, message, captured output.
pub(crate) fn plugin_error(
    plugin: &str,
    function: &str,
    failure: Failure,
    limits: &PluginLimits,
    output: &str,
) -> anyhow::Error {
    let message = match failure {
        Failure::Returned(msg) => format!("returned an error: {msg}"),
        Failure::Malformed(msg) => format!("returned a malformed answer: {msg}"),
        Failure::Trapped(err) => describe_trap(plugin, &err, limits),
        Failure::TimedOut => time_limit_message(plugin, limits),
    };
    let mut text = format!("plugin '{plugin}' failed in {function}: {message}");
    if output.trim().is_empty() {
        text.push_str("\n  (the plugin printed nothing to stdout/stderr)");
    } else {
        text.push_str("\n  plugin output (stdout+stderr, last lines):");
        for line in output.trim_end().lines() {
            text.push_str("\n    | ");
            text.push_str(line);
        }
    }
    anyhow::Error::msg(text)
}

fn time_limit_message(plugin: &str, limits: &PluginLimits) -> String {
    format!(
        "exceeded its time limit of {} ms and was stopped (raise [plugins.{plugin}] limits.timeout_ms if the \
         work is legitimate)",
        limits.timeout_ms
    )
}

fn describe_trap(plugin: &str, err: &anyhow::Error, limits: &PluginLimits) -> String {
    // The root cause (the trap) first, then its context (the wasm backtrace); not the host's Rust
    // backtrace, which says nothing about the plugin.
    let mut causes: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    let root = causes.pop().unwrap_or_default();
    let chain = std::iter::once(root)
        .chain(causes)
        .collect::<Vec<_>>()
        .join("\n");
    if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) || chain.contains("interrupt") {
        return time_limit_message(plugin, limits);
    }
    if chain.contains("forcing trap when growing memory")
        || chain.contains("forcing a memory growth failure")
    {
        return format!(
            "exceeded its memory limit of {} MiB (raise [plugins.{plugin}] limits.memory_mb if the work is \
             legitimate)",
            limits.memory_mb
        );
    }
    format!("trapped: {}", chain.replace('\n', "\n    "))
}
