//! [`PluginHost`]: the one wasmtime engine of the process, and [`Plugin`]: a loaded, precompiled
//! plugin ready to start jobs.

use super::bindings::{v0_1_0, SUPPORTED_VERSIONS};
use super::build;
use super::sandbox::{plugin_error, Failure, Sandbox, StoreState, EPOCH_TICK};
use super::types::{PluginInfo, PluginKind};
use anyhow::{bail, Context, Result};
use dusflow_core::spec::{PluginGrants, PluginLimits};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::component::{Component, ComponentExportIndex, Instance, InstancePre, Linker};
use wasmtime::{Cache, CacheConfig, Config, Engine, Store};

/// The plugin runtime of a process: one engine with epoch interruption and wasmtime's
/// compilation cache, a ticker thread that advances the epoch, and an in-memory table of
/// precompiled plugins keyed by content hash. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
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
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;

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

    /// Loads a plugin: a `.wasm` component, or a source folder that is built first (cached by
    /// content hash). Instantiates it once, under `limits`, to read its `info`.
    pub fn load(
        &self,
        path: &Path,
        grants: &PluginGrants,
        limits: &PluginLimits,
    ) -> Result<Plugin> {
        let wasm = build::ensure_built_in(path, &self.inner.cache_dir)?;
        let bytes = std::fs::read(&wasm)
            .with_context(|| format!("cannot read plugin {}", wasm.display()))?;
        let compiled = self
            .compile(&bytes)
            .with_context(|| format!("cannot load plugin {}", path.display()))?;
        let mut plugin = Plugin {
            inner: Arc::new(PluginInner {
                engine: self.inner.engine.clone(),
                compiled,
                info: PluginInfo {
                    name: plugin_label(path),
                    version: String::new(),
                    description: String::new(),
                },
                grants: grants.clone(),
                limits: limits.clone(),
                wasm,
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
        let tmp = artifact.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, component.serialize()?)?;
        std::fs::rename(&tmp, &artifact)?;
        Ok(component)
    }
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

pub(crate) struct PluginInner {
    engine: Engine,
    compiled: Arc<Compiled>,
    info: PluginInfo,
    pub(crate) grants: PluginGrants,
    pub(crate) limits: PluginLimits,
    wasm: PathBuf,
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
                job.call("info.describe", |store, instance| {
                    let f = instance.get_typed_func::<(), (
                        v0_1_0::data_filter::exports::dus::plugin::info::PluginInfo,
                    )>(&mut *store, &index)?;
                    Ok(Ok(f.call(store, ())?.0))
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

/// One job of a plugin: a fresh sandboxed store and instance. After a trap or time-out the
/// instance refuses further calls; start a new job.
pub(crate) struct Job {
    pub(crate) sandbox: Sandbox,
    pub(crate) instance: Instance,
    name: String,
    limits: PluginLimits,
    broken: Option<String>,
}

impl Job {
    /// Creates the store and instantiates the plugin in it.
    pub(crate) fn start(plugin: &Plugin) -> Result<Job> {
        let p = &plugin.inner;
        let mut sandbox = Sandbox::new(&p.engine, &p.grants, &p.limits)
            .with_context(|| format!("cannot set up the sandbox of plugin '{}'", p.info.name))?;
        match p.compiled.pre.instantiate(&mut sandbox.store) {
            Ok(instance) => Ok(Job {
                sandbox,
                instance,
                name: p.info.name.clone(),
                limits: p.limits.clone(),
                broken: None,
            }),
            Err(e) => {
                let output = sandbox.output_tail();
                Err(plugin_error(
                    &p.info.name,
                    "instantiation",
                    Failure::Trapped(e.into()),
                    &p.limits,
                    &output,
                ))
            }
        }
    }

    /// Calls into the plugin under the deadline; `f` returns the plugin's own `result`.
    pub(crate) fn call<R>(
        &mut self,
        function: &str,
        f: impl FnOnce(&mut Store<StoreState>, &Instance) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R> {
        if let Some(why) = &self.broken {
            bail!(
                "plugin '{}' cannot run {function}: its instance stopped after an earlier failure ({why}); start a new job",
                self.name
            );
        }
        self.sandbox.arm_deadline();
        let failure = match f(&mut self.sandbox.store, &self.instance) {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(msg)) => Failure::Returned(msg),
            Err(trap) => {
                self.broken = Some(format!("failed in {function}"));
                Failure::Trapped(trap.into())
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
