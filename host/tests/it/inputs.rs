//! Inputs are checked before anything is written, and bad ones are errors that name the place: merge and
//! scale refuse broken or mismatched models, damaged checkpoints name the tensor and the bytes, an input
//! truncated while a step reads it fails that step (no SIGBUS) while the rest of the run goes on, empty
//! dataset files are named, and plans end: special files, huge sweeps and huge names are refused quickly,
//! and unchanged inputs plan without being read again.

use crate::common::{failure_of, Project};
use crate::plugins_common::{load, plugin_dir};
use dusflow::engine::{self, RunOptions, RunSummary};
use dusflow::model::TensorStore;
use dusflow::steps::merge::stream::{merge, NamedModel};
use dusflow::steps::merge::MergeConfig;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A copy of fixture model folder `rel` (under tests/fixtures) at `to`.
fn copy_model(rel: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fixtures().join(rel)).unwrap() {
        let from = entry.unwrap().path();
        std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
    }
    to.to_path_buf()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Merges `a` and `b` linearly into a fresh folder; the error, and whether a checkpoint was written.
fn merge_error(a: &Path, b: &Path) -> (String, bool) {
    let out = tempfile::tempdir().unwrap();
    let named = |name: &str, path: &Path| NamedModel {
        name: name.into(),
        path: path.to_path_buf(),
    };
    let config: MergeConfig = toml::from_str("method = \"linear\"").unwrap();
    let err = merge(
        &config,
        &[named("a", a), named("b", b)],
        None,
        0,
        out.path(),
        false,
        &ProgressBar::hidden(),
        &|| false,
    )
    .unwrap_err();
    let wrote = std::fs::read_dir(out.path()).unwrap().next().is_some();
    (format!("{err:#}"), wrote)
}

#[test]
fn merge_checks_every_input_model_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| copy_model("merge/models/a", &tmp.path().join(name));
    let b = copy_model("merge/models/b", &tmp.path().join("b"));

    let broken = fresh("broken");
    std::fs::write(broken.join("config.json"), "{ not json").unwrap();
    let (err, wrote) = merge_error(&broken, &b);
    assert!(
        err.contains("model `a`") && err.contains("config.json"),
        "{err}"
    );
    assert!(err.contains("invalid config.json"), "{err}");
    assert!(!wrote, "nothing is written for a broken input");

    let missing = fresh("missing");
    std::fs::remove_file(missing.join("config.json")).unwrap();
    let (err, wrote) = merge_error(&missing, &b);
    assert!(err.contains("no config.json in the folder"), "{err}");
    assert!(!wrote);

    let layers = fresh("layers");
    edit_config(&layers, |c| c["num_hidden_layers"] = 99.into());
    let (err, wrote) = merge_error(&layers, &b);
    assert!(
        err.contains("missing tensor \"model.layers.3.input_layernorm.weight\""),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "names the file: {err}");
    assert!(!wrote);

    let fewer = fresh("fewer");
    edit_config(&fewer, |c| c["num_hidden_layers"] = 2.into());
    let (err, _) = merge_error(&fewer, &b);
    assert!(
        err.contains("belongs to layer 2, but config.json says num_hidden_layers = 2"),
        "{err}"
    );

    let mistral = copy_model("merge/models/b", &tmp.path().join("mistral"));
    edit_config(&mistral, |c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["model_type"] = "mistral".into();
    });
    let (err, wrote) = merge_error(&fresh("a2"), &mistral);
    assert!(
        err.contains("model `b` is [\"MistralForCausalLM\"] (mistral) but model `a` is [\"LlamaForCausalLM\"] (llama)"),
        "{err}"
    );
    assert!(!wrote);

    let odd = fresh("odd");
    edit_config(&odd, |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let (err, _) = merge_error(&odd, &b);
    assert!(
        err.contains("unsupported architecture \"GPT2LMHeadModel\""),
        "{err}"
    );
}

/// A scale project over one model folder `model`, SOLAR-like on its 32 layers.
async fn scale(model: &Path) -> (Project, RunSummary) {
    let p = Project::new(&format!(
        "[workflow]\nname = \"scale\"\noutput = \"out\"\n\n[models.m]\npath = {:?}\n\n\
         [steps.up]\nkind = \"scale\"\ninputs = {{ model = \"m\" }}\npolicy = \"solar\"\nm = 8\n",
        model.display().to_string()
    ));
    let summary = run(&p).await;
    (p, summary)
}

async fn run(p: &Project) -> RunSummary {
    engine::run(
        &p.workflow(),
        &dusflow::steps::builtin_registry(),
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect("run")
}

#[tokio::test]
async fn scale_refuses_models_it_cannot_run_or_that_lack_their_head() {
    let tmp = tempfile::tempdir().unwrap();
    let base = "scale/models/base";

    let heads = copy_model(base, &tmp.path().join("heads"));
    edit_config(&heads, |c| c["num_key_value_heads"] = 3.into());
    let (_, s) = scale(&heads).await;
    let err = failure_of(&s, "up");
    assert!(
        err.contains("num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
        "{err}"
    );

    let arch = copy_model(base, &tmp.path().join("arch"));
    edit_config(&arch, |c| {
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        c["model_type"] = "qwen2".into();
    });
    let (_, s) = scale(&arch).await;
    let err = failure_of(&s, "up");
    assert!(
        err.contains("unsupported architecture \"Qwen2ForCausalLM\""),
        "{err}"
    );

    // A sharded checkpoint whose index leaves out the head of an untied model.
    let headless = copy_model(base, &tmp.path().join("headless"));
    let store = TensorStore::open(&headless).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = store
        .names()
        .filter(|n| *n != "lm_head.weight")
        .map(|n| (n.to_string(), "model-00001-of-00001.safetensors".into()))
        .collect();
    drop(store);
    std::fs::rename(
        headless.join("model.safetensors"),
        headless.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    std::fs::write(
        headless.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    )
    .unwrap();
    let (p, s) = scale(&headless).await;
    let err = failure_of(&s, "up");
    assert!(
        err.contains(
            "missing tensor \"lm_head.weight\" (config.json has tie_word_embeddings = false"
        ),
        "{err}"
    );
    assert!(
        !p.path("out").exists()
            || std::fs::read_dir(p.path("out")).unwrap().all(|e| !e
                .unwrap()
                .path()
                .join("manifest.json")
                .exists()),
        "no artifact"
    );
}

/// Rewrites the single-file checkpoint of `dir` without `tensor`.
fn drop_tensor(dir: &Path, tensor: &str) {
    let file = dir.join("model.safetensors");
    let store = TensorStore::open(&file).unwrap();
    let specs: Vec<dusflow::model::TensorSpec> = store
        .metas()
        .filter(|m| m.name != tensor)
        .map(|m| dusflow::model::TensorSpec::new(m.name, m.dtype, m.shape.to_vec()))
        .collect();
    let tmp = dir.join("rewritten.safetensors");
    dusflow::model::write_safetensors(&tmp, &specs, |s| {
        Ok(std::borrow::Cow::Owned(store.bytes(&s.name)?))
    })
    .unwrap();
    drop(store);
    std::fs::rename(tmp, file).unwrap();
}

#[tokio::test]
async fn damaged_checkpoints_name_the_tensor_and_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = "scale/models/base";

    let missing = copy_model(base, &tmp.path().join("missing"));
    drop_tensor(&missing, "model.layers.1.mlp.up_proj.weight");
    let (_, s) = scale(&missing).await;
    let err = failure_of(&s, "up");
    assert!(
        err.contains("missing tensor \"model.layers.1.mlp.up_proj.weight\""),
        "{err}"
    );
    assert!(err.contains("missing/model.safetensors"), "{err}");

    let truncated = copy_model(base, &tmp.path().join("truncated"));
    let file = truncated.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let (_, s) = scale(&truncated).await;
    let err = failure_of(&s, "up");
    assert!(err.contains("truncated tensor data: tensor \""), "{err}");
    assert!(err.contains("but the file holds only"), "{err}");
    assert!(err.contains("bytes of tensor data expected"), "{err}");

    // A header whose byte range disagrees with dtype × shape: make one shape claim more elements.
    let lying = copy_model(base, &tmp.path().join("lying"));
    let file = lying.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("\"model.norm.weight\"").unwrap();
    let shape = header[at..].find("\"shape\":[16]").unwrap() + at;
    let forged = format!(
        "{}\"shape\":[17]{}",
        &header[..shape],
        &header[shape + 12..]
    );
    assert_eq!(forged.len(), n);
    let mut out = bytes[..8].to_vec();
    out.extend(forged.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&file, out).unwrap();
    let (_, s) = scale(&lying).await;
    let err = failure_of(&s, "up");
    assert!(
        err.contains("tensor \"model.norm.weight\": holds 32 bytes") && err.contains("needs 34"),
        "{err}"
    );
}

fn dus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dus"))
}

/// Runs `dus ARGS` in `dir` to the end (failing after `limit`); output goes through files, so a chatty
/// process never blocks on a full pipe.
fn run_dus(args: &[&str], dir: &Path, limit: Duration) -> (Output, Duration) {
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("out"), logs.path().join("err"));
    let started = Instant::now();
    let mut child = dus()
        .args(args)
        .current_dir(dir)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("dus {:?} did not finish in {limit:?}", &args[..1]);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: std::fs::read(out_path).unwrap(),
        stderr: std::fs::read(err_path).unwrap(),
    };
    (output, started.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_input_truncated_while_a_step_reads_it_fails_that_step_not_the_process() {
    // A merge-rule plugin with a write grant on the input folder cuts the model file short as soon as
    // the merge asks it about the first tensor: the store has opened the file, the next reads fall off
    // its end. With memory-mapped inputs this was SIGBUS for the whole process.
    load("misbehaving-merge");
    let dir = tempfile::tempdir().unwrap();
    let a = copy_model("merge/models/a", &dir.path().join("a"));
    let b = copy_model("merge/models/b", &dir.path().join("b"));
    std::fs::write(
        dir.path().join("flow.toml"),
        format!(
            r#"
[workflow]
name = "truncated"
output = "out"

[models.a]
path = "{a}"

[models.b]
path = "{b}"

[plugins.cutter]
path = "{plugin}"
build = true
grants = {{ write = ["{a}"] }}

[steps.merged]
kind = "merge"
inputs = {{ models = ["a", "b"] }}
plugin = "cutter"
plugin_params = {{ value = "mean", truncate = "{file}", to = 1000 }}

[steps.unrelated]
kind = "command"
run = "sleep 1; echo fine > $DUS_OUT/out.txt"
"#,
            a = a.display(),
            b = b.display(),
            plugin = plugin_dir("misbehaving-merge").display(),
            file = a.join("model.safetensors").display(),
        ),
    )
    .unwrap();
    let (out, _) = run_dus(&["run", "flow.toml"], dir.path(), Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed step, not a signal: {err}"
    );
    assert!(err.contains("model `a`"), "{err}");
    assert!(err.contains("reading tensor \""), "{err}");
    assert!(err.contains("but the file has 1000 bytes now"), "{err}");
    let unrelated = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("unrelated-")
        })
        .expect("the unrelated step ran");
    assert_eq!(
        std::fs::read_to_string(unrelated.join("out.txt")).unwrap(),
        "fine\n"
    );
}

#[tokio::test]
async fn empty_dataset_files_are_named() {
    let p = Project::new(
        "[workflow]\nname = \"pairs\"\noutput = \"out\"\n\n\
         [datasets.better]\npath = \"better.jsonl\"\n\n[datasets.worse]\npath = \"worse.jsonl\"\n\n\
         [steps.pairs]\nkind = \"preference-pairs\"\ninputs = { chosen = \"better\", rejected = \"worse\" }\n",
    );
    p.write("better.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n");
    p.write("worse.jsonl", "\n\n");
    let err = failure_of(&run(&p).await, "pairs");
    assert!(
        err.contains("worse.jsonl: the dataset file is empty (no records)"),
        "{err}"
    );
}

#[test]
fn special_files_are_refused_when_the_workflow_loads() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model-pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::write(
        dir.path().join("flow.toml"),
        "[workflow]\nname = \"special\"\noutput = \"out\"\n\n\
         [models.m]\npath = \"model-pipe\"\n\n[datasets.d]\npath = \"/dev/zero\"\n\n\
         [steps.s]\nkind = \"command\"\nrun = \"true\"\n",
    )
    .unwrap();
    let (out, took) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("models.m.path"), "{err}");
    assert!(
        err.contains("is a FIFO (named pipe), not a file or folder"),
        "{err}"
    );
    assert!(err.contains("datasets.d.path"), "{err}");
    assert!(err.contains("/dev/zero is a character device"), "{err}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn huge_sweeps_and_huge_names_end_quickly_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    std::fs::write(
        dir.path().join("flow.toml"),
        format!(
            "[workflow]\nname = \"sweep\"\noutput = \"out\"\n\n[steps.s]\nkind = \"command\"\nrun = \"true\"\n\
             sweep = {{ a = [{}] }}\n",
            values.join(", ")
        ),
    )
    .unwrap();
    let (out, _) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("steps.s.sweep"), "{err}");
    assert!(
        err.contains("the sweep has 1001 points, more than the 1000 a step may have"),
        "{err}"
    );

    // 300,000 points, never expanded.
    let axis = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    std::fs::write(
        dir.path().join("flow.toml"),
        format!(
            "[workflow]\nname = \"sweep\"\noutput = \"out\"\n\n[steps.s]\nkind = \"command\"\nrun = \"true\"\n\
             sweep = {{ a = [{}], b = [{}], c = [{}] }}\n",
            axis(100),
            axis(100),
            axis(30)
        ),
    )
    .unwrap();
    let (out, took) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(30));
    let err = text(&out.stderr);
    assert!(err.contains("the sweep has 100 × 100 × 30 points"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // A 1 MB unknown name in `inputs`: no "did you mean" over it.
    let name = "x".repeat(1 << 20);
    std::fs::write(
        dir.path().join("flow.toml"),
        format!(
            "[workflow]\nname = \"names\"\noutput = \"out\"\n\n[steps.first]\nkind = \"command\"\nrun = \"true\"\n\n\
             [steps.s]\nkind = \"command\"\nrun = \"true\"\ninputs = {{ prev = \"{name}\" }}\n"
        ),
    )
    .unwrap();
    let (out, took) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2));
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn an_unchanged_large_input_plans_without_being_read_again() {
    // A 4 GiB sparse model file: reading it costs seconds, a stat does not. The first `dus plan` hashes it
    // and keeps the hash although the workflow has never run (no output folder yet).
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let big = std::fs::File::create(model.join("model.safetensors")).unwrap();
    big.set_len(4 << 30).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    big.set_modified(old).unwrap();
    drop(big);
    std::fs::write(
        dir.path().join("flow.toml"),
        "[workflow]\nname = \"big\"\noutput = \"out\"\n\n[models.m]\npath = \"model\"\n\n\
         [steps.up]\nkind = \"scale\"\ninputs = { model = \"m\" }\npolicy = \"solar\"\nm = 8\n",
    )
    .unwrap();
    let (first, first_took) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(300));
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        dir.path().join("out/.dus/file-hashes.json").exists(),
        "the hash cache is kept before the first run"
    );
    let (second, took) = run_dus(&["plan", "flow.toml"], dir.path(), Duration::from_secs(300));
    assert!(second.status.success(), "{}", text(&second.stderr));
    eprintln!("first plan {first_took:?} (hashing 4 GiB), second {took:?}");
    assert_eq!(first.stdout, second.stdout, "the same plan");
    assert!(
        took < Duration::from_secs(3),
        "an unchanged 4 GiB input planned in {took:?}"
    );
}
