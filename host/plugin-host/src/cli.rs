//! `dus plugin new | build | check`: scaffold, build and try out plugins.

use super::build;
use super::scaffold::{self, Lang};
use super::types::{DType, ModelDescription, PluginKind, TensorInfo, TensorStats, Verdict};
use super::PluginHost;
use anyhow::{Context, Result};
use dusflow_core::spec::{PluginGrants, PluginLimits};
use std::io::Write;
use std::path::PathBuf;

/// The `dus plugin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Create a plugin folder with a working example of KIND in the chosen language.
    New {
        /// layer-policy, data-filter or merge-rule.
        kind: PluginKind,
        /// Plugin name; also the folder name.
        name: String,
        /// Language of the plugin.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
        /// Folder to create the plugin in (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build a plugin source folder into a component (cached by content hash).
    Build {
        /// The plugin folder.
        path: PathBuf,
        /// Keep running and rebuild whenever the sources change.
        #[arg(long)]
        watch: bool,
        /// Also copy the component to this file.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Load a plugin (component or source folder), print its info and exports, and run it on a sample.
    Check {
        /// A `.wasm` component or a plugin folder.
        file: PathBuf,
        /// Params passed to the plugin, as JSON.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Data filters: a JSONL file of sample records (default: a few built-in records).
        #[arg(long)]
        sample: Option<PathBuf>,
        /// Directories the plugin may read (like `grants.read` in a workflow).
        #[arg(long = "grant-read")]
        grant_read: Vec<PathBuf>,
        /// Per-call time limit in milliseconds.
        #[arg(long, default_value_t = PluginLimits::default().timeout_ms)]
        timeout_ms: u64,
    },
}

/// Runs a `dus plugin` subcommand, printing to stdout.
pub fn run(cmd: PluginCommand) -> Result<()> {
    run_to(cmd, &mut std::io::stdout().lock())
}

/// Runs a `dus plugin` subcommand, printing to `out`.
pub fn run_to(cmd: PluginCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        PluginCommand::New {
            kind,
            name,
            lang,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold::create(&dir, kind, &name, lang)?;
            writeln!(
                out,
                "created {kind} plugin '{name}' ({lang:?}) in {}",
                dir.display()
            )?;
            writeln!(out, "next: dus plugin check {}", dir.display())?;
        }
        PluginCommand::Build {
            path,
            watch,
            output,
        } => {
            let cache = build::default_cache_dir();
            if watch {
                build::watch(&path, &cache, |result| {
                    match result {
                        Ok(wasm) => {
                            let _ = writeln!(out, "built {}", wasm.display());
                            if let Some(o) = &output {
                                if let Err(e) = std::fs::copy(&wasm, o) {
                                    let _ = writeln!(out, "cannot copy to {}: {e}", o.display());
                                }
                            }
                        }
                        Err(e) => {
                            let _ = writeln!(out, "build failed: {e:#}");
                        }
                    }
                    let _ = out.flush();
                    std::ops::ControlFlow::Continue(())
                })?;
            } else {
                let wasm = build::ensure_built_in(&path, &cache)?;
                if let Some(o) = &output {
                    std::fs::copy(&wasm, o)
                        .with_context(|| format!("cannot write {}", o.display()))?;
                }
                writeln!(out, "{}", output.as_ref().unwrap_or(&wasm).display())?;
            }
        }
        PluginCommand::Check {
            file,
            params,
            sample,
            grant_read,
            timeout_ms,
        } => {
            check(&file, &params, sample, grant_read, timeout_ms, out)?;
        }
    }
    Ok(())
}

fn check(
    file: &std::path::Path,
    params: &str,
    sample: Option<PathBuf>,
    grant_read: Vec<PathBuf>,
    timeout_ms: u64,
    out: &mut dyn Write,
) -> Result<()> {
    let host = PluginHost::new()?;
    let grants = PluginGrants {
        read: grant_read,
        ..Default::default()
    };
    let limits = PluginLimits {
        timeout_ms,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    if build::cached_build_in(file, host.cache_dir())?.is_none() {
        writeln!(
            out,
            "building {} from source: running {} (outside the sandbox)",
            file.display(),
            build::describe_recipe(file)
        )?;
    }
    let plugin = host.load_or_build(file, &grants, &limits)?;
    let info = plugin.info();
    writeln!(out, "plugin:      {} {}", info.name, info.version)?;
    writeln!(out, "description: {}", info.description)?;
    writeln!(
        out,
        "kind:        {} (dus:plugin@{})",
        plugin.kind(),
        plugin.wit_version()
    )?;
    writeln!(
        out,
        "component:   {} (loaded in {:.0?})",
        plugin.wasm_path().display(),
        started.elapsed()
    )?;
    writeln!(out, "exports:")?;
    for export in plugin.exports() {
        writeln!(
            out,
            "  {export}: {}",
            plugin.functions_of(export).join(", ")
        )?;
    }
    writeln!(out, "sample run (params {params}):")?;
    match plugin.kind() {
        PluginKind::LayerPolicy => {
            let model = ModelDescription::from_config_json("sample-llama-7b", SAMPLE_LLAMA_CONFIG)?;
            let plan = plugin.layer_policy()?.plan(&[model], params)?;
            let layers: Vec<String> = plan
                .layers
                .iter()
                .map(|l| {
                    let t = if l.transforms.is_empty() { "" } else { "*" };
                    format!("{}:{}{t}", l.model, l.layer)
                })
                .collect();
            writeln!(
                out,
                "  32-layer model -> {} layers: {}",
                plan.layers.len(),
                layers.join(" ")
            )?;
            writeln!(out, "  (model:layer, * = transformed)")?;
        }
        PluginKind::DataFilter => {
            let records: Vec<String> = match sample {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(String::from)
                    .collect(),
                None => SAMPLE_RECORDS.iter().map(|s| s.to_string()).collect(),
            };
            let verdicts = plugin.data_filter(params)?.filter_batch(&records)?;
            for (record, verdict) in records.iter().zip(&verdicts) {
                let v = match verdict {
                    Verdict::Keep => "keep   ".to_string(),
                    Verdict::Drop => "drop   ".to_string(),
                    Verdict::Rewrite(json) => format!("rewrite -> {json}\n          "),
                };
                writeln!(out, "  {v} {record}")?;
            }
        }
        PluginKind::MergeRule => {
            let mut rule = plugin.merge_rule(params)?;
            for (name, shape) in SAMPLE_TENSORS {
                let numel: u64 = shape.iter().product();
                let inputs: Vec<Vec<u8>> = (0..2)
                    .map(|m| {
                        (0..numel)
                            .flat_map(|i| (((i * 7 + m * 3) % 11) as f32 - 5.0).to_le_bytes())
                            .collect()
                    })
                    .collect();
                let tensor = TensorInfo {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                    dtype: DType::F32,
                    layer: TensorInfo::layer_of(name),
                    num_layers: 32,
                    stats: inputs
                        .iter()
                        .map(|x| TensorStats::compute(DType::F32, x))
                        .collect(),
                };
                let plan = rule.plan_tensor(&tensor)?;
                write!(out, "  {name} {shape:?}: {plan:?}")?;
                if plan == super::MergePlan::Custom {
                    let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                    let mut merged = vec![0u8; inputs[0].len()];
                    rule.merge_custom(&tensor, &views, &mut merged)?;
                    let first: Vec<f32> = DType::F32.decode(&merged).into_iter().take(4).collect();
                    write!(out, " -> first elements {first:?}")?;
                }
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

const SAMPLE_LLAMA_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
"intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
"vocab_size": 32000, "model_type": "llama"}"#;

const SAMPLE_RECORDS: &[&str] = &[
    r#"{"text": "The quick brown fox jumps over the lazy dog.", "source": "sample"}"#,
    r#"{"text": "ok", "source": "sample"}"#,
    r#"{"text": "  Padded text with surrounding whitespace.  ", "source": "sample"}"#,
    r#"{"instruction": "Add 2 and 3.", "output": "5"}"#,
];

const SAMPLE_TENSORS: &[(&str, &[u64])] = &[
    ("model.embed_tokens.weight", &[8, 16]),
    ("model.layers.0.self_attn.q_proj.weight", &[16, 16]),
    ("model.layers.0.input_layernorm.weight", &[16]),
];
