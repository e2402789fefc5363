//! The `scale` step with layer-policy plugins (`plugin = "NAME"`): the example plugins of `plugins/` give
//! the same bytes as the built-in policies and mergekit, and plugin failures fail the step naming the plugin.

use crate::common::{dir_of, failure_of};
use dusflow::engine::{self, RunOptions, RunSummary};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/scale")
        .join(rel)
}

fn plugin_dir(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name)
        .display()
        .to_string()
}

/// Runs a workflow with models `base` and `tied`, plugins `solar` (solar-dus), `pro` (llama-pro-expand),
/// `filter` (length-filter, a data filter), `repeat`, `interleave` and `bad` (misbehaving-policy, 500 ms
/// per call), and `steps`.
async fn run(steps: &str) -> (tempfile::TempDir, RunSummary) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[workflow]\nname = \"scale-plugin\"\noutput = \"out\"\n\n\
         [models.base]\npath = {:?}\n\n[models.tied]\npath = {:?}\n\n\
         [plugins.solar]\npath = {:?}\nbuild = true\n\n[plugins.pro]\npath = {:?}\nbuild = true\n\n\
         [plugins.filter]\npath = {:?}\nbuild = true\n\n\
         [plugins.repeat]\npath = {:?}\nbuild = true\n\n[plugins.interleave]\npath = {:?}\nbuild = true\n\n\
         [plugins.bad]\npath = {:?}\nbuild = true\nlimits = {{ timeout_ms = 500 }}\n\n{steps}",
        fixture("models/base").display().to_string(),
        fixture("models/tied").display().to_string(),
        plugin_dir("solar-dus"),
        plugin_dir("llama-pro-expand"),
        plugin_dir("length-filter"),
        plugin_dir("repeat"),
        plugin_dir("interleave"),
        plugin_dir("misbehaving-policy"),
    );
    std::fs::write(dir.path().join("flow.toml"), text).unwrap();
    let opts = RunOptions {
        jobs: Some(2),
        ..RunOptions::default()
    };
    let summary = engine::run(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
        opts,
        CancellationToken::new(),
    )
    .await
    .expect("run");
    (dir, summary)
}

#[tokio::test]
async fn plugin_policies_write_the_same_bytes_as_mergekit_and_the_built_ins() {
    let (_dir, summary) = run(
        "[steps.up]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"solar\"\nparams = { m = 8 }\n\n\
         [steps.pro]\nkind = \"scale\"\ninputs = { model = \"tied\" }\nplugin = \"pro\"\nparams = { every = 4 }\n\n\
         [steps.builtin_pro]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"llama-pro\"\nevery = 4\n",
    )
    .await;
    let tensors = std::fs::read(dir_of(&summary, "up").join("model.safetensors")).unwrap();
    assert_eq!(
        format!("{:x}  {}\n", Sha256::digest(&tensors), tensors.len()),
        std::fs::read_to_string(fixture("expected/solar/model.safetensors.sha256")).unwrap()
    );
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir_of(&summary, "up").join("scale_plan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["policy"], "solar");
    assert_eq!(
        std::fs::read(dir_of(&summary, "pro").join("model.safetensors")).unwrap(),
        std::fs::read(dir_of(&summary, "builtin_pro").join("model.safetensors")).unwrap()
    );
}

#[tokio::test]
async fn repeat_and_interleave_plugins_match_the_built_in_policies() {
    let (_dir, summary) = run(
        "[steps.rep]\nkind = \"scale\"\ninputs = { model = \"tied\" }\nplugin = \"repeat\"\n\n\
         [steps.builtin_rep]\nkind = \"scale\"\ninputs = { model = \"tied\" }\npolicy = \"repeat\"\n\n\
         [steps.inter]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"interleave\"\nparams = { every = 4, scale = 0.5 }\n\n\
         [steps.builtin_inter]\nkind = \"scale\"\ninputs = { model = \"base\" }\npolicy = \"interleave\"\nevery = 4\nscale_duplicates = 0.5\n",
    )
    .await;
    for (plugin, builtin) in [("rep", "builtin_rep"), ("inter", "builtin_inter")] {
        assert_eq!(
            std::fs::read(dir_of(&summary, plugin).join("model.safetensors")).unwrap(),
            std::fs::read(dir_of(&summary, builtin).join("model.safetensors")).unwrap(),
            "{plugin}"
        );
    }
    // The scaled copies differ from their originals: the transform was applied.
    let out = dusflow::model::TensorStore::open(&dir_of(&summary, "inter")).unwrap();
    assert_ne!(
        out.bytes("model.layers.3.mlp.down_proj.weight").unwrap(),
        out.bytes("model.layers.4.mlp.down_proj.weight").unwrap()
    );
    assert_eq!(
        out.bytes("model.layers.3.mlp.up_proj.weight").unwrap(),
        out.bytes("model.layers.4.mlp.up_proj.weight").unwrap()
    );
}

#[tokio::test]
async fn plugin_failures_fail_the_step_naming_the_plugin() {
    let (dir, summary) = run(
        "[steps.bad_m]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"solar\"\nparams = { m = 20 }\n\n\
         [steps.wrong_kind]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"filter\"\n\n\
         [steps.looping]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"bad\"\nparams = { mode = \"loop\" }\n\n\
         [steps.trap]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"bad\"\nparams = { mode = \"panic\" }\n\n\
         [steps.empty]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"bad\"\nparams = { mode = \"empty\" }\n\n\
         [steps.range]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"bad\"\nparams = { mode = \"out-of-range\" }\n\n\
         [steps.many]\nkind = \"scale\"\ninputs = { model = \"base\" }\nplugin = \"bad\"\nparams = { mode = \"many\" }\n",
    )
    .await;
    let bad_m = failure_of(&summary, "bad_m");
    assert!(
        bad_m.contains("layer-policy plugin `solar`")
            && bad_m.contains("m = 20 must be between 1 and 15"),
        "{bad_m}"
    );
    for (step, what) in [
        ("looping", "exceeded its time limit of 500 ms"),
        ("trap", "panics on request"),
        ("empty", "no layers"),
        ("range", "layer 32 of model base which has 32 layers"),
        (
            "many",
            "returned 100000 layers, over the limit max_layers = 1024",
        ),
    ] {
        let message = failure_of(&summary, step);
        assert!(
            message.contains("`bad`") && message.contains(what),
            "{step}: {message}"
        );
    }
    let wrong = failure_of(&summary, "wrong_kind");
    assert!(
        wrong.contains("layer-policy plugin `filter`") && wrong.contains("data-filter"),
        "{wrong}"
    );
    let complete: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    assert!(complete.is_empty(), "{complete:?}");
}

#[test]
fn an_undeclared_plugin_or_step_keys_for_it_are_reported_at_validation() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[workflow]\nname = \"x\"\n\n[models.base]\npath = {:?}\n\n\
         [steps.a]\nkind = \"scale\"\ninputs = {{ model = \"base\" }}\nplugin = \"nope\"\n\n\
         [steps.b]\nkind = \"scale\"\ninputs = {{ model = \"base\" }}\nplugin = \"nope\"\npolicy = \"solar\"\n",
        fixture("models/base").display().to_string()
    );
    std::fs::write(dir.path().join("flow.toml"), text).unwrap();
    let Err(err) = dusflow::workflow::Workflow::load(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
    ) else {
        panic!("the workflow validated")
    };
    let err = err.to_string();
    assert!(err.contains("no [plugins.nope]"), "{err}");
    assert!(err.contains("`plugin`, not both"), "{err}");
}
