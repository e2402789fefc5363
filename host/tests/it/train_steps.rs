//! The `init`, `pretrain` and `sft` steps in real workflows: init → synthetic data → pretrain → SFT produces Hugging Face
//! folders with metrics and a loss curve; a run killed with SIGKILL resumes from its last checkpoint and
//! ends with the same weights as an uninterrupted run.

use crate::common::{artifact, ChildRun};
use candle_core::{DType, Device};
use dusflow::engine::{self, RunOptions};
use dusflow::model::{init_trainable, load_model, save_model, LlamaConfig, SaveOptions, Tokenizer};
use std::path::Path;
use tokio_util::sync::CancellationToken;

fn tiny_model(dir: &Path) {
    let cfg = LlamaConfig::tiny(dusflow::model::tokenizer::BYTE_VOCAB, 32, 64, 2, 4, 2);
    let (_, model) = init_trainable(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("tiny");
    save_model(&path, &model, &SaveOptions::default()).unwrap();
    Tokenizer::save_byte_level(&path).unwrap();
}

const FLOW: &str = r#"
[workflow]
name = "train"
seed = 11
output = "out"

[steps.tiny]
kind = "init"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2

[datasets.extra]
path = "extra.jsonl"
format = "prompt-completion"
fields = { prompt = "q", completion = "a" }
max_samples = 5

[steps.corpus]
kind = "synthetic"
task = "text"
count = 60

[steps.pretrain]
kind = "pretrain"
inputs = { model = "tiny", data = ["corpus"] }
lr = 3e-3
seq_len = 64
micro_batch = 4
max_steps = 6
warmup_steps = 1
checkpoint_every = 2

[steps.instructions]
kind = "synthetic"
task = "alpaca"
count = 24

[steps.sft]
kind = "sft"
inputs = { model = "pretrain", data = ["instructions", "extra"] }
lr = 1e-3
seq_len = 256
micro_batch = 4
grad_accum = 2
packing = true
epochs = 1
"#;

#[tokio::test(flavor = "multi_thread")]
async fn synthetic_data_to_pretrain_to_sft_writes_trained_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let extra: String = (0..9)
        .map(|i| format!("{{\"q\": \"Say {i}.\", \"a\": \" {i}\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("extra.jsonl"), extra).unwrap();
    std::fs::write(dir.path().join("flow.toml"), FLOW).unwrap();
    let registry = dusflow::steps::builtin_registry();
    let summary = engine::run(
        &dir.path().join("flow.toml"),
        &registry,
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.succeeded(), "{summary:?}");

    let out = dir.path().join("out");
    let init = artifact(&out, "tiny");
    let cfg = LlamaConfig::from_path(&init).unwrap();
    assert_eq!(
        (cfg.vocab_size, cfg.num_hidden_layers, cfg.eos_ids()),
        (259, 2, vec![257])
    );
    assert_eq!(
        Tokenizer::from_model_dir(&init).unwrap().eos_id(),
        Some(257)
    );
    for step in ["pretrain", "sft"] {
        let a = artifact(&out, step);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "metrics.jsonl",
            "loss.svg",
            "train_report.json",
        ] {
            assert!(a.join(f).is_file(), "{step}: missing {f}");
        }
        assert!(
            !a.join("checkpoints").exists(),
            "{step}: checkpoints are removed from the artifact"
        );
        load_model(&a, DType::F32, &Device::Cpu).unwrap();
        assert!(std::fs::read_to_string(a.join("loss.svg"))
            .unwrap()
            .contains("<svg"));
    }
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact(&out, "sft").join("train_report.json")).unwrap(),
    )
    .unwrap();
    let datasets = report["datasets"].as_array().unwrap();
    assert_eq!(datasets[0]["format"], "alpaca");
    assert_eq!(
        (
            datasets[1]["available"].as_u64(),
            datasets[1]["used"].as_u64()
        ),
        (Some(9), Some(5))
    );
    assert_eq!(
        report["steps"].as_u64(),
        Some(29u64.div_ceil(8).min(report["steps"].as_u64().unwrap()))
    );
    let pre = std::fs::read_to_string(artifact(&out, "pretrain").join("metrics.jsonl")).unwrap();
    assert_eq!(pre.lines().count(), 6);

    let again = engine::run(
        &dir.path().join("flow.toml"),
        &registry,
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(again.count("cached"), 5, "{again:?}");
}

const LONG: &str = r#"
[workflow]
name = "resume"
seed = 2
output = "out"

[models.tiny]
path = "tiny"

[steps.corpus]
kind = "synthetic"
task = "text"
count = 100

[steps.pretrain]
kind = "pretrain"
inputs = { model = "tiny", data = ["corpus"] }
lr = 2e-3
seq_len = 32
micro_batch = 2
max_steps = 40
checkpoint_every = 4
"#;

const CHILD: ChildRun = ChildRun {
    test: "train_steps::a_run_killed_with_sigkill_resumes_and_ends_with_the_same_weights",
    env: "DUSFLOW_TRAIN_TEST_CHILD",
};

fn checkpoint_exists(out: &Path) -> bool {
    let partial = out.join(".dus/partial");
    let Ok(entries) = std::fs::read_dir(partial) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_dir(e.path().join("checkpoints"))
            .map(|c| {
                c.filter_map(|x| x.ok())
                    .any(|x| x.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false)
    })
}

#[test]
fn a_run_killed_with_sigkill_resumes_and_ends_with_the_same_weights() {
    if CHILD.run_if_child() {
        return;
    }
    let (straight, crashy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [straight.path(), crashy.path()] {
        tiny_model(d);
        std::fs::write(d.join("flow.toml"), LONG).unwrap();
    }
    CHILD.run(straight.path());
    let out = crashy.path().join("out");
    CHILD.kill_when(crashy.path(), "a checkpoint", || {
        checkpoint_exists(&out).then_some(())
    });
    assert!(
        std::fs::read_dir(crashy.path().join("out"))
            .unwrap()
            .all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("pretrain-")),
        "no pretrain artifact after the kill"
    );
    CHILD.run(crashy.path());

    let a = artifact(&straight.path().join("out"), "pretrain");
    let b = artifact(&crashy.path().join("out"), "pretrain");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("train_report.json")).unwrap()).unwrap();
    assert!(report["resumed_from"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn bad_training_parameters_are_reported_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let flow = r#"
[workflow]
name = "bad"

[models.m]
path = "m"

[datasets.d]
path = "d.jsonl"

[steps.sft]
kind = "sft"
inputs = { model = "m", data = ["d"] }
lr = 0.0
warmup_steps = 3
warmup_ratio = 0.1
separate_documents = true
micro_batch = 0
eval_every = 5
"#;
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let err = match dusflow::workflow::Workflow::load(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
    ) {
        Ok(_) => panic!("the workflow should be invalid"),
        Err(e) => e.to_string(),
    };
    for key in [
        "steps.sft.lr",
        "steps.sft.warmup_ratio",
        "steps.sft.separate_documents",
        "steps.sft.micro_batch",
        "steps.sft.eval_every",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(err.contains("inputs.eval_data"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn data_filter_plugins_run_at_load_time_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/length-filter")
        .canonicalize()
        .unwrap();
    let mut docs = String::new();
    for i in 0..40 {
        let text = if i % 4 == 0 {
            format!("a long document number {i} that the filter drops")
        } else {
            format!("doc {i}.")
        };
        docs.push_str(&serde_json::json!({ "text": text }).to_string());
        docs.push('\n');
    }
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    let flow = format!(
        r#"
[workflow]
name = "filters"
output = "out"

[models.tiny]
path = "tiny"

[plugins.short]
path = "{}"
build = true

[datasets.docs]
path = "docs.jsonl"
format = "text"
filters = ["short"]

[steps.pretrain]
kind = "pretrain"
inputs = {{ model = "tiny", data = ["docs"] }}
seq_len = 16
micro_batch = 2
max_steps = 2
filter_params.short = {{ max_chars = 20 }}
"#,
        plugin.display()
    );
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = engine::run(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.succeeded(), "{summary:?}");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact(&dir.path().join("out"), "pretrain").join("train_report.json"))
            .unwrap(),
    )
    .unwrap();
    let f = &report["datasets"][0]["filters"][0];
    assert_eq!(f["filter"], "short");
    assert_eq!(
        (
            f["seen"].as_u64(),
            f["kept"].as_u64(),
            f["dropped"].as_u64()
        ),
        (Some(40), Some(30), Some(10)),
        "{f}"
    );
    assert_eq!(report["datasets"][0]["used"].as_u64(), Some(30));
}

/// The paper filters its instruction data against the benchmarks (Tab. 8): the same with `decontaminate`.
#[tokio::test(flavor = "multi_thread")]
async fn sft_data_is_decontaminated_against_benchmark_files() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let bench = dir.path().join("benchmarks");
    std::fs::create_dir(&bench).unwrap();
    let leaked = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May";
    std::fs::write(
        bench.join("gsm8k.jsonl"),
        serde_json::json!({ "question": leaked }).to_string(),
    )
    .unwrap();
    let mut records = String::new();
    for i in 0..8 {
        let instruction = if i % 4 == 1 {
            format!("{leaked}. How many clips? ({i})")
        } else {
            format!("Add {i} and {i}.")
        };
        records.push_str(
            &serde_json::json!({ "instruction": instruction, "output": format!("{}", 2 * i) })
                .to_string(),
        );
        records.push('\n');
    }
    std::fs::write(dir.path().join("orca.jsonl"), records).unwrap();
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/decontaminate")
        .canonicalize()
        .unwrap();
    let flow = format!(
        r#"
[workflow]
name = "decon"
output = "out"

[models.tiny]
path = "tiny"

[plugins.decon]
path = "{plugin}"
build = true
grants.read = ["{bench}"]

[datasets.orca]
path = "orca.jsonl"
format = "alpaca"
filters = ["decon"]

[steps.sft]
kind = "sft"
inputs = {{ model = "tiny", data = ["orca"] }}
seq_len = 256
micro_batch = 2
max_steps = 1
filter_params.decon = {{ benchmarks_dir = "{bench}", field = "instruction", n = 8 }}
"#,
        plugin = plugin.display(),
        bench = bench.display()
    );
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = engine::run(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.succeeded(), "{summary:?}");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact(&dir.path().join("out"), "sft").join("train_report.json")).unwrap(),
    )
    .unwrap();
    let f = &report["datasets"][0]["filters"][0];
    assert_eq!(
        (f["kept"].as_u64(), f["dropped"].as_u64()),
        (Some(6), Some(2)),
        "{f}"
    );
}
