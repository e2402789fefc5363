//! Each plugin kind end to end through the host, with the Rust example plugins.

use crate::plugins_common;

use dusflow::plugins::{
    DType, MergePlan, ModelDescription, PluginGrants, PluginKind, PluginLimits, TensorInfo,
    TensorStats, TransformOp, Verdict,
};
use plugins_common::*;

fn model(name: &str, layers: u32) -> ModelDescription {
    ModelDescription::from_config_json(name, &llama_config(layers)).unwrap()
}

#[test]
fn solar_dus_turns_32_layers_into_48() {
    let plugin = load("solar-dus");
    assert_eq!(plugin.kind(), PluginKind::LayerPolicy);
    assert_eq!(plugin.info().name, "solar-dus");
    assert_eq!(plugin.wit_version(), "0.1.0");
    let plan = plugin
        .layer_policy()
        .unwrap()
        .plan(&[model("base", 32)], r#"{"m": 8}"#)
        .unwrap();
    let layers: Vec<usize> = plan.layers.iter().map(|l| l.layer).collect();
    let expected: Vec<usize> = (0..24).chain(8..32).collect();
    assert_eq!(layers, expected);
    assert!(plan
        .layers
        .iter()
        .all(|l| l.model == 0 && l.transforms.is_empty()));
}

#[test]
fn layer_policy_errors_name_plugin_function_and_message() {
    let policy = load("solar-dus").layer_policy().unwrap();
    let err = format!(
        "{:#}",
        policy
            .plan(&[model("base", 32)], r#"{"m": 20}"#)
            .unwrap_err()
    );
    assert!(
        err.contains("plugin 'solar-dus' failed in layer-policy.plan"),
        "{err}"
    );
    assert!(err.contains("m = 20 must be between 1 and 15"), "{err}");
    let err = format!(
        "{:#}",
        policy
            .plan(&[model("base", 32)], r#"{"n": 8}"#)
            .unwrap_err()
    );
    assert!(
        err.contains("invalid params") && err.contains("unknown field `n`"),
        "{err}"
    );
}

#[test]
fn llama_pro_expansion_zeroes_output_projections_of_new_blocks() {
    let plan = load("llama-pro-expand")
        .layer_policy()
        .unwrap()
        .plan(&[model("base", 8)], r#"{"every": 4}"#)
        .unwrap();
    assert_eq!(plan.layers.len(), 10);
    let new_block = &plan.layers[4];
    assert_eq!((new_block.model, new_block.layer), (0, 3));
    let zeroed: Vec<&str> = new_block
        .transforms
        .iter()
        .map(|t| t.tensor_suffix.as_str())
        .collect();
    assert_eq!(zeroed, ["self_attn.o_proj.weight", "mlp.down_proj.weight"]);
    assert!(new_block
        .transforms
        .iter()
        .all(|t| t.op == TransformOp::Zero));
    assert!(plan.layers[3].transforms.is_empty());
}

#[test]
fn layer_schedule_moves_weight_from_model_a_to_model_b_across_layers() {
    let inputs = [vec![0u8; 16], vec![0u8; 16]];
    let mut rule = load("layer-schedule-merge")
        .merge_rule(r#"{"from": 0.2, "to": 0.8, "outside": 0.5}"#)
        .unwrap();
    let mut plan = |name: &str| {
        rule.plan_tensor(&tensor(name, &[4], DType::F32, &inputs))
            .unwrap()
    };
    // `tensor` describes a 2-layer model: layer 0 gets `from`, layer 1 gets `to`.
    assert_eq!(
        plan("model.layers.0.mlp.down_proj.weight"),
        MergePlan::Linear(vec![0.8, 0.2])
    );
    assert_eq!(
        plan("model.layers.1.mlp.down_proj.weight"),
        MergePlan::Linear(vec![1.0 - 0.8, 0.8])
    );
    assert_eq!(
        plan("model.embed_tokens.weight"),
        MergePlan::Linear(vec![0.5, 0.5])
    );
    let err = load("layer-schedule-merge")
        .merge_rule(r#"{"to": 1.5}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("to = 1.5 must be between 0 and 1"), "{err}");
}

#[test]
fn dedup_keeps_the_first_occurrence_across_batches() {
    let records: Vec<String> = [
        r#"{"instruction": "Add 2 and 3", "output": "5", "id": 1}"#,
        r#"{"instruction": "add  2 and 3", "output": "5", "id": 2}"#,
        r#"{"instruction": "Add 2 and 3", "output": "5", "id": 3}"#,
        r#"{"instruction": "Add 4 and 3", "output": "7", "id": 4}"#,
    ]
    .map(String::from)
    .to_vec();
    let mut exact = load("dedup")
        .data_filter(r#"{"fields": ["instruction", "output"]}"#)
        .unwrap();
    assert_eq!(
        exact.filter_batch(&records[..2]).unwrap(),
        vec![Verdict::Keep, Verdict::Keep]
    );
    // Record 3 repeats record 1, seen in the previous batch of the same job.
    assert_eq!(
        exact.filter_batch(&records[2..]).unwrap(),
        vec![Verdict::Drop, Verdict::Keep]
    );
    let mut normalized = load("dedup")
        .data_filter(r#"{"fields": ["instruction"], "normalize": true}"#)
        .unwrap();
    assert_eq!(
        normalized.filter_batch(&records).unwrap(),
        vec![Verdict::Keep, Verdict::Drop, Verdict::Drop, Verdict::Keep]
    );
    // Without fields the whole record is the key: the ids differ, so nothing is dropped.
    let mut whole = load("dedup").data_filter("{}").unwrap();
    assert!(whole
        .filter_batch(&records)
        .unwrap()
        .iter()
        .all(|v| *v == Verdict::Keep));
}

#[test]
fn length_filter_keeps_drops_and_rewrites() {
    let mut filter = load("length-filter")
        .data_filter(r#"{"min_chars": 5, "max_chars": 20, "trim": true}"#)
        .unwrap();
    let records: Vec<String> = [
        r#"{"text": "long enough", "id": 1}"#,
        r#"{"text": "tiny", "id": 2}"#,
        r#"{"text": "  padded text  ", "id": 3}"#,
        r#"{"text": "this one is far too long to keep", "id": 4}"#,
        r#"{"other": "no text field"}"#,
    ]
    .map(String::from)
    .to_vec();
    let verdicts = filter.filter_batch(&records).unwrap();
    assert_eq!(
        verdicts,
        vec![
            Verdict::Keep,
            Verdict::Drop,
            Verdict::Rewrite(r#"{"text":"padded text","id":3}"#.into()),
            Verdict::Drop,
            Verdict::Drop
        ]
    );
    // The job keeps its configuration across batches.
    assert_eq!(
        filter.filter_batch(&records[..1]).unwrap(),
        vec![Verdict::Keep]
    );
}

#[test]
fn data_filter_rejects_bad_params_and_bad_records_with_clear_errors() {
    let plugin = load("length-filter");
    let err = format!(
        "{:#}",
        plugin
            .data_filter(r#"{"min_chars": 9, "max_chars": 2}"#)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("plugin 'length-filter' failed in data-filter.configure"),
        "{err}"
    );
    assert!(err.contains("min_chars 9 > max_chars 2"), "{err}");
    let mut filter = plugin.data_filter("{}").unwrap();
    let err = format!(
        "{:#}",
        filter.filter_batch(&["not json".to_string()]).unwrap_err()
    );
    assert!(err.contains("record 0 of the batch"), "{err}");
}

#[test]
fn decontaminate_reads_benchmarks_only_from_a_granted_directory() {
    let bench = tempfile::tempdir().unwrap();
    std::fs::write(
        bench.path().join("gsm8k.jsonl"),
        r#"{"question": "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"}"#,
    )
    .unwrap();
    let params = serde_json::json!({ "benchmarks_dir": bench.path(), "n": 8 }).to_string();
    let records = [
        r#"{"text": "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May. How many?"}"#,
        r#"{"text": "A completely unrelated sentence about depth up-scaling of language models."}"#,
    ]
    .map(String::from);

    let granted = PluginGrants {
        read: vec![bench.path().to_path_buf()],
        ..Default::default()
    };
    let plugin = load_with("decontaminate", &granted, &PluginLimits::default());
    let verdicts = plugin
        .data_filter(&params)
        .unwrap()
        .filter_batch(&records)
        .unwrap();
    assert_eq!(verdicts, vec![Verdict::Drop, Verdict::Keep]);

    let denied = load("decontaminate");
    let err = format!("{:#}", denied.data_filter(&params).err().unwrap());
    assert!(
        err.contains("plugin 'decontaminate' failed in data-filter.configure"),
        "{err}"
    );
    assert!(err.contains("is it granted to the plugin?"), "{err}");
}

fn tensor(name: &str, shape: &[u64], dtype: DType, inputs: &[Vec<u8>]) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
        layer: TensorInfo::layer_of(name),
        num_layers: 2,
        stats: inputs
            .iter()
            .map(|x| TensorStats::compute(dtype, x))
            .collect(),
    }
}

/// The sign-consensus rule, computed natively for comparison.
fn sign_consensus(inputs: &[Vec<f32>]) -> Vec<f32> {
    (0..inputs[0].len())
        .map(|i| {
            let sum: f32 = inputs.iter().map(|x| x[i]).sum();
            let agree: Vec<f32> = inputs
                .iter()
                .map(|x| x[i])
                .filter(|v| (*v >= 0.0) == (sum >= 0.0))
                .collect();
            if agree.is_empty() {
                0.0
            } else {
                agree.iter().sum::<f32>() / agree.len() as f32
            }
        })
        .collect()
}

#[test]
fn sign_consensus_merge_plans_natively_and_merges_custom_tensors_in_chunks() {
    let plugin = load("sign-consensus-merge");
    let mut rule = plugin.merge_rule("{}").unwrap();

    let embed = [f32_bytes(&[1.0; 8]), f32_bytes(&[3.0; 8])];
    let plan = rule
        .plan_tensor(&tensor(
            "model.embed_tokens.weight",
            &[2, 4],
            DType::F32,
            &embed,
        ))
        .unwrap();
    assert_eq!(plan, MergePlan::Linear(vec![0.5, 0.5]));

    let n = 3 * (1 << 20) + 17; // several chunks plus a ragged end
    let values: Vec<Vec<f32>> = (0..3)
        .map(|m| {
            (0..n)
                .map(|i| (((i * 31 + m * 7) % 13) as f32 - 6.0) * 0.25)
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<u8>> = values.iter().map(|v| f32_bytes(v)).collect();
    let info = tensor(
        "model.layers.1.mlp.down_proj.weight",
        &[n as u64],
        DType::F32,
        &inputs,
    );
    let info = TensorInfo {
        shape: vec![1, n as u64],
        ..info
    };
    assert_eq!(rule.plan_tensor(&info).unwrap(), MergePlan::Custom);
    let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let mut out = vec![0u8; inputs[0].len()];
    rule.merge_custom(&info, &views, &mut out).unwrap();
    assert_eq!(DType::F32.decode(&out), sign_consensus(&values));

    // bf16 goes through the SDK's conversion: compare after rounding the native result.
    let bf: Vec<Vec<u8>> = values
        .iter()
        .map(|v| {
            v[..1000]
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect()
        })
        .collect();
    let info = TensorInfo {
        dtype: DType::BF16,
        shape: vec![10, 100],
        ..info
    };
    let views: Vec<&[u8]> = bf.iter().map(Vec::as_slice).collect();
    let mut out = vec![0u8; 2000];
    rule.merge_custom(&info, &views, &mut out).unwrap();
    let decoded: Vec<Vec<f32>> = bf.iter().map(|b| DType::BF16.decode(b)).collect();
    let expected: Vec<f32> = sign_consensus(&decoded)
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    assert_eq!(DType::BF16.decode(&out), expected);
}

#[test]
fn a_plugin_of_the_wrong_kind_is_refused() {
    let err = load("length-filter")
        .layer_policy()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a data-filter plugin, but the step needs a layer-policy plugin"),
        "{err}"
    );
}

#[test]
fn loading_twice_reuses_the_build_and_the_compiled_component() {
    let first = load("solar-dus");
    let started = std::time::Instant::now();
    let second = load("solar-dus");
    assert_eq!(first.wasm_path(), second.wasm_path());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "reload took {:?}",
        started.elapsed()
    );
}
