//! The `dus` command line: parses arguments and calls the library. No workflow logic lives here.

use crate::engine::{self, summary, Progress, RunOptions};
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
    },
    /// Run, then rerun the affected steps whenever a file the workflow reads changes.
    Watch {
        /// The workflow TOML file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// List the step kinds this build knows.
    Kinds,
    /// Write, build and check WebAssembly plugins.
    Plugin {
        /// What to do with plugins.
        #[command(subcommand)]
        command: crate::plugins::cli::PluginCommand,
    },
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
            progress,
            ..RunOptions::default()
        }
    }
}

/// Entry point of the `dus` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::stderr();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DUS_LOG").unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(progress.log_writer())
        .init();
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

async fn dispatch(
    command: Command,
    registry: &Registry,
    progress: Progress,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { file, common } => {
            let shutdown = ctrl_c_token();
            let summary =
                engine::run(&file, registry, common.options(progress), shutdown.clone()).await?;
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
        Command::Graph { file, format } => {
            let workflow = engine::load(&file, registry, &RunOptions::default())?;
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
        Command::Kinds => {
            for name in registry.names() {
                println!("{name}");
            }
            Ok(ExitCode::SUCCESS)
        }
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
