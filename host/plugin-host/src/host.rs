//! [`PluginHost`]: the one wasmtime engine of the process, and [`Plugin`]: a loaded, precompiled
//! plugin ready to start jobs.

use super::bindings::{v0_1_0, SUPPORTED_VERSIONS};
use super::build;
use super::runtime::PluginRuntime;
use super::sandbox::{plugin_error, CallCancelled, Failure, Sandbox, StoreState, EPOCH_TICK};
use super::types::{PluginInfo, PluginKind};
use anyhow::{bail, Context, Result};
use dusflow_core::spec::{PluginGrants, PluginLimits, PluginSpec};
use dusflow_core::step::Cancelled;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use wasmtime::component::{
    Component, ComponentExportIndex, Instance, InstancePre, Linker, Resource,
};
use wasmtime::{Cache, CacheConfig, Config, Engine, Store};
use wasmtime_wasi::filesystem::Descriptor;
use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;

/// The plugin runtime of a process: one engine with epoch interruption and wasmtime's
/// compilation cache, a ticker thread that advances the epoch, and an in-memory table of
/// precompiled plugins keyed by content hash. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
    runtime: Arc<PluginRuntime>,
    linker: Linker<StoreState>,
    cache_dir: PathBuf,
    compiled: Mutex<HashMap<blake3::Hash, Arc<Compiled>>>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// A component compiled for this engine, its kind and its instance-pre.
struct Compiled {
    component: Component,
    pre: InstancePre<StoreState>,
    kind: PluginKind,
    version: String,
    exports: Vec<String>,
}

impl PluginHost {
    /// A host caching built and precompiled plugins under [`build::default_cache_dir`].
    pub fn new() -> Result<PluginHost> {
        PluginHost::with_cache_dir(build::default_cache_dir())
    }

    /// A host caching built and precompiled plugins under `cache_dir`.
    pub fn with_cache_dir(cache_dir: impl Into<PathBuf>) -> Result<PluginHost> {
        let cache_dir = cache_dir.into();
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("cannot create the plugin cache {}", cache_dir.display()))?;
        let mut config = Config::new();
        config.epoch_interruption(true);
        let mut cache = CacheConfig::new();
        cache.with_directory(cache_dir.join("wasmtime"));
        config.cache(Some(Cache::new(cache)?));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        refuse_links(&mut linker)?;
        let runtime = PluginRuntime::new().context("starting the plugin runtime")?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("dusflow-plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        let inner = HostInner {
            engine,
            runtime,
            linker,
            cache_dir,
            compiled: Mutex::default(),
            stop_ticker,
        };
        Ok(PluginHost {
            inner: Arc::new(inner),
        })
    }

    /// Where built components and precompiled artifacts are cached.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// Loads a plugin: a `.wasm` component, or a source folder that has already been built (by
    /// `dus plugin build` or an earlier allowed build; found in the build cache by content hash).
    /// Building runs the folder's build command outside the sandbox, so this never builds: a source
    /// folder with no cached build is an error saying how to build it. Instantiates the plugin once,
    /// under `limits`, to read its `info`.
    pub fn load(
        &self,
        path: &Path,
        grants: &PluginGrants,
        limits: &PluginLimits,
    ) -> Result<Plugin> {
        let wasm = match build::cached_build_in(path, &self.inner.cache_dir)? {
            Some(wasm) => wasm,
            None => bail!(
                "plugin {} is a source folder with no build of its current sources; building runs {} on \
                 this machine, outside the sandbox, so dusflow builds only when asked: run `dus plugin build \
                 {}`, or set `build = true` in the workflow's [plugins.<name>] table",
                path.display(),
                build::describe_recipe(path),
                path.display()
            ),
        };
        self.load_component(path, &wasm, grants, limits)
    }

    /// Like [`load`](Self::load), but a source folder without a cached build is built first (its
    /// build command runs on this machine, outside the sandbox; the build is logged).
    pub fn load_or_build(
        &self,
        path: &Path,
        grants: &PluginGrants,
        limits: &PluginLimits,
    ) -> Result<Plugin> {
        let wasm = build::ensure_built_in(path, &self.inner.cache_dir)?;
        self.load_component(path, &wasm, grants, limits)
    }

    /// Loads a workflow's `[plugins.NAME]` (path absolute): builds a source folder only when the
    /// table says `build = true`.
    pub fn load_spec(&self, spec: &PluginSpec) -> Result<Plugin> {
        if spec.build {
            self.load_or_build(&spec.path, &spec.grants, &spec.limits)
        } else {
            self.load(&spec.path, &spec.grants, &spec.limits)
        }
    }

    fn load_component(
        &self,
        path: &Path,
        wasm: &Path,
        grants: &PluginGrants,
        limits: &PluginLimits,
    ) -> Result<Plugin> {
        let wasm = wasm.to_path_buf();
        let bytes = std::fs::read(&wasm)
            .with_context(|| format!("cannot read plugin {}", wasm.display()))?;
        let compiled = self
            .compile(&bytes)
            .with_context(|| format!("cannot load plugin {}", path.display()))?;
        let mut plugin = Plugin {
            inner: Arc::new(PluginInner {
                engine: self.inner.engine.clone(),
                runtime: self.inner.runtime.clone(),
                compiled,
                info: PluginInfo {
                    name: plugin_label(path),
                    version: String::new(),
                    description: String::new(),
                },
                grants: grants.clone(),
                limits: limits.clone(),
                wasm,
                cancel: None,
            }),
        };
        let info = plugin.read_info()?;
        Arc::get_mut(&mut plugin.inner)
            .expect("a plugin being loaded is not shared yet")
            .info = info;
        Ok(plugin)
    }

    fn compile(&self, bytes: &[u8]) -> Result<Arc<Compiled>> {
        let hash = blake3::hash(bytes);
        if let Some(c) = self.inner.compiled.lock().unwrap().get(&hash) {
            return Ok(c.clone());
        }
        let component = self.precompiled(hash, bytes)?;
        let (kind, version, exports) = classify(&self.inner.engine, &component)?;
        let pre = self.inner.linker.instantiate_pre(&component).map_err(anyhow::Error::from).context(
            "the plugin imports something the host does not provide (only WASI 0.2 is available to plugins)",
        )?;
        let compiled = Arc::new(Compiled {
            component,
            pre,
            kind,
            version,
            exports,
        });
        self.inner
            .compiled
            .lock()
            .unwrap()
            .insert(hash, compiled.clone());
        Ok(compiled)
    }

    /// Deserialises the precompiled artifact of `bytes` for this engine, or compiles and stores it.
    fn precompiled(&self, hash: blake3::Hash, bytes: &[u8]) -> Result<Component> {
        let engine = &self.inner.engine;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let dir = self.inner.cache_dir.join("precompiled");
        let artifact = dir.join(format!(
            "{}-{:016x}.cwasm",
            hash.to_hex(),
            engine_hash.finish()
        ));
        if artifact.exists() {
            // SAFETY: the artifact was written by `Component::serialize` of an engine with the same
            // compatibility hash, into a cache directory this host owns; a damaged or mismatched file
            // is refused by wasmtime's header checks and recompiled below.
            if let Ok(component) = unsafe { Component::deserialize_file(engine, &artifact) } {
                return Ok(component);
            }
        }
        let component = Component::from_binary(engine, bytes)
            .map_err(anyhow::Error::from)
            .context("not a valid WebAssembly component")?;
        std::fs::create_dir_all(&dir)?;
        // A temp file of its own: threads and processes may compile the same component at once.
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        std::io::Write::write_all(&mut tmp, &component.serialize()?)?;
        tmp.persist(&artifact).map_err(|e| e.error)?;
        Ok(component)
    }
}

/// Replaces WASI's `symlink-at` and `link-at` with functions that refuse: a link made under a write
/// grant could point outside it (a symlink) or give a read-only file a writable name (a hard link),
/// and the host or a later step would follow it.
fn refuse_links(linker: &mut Linker<StoreState>) -> Result<()> {
    // The interface version wasmtime-wasi 48 registers; guests built against older 0.2.x
    // versions resolve to it (the linker matches semver-compatible imports).
    const FILESYSTEM: &str = "wasi:filesystem/types@0.2.12";
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM)?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |_store, (_dir, _target, _link): (Resource<Descriptor>, String, String)| {
            Box::new(async { Ok((Err::<(), _>(ErrorCode::NotPermitted),)) })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.link-at",
        |_store,
         (_dir, _flags, _old, _new_dir, _new): (
            Resource<Descriptor>,
            wasmtime_wasi::p2::bindings::filesystem::types::PathFlags,
            String,
            Resource<Descriptor>,
            String,
        )| { Box::new(async { Ok((Err::<(), _>(ErrorCode::NotPermitted),)) }) },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn plugin_label(path: &Path) -> String {
    let stem = path.file_stem().unwrap_or(path.as_os_str());
    stem.to_string_lossy().into_owned()
}

/// Finds the plugin kind and WIT version from the component's exported interfaces.
fn classify(engine: &Engine, component: &Component) -> Result<(PluginKind, String, Vec<String>)> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    classify_exports(exports)
}

/// [`classify`] on the export names alone.
fn classify_exports(exports: Vec<String>) -> Result<(PluginKind, String, Vec<String>)> {
    let mut kinds = Vec::new();
    let mut has_info = false;
    for name in &exports {
        let Some(rest) = name.strip_prefix("dus:plugin/") else {
            continue;
        };
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        if !SUPPORTED_VERSIONS.contains(&version) {
            bail!(
                "the plugin exports {name}, but this host supports dus:plugin versions {}; rebuild the plugin \
                 against one of them (sdk/wit/)",
                SUPPORTED_VERSIONS.join(", ")
            );
        }
        match interface {
            "info" => has_info = true,
            other => match PluginKind::from_interface(other) {
                Some(kind) => kinds.push((kind, version.to_string())),
                None => bail!("the plugin exports unknown interface {name}"),
            },
        }
    }
    match (has_info, kinds.as_slice()) {
        (true, [(kind, version)]) => Ok((*kind, version.clone(), exports)),
        (false, _) => bail!(
            "the component exports no dus:plugin/info interface (exports: {}); is it a dusflow plugin built for one \
             of the worlds layer-policy-plugin, data-filter-plugin, merge-rule-plugin?",
            exports.join(", ")
        ),
        (true, []) => bail!("the component exports dus:plugin/info but no plugin kind interface"),
        (true, _) => bail!("the component exports several plugin kinds; a plugin implements exactly one world"),
    }
}

/// A loaded plugin: precompiled, with its grants and limits. Cheap to clone; each typed handle
/// (`layer_policy`, `data_filter`, `merge_rule`) starts a job in a fresh store.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

#[derive(Clone)]
pub(crate) struct PluginInner {
    engine: Engine,
    runtime: Arc<PluginRuntime>,
    compiled: Arc<Compiled>,
    info: PluginInfo,
    pub(crate) grants: PluginGrants,
    pub(crate) limits: PluginLimits,
    wasm: PathBuf,
    cancel: Option<CancellationToken>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.info.name)
            .field("kind", &self.kind())
            .field("wasm", &self.inner.wasm)
            .finish()
    }
}

impl Plugin {
    /// The plugin's kind, from its exported interface.
    pub fn kind(&self) -> PluginKind {
        self.inner.compiled.kind
    }

    /// The `dus:plugin` WIT version the plugin was built against.
    pub fn wit_version(&self) -> &str {
        &self.inner.compiled.version
    }

    /// Name, version and description the plugin reports.
    pub fn info(&self) -> &PluginInfo {
        &self.inner.info
    }

    /// Names of the component's exports (e.g. `dus:plugin/data-filter@0.1.0`).
    pub fn exports(&self) -> &[String] {
        &self.inner.compiled.exports
    }

    /// The function names of one exported interface.
    pub fn functions_of(&self, interface: &str) -> Vec<String> {
        let engine = &self.inner.engine;
        let ty = self.inner.compiled.component.component_type();
        let Some((_, item)) = ty.exports(engine).find(|(name, _)| *name == interface) else {
            return Vec::new();
        };
        match item.ty {
            wasmtime::component::types::ComponentItem::ComponentInstance(i) => i
                .exports(engine)
                .map(|(name, _)| name.to_string())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The `.wasm` component this plugin was loaded from (in the build cache for source folders).
    pub fn wasm_path(&self) -> &Path {
        &self.inner.wasm
    }

    /// The resource limits applied to each call.
    pub fn limits(&self) -> &PluginLimits {
        &self.inner.limits
    }

    /// This plugin with its calls stopped when `token` is cancelled: a call in progress (running
    /// guest code or waiting in WASI) ends within a tick with an error that is a
    /// [`Cancelled`](dusflow_core::step::Cancelled), and jobs started later refuse to run.
    pub fn cancelled_by(&self, token: CancellationToken) -> Plugin {
        let mut inner = (*self.inner).clone();
        inner.cancel = Some(token);
        Plugin {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn expect_kind(&self, kind: PluginKind) -> Result<()> {
        if self.kind() != kind {
            bail!(
                "plugin '{}' is a {} plugin, but the step needs a {kind} plugin",
                self.inner.info.name,
                self.kind()
            );
        }
        Ok(())
    }

    pub(crate) fn export_index(
        &self,
        interface: &str,
        function: &str,
    ) -> Result<ComponentExportIndex> {
        let component = &self.inner.compiled.component;
        let iface = format!("dus:plugin/{interface}@{}", self.wit_version());
        let parent = component
            .get_export_index(None, &iface)
            .with_context(|| format!("no export {iface}"))?;
        component
            .get_export_index(Some(&parent), function)
            .with_context(|| format!("no function {iface}#{function}"))
    }

    fn read_info(&self) -> Result<PluginInfo> {
        let mut job = Job::start(self)?;
        let info = match self.wit_version() {
            "0.1.0" => {
                let index = self.export_index("info", "describe")?;
                job.call("info.describe", async |store, instance| {
                    let f = instance.get_typed_func::<(), (
                        v0_1_0::data_filter::exports::dus::plugin::info::PluginInfo,
                    )>(&mut *store, &index)?;
                    Ok(Ok(f.call_async(store, ()).await?.0))
                })?
            }
            other => unreachable!("classify accepted unsupported version {other}"),
        };
        // Errors name the plugin: fall back to its file or folder name if it reports none.
        let name = if info.name.trim().is_empty() {
            self.inner.info.name.clone()
        } else {
            info.name
        };
        Ok(PluginInfo {
            name,
            version: info.version,
            description: info.description,
        })
    }
}

/// One job of a plugin: a fresh sandboxed store and instance. After a trap, time-out or
/// cancellation the instance refuses further calls; start a new job.
pub(crate) struct Job {
    pub(crate) sandbox: Sandbox,
    pub(crate) instance: Instance,
    runtime: Arc<PluginRuntime>,
    name: String,
    limits: PluginLimits,
    broken: Option<String>,
}

/// How a bounded call into the guest ended.
enum Ended<T> {
    Returned(wasmtime::Result<T>),
    TimedOut,
    Cancelled,
}

/// Runs `call` (a future driving the guest) until it finishes, `deadline` passes or `cancel` fires,
/// whichever is first; dropping the unfinished future abandons what the guest was waiting for.
fn bounded<T>(
    runtime: &PluginRuntime,
    deadline: std::time::Instant,
    cancel: Option<CancellationToken>,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> Ended<T> {
    runtime.block_on(async {
        let cancelled = async {
            match &cancel {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = call => Ended::Returned(result),
            _ = tokio::time::sleep_until(deadline.into()) => Ended::TimedOut,
            _ = cancelled => Ended::Cancelled,
        }
    })
}

fn is_cancellation(e: &wasmtime::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<CallCancelled>().is_some())
}

impl Job {
    /// Creates the store and instantiates the plugin in it (under the call deadline: a start
    /// function runs guest code).
    pub(crate) fn start(plugin: &Plugin) -> Result<Job> {
        let p = &plugin.inner;
        if p.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(Cancelled.into());
        }
        let mut sandbox = Sandbox::new(&p.engine, &p.grants, &p.limits, p.cancel.clone())
            .with_context(|| format!("cannot set up the sandbox of plugin '{}'", p.info.name))?;
        let deadline = sandbox.arm_deadline();
        let ended = bounded(
            &p.runtime,
            deadline,
            p.cancel.clone(),
            p.compiled.pre.instantiate_async(&mut sandbox.store),
        );
        let failure = match ended {
            Ended::Returned(Ok(instance)) => {
                return Ok(Job {
                    sandbox,
                    instance,
                    runtime: p.runtime.clone(),
                    name: p.info.name.clone(),
                    limits: p.limits.clone(),
                    broken: None,
                })
            }
            Ended::Cancelled => return Err(Cancelled.into()),
            Ended::Returned(Err(e)) if is_cancellation(&e) => return Err(Cancelled.into()),
            Ended::Returned(Err(e)) => Failure::Trapped(e.into()),
            Ended::TimedOut => Failure::TimedOut,
        };
        Err(plugin_error(
            &p.info.name,
            "instantiation",
            failure,
            &p.limits,
            &sandbox.output_tail(),
        ))
    }

    /// Calls into the plugin under the deadline and the cancellation token; `f` drives the call and
    /// returns the plugin's own `result`.
    pub(crate) fn call<R>(
        &mut self,
        function: &str,
        f: impl AsyncFnOnce(&mut Store<StoreState>, &Instance) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R> {
        if let Some(why) = &self.broken {
            bail!(
                "plugin '{}' cannot run {function}: its instance stopped after an earlier failure ({why}); start a new job",
                self.name
            );
        }
        let cancel = self.sandbox.cancel_token();
        if cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            self.broken = Some("cancelled".into());
            return Err(Cancelled.into());
        }
        let deadline = self.sandbox.arm_deadline();
        let ended = bounded(
            &self.runtime,
            deadline,
            cancel,
            f(&mut self.sandbox.store, &self.instance),
        );
        let failure = match ended {
            Ended::Returned(Ok(Ok(r))) => return Ok(r),
            Ended::Returned(Ok(Err(msg))) => Failure::Returned(msg),
            Ended::Cancelled => {
                self.broken = Some("cancelled".into());
                return Err(Cancelled.into());
            }
            Ended::Returned(Err(trap)) if is_cancellation(&trap) => {
                self.broken = Some("cancelled".into());
                return Err(Cancelled.into());
            }
            Ended::Returned(Err(trap)) => {
                self.broken = Some(format!("failed in {function}"));
                Failure::Trapped(trap.into())
            }
            Ended::TimedOut => {
                self.broken = Some(format!("timed out in {function}"));
                Failure::TimedOut
            }
        };
        Err(plugin_error(
            &self.name,
            function,
            failure,
            &self.limits,
            &self.sandbox.output_tail(),
        ))
    }

    /// The plugin's name (as it reports it).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The limits of this job's calls.
    pub(crate) fn limits(&self) -> &PluginLimits {
        &self.limits
    }

    /// The error for an answer the host cannot accept.
    pub(crate) fn malformed(&self, function: &str, message: String) -> anyhow::Error {
        plugin_error(
            &self.name,
            function,
            Failure::Malformed(message),
            &self.limits,
            &self.sandbox.output_tail(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync + Clone>() {}
    fn movable<T: Send>() {}

    fn classified(names: &[&str]) -> Result<(PluginKind, String)> {
        classify_exports(names.iter().map(|n| n.to_string()).collect()).map(|(k, v, _)| (k, v))
    }

    #[test]
    fn plugins_are_classified_by_their_exported_interfaces() {
        let ok = classified(&["dus:plugin/info@0.1.0", "dus:plugin/merge-rule@0.1.0"]).unwrap();
        assert_eq!(ok, (PluginKind::MergeRule, "0.1.0".to_string()));
        let err = |names: &[&str]| classified(names).unwrap_err().to_string();
        assert!(
            err(&["dus:plugin/info@0.9.0", "dus:plugin/data-filter@0.9.0"])
                .contains("supports dus:plugin versions 0.1.0")
        );
        assert!(err(&["dus:plugin/data-filter@0.1.0"]).contains("no dus:plugin/info"));
        assert!(err(&["dus:plugin/info@0.1.0"]).contains("no plugin kind"));
        assert!(err(&[
            "dus:plugin/info@0.1.0",
            "dus:plugin/data-filter@0.1.0",
            "dus:plugin/merge-rule@0.1.0"
        ])
        .contains("several plugin kinds"));
        assert!(
            err(&["dus:plugin/info@0.1.0", "dus:plugin/tokenizer@0.1.0"])
                .contains("unknown interface")
        );
    }

    #[test]
    fn the_host_and_plugins_are_shareable_across_threads_and_jobs_movable() {
        shareable::<PluginHost>();
        shareable::<Plugin>();
        movable::<super::super::DataFilterPlugin>();
        movable::<super::super::MergeRulePlugin>();
        shareable::<super::super::LayerPolicyPlugin>();
    }
}
