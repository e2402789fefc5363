//! The `merge` step kind in workflows: validation with line numbers, an end-to-end run through the engine,
//! sharded output, and clear errors for incompatible models.

use crate::common;

use common::Project;
use dusflow::engine::{self, RunOptions};
use dusflow::model::{write_safetensors, TensorSpec, TensorStore};
use dusflow::steps::merge::stream::{merge, NamedModel};
use dusflow::steps::merge::MergeConfig;
use dusflow::workflow::Workflow;
use indicatif::ProgressBar;
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/merge/models")
        .join(name)
}

fn models_section() -> String {
    ["a", "b", "base"]
        .iter()
        .map(|m| {
            format!(
                "[models.{m}]\npath = {:?}\n",
                fixture_model(m).display().to_string()
            )
        })
        .collect()
}

#[test]
fn parameter_errors_are_reported_with_their_lines() {
    let text = format!(
        r#"[workflow]
name = "merges"

{models}
[steps.few_weights]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
method = "linear"
weights = [0.5]

[steps.bad_t]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
method = "slerp"
t = [0.0, 1.5]

[steps.no_base]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
method = "ties"
density = 0.5

[steps.three_slerp]
kind = "merge"
inputs = {{ models = ["a", "b", "base"] }}
method = "slerp"
t = 0.5

[steps.typo]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
method = "linear"
denisty = 0.5
"#,
        models = models_section()
    );
    let p = Project::new(&text);
    let e = match Workflow::load(&p.workflow(), &dusflow::steps::builtin_registry()) {
        Ok(_) => panic!("workflow should be invalid"),
        Err(e) => e,
    };
    let rendered = e.to_string();
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let find = |key: &str| {
        e.diagnostics
            .iter()
            .find(|d| d.key == key)
            .unwrap_or_else(|| panic!("no error for {key} in:\n{rendered}"))
    };
    let d = find("steps.few_weights.weights");
    assert_eq!(d.line, line_of("weights = [0.5]"), "{d}");
    assert!(
        d.message.contains("1 entries") && d.message.contains("2 models"),
        "{d}"
    );
    let d = find("steps.bad_t.t");
    assert_eq!(d.line, line_of("t = [0.0, 1.5]"), "{d}");
    assert!(d.message.contains("1.5"), "{d}");
    assert!(find("steps.no_base.inputs.base")
        .message
        .contains("needs `inputs.base`"));
    assert!(find("steps.three_slerp.inputs")
        .message
        .contains("exactly two models"));
    assert!(find("steps.typo.denisty").message.contains("unknown field"));
}

#[tokio::test]
async fn a_workflow_merge_writes_a_loadable_model_equal_to_mergekit() {
    let text = format!(
        r#"[workflow]
name = "merges"

{models}
[steps.average]
kind = "merge"
inputs = {{ models = ["a", "b", "base"] }}
method = "linear"
weights = [1.0, 2.0, 0.5]
dtype = "bfloat16"
"#,
        models = models_section()
    );
    let p = Project::new(&text);
    let summary = engine::run(
        &p.workflow(),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect("run");
    assert!(summary.succeeded(), "{summary:?}");
    let dir = PathBuf::from(&summary.step("average").unwrap().dir);
    let ours = TensorStore::open(&dir).unwrap();
    let mergekit = TensorStore::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge/outputs/linear"),
    )
    .unwrap();
    assert_eq!(ours.len(), mergekit.len());
    for name in mergekit.names() {
        assert_eq!(
            ours.bytes(name).unwrap(),
            mergekit.bytes(name).unwrap(),
            "{name}"
        );
    }
    // config.json comes from the first listed model, with the output dtype.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    assert_eq!(config["num_hidden_layers"], 3);
}

#[test]
fn sharded_output_holds_the_same_tensors() {
    let models = [
        NamedModel {
            name: "a".into(),
            path: fixture_model("a"),
        },
        NamedModel {
            name: "b".into(),
            path: fixture_model("b"),
        },
    ];
    let run = |extra: &str| {
        let config: MergeConfig =
            toml::from_str(&format!("method = \"slerp\"\nt = 0.3\n{extra}")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let summary = merge(
            &config,
            &models,
            None,
            0,
            dir.path(),
            true,
            &ProgressBar::hidden(),
            &|| false,
        )
        .unwrap();
        (dir, summary)
    };
    let (single, s1) = run("");
    let (sharded, s2) = run("shard_size = \"20KB\"");
    assert_eq!(s1.files, vec!["model.safetensors"]);
    assert!(s2.files.len() > 2, "{:?}", s2.files);
    assert!(sharded
        .path()
        .join("model.safetensors.index.json")
        .is_file());
    let (a, b) = (
        TensorStore::open(single.path()).unwrap(),
        TensorStore::open(sharded.path()).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for name in a.names() {
        assert_eq!(a.bytes(name).unwrap(), b.bytes(name).unwrap(), "{name}");
    }
}

fn write_model(dir: &Path, tensors: &[(&str, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s)| TensorSpec::new(*n, Dtype::F32, s.clone()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &specs, |s| {
        Ok(Cow::Owned(vec![0u8; s.byte_len()]))
    })
    .unwrap();
}

#[test]
fn incompatible_models_are_errors_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    write_model(
        &a,
        &[
            ("model.embed_tokens.weight", vec![8, 4]),
            ("model.norm.weight", vec![4]),
        ],
    );
    write_model(
        &b,
        &[
            ("model.embed_tokens.weight", vec![9, 4]),
            ("model.norm.weight", vec![4]),
        ],
    );
    write_model(&c, &[("model.embed_tokens.weight", vec![8, 4])]);
    let config: MergeConfig = toml::from_str("method = \"linear\"").unwrap();
    // Bare safetensors files (no config.json to check): the tensors themselves must fit together.
    let named = |n: &str, p: &Path| NamedModel {
        name: n.into(),
        path: p.join("model.safetensors"),
    };
    let out = tempfile::tempdir().unwrap();
    let err = merge(
        &config,
        &[named("a", &a), named("b", &b)],
        None,
        0,
        out.path(),
        true,
        &ProgressBar::hidden(),
        &|| false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.embed_tokens.weight")
            && err.contains("[8, 4]")
            && err.contains("[9, 4]"),
        "{err}"
    );
    assert!(err.contains("vocabularies"), "{err}");
    let err = merge(
        &config,
        &[named("a", &a), named("c", &c)],
        None,
        0,
        out.path(),
        true,
        &ProgressBar::hidden(),
        &|| false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("not in model `c`"),
        "{err}"
    );
}

/// The sign-consensus rule of `plugins/sign-consensus-merge`, computed natively for comparison.
fn sign_consensus(values: &[f32]) -> f32 {
    let sum: f32 = values.iter().sum();
    let agree: Vec<f32> = values
        .iter()
        .copied()
        .filter(|v| (*v >= 0.0) == (sum >= 0.0))
        .collect();
    if agree.is_empty() {
        0.0
    } else {
        agree.iter().sum::<f32>() / agree.len() as f32
    }
}

#[tokio::test]
async fn a_merge_rule_plugin_plans_natively_and_merges_custom_tensors() {
    let plugin_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sign-consensus-merge");
    let text = format!(
        r#"[workflow]
name = "plugin-merge"

{models}
[plugins.consensus]
path = {plugin:?}
build = true

[steps.consensus]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
plugin = "consensus"

[steps.average]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
method = "linear"
"#,
        models = models_section(),
        plugin = plugin_dir.display().to_string()
    );
    let p = Project::new(&text);
    let summary = engine::run(
        &p.workflow(),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect("run");
    assert!(summary.succeeded(), "{summary:?}");
    let open = |step: &str| TensorStore::open(Path::new(&summary.step(step).unwrap().dir)).unwrap();
    let (merged, average) = (open("consensus"), open("average"));
    let (a, b) = (
        TensorStore::open(&fixture_model("a")).unwrap(),
        TensorStore::open(&fixture_model("b")).unwrap(),
    );
    let decode = |s: &TensorStore, name: &str| {
        let meta = s.meta(name).unwrap();
        let mut v = vec![0f32; meta.numel()];
        dusflow::steps::merge::elements::Source {
            bytes: &s.bytes(name).unwrap(),
            dtype: meta.dtype,
        }
        .decode(0, &mut v);
        v
    };
    let mut custom = 0;
    for name in a.names() {
        let elementwise = name.contains("layers.") && a.meta(name).unwrap().shape.len() > 1;
        if elementwise {
            custom += 1;
            let (va, vb, got) = (decode(&a, name), decode(&b, name), decode(&merged, name));
            for j in 0..va.len() {
                let want = half::bf16::from_f32(sign_consensus(&[va[j], vb[j]])).to_f32();
                assert_eq!(got[j].to_bits(), want.to_bits(), "{name}[{j}]");
            }
        } else {
            // Planned `linear([0.5, 0.5])`: run by the native kernel, equal to the built-in average.
            assert_eq!(
                merged.bytes(name).unwrap(),
                average.bytes(name).unwrap(),
                "{name}"
            );
        }
    }
    assert!(custom > 0);
}
