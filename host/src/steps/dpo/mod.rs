//! `kind = "dpo"`: preference alignment by DPO, or by sDPO (Kim et al. 2024; the SOLAR paper's
//! alignment stage) when `chunks > 1`: the preference data is split into chunks D_1..D_T and stage t
//! trains M_{t−1} on D_t against the reference M_{t−1} (M_0 = the `model` input). With a `reference`
//! input, that model is the reference of every stage instead.
//!
//! ```toml
//! [steps.align]
//! kind = "dpo"
//! inputs = { model = "sft", data = ["ultrafeedback", "math-alignment"] }
//! chunks = 2              # sDPO: one stage per dataset, in the order given
//! beta = 0.1
//! lr = 5e-7
//! ```
//!
//! Parts: `stage-<t>` for t < T (the intermediate models M_t), e.g. `inputs = { model = "align/stage-1" }`.
//!
//! Reference log-probs are computed once per stage in a no-grad pass and stored in the work folder
//! (`reference_logps/stage-<t>.json`, kept in the artifact), so no reference model is in memory while
//! training and a resumed run does not recompute them. The artifact: the final model M_T at the root (a
//! Hugging Face folder), `stage-<t>/` with M_t for t < T, `metrics.jsonl` (TRL's metric names, a `stage`
//! field), `dpo.svg` (loss, reward accuracy and margins) and `dpo_report.json` (per stage: chunk, reference
//! identity, reference-pass time, final metrics).

pub mod chunks;
pub mod config;
pub mod stages;

pub use config::{ChunkBy, DpoStepConfig};

use crate::atomic::write_file_atomic;
use crate::data::{derive_seed, DatasetSource, Templates};
use crate::model::{read_chat_template, Tokenizer};
use crate::steps::training::{
    check_filter_plugins, dependencies, eval_every_issue, plugin_filters, EVAL_DATA,
};
use crate::steps::{
    ArtifactKind, ArtifactPart, CheckContext, ConfigIssue, Dependencies, InputArtifact, InputSlot,
    InputSlots, Resources, StepContext, StepKind,
};
use crate::train::dpo::{plot_dpo, PreferencePair};
use anyhow::{Context, Result};
use chunks::{all_pairs, load_preference_data, split_chunks, PreferenceData};
use stages::{
    model_digest, run_stages, stage_histories, ModelIdentity, StageReport, StageSetup, Stages,
    StoredReference,
};

/// The `dpo` step kind.
pub struct DpoStep;

const DPO_INPUTS: &[InputSlot] = &[
    InputSlot::one("model", &[ArtifactKind::Model]),
    InputSlot::many("data", &[ArtifactKind::Dataset]),
    InputSlot::one("reference", &[ArtifactKind::Model]).optional(),
    InputSlot::many(EVAL_DATA, &[ArtifactKind::Dataset]).optional(),
];

impl StepKind for DpoStep {
    type Config = DpoStepConfig;

    fn name(&self) -> &'static str {
        "dpo"
    }

    fn version(&self) -> u32 {
        // 2: orca-dpo / ultrafeedback pairs rendered with the `template` choice (the model's own chat
        // template when it has one), the split at the prompt as TRL makes it.
        // 3: attention through the fused op (issue 17): the same values up to float rounding.
        // 4: fused RMSNorm / SwiGLU / RoPE on the CPU (issue 18): the same values up to float rounding.
        4
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(DPO_INPUTS)
    }

    fn output(&self, _: &DpoStepConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    /// `stage-<t>` for t < T: the intermediate sDPO models M_t.
    fn parts(&self, c: &DpoStepConfig) -> Vec<ArtifactPart> {
        let mut parts: Vec<ArtifactPart> = (1..c.chunks)
            .map(|t| ArtifactPart {
                name: format!("stage-{t}"),
                path: format!("stage-{t}").into(),
                kind: ArtifactKind::Model,
            })
            .collect();
        parts.extend(crate::steps::training::adapter_parts(&c.train_config()));
        parts
    }

    fn check(&self, c: &DpoStepConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = c.issues(ctx.input_count("data"));
        issues.extend(check_filter_plugins(&c.filter_params, ctx));
        issues.extend(eval_every_issue(c.eval_every, ctx));
        issues
    }

    fn dependencies(&self, c: &DpoStepConfig) -> Dependencies {
        dependencies(&c.filter_params)
    }

    fn resources(&self, _: &DpoStepConfig) -> Resources {
        Resources {
            exclusive_device: true,
        }
    }

    fn resumable(&self) -> bool {
        true
    }

    fn run(&self, c: &DpoStepConfig, ctx: &StepContext) -> Result<()> {
        if crate::distributed::launch_step(ctx, "dpo", c, c.devices, c.zero)? {
            return Ok(());
        }
        let parallel = crate::distributed::parallel(ctx);
        let model = ctx.input("model")?;
        let tokenizer = Tokenizer::from_model_dir(&model.path)
            .with_context(|| format!("model {:?} needs a tokenizer.json for DPO", model.name))?;
        let fixed_reference = ctx.inputs_of("reference").first();
        let sources = ctx
            .inputs_of("data")
            .iter()
            .map(DatasetSource::from_input)
            .collect::<Result<Vec<_>>>()?;
        let train = c.train_config();
        let seed = derive_seed(ctx.settings.seed, &format!("dpo/{}", c.seed));
        let templates = Templates::resolve(
            c.template,
            read_chat_template(&model.path)?.as_ref(),
            &model.name,
        )?;
        let mut filters = plugin_filters(&train.filter_params, ctx);
        let data = load_preference_data(
            &sources,
            &mut filters,
            seed,
            &tokenizer,
            &templates,
            c.limits(),
        )?;
        let eval_sources = ctx
            .inputs_of(EVAL_DATA)
            .iter()
            .map(DatasetSource::from_input)
            .collect::<Result<Vec<_>>>()?;
        let held_out: Option<Vec<PreferencePair>> = if eval_sources.is_empty() {
            None
        } else {
            let held = load_preference_data(
                &eval_sources,
                &mut filters,
                seed,
                &tokenizer,
                &templates,
                c.limits(),
            )
            .context("loading the held-out pairs (inputs.eval_data)")?;
            Some(all_pairs(&held).into_iter().map(|p| p.pair).collect())
        };
        drop(filters);
        let device = crate::distributed::device(ctx)?;
        let setup = StageSetup {
            out_dir: &ctx.out_dir,
            train: &train,
            loss: c.loss_config(),
            seed,
            pad: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
            save_dtype: crate::device::candle_dtype(ctx.settings.dtype),
            device: &device,
            parallel: &parallel,
        };
        let initial = ModelIdentity {
            source: format!("input model {:?}", model.name),
            blake3: model_digest(&model.path)?,
        };
        // chunk_by = "margin": M_0's log-probs of every pair (reused as stage 1's reference pass in sDPO).
        let initial_pass = if c.chunks > 1 && c.chunk_by == ChunkBy::Margin {
            Some(initial_margins(&setup, ctx, &data, &model.path, &initial)?)
        } else {
            None
        };
        let margins: Option<Vec<f32>> = initial_pass.as_ref().map(|p| {
            p.logps
                .chosen
                .iter()
                .zip(&p.logps.rejected)
                .map(|(a, b)| a - b)
                .collect()
        });
        let chunks = split_chunks(
            &data,
            c.chunks,
            c.chunk_by,
            derive_seed(seed, "chunks"),
            margins.as_deref(),
        )?;
        let reports = run_stages(
            &setup,
            ctx,
            &Stages {
                data: &data,
                chunks: &chunks,
                initial: (model.path.clone(), initial),
                fixed_reference,
                initial_pass: initial_pass.as_ref(),
                held_out: held_out.as_deref(),
            },
        )?;
        if !parallel.is_root() {
            return Ok(());
        }
        write_reports(c, ctx, &data, &templates, fixed_reference, reports)
    }
}

/// The initial model's log-probs of every pair, stored as `reference_logps/initial-margins.json`.
fn initial_margins(
    setup: &StageSetup<'_>,
    ctx: &StepContext,
    data: &PreferenceData,
    model_dir: &std::path::Path,
    initial: &ModelIdentity,
) -> Result<StoredReference> {
    ctx.progress.set_message("margins of the initial model");
    let every: Vec<PreferencePair> = all_pairs(data).into_iter().map(|p| p.pair).collect();
    let refs: Vec<&PreferencePair> = every.iter().collect();
    let (stored, _) = setup.stored_reference(
        ctx,
        &setup.out_dir.join("reference_logps/initial-margins.json"),
        (model_dir, initial.clone()),
        &refs,
        None,
    )?;
    Ok(stored)
}

/// The step's outputs beside the model: `metrics.jsonl` (every stage's steps), `dpo.svg`, `dpo_report.json`;
/// the stages' work folder is removed.
fn write_reports(
    c: &DpoStepConfig,
    ctx: &StepContext,
    data: &PreferenceData,
    templates: &Templates,
    fixed_reference: Option<&InputArtifact>,
    reports: Vec<StageReport>,
) -> Result<()> {
    let out = ctx.out_dir.as_path();
    let stages = reports.len();
    let history = stage_histories(out, stages)?;
    let mut lines = String::new();
    for (t, m) in &history {
        let mut v = serde_json::to_value(m)?;
        v.as_object_mut()
            .expect("metrics serialise to an object")
            .insert("stage".into(), (*t).into());
        lines.push_str(&serde_json::to_string(&v)?);
        lines.push('\n');
    }
    write_file_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
    plot_dpo(
        &history,
        &format!(
            "{}: DPO ({} stage{})",
            ctx.step,
            stages,
            if stages > 1 { "s" } else { "" }
        ),
        &out.join("dpo.svg"),
    )?;
    let report = serde_json::json!({
        "loss": c.loss_config(),
        "chunks": stages,
        "chunk_by": c.chunk_by,
        "reference": match fixed_reference {
            Some(r) => format!("fixed: input reference {:?}", r.name),
            None if stages == 1 => "the initial model (input model)".to_string(),
            None => "the previous stage's model (sDPO)".to_string(),
        },
        "datasets": data.reports,
        "templates": templates.describe(),
        "dropped_too_long": data.dropped_too_long,
        "stages": reports,
    });
    write_file_atomic(
        &out.join("dpo_report.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    let work = out.join(".dpo-work");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    Ok(())
}
