//! The one-line commands `dus scale MODEL OUT …` and `dus eval MODEL --tasks …`: each writes a one-step
//! workflow file and runs it like `dus run` (same loader, checks, cache, artifacts and errors), so a
//! command line and a workflow step with the same parameters share their artifact.
//!
//! - `dus scale MODEL OUT`: the workflow is `OUT/.dusflow/scale.toml`, its artifact store
//!   `OUT/.dusflow/runs/`; OUT then holds the scaled model's files as hard links to the artifact (a copy
//!   where the file system has no hard links), so OUT is a Hugging Face folder.
//! - `dus merge CONFIG.yml OUT`: a mergekit config; the workflow is `OUT/.dusflow/merge.toml` (its models
//!   are the config's model folders), the artifact store `OUT/.dusflow/runs/`, OUT linked as for scale.
//! - `dus eval MODEL --tasks …`: the workflow is `OUT/.dusflow/eval-<model>.toml` and the artifact
//!   `OUT/eval-<model>-<hash>/` (OUT defaults to `runs/dus-eval`): `results.json`, `results.md`,
//!   `lm_eval_results.json`, `tasks/`.

use crate::engine::{self, RunOptions, RunSummary};
use crate::steps::Registry;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// What `dus scale` was asked for.
#[derive(Debug, Clone, Default)]
pub struct ScaleRequest {
    /// The model folder to scale.
    pub model: PathBuf,
    /// Where the scaled model goes.
    pub out: PathBuf,
    /// The step's parameters (`policy`, `m`, …), as TOML values.
    pub params: toml::Table,
}

/// What `dus eval` was asked for.
#[derive(Debug, Clone, Default)]
pub struct EvalRequest {
    /// The model folder to evaluate.
    pub model: PathBuf,
    /// Artifact folder.
    pub out: PathBuf,
    /// The step's parameters (`tasks`, `limit`, `mode`, `data_dir`, …), as TOML values.
    pub params: toml::Table,
}

/// What `dus merge` was asked for.
#[derive(Debug, Clone, Default)]
pub struct MergeRequest {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// Where the merged model goes.
    pub out: PathBuf,
}

/// The finished one-step run: its summary and the step's artifact folder (when it succeeded).
pub struct OneStepRun {
    /// The run summary (one step).
    pub summary: RunSummary,
    /// The step's artifact folder.
    pub artifact: Option<PathBuf>,
    /// The generated workflow file.
    pub workflow: PathBuf,
}

/// The tasks of `--tasks a,b,c` (`h6` stands for the six H6 tasks).
pub fn task_list(tasks: &str) -> Vec<String> {
    tasks
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .flat_map(|t| {
            if t.eq_ignore_ascii_case("h6") {
                crate::eval::H6.iter().map(|s| s.to_string()).collect()
            } else {
                vec![t.to_string()]
            }
        })
        .collect()
}

/// A task's results name (`arc` is `arc_challenge`, `truthfulqa` is `truthfulqa_mc2`).
pub fn canonical_task(task: &str) -> String {
    match task {
        "arc" => "arc_challenge".into(),
        "truthfulqa" => "truthfulqa_mc2".into(),
        other => other.into(),
    }
}

/// A name usable as a workflow model name: the folder's name with other characters replaced by `_`.
fn model_name(model: &Path) -> String {
    let base = model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty()
        || !clean
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
    {
        format!("m_{clean}")
    } else {
        clean
    }
}

/// Writes a workflow with one model `model_name` at `model` and one step `step` of `kind` with `params`.
// One call site per command, each naming every part of the generated file; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn write_workflow(
    file: &Path,
    name: &str,
    output: &Path,
    model_name: &str,
    model: &Path,
    step: &str,
    kind: &str,
    slot: &str,
    params: &toml::Table,
) -> Result<()> {
    let model = std::path::absolute(model)?;
    if !model.is_dir() {
        bail!("{} is not a model folder", model.display());
    }
    let mut doc = toml::Table::new();
    let mut wf = toml::Table::new();
    wf.insert("name".into(), name.into());
    wf.insert(
        "output".into(),
        std::path::absolute(output)?.display().to_string().into(),
    );
    doc.insert("workflow".into(), wf.into());
    let mut m = toml::Table::new();
    m.insert("path".into(), model.display().to_string().into());
    let mut models = toml::Table::new();
    models.insert(model_name.into(), m.into());
    doc.insert("models".into(), models.into());
    let mut s = params.clone();
    s.insert("kind".into(), kind.into());
    let mut inputs = toml::Table::new();
    inputs.insert(slot.into(), model_name.into());
    s.insert("inputs".into(), inputs.into());
    let mut steps = toml::Table::new();
    steps.insert(step.into(), s.into());
    doc.insert("steps".into(), steps.into());
    let text = format!(
        "# Written by `dus {kind}`; `dus run` on this file does the same.\n{}",
        toml::to_string(&doc)?
    );
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    dusflow_core::atomic::write_file_atomic(file, text.as_bytes())
}

async fn run_one(
    workflow: PathBuf,
    step: &str,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<OneStepRun> {
    let summary = engine::run(&workflow, registry, options, shutdown).await?;
    let artifact = summary
        .step(step)
        .filter(|s| s.status.is_success())
        .map(|s| s.dir.clone());
    Ok(OneStepRun {
        summary,
        artifact,
        workflow,
    })
}

/// `dus scale`: runs the one-step workflow, then links the model's files into `OUT`.
pub async fn scale(
    req: &ScaleRequest,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<OneStepRun> {
    let hidden = req.out.join(".dusflow");
    let workflow = hidden.join("scale.toml");
    let name = model_name(&req.model);
    write_workflow(
        &workflow,
        "dus-scale",
        &hidden.join("runs"),
        &name,
        &req.model,
        "scale",
        "scale",
        "model",
        &req.params,
    )?;
    let run = run_one(workflow, "scale", registry, options, shutdown).await?;
    if let Some(artifact) = &run.artifact {
        link_contents(artifact, &req.out)?;
    }
    Ok(run)
}

/// `dus eval`: runs the one-step workflow; the artifact is in `OUT`.
pub async fn eval(
    req: &EvalRequest,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<OneStepRun> {
    let name = model_name(&req.model);
    let step = format!("eval-{name}");
    let workflow = req.out.join(".dusflow").join(format!("{step}.toml"));
    write_workflow(
        &workflow,
        "dus-eval",
        &req.out,
        &name,
        &req.model,
        &step,
        "eval",
        "model",
        &req.params,
    )?;
    run_one(workflow, &step, registry, options, shutdown).await
}

/// `dus merge CONFIG.yml OUT`: the config's model references are folders (relative to the config file, as
/// mergekit resolves local paths); they become the workflow's models, and the step reads the config itself
/// (`config = "…"`). OUT then holds the merged model as hard links to the artifact, like `dus scale`.
pub async fn merge(
    req: &MergeRequest,
    registry: &Registry,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<OneStepRun> {
    let config = std::path::absolute(&req.config)?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let mut models = toml::Table::new();
    let mut names: Vec<toml::Value> = Vec::new();
    for reference in crate::steps::merge::mergekit_yaml::referenced_models(&config)? {
        let path = dir.join(&reference);
        if !path.is_dir() {
            bail!(
                "{}: model `{reference}` is not a folder ({}); `dus merge` reads local model folders (download \
                 hub models first)",
                config.display(),
                path.display()
            );
        }
        let mut name = model_name(&path);
        while models.contains_key(&name) {
            name.push('_');
        }
        let mut m = toml::Table::new();
        m.insert(
            "path".into(),
            std::path::absolute(&path)?.display().to_string().into(),
        );
        models.insert(name.clone(), m.into());
        names.push(name.into());
    }
    let hidden = req.out.join(".dusflow");
    let workflow = hidden.join("merge.toml");
    let mut doc = toml::Table::new();
    let mut wf = toml::Table::new();
    wf.insert("name".into(), "dus-merge".into());
    wf.insert(
        "output".into(),
        std::path::absolute(hidden.join("runs"))?
            .display()
            .to_string()
            .into(),
    );
    doc.insert("workflow".into(), wf.into());
    doc.insert("models".into(), models.into());
    let mut step = toml::Table::new();
    step.insert("kind".into(), "merge".into());
    let mut inputs = toml::Table::new();
    inputs.insert("models".into(), names.into());
    step.insert("inputs".into(), inputs.into());
    step.insert("config".into(), config.display().to_string().into());
    let mut steps = toml::Table::new();
    steps.insert("merge".into(), step.into());
    doc.insert("steps".into(), steps.into());
    let text = format!(
        "# Written by `dus merge`; `dus run` on this file does the same.\n{}",
        toml::to_string(&doc)?
    );
    std::fs::create_dir_all(&hidden).with_context(|| format!("creating {}", hidden.display()))?;
    dusflow_core::atomic::write_file_atomic(&workflow, text.as_bytes())?;
    let run = run_one(workflow, "merge", registry, options, shutdown).await?;
    if let Some(artifact) = &run.artifact {
        link_contents(artifact, &req.out)?;
    }
    Ok(run)
}

/// Makes every file of `artifact` (but its manifest) appear in `out` as a hard link (a copy where hard
/// links fail), replacing what is there under the same name.
fn link_contents(artifact: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(artifact)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "manifest.json" {
            continue;
        }
        let from = entry.path();
        let to = out.join(&name);
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&to)?;
            link_contents(&from, &to)?;
            continue;
        }
        if same_file(&from, &to) {
            continue;
        }
        if to.exists() {
            std::fs::remove_file(&to).with_context(|| format!("replacing {}", to.display()))?;
        }
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_workflow_names() {
        assert_eq!(
            model_name(Path::new("/m/Mistral-7B-v0.1")),
            "Mistral-7B-v0_1"
        );
        assert_eq!(model_name(Path::new("/m/7b")), "m_7b");
    }
}
