//! `kind = "command"`: run an external program as a step (glue for scripts and other tools).
//!
//! The program runs in the workflow's folder with these environment variables:
//! `DUS_OUT` (the folder to write outputs into), `DUS_STEP`, `DUS_SEED`, `DUS_DTYPE`, and per input slot
//! `DUS_INPUT_<SLOT>` (the first artifact's path) and `DUS_INPUTS_<SLOT>` (all paths, `:`-separated).
//! Its stdout and stderr go to `command.log` in the artifact.

use anyhow::{bail, Context, Result};
use dusflow_core::step::StepContext;
use dusflow_core::step::{ArtifactKind, Dependencies, InputSlots, Resources, StepKind};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// Run through `sh -c`.
    Shell(String),
    /// Program followed by arguments, run directly.
    Argv(Vec<String>),
}

/// Parameters of a `command` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// What to run.
    pub run: CommandLine,
    /// Files or folders the program reads (scripts, configs): hashed into the cache key and watched.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: indexmap::IndexMap<String, String>,
    /// What the program writes into `DUS_OUT`.
    #[serde(default = "CommandConfig::default_output")]
    pub output: ArtifactKind,
    /// Whether the program needs the compute device to itself.
    #[serde(default)]
    pub exclusive_device: bool,
    /// Seed offset: `DUS_SEED` becomes the workflow seed combined with it (without it, the workflow seed
    /// itself), so `sweep = { seed = [1, 2, 3] }` hands each point its own seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl CommandConfig {
    fn default_output() -> ArtifactKind {
        ArtifactKind::Files
    }
}

/// The `command` step kind.
pub struct CommandStep;

/// `DUS_SEED`: the workflow seed, or with a step `seed` both combined as every built-in kind combines them.
fn command_seed(workflow: u64, step: Option<u64>) -> u64 {
    match step {
        Some(s) => crate::data::derive_seed(workflow, &format!("command/{s}")),
        None => workflow,
    }
}

/// How many trailing log lines an error message shows.
const LOG_TAIL_LINES: usize = 20;

impl StepKind for CommandStep {
    type Config = CommandConfig;

    fn name(&self) -> &'static str {
        "command"
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Any
    }

    fn output(&self, config: &CommandConfig) -> ArtifactKind {
        config.output
    }

    fn check(
        &self,
        config: &CommandConfig,
        _: &dyn super::CheckContext,
    ) -> Vec<super::ConfigIssue> {
        let empty = match &config.run {
            CommandLine::Shell(s) => s.trim().is_empty(),
            CommandLine::Argv(v) => v.is_empty() || v[0].is_empty(),
        };
        if empty {
            vec![super::ConfigIssue::new("run", "the command is empty")]
        } else {
            Vec::new()
        }
    }

    fn dependencies(&self, config: &CommandConfig) -> Dependencies {
        Dependencies {
            plugins: Vec::new(),
            files: config.files.clone(),
        }
    }

    fn resources(&self, config: &CommandConfig) -> Resources {
        Resources {
            exclusive_device: config.exclusive_device,
        }
    }

    fn run(&self, config: &CommandConfig, ctx: &StepContext) -> Result<()> {
        let mut cmd = match &config.run {
            CommandLine::Shell(s) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(s);
                c
            }
            CommandLine::Argv(argv) => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        let log_path = ctx.out_dir.join("command.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        cmd.current_dir(&ctx.workflow_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("DUS_OUT", &ctx.out_dir)
            .env("DUS_STEP", &ctx.step)
            .env(
                "DUS_SEED",
                command_seed(ctx.settings.seed, config.seed).to_string(),
            )
            .env(
                "DUS_DTYPE",
                format!("{:?}", ctx.settings.dtype).to_lowercase(),
            );
        for (slot, artifacts) in &ctx.inputs {
            let var = slot.to_uppercase().replace('-', "_");
            if let Some(first) = artifacts.first() {
                cmd.env(format!("DUS_INPUT_{var}"), &first.path);
            }
            let all: Vec<String> = artifacts
                .iter()
                .map(|a| a.path.display().to_string())
                .collect();
            cmd.env(format!("DUS_INPUTS_{var}"), all.join(":"));
        }
        cmd.envs(&config.env);

        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", config.run))?;
        ctx.progress.set_message("running");
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if ctx.is_cancelled() {
                let _ = child.kill();
                let _ = child.wait();
                return ctx.check_cancelled();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            let tail = log_tail(&log_path);
            bail!(
                "command {:?} failed ({status}); last lines of {}:\n{tail}",
                config.run,
                log_path.display()
            );
        }
        Ok(())
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
