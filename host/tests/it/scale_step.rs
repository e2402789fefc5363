//! The `scale` step through the engine: built-in policies, LLaMA-Pro function preservation, sharding,
//! and failures that name the policy and leave no artifact (fixtures: `fixtures/scale/make_fixtures.py`).

use crate::common::{dir_of, failure_of};
use candle_core::{DType, Device, Tensor};
use dusflow::engine::{self, RunOptions, RunSummary};
use dusflow::model::{load_model, ForwardOptions, TensorStore};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/scale")
        .join(rel)
}

/// A temp folder holding `flow.toml` = `[workflow]` + `[models]` (base, donor, tied) + `steps`.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(steps: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let models: String = ["base", "donor", "tied"]
            .iter()
            .map(|m| {
                format!(
                    "[models.{m}]\npath = {:?}\n\n",
                    fixture(&format!("models/{m}")).display().to_string()
                )
            })
            .collect();
        let text =
            format!("[workflow]\nname = \"scale-test\"\noutput = \"out\"\n\n{models}{steps}");
        std::fs::write(dir.path().join("flow.toml"), text).unwrap();
        Project { dir }
    }

    async fn run(&self) -> RunSummary {
        let opts = RunOptions {
            jobs: Some(2),
            ..RunOptions::default()
        };
        engine::run(
            &self.dir.path().join("flow.toml"),
            &dusflow::steps::builtin_registry(),
            opts,
            CancellationToken::new(),
        )
        .await
        .expect("run")
    }

    /// Artifact folders of step `step` (completed or not) under the output folder.
    fn artifacts(&self, step: &str) -> Vec<PathBuf> {
        let out = self.dir.path().join("out");
        let Ok(entries) = std::fs::read_dir(&out) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{step}-"))
            })
            .collect()
    }
}

fn sha256_line(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}  {}\n", Sha256::digest(&bytes), bytes.len())
}

#[tokio::test]
async fn solar_policy_in_a_workflow_writes_mergekits_model() {
    let p = Project::new(
        "[steps.up]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\nm = 8\n",
    );
    let summary = p.run().await;
    let dir = dir_of(&summary, "up");
    assert_eq!(
        sha256_line(&dir.join("model.safetensors")),
        std::fs::read_to_string(fixture("expected/solar/model.safetensors.sha256")).unwrap()
    );
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        std::fs::read(fixture("expected/solar/config.json")).unwrap()
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("scale_plan.json")).unwrap()).unwrap();
    assert_eq!(record["policy"], "solar");
    assert_eq!(record["plan"]["layers"].as_array().unwrap().len(), 48);
    assert_eq!(record["plan"]["layers"][24]["layer"], 8);
}

#[tokio::test]
async fn repeat_interleave_and_target_size_copy_the_planned_layers() {
    let p = Project::new(
        "[steps.rep]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"repeat\"\n\n\
         [steps.inter]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"interleave\"\nevery = 3\n\n\
         [steps.by_s]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\ns = 40\n",
    );
    let summary = p.run().await;
    let src = TensorStore::open(&fixture("models/tied")).unwrap();
    let cases: [(&str, Vec<usize>); 2] = [
        ("rep", (0..8).chain(0..8).collect()),
        ("inter", vec![0, 1, 2, 2, 3, 4, 5, 5, 6, 7]),
    ];
    for (step, expected) in cases {
        let out = TensorStore::open(&dir_of(&summary, step)).unwrap();
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir_of(&summary, step).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["num_hidden_layers"], expected.len(), "{step}");
        for (new, old) in expected.iter().enumerate() {
            for s in [
                "self_attn.q_proj.weight",
                "mlp.down_proj.weight",
                "input_layernorm.weight",
            ] {
                let a = out.bytes(&format!("model.layers.{new}.{s}")).unwrap();
                assert_eq!(
                    a,
                    src.bytes(&format!("model.layers.{old}.{s}")).unwrap(),
                    "{step}: layer {new} {s}"
                );
            }
        }
        assert_eq!(
            out.bytes("model.embed_tokens.weight").unwrap(),
            src.bytes("model.embed_tokens.weight").unwrap()
        );
        assert!(
            !out.contains("lm_head.weight"),
            "{step}: tied model gained a head"
        );
    }
    // s = 40 from 32 layers: m = 12, layers [0, 20) + [12, 32).
    let out = TensorStore::open(&dir_of(&summary, "by_s")).unwrap();
    let base = TensorStore::open(&fixture("models/base")).unwrap();
    assert_eq!(
        out.bytes("model.layers.20.mlp.up_proj.weight").unwrap(),
        base.bytes("model.layers.12.mlp.up_proj.weight").unwrap()
    );
    assert_eq!(
        out.bytes("lm_head.weight").unwrap(),
        base.bytes("lm_head.weight").unwrap()
    );
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = load_model(dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 33, 2, 60, 7]], &Device::Cpu).unwrap();
    model
        .forward(&ids, &ForwardOptions::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[tokio::test]
async fn llama_pro_expansion_preserves_the_function_and_zeroes_output_projections() {
    let p = Project::new(
        "[steps.pro]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"llama-pro\"\nevery = 4\n\n\
         [steps.same]\nkind = \"scale\"\ninputs = { model = \"tied\" }\n\
         slices = [{ layers = [0, 4] }, { layers = [3, 4], transforms = [{ tensor = \"o_proj.weight\", zero = true }, { tensor = \"down_proj.weight\", zero = true }] }, { layers = [4, 8] }, { layers = [7, 8], transforms = [{ tensor = \"o_proj.weight\", zero = true }, { tensor = \"down_proj.weight\", zero = true }] }]\n",
    );
    let summary = p.run().await;
    let pro = dir_of(&summary, "pro");
    assert_eq!(
        std::fs::read(pro.join("model.safetensors")).unwrap(),
        std::fs::read(dir_of(&summary, "same").join("model.safetensors")).unwrap()
    );
    let out = TensorStore::open(&pro).unwrap();
    for layer in [4, 9] {
        for s in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
            assert!(
                out.bytes(&format!("model.layers.{layer}.{s}"))
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0),
                "layer {layer} {s}"
            );
        }
    }
    let (before, after) = (logits(&fixture("models/tied")), logits(&pro));
    let worst = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "expanded model changed the logits by {worst}");
    // Without zeroing, the same layer stack does change the function: the check above can fail.
    let p2 = Project::new("[steps.inter]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"interleave\"\nevery = 4\n");
    let inter = logits(&dir_of(&p2.run().await, "inter"));
    assert!(before.iter().zip(&inter).any(|(a, b)| (a - b).abs() > 1e-2));
}

#[tokio::test]
async fn sharded_output_holds_the_same_tensors_with_an_index() {
    let p = Project::new(
        "[steps.one]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\nm = 8\n\n\
         [steps.sharded]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\nm = 8\nshard_size = \"100KB\"\n",
    );
    let summary = p.run().await;
    let dir = dir_of(&summary, "sharded");
    assert!(dir.join("model.safetensors.index.json").is_file());
    assert!(
        dir.join("model-00001-of-00003.safetensors").is_file(),
        "{:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
    let (a, b) = (
        TensorStore::open(&dir_of(&summary, "one")).unwrap(),
        TensorStore::open(&dir).unwrap(),
    );
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    for name in a.names() {
        assert_eq!(a.bytes(name).unwrap(), b.bytes(name).unwrap(), "{name}");
    }
}

#[tokio::test]
async fn bad_plans_fail_naming_the_policy_and_leave_no_artifact() {
    let p = Project::new(
        "[steps.past]\nkind = \"scale\"\ninputs = { model = \"base\" }\nslices = [{ layers = [0, 24] }, { layers = [8, 40] }]\n\n\
         [steps.huge]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"repeat\"\ntimes = 40\n\n\
         [steps.mixed]\nkind = \"scale\"\ninputs = { model = [\"base\", \"tied\"] }\nslices = [{ model = \"base\", layers = [0, 4] }, { model = \"tied\", layers = [4, 8] }]\n\n\
         [steps.typo]\nkind = \"scale\"\ninputs = { model = \"tied\" }\nslices = [{ layers = [0, 8], transforms = [{ tensor = \"o_prj.weight\", zero = true }] }]\n\n\
         [steps.ok]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"repeat\"\n",
    );
    let summary = p.run().await;
    let past = failure_of(&summary, "past");
    assert!(
        past.contains("slices[1]") && past.contains("ends past the 32 layers of model `base`"),
        "{past}"
    );
    let huge = failure_of(&summary, "huge");
    assert!(
        huge.contains("policy `repeat` returned 1280 layers") && huge.contains("max_layers = 1024"),
        "{huge}"
    );
    let mixed = failure_of(&summary, "mixed");
    assert!(
        mixed.contains("incompatible models") && mixed.contains("BF16") && mixed.contains("F32"),
        "{mixed}"
    );
    let typo = failure_of(&summary, "typo");
    assert!(
        typo.contains("policy `slices`")
            && typo.contains("`o_prj.weight`, which matches no tensor"),
        "{typo}"
    );
    for step in ["past", "huge", "mixed", "typo"] {
        let left: Vec<_> = p
            .artifacts(step)
            .into_iter()
            .filter(|d| d.join("manifest.json").exists())
            .collect();
        assert!(left.is_empty(), "{step} left {left:?}");
    }
    dir_of(&summary, "ok");
}

#[tokio::test]
async fn models_of_different_shapes_are_refused() {
    let odd = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("models/base").join(f), odd.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixture("models/base/config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 48");
    std::fs::write(odd.path().join("config.json"), config).unwrap();
    let p = Project::new(&format!(
        "[models.odd]\npath = {:?}\n\n[steps.f]\nkind = \"scale\"\ninputs = {{ model = [\"base\", \"odd\"] }}\nslices = [{{ model = \"base\", layers = [0, 4] }}, {{ model = \"odd\", layers = [4, 8] }}]\n",
        odd.path().display().to_string()
    ));
    let message = failure_of(&p.run().await, "f");
    // `odd` claims another MLP width than its tensors have: refused as a broken model before any
    // comparison with `base`.
    assert!(
        message.contains("model `odd`") && message.contains("config.json implies [48, 16]"),
        "{message}"
    );
}

#[test]
fn parameters_the_policy_does_not_use_are_reported_at_validation() {
    let p = Project::new(
        "[steps.a]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\nm = 8\nevery = 2\n\n\
         [steps.b]\nkind = \"scale\"\ninputs = { model = \"base\" }\n\n\
         [steps.c]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"solar\"\nm = 8\ns = 48\n\n\
         [steps.d]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"slices\"\n",
    );
    let Err(err) = dusflow::workflow::Workflow::load(
        &p.dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
    ) else {
        panic!("the workflow validated")
    };
    let err = err.to_string();
    assert!(err.contains("policy `solar` does not use `every`"), "{err}");
    assert!(err.contains("set `policy`"), "{err}");
    assert!(err.contains("give `m` or `s`, not both"), "{err}");
    assert!(
        err.contains("policy `slices` needs a non-empty `slices` list"),
        "{err}"
    );
}

#[test]
fn stopping_mid_write_leaves_no_tensors_file() {
    use dusflow::steps::scale::{
        builtin_plan, write_scaled, BuiltinPolicy, PolicyParams, SourceModel, WriteOptions,
    };
    let models = vec![SourceModel::open("base", &fixture("models/base")).unwrap()];
    let params = PolicyParams {
        m: Some(8),
        ..Default::default()
    };
    let plan = builtin_plan(BuiltinPolicy::Solar, &params, &["base".into()], &[32]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut seen = 0;
    let err = write_scaled(
        &models,
        &plan,
        "solar",
        out.path(),
        &WriteOptions::default(),
        &mut |_, _| {
            seen += 1;
            if seen == 10 {
                anyhow::bail!("stop requested")
            }
            Ok(())
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("stop requested"), "{err:#}");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
