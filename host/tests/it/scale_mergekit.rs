//! The `scale` step against mergekit 0.1.5 passthrough: each case of `fixtures/scale/mergekit/*.yml` is
//! translated into `slices` and written by dusflow, and the tensors file must have mergekit's sha256, the
//! config.json mergekit's bytes, and the folder mergekit's files (fixtures: `fixtures/scale/make_fixtures.py`).

use dusflow::steps::scale::{
    builtin_plan, write_scaled, BuiltinPolicy, PolicyParams, SliceSpec, SourceModel, TransformSpec,
    WriteOptions, PLAN_FILE,
};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scale")
}

/// The mergekit config of a case (JSON text in a .yml file) as dusflow slices, model names and dtype.
fn mergekit_case(case: &str) -> (Vec<SliceSpec>, Vec<String>, Option<Dtype>) {
    let text = std::fs::read_to_string(fixtures().join(format!("mergekit/{case}.yml"))).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["merge_method"], "passthrough");
    let mut models: Vec<String> = Vec::new();
    let mut slices = Vec::new();
    for slice in config["slices"].as_array().unwrap() {
        let source = &slice["sources"][0];
        let model = source["model"].as_str().unwrap().to_string();
        if !models.contains(&model) {
            models.push(model.clone());
        }
        let range = source["layer_range"].as_array().unwrap();
        let mut transforms = Vec::new();
        for rule in source["parameters"]["scale"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let value = rule["value"].as_f64().unwrap() as f32;
            if let Some(filter) = rule["filter"].as_str() {
                transforms.push(TransformSpec {
                    tensor: format!("{filter}.weight"),
                    zero: false,
                    scale: Some(value),
                });
            } else {
                assert_eq!(value, 1.0, "only filtered scales are translated");
            }
        }
        slices.push(SliceSpec {
            model: Some(model),
            layers: [
                range[0].as_u64().unwrap() as usize,
                range[1].as_u64().unwrap() as usize,
            ],
            transforms,
        });
    }
    let dtype = match config.get("dtype").and_then(|d| d.as_str()) {
        None => None,
        Some("bfloat16") => Some(Dtype::BF16),
        Some(other) => panic!("dtype {other} not translated"),
    };
    (slices, models, dtype)
}

fn open(models: &[String]) -> Vec<SourceModel> {
    models
        .iter()
        .map(|m| SourceModel::open(m, &fixtures().join(m)).unwrap())
        .collect()
}

fn sha256_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}  {}\n", Sha256::digest(&bytes), bytes.len())
}

fn file_list(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != PLAN_FILE)
        .collect();
    names.sort();
    names.join("\n") + "\n"
}

/// Asserts that `out` holds what mergekit wrote for `case`.
fn assert_matches_mergekit(case: &str, out: &Path) {
    let expected = fixtures().join("expected").join(case);
    assert_eq!(
        sha256_of(&out.join("model.safetensors")),
        std::fs::read_to_string(expected.join("model.safetensors.sha256")).unwrap(),
        "{case}: model.safetensors differs from mergekit's (sha256, size)"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        std::fs::read_to_string(expected.join("config.json")).unwrap(),
        "{case}: config.json"
    );
    assert_eq!(
        file_list(out),
        std::fs::read_to_string(expected.join("files.txt")).unwrap(),
        "{case}: files"
    );
}

fn scale_case(case: &str) -> tempfile::TempDir {
    let (slices, names, dtype) = mergekit_case(case);
    let models = open(&names);
    let counts: Vec<usize> = models.iter().map(|m| m.num_layers).collect();
    let params = PolicyParams {
        slices,
        ..Default::default()
    };
    let plan = builtin_plan(BuiltinPolicy::Slices, &params, &names, &counts).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = WriteOptions {
        dtype,
        ..Default::default()
    };
    write_scaled(&models, &plan, "slices", out.path(), &opts, &mut |_, _| {
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn solar_slices_are_byte_identical_to_mergekit() {
    let out = scale_case("solar");
    assert_matches_mergekit("solar", out.path());
}

#[test]
fn a_frankenmerge_takes_embeddings_from_the_first_model_and_the_head_from_the_last() {
    let out = scale_case("franken");
    assert_matches_mergekit("franken", out.path());
}

#[test]
fn tied_embeddings_stay_tied_and_a_cast_to_bf16_matches_mergekit() {
    let out = scale_case("tied-bf16");
    assert_matches_mergekit("tied-bf16", out.path());
    let model = SourceModel::open("out", out.path()).unwrap();
    assert!(!model.store.contains("lm_head.weight"));
    assert_eq!(model.layer_dtype().unwrap(), Dtype::BF16);
}

#[test]
fn scaled_projections_match_mergekits_passthrough_scale() {
    assert_matches_mergekit("scaled", scale_case("scaled").path());
    assert_matches_mergekit("llama-pro", scale_case("llama-pro").path());
}

/// `config = "*.yml"` on a `scale` step, through `dus run`: the merge fixtures' passthrough cases
/// (`tests/fixtures/merge/cases.json`, made by mergekit 0.1.5) — two overlapping slices of one model with
/// `scale` filters and a cast to bf16, and a two-model frankenmerge — give mergekit's tensors bit for bit,
/// and mergekit's card and config copy.
#[test]
fn passthrough_yaml_configs_on_the_scale_step_equal_mergekit() {
    let merge = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merge.join("cases.json")).unwrap()).unwrap();
    for name in ["passthrough_dus", "passthrough_frankenmerge"] {
        let case = cases
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        assert_eq!(case["step"], "scale");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("p.yml"),
            serde_json::to_string_pretty(&case["mergekit"]).unwrap(),
        )
        .unwrap();
        let models: Vec<&str> = case["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        let mut flow = String::from("[workflow]\nname = \"p\"\noutput = \"runs\"\n");
        for m in &models {
            flow += &format!(
                "[models.{m}]\npath = \"{}\"\n",
                merge.join("models").join(m).display()
            );
        }
        flow += &format!(
            "[steps.scaled]\nkind = \"scale\"\ninputs = {{ model = {models:?} }}\nconfig = \"p.yml\"\n"
        );
        std::fs::write(tmp.path().join("flow.toml"), flow).unwrap();
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_dus"))
            .args(["run", "flow.toml"])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = std::fs::read_dir(tmp.path().join("runs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("manifest.json").exists())
            .unwrap();
        let ours = dusflow::model::TensorStore::open(&out).unwrap();
        let theirs = dusflow::model::TensorStore::open(&merge.join("outputs").join(name)).unwrap();
        let mut a: Vec<&str> = ours.names().collect();
        let mut b: Vec<&str> = theirs.names().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}");
        for t in a {
            assert_eq!(
                ours.meta(t).unwrap().dtype,
                theirs.meta(t).unwrap().dtype,
                "{name}: {t}"
            );
            assert_eq!(
                ours.bytes(t).unwrap(),
                theirs.bytes(t).unwrap(),
                "{name}: {t}"
            );
        }
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains("merged using the Passthrough merge method."),
            "{card}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
            std::fs::read_to_string(tmp.path().join("p.yml")).unwrap()
        );
    }
}
