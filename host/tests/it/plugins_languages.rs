//! Plugins written in Python, JavaScript and C, through the same host. Each test is skipped,
//! with a notice, when its toolchain is not installed (CI installs them).

use crate::plugins_common;

use dusflow::plugins::{DType, MergePlan, ModelDescription, TensorInfo, TensorStats, Verdict};
use plugins_common::*;

#[test]
fn python_length_filter_agrees_with_the_rust_one() {
    let Some(py) = load_or_skip("length-filter-py") else {
        return;
    };
    assert_eq!(py.info().name, "length-filter-py");
    let params = r#"{"min_chars": 5, "max_chars": 20, "trim": true}"#;
    let records: Vec<String> = [
        r#"{"text": "long enough", "id": 1}"#,
        r#"{"text": "tiny", "id": 2}"#,
        r#"{"text": "  padded text  ", "id": 3}"#,
        r#"{"text": "this one is far too long to keep", "id": 4}"#,
        r#"{"other": "no text field"}"#,
        r#"{"text": "ünïcödé ok"}"#,
    ]
    .map(String::from)
    .to_vec();
    let from_python = py
        .data_filter(params)
        .unwrap()
        .filter_batch(&records)
        .unwrap();
    let from_rust = load("length-filter")
        .data_filter(params)
        .unwrap()
        .filter_batch(&records)
        .unwrap();
    let normalise = |v: &Verdict| match v {
        Verdict::Rewrite(json) => Verdict::Rewrite(
            serde_json::from_str::<serde_json::Value>(json)
                .unwrap()
                .to_string(),
        ),
        other => other.clone(),
    };
    assert_eq!(
        from_python.iter().map(normalise).collect::<Vec<_>>(),
        from_rust.iter().map(normalise).collect::<Vec<_>>()
    );

    let err = format!(
        "{:#}",
        py.data_filter(r#"{"min_chars": 9, "max_chars": 2}"#)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("plugin 'length-filter-py' failed in data-filter.configure"),
        "{err}"
    );
    assert!(err.contains("min_chars 9 > max_chars 2"), "{err}");
    // A Python exception that is not an Err is a trap; its traceback is in the captured output.
    let mut job = py.data_filter("{}").unwrap();
    let err = format!("{:#}", job.filter_batch(&["not json".into()]).unwrap_err());
    assert!(err.contains("JSONDecodeError"), "{err}");
}

#[test]
fn javascript_frankenmerge_stacks_slices_of_two_models() {
    let Some(js) = load_or_skip("frankenmerge-js") else {
        return;
    };
    let a = ModelDescription::from_config_json("a", &llama_config(8)).unwrap();
    let b = ModelDescription::from_config_json("b", &llama_config(6)).unwrap();
    let params = r#"{"slices": [{"model": 0, "from": 0, "to": 4}, {"model": 1, "from": 2, "to": 6}],
                     "base_model": 1, "scale": {"mlp.down_proj.weight": 0.5}}"#;
    let plan = js
        .layer_policy()
        .unwrap()
        .plan(&[a.clone(), b.clone()], params)
        .unwrap();
    assert_eq!(plan.base_model, 1);
    let order: Vec<(usize, usize)> = plan.layers.iter().map(|l| (l.model, l.layer)).collect();
    assert_eq!(
        order,
        [
            (0, 0),
            (0, 1),
            (0, 2),
            (0, 3),
            (1, 2),
            (1, 3),
            (1, 4),
            (1, 5)
        ]
    );
    assert_eq!(
        plan.layers[0].transforms[0].tensor_suffix,
        "mlp.down_proj.weight"
    );

    let bad = r#"{"slices": [{"model": 1, "from": 4, "to": 9}]}"#;
    let err = format!(
        "{:#}",
        js.layer_policy().unwrap().plan(&[a, b], bad).unwrap_err()
    );
    assert!(
        err.contains("plugin 'frankenmerge-js' failed in layer-policy.plan"),
        "{err}"
    );
    assert!(
        err.contains("slice 0: layers 4..9 are outside 0..6 of b"),
        "{err}"
    );
}

#[test]
fn c_weighted_average_plans_natively_or_merges_element_wise() {
    let Some(c) = load_or_skip("weighted-average-c") else {
        return;
    };
    let inputs = [
        f32_bytes(&[1.0, 2.0, -4.0, 8.0]),
        f32_bytes(&[3.0, 6.0, 4.0, 0.0]),
    ];
    let info = TensorInfo {
        name: "model.layers.0.mlp.up_proj.weight".into(),
        shape: vec![2, 2],
        dtype: DType::F32,
        layer: Some(0),
        num_layers: 1,
        stats: inputs
            .iter()
            .map(|x| TensorStats::compute(DType::F32, x))
            .collect(),
    };
    let mut native = c.merge_rule(r#"{"weights": [0.25, 0.75]}"#).unwrap();
    assert_eq!(
        native.plan_tensor(&info).unwrap(),
        MergePlan::Linear(vec![0.25, 0.75])
    );

    let mut custom = c
        .merge_rule(r#"{"weights": [0.25, 0.75], "elementwise": true}"#)
        .unwrap();
    assert_eq!(custom.plan_tensor(&info).unwrap(), MergePlan::Custom);
    let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let mut out = vec![0u8; 16];
    custom.merge_custom(&info, &views, &mut out).unwrap();
    assert_eq!(DType::F32.decode(&out), vec![2.5, 5.0, 2.0, 2.0]);

    let err = format!(
        "{:#}",
        c.merge_rule(r#"{"weights": [1.0]}"#)
            .unwrap()
            .plan_tensor(&info)
            .unwrap_err()
    );
    assert!(
        err.contains("plugin 'weighted-average-c' failed in merge-rule.plan-tensor"),
        "{err}"
    );
    assert!(err.contains("one weight per input model"), "{err}");
}
