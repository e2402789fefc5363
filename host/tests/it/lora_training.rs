//! LoRA through workflows: an SFT step trains only the adapter (base frozen), writes the merged model as its
//! artifact and PEFT's files as the part `STEP/adapter`; sDPO's stages continue one adapter; a killed LoRA
//! run resumes to the same adapter; a PEFT adapter folder is a model input, merged on load.

use crate::common::{artifact, max_abs_diff, run_flow, ChildRun};
use candle_core::{DType, Device, Tensor};
use dusflow::model::lora::{Adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use dusflow::model::{LlamaConfig, TensorStore};
use std::path::Path;

const BASE: &str = r#"
[workflow]
name = "lora"
seed = 5
output = "out"

[steps.tiny]
kind = "init"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2

[steps.instructions]
kind = "synthetic"
task = "alpaca"
count = 24

[steps.prefs]
kind = "synthetic"
task = "preference"
count = 24
"#;

const SFT: &str = r#"
[steps.sft]
kind = "sft"
inputs = { model = "tiny", data = ["instructions"] }
lr = 1e-2
seq_len = 400
micro_batch = 4
max_steps = 4
gradient_checkpointing = true
lora = { r = 4, alpha = 8, dropout = 0.1, targets = "all-linear" }
"#;

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let store = TensorStore::open(dir).unwrap();
    let mut names: Vec<String> = store.names().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = store.tensor(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_sft_trains_the_adapter_only_and_writes_the_merge_and_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), format!("{BASE}{SFT}")).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:#?}");
    let out = dir.path().join("out");
    let (base, sft) = (artifact(&out, "tiny"), artifact(&out, "sft"));
    let adapter_dir = sft.join("adapter");
    assert!(
        adapter_dir.join(ADAPTER_CONFIG).is_file() && adapter_dir.join(ADAPTER_WEIGHTS).is_file()
    );
    let cfg = LlamaConfig::from_path(&base).unwrap();
    let adapter = Adapter::read(&adapter_dir, &cfg, &Device::Cpu).unwrap();
    assert_eq!(adapter.layers.len(), 14, "all-linear: 7 layers x 2 blocks");
    // B started at zero: training moved it.
    assert!(adapter.layers.values().all(|p| p
        .b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0));
    // The artifact is base + the adapter's update, as PEFT merges; the rest of the base is untouched.
    let (base_w, merged_w) = (tensors(&base), tensors(&sft));
    assert_eq!(base_w.len(), merged_w.len());
    for ((name, b), (_, m)) in base_w.iter().zip(&merged_w) {
        let module = name.strip_suffix(".weight").unwrap();
        let want = adapter.merge_weight(module, b).unwrap();
        assert_eq!(max_abs_diff(&want, m), 0.0, "{name}");
        if !adapter.layers.contains_key(module) {
            assert_eq!(max_abs_diff(b, m), 0.0, "{name} is frozen");
        }
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("train_report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdpo_stages_continue_one_adapter_and_a_later_step_reads_its_part() {
    let dir = tempfile::tempdir().unwrap();
    let flow = format!(
        r#"{BASE}{SFT}
[steps.align]
kind = "dpo"
inputs = {{ model = "sft", data = ["prefs"] }}
chunks = 2
chunk_by = "random"
lr = 5e-3
micro_batch = 4
max_length = 256
max_steps = 2
lora = {{ r = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}

[steps.check]
kind = "command"
inputs = {{ adapter = "align/adapter" }}
run = ["sh", "-c", "cp \"$DUS_INPUT_ADAPTER/adapter_config.json\" \"$DUS_OUT/\""]
"#
    );
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:#?}");
    let out = dir.path().join("out");
    let (sft, align) = (artifact(&out, "sft"), artifact(&out, "align"));
    let cfg = LlamaConfig::from_path(&sft).unwrap();
    let stage1 = Adapter::read(&align.join("stage-1/adapter"), &cfg, &Device::Cpu).unwrap();
    let last = Adapter::read(&align.join("adapter"), &cfg, &Device::Cpu).unwrap();
    assert_eq!(stage1.layers.len(), 4);
    // Stage 2 continued stage 1's adapter (B is not back at zero, and it moved on).
    let m = "model.layers.0.self_attn.q_proj";
    assert!(max_abs_diff(&stage1.layers[m].b, &last.layers[m].b) > 0.0);
    // Both stage models are the SFT model merged with the adapter of their stage.
    for (folder, adapter) in [(align.join("stage-1"), &stage1), (align.clone(), &last)] {
        for ((name, b), (_, merged)) in tensors(&sft).iter().zip(&tensors(&folder)) {
            let want = adapter
                .merge_weight(name.strip_suffix(".weight").unwrap(), b)
                .unwrap();
            assert_eq!(
                max_abs_diff(&want, merged),
                0.0,
                "{name} in {}",
                folder.display()
            );
        }
    }
    assert!(artifact(&out, "check").join(ADAPTER_CONFIG).is_file());
}

const KILLED: &str = r#"
[steps.sft]
kind = "sft"
inputs = { model = "tiny", data = ["instructions"] }
lr = 1e-2
seq_len = 400
micro_batch = 2
max_steps = 24
checkpoint_every = 3
lora = { r = 4, alpha = 8, dropout = 0.1, targets = "all-linear" }
"#;

const CHILD: ChildRun = ChildRun {
    test: "lora_training::a_killed_lora_run_resumes_to_the_same_adapter",
    env: "DUSFLOW_LORA_TEST_CHILD",
};

#[test]
fn a_killed_lora_run_resumes_to_the_same_adapter() {
    if CHILD.run_if_child() {
        return;
    }
    let (straight, crashy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [straight.path(), crashy.path()] {
        std::fs::write(d.join("flow.toml"), format!("{BASE}{KILLED}")).unwrap();
    }
    CHILD.run(straight.path());
    let out = crashy.path().join("out");
    CHILD.kill_when(crashy.path(), "a checkpoint of the sft step", || {
        let partial = std::fs::read_dir(out.join(".dus/partial")).ok()?;
        partial.flatten().find_map(|e| {
            std::fs::read_dir(e.path().join("checkpoints"))
                .ok()?
                .flatten()
                .any(|c| c.file_name().to_string_lossy().starts_with("step-"))
                .then_some(())
        })
    });
    CHILD.run(crashy.path());
    let weights = |root: &Path| {
        std::fs::read(
            artifact(&root.join("out"), "sft")
                .join("adapter")
                .join(ADAPTER_WEIGHTS),
        )
        .unwrap()
    };
    assert!(
        weights(straight.path()) == weights(crashy.path()),
        "the resumed adapter differs"
    );
    let _ = DType::F32;
}

/// A `[models.X]` with a PEFT adapter is read as base + adapter merged (PEFT's own merge, bit for bit), made
/// once and reused by every step that reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peft_adapter_folder_is_a_model_input_merged_on_load() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let flow = format!(
        r#"[workflow]
name = "adapter-input"
output = "out"

[models.tuned]
path = "{}"
adapter = "{}"

[steps.copy]
kind = "merge"
inputs = {{ models = ["tuned"] }}
method = "linear"
weights = [1.0]

[steps.files]
kind = "command"
inputs = {{ model = "tuned" }}
run = ["sh", "-c", "ls \"$DUS_INPUT_MODEL\" > \"$DUS_OUT/files.txt\""]
"#,
        fixtures.join("model/llama").display(),
        fixtures.join("lora/qv_down").display()
    );
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:#?}");
    let out = dir.path().join("out");
    let want = candle_core::safetensors::load(
        fixtures.join("lora/qv_down/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let merged = tensors(&artifact(&out, "copy"));
    let mut checked = 0;
    for (name, t) in &merged {
        if let Some(peft) = want.get(&format!("merged.{name}")) {
            assert_eq!(max_abs_diff(t, peft), 0.0, "{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "the six adapted layers");
    // One merged folder, shared by both steps.
    let merged_inputs: Vec<_> = std::fs::read_dir(out.join(".dus/merged-inputs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(merged_inputs.len(), 1);
    let files = std::fs::read_to_string(artifact(&out, "files").join("files.txt")).unwrap();
    assert!(files.contains("model.safetensors"), "{files}");

    // Planned again, nothing runs: the merged input is keyed by the contents of base and adapter.
    let plan = dusflow::engine::plan_workflow(
        dusflow::engine::load(
            &dir.path().join("flow.toml"),
            &dusflow::steps::builtin_registry(),
            &Default::default(),
        )
        .unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(plan.to_run(), 0);
}
