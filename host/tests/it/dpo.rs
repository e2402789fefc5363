//! The `dpo` step: losses and their gradients equal TRL's own loss code on fixed log-probs (fixture), the
//! sigmoid loss is ln 2
//! when policy = reference, a toy preference set is learned through a real workflow, sDPO with two chunks
//! uses M_1 as the second reference, and bad input is reported clearly.

use crate::common::{artifact, run_flow, ChildRun};
use candle_core::{DType, Device};
use dusflow::model::{load_model, Tokenizer};
use dusflow::train::dpo::{
    dpo_losses, pair_metric_sums, reference_pass, sequence_logps, tokenize_pair, vector,
    DpoLossConfig, DpoLossKind, PairLimits, PreferencePair, ReferenceLogps,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo/dpo_losses.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn losses_gradients_and_metrics_equal_trl_on_fixed_log_probs() {
    let fx = fixture();
    let d = Device::Cpu;
    let tokens =
        |key: &str| -> Vec<Vec<f32>> { fx[key].as_array().unwrap().iter().map(floats).collect() };
    let (chosen_tok, rejected_tok) = (tokens("chosen_token_logps"), tokens("rejected_token_logps"));
    let sum = |t: &[Vec<f32>]| -> Vec<f32> { t.iter().map(|r| r.iter().sum()).collect() };
    let len = |t: &[Vec<f32>]| -> Vec<f32> { t.iter().map(|r| r.len() as f32).collect() };
    let (pc, pr) = (sum(&chosen_tok), sum(&rejected_tok));
    let (rc, rr) = (floats(&fx["ref_chosen"]), floats(&fx["ref_rejected"]));
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let kind: DpoLossKind = serde_json::from_value(case["loss"].clone()).unwrap();
        let cfg = DpoLossConfig {
            kind,
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        };
        let (policy_c, policy_r) = (
            candle_core::Var::new(pc.as_slice(), &d).unwrap(),
            candle_core::Var::new(pr.as_slice(), &d).unwrap(),
        );
        let losses = dpo_losses(
            &cfg,
            policy_c.as_tensor(),
            policy_r.as_tensor(),
            &vector(&rc, &d).unwrap(),
            &vector(&rr, &d).unwrap(),
            &vector(&len(&chosen_tok), &d).unwrap(),
            &vector(&len(&rejected_tok), &d).unwrap(),
        )
        .unwrap();
        let got = losses.to_vec1::<f32>().unwrap();
        // d loss_i / d log p(chosen_i) and d loss_i / d log p(rejected_i), as torch autograd gives them.
        let grads = losses.sum_all().unwrap().backward().unwrap();
        for (var, key) in [(&policy_c, "grad_chosen"), (&policy_r, "grad_rejected")] {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (g, w)) in g.iter().zip(floats(&case[key])).enumerate() {
                let tol = 1e-6 * w.abs().max(1.0);
                assert!(
                    (g - w).abs() <= tol,
                    "{cfg:?} {key} pair {i}: {g} vs TRL {w}"
                );
            }
        }
        let want = floats(&case["per_pair"]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!((g - w).abs() <= tol, "{cfg:?} pair {i}: {g} vs TRL {w}");
        }
        let mean = got.iter().map(|&x| x as f64).sum::<f64>() / got.len() as f64;
        let want_mean = case["mean"].as_f64().unwrap();
        assert!(
            (mean - want_mean).abs() <= 1e-6 * want_mean.abs().max(1.0),
            "{cfg:?} mean: {mean} vs TRL {want_mean}"
        );
        let m: Vec<usize> = fx["metric_pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as usize)
            .collect();
        let pick = |v: &[f32]| -> Vec<f32> { m.iter().map(|&i| v[i]).collect() };
        let sums = pair_metric_sums(cfg.beta, &pick(&pc), &pick(&pr), &pick(&rc), &pick(&rr));
        for (name, s) in sums {
            let want = case["metrics"][name].as_f64().unwrap();
            let got = s / m.len() as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name}: {got} vs TRL {want}"
            );
        }
    }
    assert!(fx["trl"].as_str().unwrap().starts_with("1.16"));
}

const FLOW: &str = r#"
[workflow]
name = "dpo"
seed = 5
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2

[steps.pairs]
kind = "synthetic"
task = "preference"
count = 16

[steps.align]
kind = "dpo"
inputs = { model = "tiny", data = ["pairs"] }
beta = 0.5
lr = 5e-3
micro_batch = 4
epochs = 16
warmup_steps = 0
schedule = "constant"
"#;

fn read_pairs(file: &Path, tok: &Tokenizer) -> Vec<PreferencePair> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            tokenize_pair(
                tok,
                &s("prompt"),
                &s("chosen"),
                &s("rejected"),
                true,
                PairLimits {
                    max_length: Some(1024),
                    max_prompt_length: None,
                },
            )
            .unwrap()
            .unwrap()
        })
        .collect()
}

fn metrics(a: &Path) -> Vec<Value> {
    std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn toy_preferences_are_learned_and_the_first_loss_is_ln2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), FLOW).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let out = dir.path().join("out");
    let a = artifact(&out, "align");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "dpo.svg",
        "dpo_report.json",
    ] {
        assert!(a.join(f).is_file(), "missing {f}");
    }
    assert!(!a.join(".dpo-work").exists());

    let m = metrics(&a);
    assert_eq!(m.len(), 64);
    let first = m[0]["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-6,
        "first loss {first}"
    );
    // Reference and policy passes batch pairs differently, so the margin is 0 up to f32 rounding.
    assert!(
        m[0]["rewards/margins"].as_f64().unwrap().abs() < 1e-5,
        "{}",
        m[0]
    );
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
    ] {
        assert!(m[5][key].is_number(), "metrics lack {key}: {}", m[5]);
    }
    assert_eq!(m[63]["stage"].as_u64(), Some(1));

    // Reward accuracy of the trained model on all training pairs, against the initial model.
    let tok = Tokenizer::from_model_dir(&a).unwrap();
    let pairs = read_pairs(&artifact(&out, "pairs").join("data.jsonl"), &tok);
    let pad = tok.pad_id().unwrap();
    let score = |dir: &Path| {
        let model = load_model(dir, DType::F32, &Device::Cpu).unwrap();
        reference_pass(&model, &pairs, 8, pad, &mut |_| Ok(())).unwrap()
    };
    let (before, after) = (score(&artifact(&out, "tiny")), score(&a));
    let right = (0..pairs.len())
        .filter(|&i| after.chosen[i] - before.chosen[i] > after.rejected[i] - before.rejected[i])
        .count();
    let accuracy = right as f64 / pairs.len() as f64;
    assert!(accuracy > 0.9, "reward accuracy {accuracy}");
    let mean_acc = |r: &[Value]| {
        r.iter()
            .map(|x| x["rewards/accuracies"].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    let (early, late) = (mean_acc(&m[..8]), mean_acc(&m[m.len() - 8..]));
    assert!(
        late > early && late >= 0.75,
        "logged reward accuracy {early} -> {late}"
    );
}

const SDPO: &str = r#"
[workflow]
name = "sdpo"
seed = 9
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2

[steps.easy]
kind = "synthetic"
task = "preference"
count = 8
max_operand = 9

[steps.hard]
kind = "synthetic"
task = "preference"
count = 6
seed = 3

[steps.align]
kind = "dpo"
inputs = { model = "tiny", data = ["easy", "hard"] }
chunks = 2
chunk_by = "dataset"
lr = 2e-3
micro_batch = 4
max_steps = 3

[steps.average]
kind = "merge"
inputs = { models = ["align/stage-1", "align"] }
method = "linear"
weights = [0.5, 0.5]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn sdpo_with_two_chunks_uses_stage_one_as_the_second_reference() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), SDPO).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let out = dir.path().join("out");
    let a = artifact(&out, "align");
    let stage1 = a.join("stage-1");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(stage1.join(f).is_file(), "stage-1 lacks {f}");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(a.join("dpo_report.json")).unwrap()).unwrap();
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0]["pairs"].as_u64(), Some(8));
    assert_eq!(stages[1]["pairs"].as_u64(), Some(6));
    assert_eq!(stages[0]["chunk"]["datasets"]["easy"].as_u64(), Some(8));
    assert_eq!(stages[1]["chunk"]["datasets"]["hard"].as_u64(), Some(6));
    let (r1, r2) = (&stages[0]["reference"], &stages[1]["reference"]);
    assert_eq!(r1["source"], "input model \"tiny\"");
    assert_eq!(r2["source"], "stage-1");
    assert_ne!(r1["blake3"], r2["blake3"]);
    assert_eq!(stages[1]["initial"], stages[1]["reference"]);
    assert_eq!(stages[1]["output"], ".");

    // The stored stage-2 reference pass = M_1's log-probs of chunk 2.
    let tok = Tokenizer::from_model_dir(&a).unwrap();
    let chunk2 = read_pairs(&artifact(&out, "hard").join("data.jsonl"), &tok);
    let m1 = load_model(&stage1, DType::F32, &Device::Cpu).unwrap();
    let want = reference_pass(&m1, &chunk2, 3, tok.pad_id().unwrap(), &mut |_| Ok(())).unwrap();
    let stored: Value =
        serde_json::from_slice(&std::fs::read(a.join("reference_logps/stage-2.json")).unwrap())
            .unwrap();
    let got_c = floats(&stored["logps"]["chosen"]);
    let got_r = floats(&stored["logps"]["rejected"]);
    for i in 0..chunk2.len() {
        assert!(
            (got_c[i] - want.chosen[i]).abs() < 1e-4,
            "pair {i}: {} vs {}",
            got_c[i],
            want.chosen[i]
        );
        assert!((got_r[i] - want.rejected[i]).abs() < 1e-4);
    }
    let m0 = load_model(&artifact(&out, "tiny"), DType::F32, &Device::Cpu).unwrap();
    let under_m0 = reference_pass(&m0, &chunk2, 3, tok.pad_id().unwrap(), &mut |_| Ok(())).unwrap();
    assert!(
        (0..chunk2.len()).any(|i| (under_m0.chosen[i] - got_c[i]).abs() > 1e-3),
        "stage 2's reference must not be M_0"
    );
    // Both stages start with loss ln 2: each stage's reference is its own starting model.
    let m = metrics(&a);
    assert_eq!(m.len(), 6);
    for i in [0, 3] {
        let loss = m[i]["loss"].as_f64().unwrap();
        assert!(
            (loss - std::f64::consts::LN_2).abs() < 1e-6,
            "stage start {i}: loss {loss}"
        );
    }
    assert_eq!(m[3]["stage"].as_u64(), Some(2));
    // The intermediate model is a part other steps use: M_1 and M_2 averaged.
    let average = artifact(&out, "average");
    load_model(&average, DType::F32, &Device::Cpu).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn held_out_pairs_are_scored_in_each_stage_against_that_stages_reference() {
    let flow = SDPO
        .replace(
            "inputs = { model = \"tiny\", data = [\"easy\", \"hard\"] }",
            "inputs = { model = \"tiny\", data = [\"easy\", \"hard\"], eval_data = [\"held\"] }\n\
             eval_every = 2\nbeta = 0.1",
        )
        .replace(
            "[steps.average]",
            "[steps.held]\nkind = \"synthetic\"\ntask = \"preference\"\ncount = 7\nseed = 11\n\n\
             [steps.average]",
        );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let out = dir.path().join("out");
    let a = artifact(&out, "align");
    let m = metrics(&a);
    // Each stage has 3 steps: scored at its 2nd and its last.
    let scored: Vec<(u64, usize)> = m
        .iter()
        .enumerate()
        .filter(|(_, x)| x["eval_loss"].is_number())
        .map(|(i, x)| (x["stage"].as_u64().unwrap(), i))
        .collect();
    assert_eq!(scored, vec![(1, 1), (1, 2), (2, 4), (2, 5)]);

    // The last score of each stage is the DPO loss and reward accuracy of M_t against M_(t-1) on the
    // held-out pairs, from log-probs taken apart from the step.
    let tok = Tokenizer::from_model_dir(&a).unwrap();
    let held = read_pairs(&artifact(&out, "held").join("data.jsonl"), &tok);
    let logps = |dir: &Path| {
        let model = load_model(dir, DType::F32, &Device::Cpu).unwrap();
        reference_pass(&model, &held, 3, tok.pad_id().unwrap(), &mut |_| Ok(())).unwrap()
    };
    let (m0, m1, m2) = (
        logps(&artifact(&out, "tiny")),
        logps(&a.join("stage-1")),
        logps(&a),
    );
    let dpo = |policy: &ReferenceLogps, reference: &ReferenceLogps| {
        let margins: Vec<f64> = (0..held.len())
            .map(|i| {
                0.1 * ((policy.chosen[i] - reference.chosen[i])
                    - (policy.rejected[i] - reference.rejected[i])) as f64
            })
            .collect();
        let loss = margins.iter().map(|z| (1.0 + (-z).exp()).ln()).sum::<f64>() / held.len() as f64;
        let accuracy = margins.iter().filter(|z| **z > 0.0).count() as f64 / held.len() as f64;
        (loss, accuracy)
    };
    for (line, (loss, accuracy)) in [(2, dpo(&m1, &m0)), (5, dpo(&m2, &m1))] {
        let logged = m[line]["eval_loss"].as_f64().unwrap();
        assert!(
            (logged - loss).abs() < 1e-5,
            "line {line}: held-out loss {logged} vs {loss}"
        );
        assert_eq!(
            m[line]["eval_rewards/accuracies"].as_f64().unwrap(),
            accuracy,
            "line {line}"
        );
    }
    assert!(a.join("reference_logps/stage-2-eval_data.json").is_file());
}

#[test]
fn sequence_log_probs_count_completion_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        dusflow::model::LlamaConfig::tiny(dusflow::model::tokenizer::BYTE_VOCAB, 32, 64, 2, 4, 2);
    let (_, model) = dusflow::model::init_trainable(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let _ = dir;
    let pair = PreferencePair {
        prompt: vec![256, 10, 11],
        chosen: vec![12, 257],
        rejected: vec![13, 14, 257],
    };
    let lp = sequence_logps(&model, &[&pair], 258).unwrap();
    // By hand: the full-sequence log-softmax at the completion positions.
    let ids = candle_core::Tensor::new(&[[256u32, 10, 11, 12, 257]], &Device::Cpu).unwrap();
    let logits = model
        .forward_train(&ids, &Default::default())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = logp[2][12] + logp[3][257];
    let got = lp.chosen.to_vec1::<f32>().unwrap()[0];
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert_eq!(lp.rejected_len.to_vec1::<f32>().unwrap(), vec![3.0]);
}

fn load_err(flow: &str, files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    match dusflow::workflow::Workflow::load(
        &dir.path().join("flow.toml"),
        &dusflow::steps::builtin_registry(),
    ) {
        Ok(_) => panic!("the workflow should be invalid"),
        Err(e) => e.to_string(),
    }
}

const BAD_BASE: &str = r#"
[workflow]
name = "bad"
output = "out"

[models.m]
path = "m"

[datasets.a]
path = "a.jsonl"
format = "preference"

[datasets.b]
path = "b.jsonl"
format = "preference"
"#;

#[test]
fn chunk_count_typos_and_ranges_are_config_errors() {
    let flow = format!(
        "{BAD_BASE}\n[steps.align]\nkind = \"dpo\"\ninputs = {{ model = \"m\", data = [\"a\", \"b\"] }}\nchunks = 3\n"
    );
    let err = load_err(&flow, &[]);
    assert!(err.contains("steps.align.chunks"), "{err}");
    assert!(err.contains("there are 2"), "{err}");

    let flow = format!(
        "{BAD_BASE}\n[steps.align]\nkind = \"dpo\"\ninputs = {{ model = \"m\", data = [\"a\"] }}\nbetta = 0.2\n"
    );
    let err = load_err(&flow, &[]);
    assert!(err.contains("betta"), "{err}");

    let flow = format!(
        "{BAD_BASE}\n[steps.align]\nkind = \"dpo\"\ninputs = {{ model = \"m\", data = [\"a\"] }}\nloss = \"hinge\"\nlabel_smoothing = 0.1\nbeta = 0\nmax_prompt_length = 2000\n"
    );
    let err = load_err(&flow, &[]);
    for key in [
        "steps.align.label_smoothing",
        "steps.align.beta",
        "steps.align.max_prompt_length",
    ] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
}

async fn run_err(flow: &str, files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        dusflow::model::LlamaConfig::tiny(dusflow::model::tokenizer::BYTE_VOCAB, 32, 64, 2, 4, 2);
    let (_, model) = dusflow::model::init_trainable(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let m = dir.path().join("m");
    dusflow::model::save_model(&m, &model, &Default::default()).unwrap();
    Tokenizer::save_byte_level(&m).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(!summary.succeeded());
    let log = std::fs::read_to_string(dir.path().join("out/.dus/events.jsonl")).unwrap_or_default();
    format!("{summary:?}\n{log}")
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_lines_and_empty_chunks_fail_with_their_place() {
    let good = "{\"prompt\": \"p\", \"chosen\": \" a\", \"rejected\": \" b\"}\n";
    let flow = format!(
        "{BAD_BASE}\n[steps.align]\nkind = \"dpo\"\ninputs = {{ model = \"m\", data = [\"a\", \"b\"] }}\nchunks = 2\nmax_steps = 1\n"
    );
    let bad = format!("{good}{{\"prompt\": \"p\", \"chosen\": \" a\"}}\n");
    let err = run_err(&flow, &[("a.jsonl", good), ("b.jsonl", &bad)]).await;
    assert!(err.contains("b.jsonl:2"), "{err}");
    assert!(err.contains("rejected"), "{err}");

    // An empty file is named as such before any chunk is formed.
    let err = run_err(&flow, &[("a.jsonl", good), ("b.jsonl", "")]).await;
    assert!(err.contains("b.jsonl: the dataset file is empty"), "{err}");
}

const LONG: &str = r#"
[workflow]
name = "resume"
seed = 4
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2

[steps.first]
kind = "synthetic"
task = "preference"
count = 8

[steps.second]
kind = "synthetic"
task = "preference"
count = 8
seed = 1

[steps.align]
kind = "dpo"
inputs = { model = "tiny", data = ["first", "second"] }
chunks = 2
lr = 1e-3
micro_batch = 2
max_steps = 16
checkpoint_every = 4
"#;

const CHILD: ChildRun = ChildRun {
    test: "dpo::sdpo_killed_in_stage_two_resumes_there_and_ends_with_the_same_weights",
    env: "DUSFLOW_DPO_TEST_CHILD",
};

/// The partial work folder of the dpo step, once stage 2 has written a checkpoint.
fn stage_two_checkpoint(out: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(out.join(".dus/partial")).ok()?.flatten() {
        let ckpt = e.path().join(".dpo-work/stage-2/checkpoints");
        let has = std::fs::read_dir(&ckpt).is_ok_and(|c| {
            c.flatten()
                .any(|x| x.file_name().to_string_lossy().starts_with("step-"))
        });
        if has {
            return Some(e.path());
        }
    }
    None
}

#[test]
fn sdpo_killed_in_stage_two_resumes_there_and_ends_with_the_same_weights() {
    if CHILD.run_if_child() {
        return;
    }
    let (straight, crashy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [straight.path(), crashy.path()] {
        std::fs::write(d.join("flow.toml"), LONG).unwrap();
    }
    CHILD.run(straight.path());
    let partial = CHILD.kill_when(crashy.path(), "a stage-2 checkpoint", || {
        stage_two_checkpoint(&crashy.path().join("out"))
    });
    let stage1_model = partial.join("stage-1/model.safetensors");
    let stage1_time = std::fs::metadata(&stage1_model)
        .unwrap()
        .modified()
        .unwrap();
    CHILD.run(crashy.path());

    let a = artifact(&straight.path().join("out"), "align");
    let b = artifact(&crashy.path().join("out"), "align");
    let report: Value =
        serde_json::from_slice(&std::fs::read(b.join("dpo_report.json")).unwrap()).unwrap();
    let stage2 = &report["stages"][1];
    assert!(stage2["resumed_from"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(stage2["reference_pass_reused"], true, "{report}");
    assert_eq!(report["stages"][0]["resumed_from"], 0);
    assert_eq!(
        std::fs::metadata(b.join("stage-1/model.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        stage1_time,
        "stage 1 was not redone"
    );
    for f in ["model.safetensors", "stage-1/model.safetensors"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs from the uninterrupted run"
        );
    }
    assert_eq!(metrics(&b).len(), 32);
}

#[tokio::test(flavor = "multi_thread")]
async fn ultrafeedback_parquet_and_orca_jsonl_are_detected_and_trained_on() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo");
    let flow = format!(
        r#"
[workflow]
name = "layouts"
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2

[datasets.uf]
path = "{}"

[datasets.orca]
path = "{}"

[steps.align]
kind = "dpo"
inputs = {{ model = "tiny", data = ["uf", "orca"] }}
chunks = 2
max_steps = 1
micro_batch = 2
"#,
        fixtures.join("ultrafeedback.parquet").display(),
        fixtures.join("orca_dpo_pairs.jsonl").display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let a = artifact(&dir.path().join("out"), "align");
    let report: Value =
        serde_json::from_slice(&std::fs::read(a.join("dpo_report.json")).unwrap()).unwrap();
    assert_eq!(report["datasets"][0]["format"], "ultrafeedback");
    assert_eq!(report["datasets"][0]["used"], 3);
    assert_eq!(report["datasets"][1]["format"], "orca-dpo");
    assert_eq!(report["stages"][1]["pairs"], 2);

    // The first UltraFeedback pair, rendered with ChatML (the model has no chat template of its own) and
    // split at the prompt as TRL's maybe_apply_chat_template splits it, tokenised like TRL.
    let tok = Tokenizer::from_model_dir(&a).unwrap();
    let pair = tokenize_pair(
        &tok,
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "2+2 is 4.<|im_end|>\n",
        "It is 5.<|im_end|>\n",
        true,
        PairLimits::default(),
    )
    .unwrap()
    .unwrap();
    let stored: Value =
        serde_json::from_slice(&std::fs::read(a.join("reference_logps/stage-1.json")).unwrap())
            .unwrap();
    let m0 = load_model(
        &artifact(&dir.path().join("out"), "tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = reference_pass(&m0, &[pair], 1, tok.pad_id().unwrap(), &mut |_| Ok(())).unwrap();
    let got = floats(&stored["logps"]["chosen"]);
    assert!(
        (got[0] - want.chosen[0]).abs() < 1e-4,
        "{} vs {}",
        got[0],
        want.chosen[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn margin_chunks_go_easy_to_hard_with_a_fixed_reference_and_filtered_data() {
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/length-filter")
        .canonicalize()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = String::new();
    for i in 0..10 {
        // Every fifth pair has a long chosen answer, which the filter drops.
        let chosen = if i % 5 == 4 {
            format!(" {i} is the answer, after a long and winding explanation")
        } else {
            format!(" {i}")
        };
        let row = serde_json::json!({"prompt": format!("Say {i}:"), "chosen": chosen, "rejected": format!(" {}", i + 1)});
        rows.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.path().join("pairs.jsonl"), rows).unwrap();
    let flow = format!(
        r#"
[workflow]
name = "margin"
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2

[steps.other]
kind = "init"
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2
seed = 1

[plugins.short]
path = "{}"
build = true

[datasets.pairs]
path = "pairs.jsonl"
filters = ["short"]

[steps.align]
kind = "dpo"
inputs = {{ model = "tiny", data = ["pairs"], reference = "other" }}
chunks = 3
chunk_by = "margin"
max_steps = 1
micro_batch = 2
filter_params.short = {{ field = "chosen", max_chars = 10 }}
"#,
        plugin.display()
    );
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let out = dir.path().join("out");
    let a = artifact(&out, "align");
    let report: Value =
        serde_json::from_slice(&std::fs::read(a.join("dpo_report.json")).unwrap()).unwrap();
    let filter = &report["datasets"][0]["filters"][0];
    assert_eq!(
        (filter["kept"].as_u64(), filter["dropped"].as_u64()),
        (Some(8), Some(2)),
        "{filter}"
    );
    let stages = report["stages"].as_array().unwrap();
    let sizes: Vec<u64> = stages
        .iter()
        .map(|s| s["pairs"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![3, 3, 2]);
    // Every stage is scored against the fixed reference, not against M_{t-1}.
    for s in stages {
        assert_eq!(s["reference"]["source"], "input reference \"other\"");
        assert_eq!(s["reference"]["blake3"], stages[0]["reference"]["blake3"]);
    }
    assert_ne!(
        stages[1]["initial"]["blake3"],
        stages[1]["reference"]["blake3"]
    );
    // Chunks follow M_0's margin, largest (easiest) first.
    let initial: Value = serde_json::from_slice(
        &std::fs::read(a.join("reference_logps/initial-margins.json")).unwrap(),
    )
    .unwrap();
    let (c, r) = (
        floats(&initial["logps"]["chosen"]),
        floats(&initial["logps"]["rejected"]),
    );
    let margin = |i: usize| c[i] - r[i];
    let chunk_margins: Vec<Vec<f32>> = stages
        .iter()
        .map(|s| {
            s["chunk"]["records"]["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r[0].as_u64().unwrap()..r[1].as_u64().unwrap())
                .map(|i| margin(i as usize))
                .collect()
        })
        .collect();
    for w in chunk_margins.windows(2) {
        let lowest = w[0].iter().cloned().fold(f32::INFINITY, f32::min);
        let highest = w[1].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert!(
            lowest >= highest,
            "chunks not easy to hard: {chunk_margins:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdpo_by_margin_takes_stage_one_reference_from_the_initial_pass() {
    let flow = r#"
[workflow]
name = "margin-sdpo"
output = "out"
dtype = "f32"

[steps.tiny]
kind = "init"
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2

[steps.pairs]
kind = "synthetic"
task = "preference"
count = 6

[steps.align]
kind = "dpo"
inputs = { model = "tiny", data = ["pairs"] }
chunks = 2
chunk_by = "margin"
max_steps = 1
micro_batch = 3
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flow.toml"), flow).unwrap();
    let summary = run_flow(dir.path()).await;
    assert!(summary.succeeded(), "{summary:?}");
    let a = artifact(&dir.path().join("out"), "align");
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(a.join("reference_logps").join(f)).unwrap()).unwrap()
    };
    let (initial, stage1, stage2) = (
        read("initial-margins.json"),
        read("stage-1.json"),
        read("stage-2.json"),
    );
    assert_eq!(stage1["reference"], initial["reference"]);
    assert_ne!(
        stage2["reference"]["blake3"],
        initial["reference"]["blake3"]
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(a.join("dpo_report.json")).unwrap()).unwrap();
    let records: Vec<usize> = report["stages"][0]["chunk"]["records"]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r[0].as_u64().unwrap() as usize..r[1].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(records.len(), 3);
    // Stage 1's pairs, easiest first; their reference log-probs are the initial pass's.
    let all = floats(&initial["logps"]["chosen"]);
    let mut want: Vec<f32> = records.iter().map(|&i| all[i]).collect();
    let mut got = floats(&stage1["logps"]["chosen"]);
    want.sort_by(f32::total_cmp);
    got.sort_by(f32::total_cmp);
    assert_eq!(got, want);
}

/// TRL's own tokenisation and reference pass (fixture from `make_trl_rows.py`) on the model fixture
/// `tests/fixtures/model/llama` with the byte-level tokenizer: same ids, same dropped pair, same log-probs.
#[test]
fn tokenisation_and_reference_log_probs_equal_trl() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fx: Value =
        serde_json::from_slice(&std::fs::read(root.join("dpo/trl_rows.json")).unwrap()).unwrap();
    let model_dir = tempfile::tempdir().unwrap();
    for dir in ["model/llama", "dpo/byte_tokenizer"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, model_dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let tok = Tokenizer::from_model_dir(model_dir.path()).unwrap();
    let max = fx["max_length"].as_u64().unwrap() as usize;
    let limits = PairLimits {
        max_length: Some(max),
        max_prompt_length: None,
    };
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut kept = Vec::new();
    for p in fx["pairs"].as_array().unwrap() {
        let s = |k: &str| p[k].as_str().unwrap();
        if let Some(pair) =
            tokenize_pair(&tok, s("prompt"), s("chosen"), s("rejected"), true, limits).unwrap()
        {
            kept.push(pair);
        }
    }
    assert_eq!(
        kept.len(),
        fx["prompt_ids"].as_array().unwrap().len(),
        "TRL drops the same pairs"
    );
    for (i, pair) in kept.iter().enumerate() {
        let prompt = ids(&fx["prompt_ids"][i]);
        // TRL keeps completions whole in the dataset and cuts prompt + completion to max_length when batching.
        let room = max - prompt.len();
        let cut = |v: Vec<u32>| v.into_iter().take(room).collect::<Vec<u32>>();
        assert_eq!(pair.prompt, prompt, "pair {i}");
        assert_eq!(pair.chosen, cut(ids(&fx["chosen_ids"][i])), "pair {i}");
        assert_eq!(pair.rejected, cut(ids(&fx["rejected_ids"][i])), "pair {i}");
    }
    let model = load_model(model_dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ours = reference_pass(&model, &kept, 2, tok.pad_id().unwrap(), &mut |_| Ok(())).unwrap();
    for (side, got, key) in [
        ("chosen", &ours.chosen, "ref_chosen_logps"),
        ("rejected", &ours.rejected, "ref_rejected_logps"),
    ] {
        for (i, (g, w)) in got.iter().zip(floats(&fx[key])).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{side} {i}: {g} vs TRL {w}"
            );
        }
    }
}
