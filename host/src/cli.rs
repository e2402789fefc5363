//! The `dus` command line: parses arguments and calls the library. No workflow logic lives here.

use crate::engine::{self, summary, Progress, RunOptions};
use crate::one_step;
use crate::steps::Registry;
use crate::workflow::{render, WorkflowError};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// dusflow: depth up-scaling (SOLAR) workflows as a reproducible DAG.
#[derive(Parser, Debug)]
#[command(name = "dus", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Run a workflow: every step whose artifact is not already complete.
    Run {
        /// The workflow TOML file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Validate a workflow and show what would run and what is cached.
    Plan {
        /// The workflow TOML file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print the workflow's DAG as Graphviz DOT or Mermaid.
    Graph {
        /// The workflow TOML file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Apply the workflow's `[variants.NAME]` over its tables.
        #[arg(long, value_name = "NAME")]
        variant: Option<String>,
    },
    /// Run, then rerun the affected steps whenever a file the workflow reads changes.
    Watch {
        /// The workflow TOML file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Depth up-scale a model folder in one line (a one-step workflow underneath: same checks, cache and
    /// artifact as a `scale` step). OUT becomes the scaled Hugging Face folder.
    Scale {
        /// The model folder (config.json, safetensors, tokenizer files).
        model: PathBuf,
        /// Where the scaled model goes.
        out: PathBuf,
        /// Built-in layer policy: solar, repeat, interleave or llama-pro.
        #[arg(long, default_value = "solar")]
        policy: String,
        /// solar: layers removed from each copy (n = 32, m = 8 → 48 layers).
        #[arg(long)]
        m: Option<usize>,
        /// solar: the target layer count instead of m.
        #[arg(long)]
        s: Option<usize>,
        /// repeat: how many times the stack is repeated.
        #[arg(long)]
        times: Option<usize>,
        /// interleave / llama-pro: a copy after every this many layers.
        #[arg(long)]
        every: Option<usize>,
        /// Output dtype: f32, bf16 or f16 (default: as stored).
        #[arg(long)]
        dtype: Option<String>,
        /// Largest shard ("5GB", "500MB", or "none" for one file).
        #[arg(long)]
        shard_size: Option<String>,
        #[command(flatten)]
        run: OneStepRun,
    },
    /// Merge models with a mergekit YAML config in one line (a one-step workflow underneath: same checks,
    /// cache and artifact as a `merge` step with `config`). OUT becomes the merged Hugging Face folder.
    Merge {
        /// The mergekit config (its model paths are relative to it).
        config: PathBuf,
        /// Where the merged model goes.
        out: PathBuf,
        #[command(flatten)]
        run: OneStepRun,
    },
    /// Evaluate a model folder on built-in tasks in one line (a one-step workflow underneath: same scoring,
    /// cache and artifact as an `eval` step); prints the results table.
    Eval {
        /// The model folder.
        model: PathBuf,
        /// Comma-separated tasks: arc_challenge (arc), hellaswag, mmlu, truthfulqa_mc2 (truthfulqa),
        /// winogrande, gsm8k; or h6 for all six.
        #[arg(long, default_value = "h6")]
        tasks: String,
        /// Documents per task (per subject for MMLU).
        #[arg(long)]
        limit: Option<usize>,
        /// leaderboard-v1 (the paper's numbers) or harness (lm-eval 0.4 from pip).
        #[arg(long)]
        mode: Option<String>,
        /// Folder with the task data: <task>/ (split files) or <task>.jsonl.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Few-shot examples for every task (default: the leaderboard's per task).
        #[arg(long)]
        num_fewshot: Option<usize>,
        /// Sequences per forward pass.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Artifact folder.
        #[arg(short, long, default_value = "runs/dus-eval")]
        output: PathBuf,
        #[command(flatten)]
        run: OneStepRun,
    },
    /// List the step kinds this build knows.
    Kinds,
    /// Write, build and check WebAssembly plugins.
    Plugin {
        /// What to do with plugins.
        #[command(subcommand)]
        command: crate::plugins::cli::PluginCommand,
    },
    /// One rank of a training step on several devices (started by `dus run`; the job on standard input).
    #[command(name = "__worker", hide = true)]
    Worker,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Rerun this step even if cached (a swept step's base name forces all its points). Repeatable.
    #[arg(long, value_name = "STEP")]
    force: Vec<String>,
    /// How many steps may run at once.
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Artifact directory (overrides `[workflow] output`).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Apply the workflow's `[variants.NAME]` (e.g. `single-gpu`) over its tables.
    #[arg(long, value_name = "NAME")]
    variant: Option<String>,
}

#[derive(clap::Args, Debug)]
struct OneStepRun {
    /// Rerun even if cached.
    #[arg(long)]
    force: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum GraphFormat {
    Dot,
    Mermaid,
}

impl Common {
    fn options(self, progress: Progress) -> RunOptions {
        RunOptions {
            force: self.force.into_iter().collect::<HashSet<_>>(),
            jobs: self.jobs,
            output: self.output,
            variant: self.variant,
            progress,
            ..RunOptions::default()
        }
    }
}

/// Entry point of the `dus` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Worker) {
        init_logging(cli.verbose, None);
        return crate::distributed::worker_main();
    }
    let progress = Progress::stderr();
    init_logging(cli.verbose, Some(&progress));
    let registry = crate::steps::builtin_registry();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(dispatch(cli.command, &registry, progress));
    match result {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<WorkflowError>().is_some() {
                eprint!("{e}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(verbose: u8, progress: Option<&Progress>) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DUS_LOG").unwrap_or_else(|_| level.into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match progress {
        Some(p) => fmt.with_writer(p.log_writer()).init(),
        // A worker's standard error is read by its launcher, which logs each line again: no colour codes.
        None => fmt.with_writer(std::io::stderr).with_ansi(false).init(),
    }
}

async fn dispatch(
    command: Command,
    registry: &Registry,
    progress: Progress,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { file, common } => {
            let mut options = common.options(progress);
            // Started by torchrun or Slurm: rank 0 runs the workflow, the others serve its training steps.
            let launch =
                crate::distributed::LaunchEnv::from_process_env()?.filter(|e| e.world_size > 1);
            let cluster = match &launch {
                Some(env) if env.rank > 0 => {
                    let env = env.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::distributed::follow(&env, &Default::default())
                    })
                    .await??;
                    return Ok(ExitCode::SUCCESS);
                }
                Some(env) => {
                    let cluster = crate::distributed::Cluster::start(
                        env.clone(),
                        crate::distributed::collective_timeout(),
                    )?;
                    options.services.insert(cluster.clone());
                    Some(cluster)
                }
                None => None,
            };
            let shutdown = ctrl_c_token();
            let summary = engine::run(&file, registry, options, shutdown.clone()).await;
            if let Some(cluster) = cluster {
                cluster.shutdown();
            }
            let summary = summary?;
            eprint!("{}", summary::render_summary(&summary));
            print!("{}", summary::render_headlines(&summary));
            Ok(if shutdown.is_cancelled() {
                ExitCode::from(130)
            } else if summary.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Plan { file, common } => {
            let options = common.options(progress);
            let workflow = engine::load(&file, registry, &options)?;
            let plan = engine::plan_workflow(workflow, &options)?;
            print!("{}", summary::render_plan(&plan));
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            file,
            format,
            variant,
        } => {
            let options = RunOptions {
                variant,
                ..RunOptions::default()
            };
            let workflow = engine::load(&file, registry, &options)?;
            match format {
                GraphFormat::Dot => print!("{}", render::dot(&workflow)),
                GraphFormat::Mermaid => print!("{}", render::mermaid(&workflow)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { file, common } => {
            let shutdown = ctrl_c_token();
            engine::watch::watch(&file, registry, common.options(progress), shutdown).await?;
            Ok(ExitCode::from(130))
        }
        Command::Plugin { command } => {
            crate::plugins::cli::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale {
            model,
            out,
            policy,
            m,
            s,
            times,
            every,
            dtype,
            shard_size,
            run,
        } => {
            let mut params = toml::Table::new();
            params.insert("policy".into(), policy.into());
            for (key, value) in [("m", m), ("s", s), ("times", times), ("every", every)] {
                if let Some(v) = value {
                    params.insert(key.into(), (v as i64).into());
                }
            }
            for (key, value) in [("dtype", dtype), ("shard_size", shard_size)] {
                if let Some(v) = value {
                    params.insert(key.into(), v.into());
                }
            }
            let req = one_step::ScaleRequest { model, out, params };
            let shutdown = ctrl_c_token();
            let done = one_step::scale(
                &req,
                registry,
                one_step_options(run, "scale", progress),
                shutdown.clone(),
            )
            .await?;
            eprint!("{}", summary::render_summary(&done.summary));
            if done.artifact.is_some() {
                let plan = done.artifact.as_ref().map(|a| a.join("scale_plan.json"));
                println!(
                    "scaled model in {} (plan: {}; workflow: {})",
                    req.out.display(),
                    plan.map(|p| p.display().to_string()).unwrap_or_default(),
                    done.workflow.display()
                );
            }
            Ok(exit_code(&done.summary, &shutdown))
        }
        Command::Merge { config, out, run } => {
            let req = one_step::MergeRequest { config, out };
            let shutdown = ctrl_c_token();
            let done = one_step::merge(
                &req,
                registry,
                one_step_options(run, "merge", progress),
                shutdown.clone(),
            )
            .await?;
            eprint!("{}", summary::render_summary(&done.summary));
            if done.artifact.is_some() {
                println!(
                    "merged model in {} (workflow: {})",
                    req.out.display(),
                    done.workflow.display()
                );
            }
            Ok(exit_code(&done.summary, &shutdown))
        }
        Command::Eval {
            model,
            tasks,
            limit,
            mode,
            data_dir,
            num_fewshot,
            batch_size,
            output,
            run,
        } => {
            let mut params = toml::Table::new();
            let names = one_step::task_list(&tasks);
            if let Some(k) = num_fewshot {
                let mut shots = toml::Table::new();
                for t in &names {
                    shots.insert(one_step::canonical_task(t), (k as i64).into());
                }
                params.insert("num_fewshot".into(), shots.into());
            }
            params.insert(
                "tasks".into(),
                toml::Value::Array(names.into_iter().map(toml::Value::from).collect()),
            );
            if let Some(n) = limit {
                params.insert("limit".into(), (n as i64).into());
            }
            if let Some(m) = mode {
                params.insert("mode".into(), m.into());
            }
            if let Some(b) = batch_size {
                params.insert("batch_size".into(), (b as i64).into());
            }
            if let Some(d) = data_dir {
                params.insert(
                    "data_dir".into(),
                    std::path::absolute(&d)?.display().to_string().into(),
                );
            }
            let req = one_step::EvalRequest {
                model,
                out: output,
                params,
            };
            let shutdown = ctrl_c_token();
            let done = one_step::eval(
                &req,
                registry,
                one_step_options(run, "eval", progress),
                shutdown.clone(),
            )
            .await?;
            eprint!("{}", summary::render_summary(&done.summary));
            if let Some(dir) = &done.artifact {
                let table = std::fs::read_to_string(dir.join("results.md"))?;
                println!("\n{}\n\n{}", dir.display(), table.trim_end());
            }
            Ok(exit_code(&done.summary, &shutdown))
        }
        Command::Kinds => {
            for name in registry.names() {
                println!("{name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker => unreachable!("handled before the runtime starts"),
    }
}

fn one_step_options(run: OneStepRun, step: &str, progress: Progress) -> RunOptions {
    let mut force = HashSet::new();
    if run.force {
        force.insert(step.to_string());
    }
    RunOptions {
        force,
        progress,
        ..RunOptions::default()
    }
}

fn exit_code(summary: &engine::RunSummary, shutdown: &CancellationToken) -> ExitCode {
    if shutdown.is_cancelled() {
        ExitCode::from(130)
    } else if summary.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A token cancelled by the first Ctrl-C; a second Ctrl-C exits at once.
fn ctrl_c_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: stopping running steps (Ctrl-C again to exit now)");
            t.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    token
}
