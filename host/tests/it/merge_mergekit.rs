//! mergekit YAML configs (`config = "merge.yml"`) against mergekit 0.1.5 itself: every case of
//! `tests/fixtures/merge/cases.json` (generator `make_fixtures.py`) run from its mergekit config, with
//! mergekit's `dtype` (compute) and `out_dtype`, including bf16 arithmetic; the model card and config copy.

use dusflow::model::TensorStore;
use dusflow::steps::merge::elements::Source;
use dusflow::steps::merge::mergekit_yaml;
use dusflow::steps::merge::stream::{merge_mergekit, NamedModel};
use dusflow::steps::merge::MergeConfig;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    mergekit: serde_json::Value,
    step: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every fixture model, named as the configs name them.
fn inputs() -> Vec<NamedModel> {
    ["a", "b", "base", "a32", "b32", "base32"]
        .iter()
        .map(|m| NamedModel {
            name: m.to_string(),
            path: fixtures().join("models").join(m),
        })
        .collect()
}

fn values(store: &TensorStore, name: &str) -> Vec<f32> {
    let meta = store.meta(name).unwrap();
    let bytes = store.bytes(name).unwrap();
    let mut out = vec![0f32; meta.numel()];
    Source {
        bytes: &bytes,
        dtype: meta.dtype,
    }
    .decode(0, &mut out);
    out
}

/// Distance in units in the last place of the stored dtype (`bf16`: 16-bit patterns).
fn ulps(a: f32, b: f32, bf16: bool) -> u32 {
    let key = |x: f32| {
        let bits = if bf16 {
            (x.to_bits() >> 16) as i32
        } else {
            x.to_bits() as i32
        };
        let bits = if bf16 { bits << 16 >> 16 } else { bits };
        if bits < 0 {
            (if bf16 { i16::MIN as i32 } else { i32::MIN }) - bits
        } else {
            bits
        }
    };
    key(a).abs_diff(key(b))
}

/// Runs case `name` from its mergekit config; returns (ours, mergekit's).
fn run(name: &str) -> (TensorStore, TensorStore, tempfile::TempDir) {
    let case = cases().into_iter().find(|c| c.name == name).unwrap();
    assert_eq!(case.step, "merge");
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("merge.yml");
    // JSON is YAML.
    std::fs::write(&yaml, serde_json::to_string_pretty(&case.mergekit).unwrap()).unwrap();
    let config = mergekit_yaml::load(&yaml, &inputs()).unwrap();
    let out = dir.path().join(name);
    std::fs::create_dir(&out).unwrap();
    let step: MergeConfig = toml::from_str("config = \"merge.yml\"").unwrap();
    merge_mergekit(
        &config,
        &step,
        0,
        &out,
        false,
        &ProgressBar::hidden(),
        &|| false,
    )
    .unwrap();
    let ours = TensorStore::open(&out).unwrap();
    let theirs = TensorStore::open(&fixtures().join("outputs").join(name)).unwrap();
    (ours, theirs, dir)
}

/// (elements, identical, max ulps, elements more than 1 ulp apart), checking names and dtypes.
fn compare(name: &str) -> (usize, usize, u32, usize) {
    let (ours, theirs, _dir) = run(name);
    let mut a: Vec<&str> = ours.names().collect();
    let mut b: Vec<&str> = theirs.names().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{name}: tensor names");
    let (mut total, mut same, mut worst, mut far) = (0, 0, 0, 0);
    for t in ours.names() {
        let dtype = theirs.meta(t).unwrap().dtype;
        assert_eq!(ours.meta(t).unwrap().dtype, dtype, "{name}: {t} dtype");
        let bf16 = dtype == safetensors::Dtype::BF16;
        for (x, y) in values(&ours, t).into_iter().zip(values(&theirs, t)) {
            let d = ulps(x, y, bf16);
            total += 1;
            same += (d == 0) as usize;
            far += (d > 1) as usize;
            worst = worst.max(d);
        }
    }
    eprintln!(
        "{name}: {same} of {total} identical, {far} more than 1 ulp apart, worst {worst} ulps"
    );
    (total, same, worst, far)
}

/// Deterministic methods: within 1 ulp of the stored dtype everywhere and identical on ≥ 99.99 % of
/// elements (the SLERP tolerance of `merge_parity`); most are bit-identical.
#[test]
fn deterministic_methods_match_mergekit_within_one_ulp() {
    for name in [
        "linear",
        "linear_fma",
        "linear_fma_f32",
        "linear_fma_bf16",
        "linear_gradient",
        "slerp",
        "task_arithmetic",
        "ties_f32",
        "model_stock",
        "model_stock_filter_wise",
        "breadcrumbs",
        "breadcrumbs_ties",
        "nuslerp",
        "nuslerp_base_row_wise",
        "nuslerp_rows",
        "multislerp",
        "multislerp_no_base",
        "karcher",
        "sce",
        "sce_all",
        "nearswap",
        // mergekit's `dtype: bfloat16`: bf16 arithmetic.
        "task_arithmetic_bf16_to_f32",
        "linear_bf16_to_f32",
        "model_stock_bf16",
        "multislerp_bf16",
        "nuslerp_bf16",
        "nearswap_bf16",
        // One slice over all layers, `t` gradients per filter, bf16 arithmetic.
        "slerp_slices",
    ] {
        let (total, same, worst, _) = compare(name);
        assert!(worst <= 1, "{name}: {worst} ulps from mergekit");
        assert!(
            same as f64 >= 0.9999 * total as f64,
            "{name}: only {same} of {total} identical"
        );
    }
}

/// Methods with a top-k or sorted cut on bf16 values, where equal magnitudes make mergekit's choice
/// depend on torch's unspecified sort order (ours: lowest index first): ≤ 1 % of elements differ, the
/// bound `merge_parity` uses for TIES on bf16 models.
#[test]
fn methods_with_a_magnitude_cut_match_mergekit_up_to_tie_order() {
    for name in [
        "ties",
        "ties_no_dtype",
        "ties_dtype_bf16",
        "breadcrumbs_bf16",
        "sce_bf16",
    ] {
        let (total, same, _, _) = compare(name);
        assert!(
            (total - same) as f64 <= 0.01 * total as f64,
            "{name}: {} of {total} elements differ",
            total - same
        );
    }
}

/// Share of elements equal to the base, and Σ|out − base|.
fn change_stats(out: &TensorStore, base: &TensorStore) -> (f64, f64) {
    let (mut total, mut same, mut l1) = (0usize, 0usize, 0f64);
    for t in out.names() {
        for (x, y) in values(out, t).into_iter().zip(values(base, t)) {
            total += 1;
            same += (x == y) as usize;
            l1 += (x - y).abs() as f64;
        }
    }
    (same as f64 / total as f64, l1)
}

/// Random masks (DARE, DELLA) are drawn by our counter-based generator, not torch's (as the TOML DARE
/// tests in `merge_parity`): the same share of untouched elements and the same L1 size of the change.
#[test]
fn random_methods_match_mergekit_statistically() {
    for (name, base) in [
        ("dare_linear", "base"),
        ("dare_ties", "base"),
        ("dare_ties_bf16", "base"),
        ("della", "base32"),
        ("della_linear", "base32"),
        ("della_bf16", "base"),
    ] {
        let (ours, theirs, _dir) = run(name);
        let base = TensorStore::open(&fixtures().join("models").join(base)).unwrap();
        let (ours_same, ours_l1) = change_stats(&ours, &base);
        let (theirs_same, theirs_l1) = change_stats(&theirs, &base);
        eprintln!("{name}: unchanged {ours_same:.4} vs mergekit {theirs_same:.4}; L1 {ours_l1:.4} vs {theirs_l1:.4}");
        assert!(
            (ours_same - theirs_same).abs() < 0.02,
            "{name}: unchanged share {ours_same} vs mergekit {theirs_same}"
        );
        assert!(
            (ours_l1 / theirs_l1 - 1.0).abs() < 0.03,
            "{name}: L1 of the change {ours_l1} vs mergekit {theirs_l1}"
        );
    }
}

#[test]
fn karcher_in_bf16_arithmetic_stays_close_to_mergekit() {
    let (total, _, worst, far) = compare("karcher_bf16");
    assert!(
        far as f64 <= 0.02 * total as f64 && worst <= 200,
        "{far} of {total} elements more than 1 ulp apart (worst {worst})"
    );
}

/// The TOML side of the new methods (our keys, f32 arithmetic, `dtype` = output): the cases' `dusflow`
/// configs against the same mergekit outputs.
#[test]
fn new_methods_from_toml_match_mergekit() {
    #[derive(serde::Deserialize)]
    struct TomlCase {
        name: String,
        dusflow: Option<String>,
        models: Vec<String>,
        base: Option<String>,
    }
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let all: Vec<TomlCase> = serde_json::from_str(&text).unwrap();
    let model = |m: &str| NamedModel {
        name: m.into(),
        path: fixtures().join("models").join(m),
    };
    for name in [
        "model_stock",
        "model_stock_filter_wise",
        "breadcrumbs",
        "nuslerp",
        "nuslerp_base_row_wise",
        "multislerp",
        "karcher",
        "sce",
        "nearswap",
    ] {
        let c = all.iter().find(|c| c.name == name).unwrap();
        let config: MergeConfig = toml::from_str(c.dusflow.as_deref().unwrap()).unwrap();
        let models: Vec<NamedModel> = c.models.iter().map(|m| model(m)).collect();
        let base = c.base.as_deref().map(model);
        let dir = tempfile::tempdir().unwrap();
        dusflow::steps::merge::stream::merge(
            &config,
            &models,
            base.as_ref(),
            0,
            dir.path(),
            false,
            &ProgressBar::hidden(),
            &|| false,
        )
        .unwrap();
        let ours = TensorStore::open(dir.path()).unwrap();
        let theirs = TensorStore::open(&fixtures().join("outputs").join(name)).unwrap();
        let (mut total, mut same) = (0usize, 0usize);
        for t in theirs.names() {
            for (x, y) in values(&ours, t).into_iter().zip(values(&theirs, t)) {
                let d = ulps(x, y, true);
                assert!(d <= 1, "{name}: {t}: {x} vs mergekit {y}");
                total += 1;
                same += (d == 0) as usize;
            }
        }
        assert!(
            same as f64 >= 0.9999 * total as f64,
            "{name}: {same} of {total}"
        );
    }
}

/// mergekit's card and config copy, from the generator's `card_*` cases (relative model paths, run from
/// the models folder): our README.md equals mergekit's but for the order of the "Models Merged" bullets
/// (mergekit lists a Python set), and mergekit_config.yml is the config text.
#[test]
fn yaml_merges_write_mergekits_model_card_and_config() {
    for case in ["card_ties", "card_slerp"] {
        let expected = fixtures().join("outputs").join(case);
        let text = std::fs::read_to_string(expected.join("config.yml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("config.yml");
        std::fs::write(&yaml, &text).unwrap();
        // Inputs named by the workflow, found by folder name (`./a` → folder `a`).
        let inputs: Vec<NamedModel> = ["a", "b", "base"]
            .iter()
            .map(|m| NamedModel {
                name: format!("model_{m}"),
                path: fixtures().join("models").join(m),
            })
            .collect();
        let config = mergekit_yaml::load(&yaml, &inputs).unwrap();
        let out = dir.path().join(case);
        std::fs::create_dir(&out).unwrap();
        let step: MergeConfig = toml::from_str("config = \"config.yml\"").unwrap();
        merge_mergekit(
            &config,
            &step,
            0,
            &out,
            false,
            &ProgressBar::hidden(),
            &|| false,
        )
        .unwrap();
        let sorted_lines = |s: &str| {
            let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        let ours = std::fs::read_to_string(out.join("README.md")).unwrap();
        let theirs = std::fs::read_to_string(expected.join("README.md")).unwrap();
        assert_eq!(
            sorted_lines(&ours),
            sorted_lines(&theirs),
            "{case}: README.md"
        );
        let bullets = |s: &str| s.lines().filter(|l| l.starts_with("* ")).count();
        assert_eq!(bullets(&ours), bullets(&theirs));
        // Outside the bullets, line for line.
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("* "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&ours), strip(&theirs), "{case}: README.md");
        assert_eq!(
            std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
            std::fs::read_to_string(expected.join("mergekit_config.yml")).unwrap()
        );
        assert!(out.join("config.json").is_file());
    }
}

/// Bad configs: each error names the YAML file and the line of the culprit.
#[test]
fn yaml_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: &str, line: usize, needle: &str| {
        let path = dir.path().join("bad.yml");
        std::fs::write(&path, yaml).unwrap();
        let err = format!("{:#}", mergekit_yaml::load(&path, &inputs()).unwrap_err());
        let prefix = format!("{}:{line}", path.display());
        assert!(
            err.starts_with(&prefix) && err.contains(needle),
            "{err:?} should start with {prefix:?} and mention {needle:?}"
        );
    };
    let ties = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n      weight: 1.0\n";
    check(
        &ties.replace("ties\n", "tiez\n"),
        1,
        "unknown merge_method `tiez`",
    );
    check(
        &format!("{ties}      densty: 0.5\n"),
        7,
        "parameter `densty` is not used",
    );
    check(
        &format!("{ties}dtyp: bfloat16\n"),
        7,
        "unknown field `dtyp`",
    );
    check(
        &ties.replace("model: a", "model: c"),
        4,
        "model `c` is none of the step's inputs",
    );
    check(&format!("{ties}dtype: float8\n"), 7, "float8");
    check(
        "merge_method: ties\nbase_model: base\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        parameters:\n          weight: 1\n",
        4,
        "the base model is not among its sources",
    );
    check(
        "merge_method: ties\nbase_model: base\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 9]\n",
        6,
        "layer_range [0, 9] of `a`, which has 3 layers",
    );
    check(
        "merge_method: ties\nmodels:\n  - model: a\n",
        1,
        "needs `base_model`",
    );
}

/// Several slices over shifted layer ranges, with parameters per source, per slice (a filter) and top-level
/// (a gradient over each slice's layers): mergekit's `ties_slices` case. The f32 models have no ties at the
/// magnitude cut, so every element must match.
#[test]
fn sliced_merges_match_mergekit() {
    let (total, same, worst, _) = compare("ties_slices");
    assert!(worst <= 1, "ties_slices: {worst} ulps from mergekit");
    assert!(
        same as f64 >= 0.9999 * total as f64,
        "ties_slices: only {same} of {total} identical"
    );
}
