//! The tokio runtime behind plugin calls, and a `block_on` that works from any thread.
//!
//! Plugin calls are futures (wasmtime's async API) so that a call blocked in WASI can be abandoned at
//! its deadline. Callers are synchronous code on every kind of thread: a step's blocking thread, a test,
//! `dus plugin check` inside the CLI's runtime. tokio's own `block_on` refuses to run inside another
//! runtime ("Cannot start a runtime from within a runtime"), so the future is polled here on the calling
//! thread while this runtime's worker drives timers and I/O, and wakes the caller by unparking it.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use tokio::runtime::{Handle, Runtime};

/// A small multi-thread runtime owned by the plugin host (one worker: WASI's timers, I/O and blocking
/// file operations), shut down without waiting when the last owner drops it.
pub(crate) struct PluginRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl PluginRuntime {
    pub(crate) fn new() -> std::io::Result<Arc<PluginRuntime>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dusflow-plugin-io")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Arc::new(PluginRuntime {
            runtime: Some(runtime),
            handle,
        }))
    }

    /// Runs `future` to completion on the calling thread, with this runtime as the ambient one.
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _ambient = self.handle.enter();
        let waker = Waker::from(Arc::new(Unparker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(value) => return value,
                // A spurious wake-up only costs another poll.
                Poll::Pending => std::thread::park(),
            }
        }
    }
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks end, which panics inside another runtime (the
        // engine drops the plugin host from async code): let it wind down in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct Unparker(std::thread::Thread);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn block_on_drives_timers_from_inside_another_runtime() {
        let plugin_runtime = PluginRuntime::new().unwrap();
        let outer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // tokio's own block_on would panic here: this is the situation of `dus plugin check`.
        let waited = outer.block_on(async {
            plugin_runtime.block_on(async {
                let started = Instant::now();
                tokio::time::sleep(Duration::from_millis(30)).await;
                started.elapsed()
            })
        });
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        drop(outer);
        // Dropping the plugin runtime inside an async context must not panic either.
        let outer = tokio::runtime::Runtime::new().unwrap();
        outer.block_on(async move { drop(plugin_runtime) });
    }
}
