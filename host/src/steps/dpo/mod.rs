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

use crate::data::{derive_seed, DatasetSource};
use crate::model::Tokenizer;
use crate::steps::training::{
    check_filter_plugins, dependencies, plugin_filters, progress_observer,
};
use crate::train::dpo::{plot_dpo, PreferencePair, ReferenceLogps};
use anyhow::{Context, Result};
use chunks::{all_pairs, chunk_origin, load_preference_data, split_chunks};
use dusflow_core::atomic::write_file_atomic;
use dusflow_core::step::StepContext;
use dusflow_core::step::{
    ArtifactKind, ArtifactPart, CheckContext, ConfigIssue, Dependencies, InputSlot, InputSlots,
    Resources, StepKind,
};
use stages::{
    model_digest, reference_logps, run_stage, stage_histories, ModelIdentity, StageSetup,
};

/// The `dpo` step kind.
pub struct DpoStep;

const DPO_INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &[ArtifactKind::Model],
        many: false,
        required: true,
    },
    InputSlot {
        name: "data",
        accepts: &[ArtifactKind::Dataset],
        many: true,
        required: true,
    },
    InputSlot {
        name: "reference",
        accepts: &[ArtifactKind::Model],
        many: false,
        required: false,
    },
];

impl StepKind for DpoStep {
    type Config = DpoStepConfig;

    fn name(&self) -> &'static str {
        "dpo"
    }

    fn version(&self) -> u32 {
        2 // 2: attention through the fused op (issue 17): the same values up to float rounding
    }

    fn inputs(&self) -> InputSlots {
        InputSlots::Fixed(DPO_INPUTS)
    }

    fn output(&self, _: &DpoStepConfig) -> ArtifactKind {
        ArtifactKind::Model
    }

    /// `stage-<t>` for t < T: the intermediate sDPO models M_t.
    fn parts(&self, c: &DpoStepConfig) -> Vec<ArtifactPart> {
        (1..c.chunks)
            .map(|t| ArtifactPart {
                name: format!("stage-{t}"),
                path: format!("stage-{t}").into(),
                kind: ArtifactKind::Model,
            })
            .collect()
    }

    fn check(&self, c: &DpoStepConfig, ctx: &dyn CheckContext) -> Vec<ConfigIssue> {
        let mut issues = c.issues(ctx.input_count("data"));
        issues.extend(check_filter_plugins(&c.filter_params, ctx));
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
        let data = {
            let mut filters = plugin_filters(&train.filter_params, ctx);
            load_preference_data(&sources, &mut filters, seed, &tokenizer, c.limits())?
        };
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let device = crate::device::select_device(ctx.settings.device)?;
        let out = ctx.out_dir.as_path();
        let refs_dir = out.join("reference_logps");
        let on_batch = |total: usize| {
            move |done: usize| {
                ctx.progress.set_length(total as u64);
                ctx.progress.set_position(done as u64);
                ctx.check_cancelled()
            }
        };

        let initial = ModelIdentity {
            source: format!("input model {:?}", model.name),
            blake3: model_digest(&model.path)?,
        };
        // chunk_by = "margin": M_0's log-probs of every pair (reused as stage 1's reference pass in sDPO).
        let initial_pass = if c.chunks > 1 && c.chunk_by == ChunkBy::Margin {
            ctx.progress.set_message("margins of the initial model");
            let every: Vec<PreferencePair> = all_pairs(&data).into_iter().map(|p| p.pair).collect();
            let refs: Vec<&PreferencePair> = every.iter().collect();
            let (stored, _) = reference_logps(
                &refs_dir.join("initial-margins.json"),
                &model.path,
                initial.clone(),
                &refs,
                None,
                c.micro_batch,
                pad,
                &device,
                &mut on_batch(refs.len()),
            )?;
            Some(stored)
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
        // Position of each (dataset, record) in the initial pass.
        let initial_index: std::collections::HashMap<(usize, usize), usize> = all_pairs(&data)
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.dataset, p.record), i))
            .collect();

        let setup = StageSetup {
            out_dir: out,
            train: &train,
            loss: c.loss_config(),
            seed,
            pad,
            save_dtype: crate::device::candle_dtype(ctx.settings.dtype),
            device: &device,
        };
        let stages = chunks.len();
        let mut reports = Vec::with_capacity(stages);
        let mut current = (model.path.clone(), initial);
        for (i, chunk) in chunks.iter().enumerate() {
            let t = i + 1;
            let (ref_dir, ref_source) = match fixed_reference {
                Some(r) => (r.path.clone(), format!("input reference {:?}", r.name)),
                None => (current.0.clone(), current.1.source.clone()),
            };
            let ref_identity = if fixed_reference.is_none() {
                current.1.clone()
            } else {
                ModelIdentity {
                    source: ref_source,
                    blake3: model_digest(&ref_dir)?,
                }
            };
            ctx.progress
                .set_message(format!("stage {t}/{stages}: reference pass"));
            let refs: Vec<&PreferencePair> = chunk.iter().map(|p| &p.pair).collect();
            let known = match &initial_pass {
                Some(pass) if pass.reference == ref_identity => {
                    let pick = |v: &[f32]| -> Vec<f32> {
                        chunk
                            .iter()
                            .map(|p| v[initial_index[&(p.dataset, p.record)]])
                            .collect()
                    };
                    let logps = ReferenceLogps {
                        chosen: pick(&pass.logps.chosen),
                        rejected: pick(&pass.logps.rejected),
                    };
                    let share = chunk.len() as f64 / initial_index.len().max(1) as f64;
                    Some((logps, pass.seconds * share))
                }
                _ => None,
            };
            let reference = reference_logps(
                &refs_dir.join(format!("stage-{t}.json")),
                &ref_dir,
                ref_identity,
                &refs,
                known,
                c.micro_batch,
                pad,
                &device,
                &mut on_batch(refs.len()),
            )?;
            ctx.progress
                .set_message(format!("stage {t}/{stages}: training"));
            let output = if t == stages {
                ".".to_string()
            } else {
                format!("stage-{t}")
            };
            let mut observer = progress_observer(ctx);
            let report = run_stage(
                &setup,
                t,
                chunk,
                serde_json::to_value(chunk_origin(&data, chunk))?,
                (&current.0, current.1.clone()),
                reference,
                &output,
                &mut observer,
            )?;
            reports.push(report);
            if t < stages {
                // M_t starts (and, in sDPO, is the reference of) the next stage.
                let written = out.join(&output);
                let identity = ModelIdentity {
                    source: format!("stage-{t}"),
                    blake3: model_digest(&written)?,
                };
                current = (written, identity);
            }
        }

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
            "dropped_too_long": data.dropped_too_long,
            "stages": reports,
        });
        write_file_atomic(
            &out.join("dpo_report.json"),
            &serde_json::to_vec_pretty(&report)?,
        )?;
        let work = out.join(".dpo-work");
        if work.exists() {
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("removing {}", work.display()))?;
        }
        Ok(())
    }
}
