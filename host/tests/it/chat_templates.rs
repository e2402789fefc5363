//! Chat templates against transformers' `apply_chat_template` (fixtures/chat/make_fixtures.py): rendered
//! text with and without the generation prompt, token ids, the assistant-only loss mask, and the templates'
//! own errors, for the templates of Mistral-Instruct, Mixtral-Instruct, Llama-2-chat, Llama-3-Instruct,
//! Zephyr, ChatML (OpenHermes), SOLAR-Instruct and Qwen3, with the real Llama-2, Llama-3 and Qwen3
//! tokenizers (fetched by scripts/fetch-test-tokenizer.sh; their cases are skipped when the variables are
//! unset) and dusflow's byte-level tokenizer (always).

use dusflow::data::chat_template::{ALPACA_CHAT_TEMPLATE, CHATML_TEMPLATE};
use dusflow::data::{tokenize_chat, ChatTemplate, Message};
use dusflow::model::{read_chat_template, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn tokenizer_dir(name: &str) -> Option<PathBuf> {
    let var = match name {
        "byte" => {
            return Some(
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo/byte_tokenizer"),
            )
        }
        "llama2" => "DUSFLOW_LLAMA_TOKENIZER_DIR",
        "llama3" => "DUSFLOW_LLAMA3_TOKENIZER_DIR",
        "qwen3" => "DUSFLOW_QWEN3_TOKENIZER_DIR",
        other => panic!("unknown tokenizer {other}"),
    };
    std::env::var(var).ok().map(PathBuf::from)
}

/// A model folder as a user would have it: the tokenizer's files plus the template as chat_template.jinja.
fn model_folder(dir: &Path, tokenizer: &Path, template: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if tokenizer.join(f).exists() {
            std::fs::copy(tokenizer.join(f), dir.join(f)).unwrap();
        }
    }
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn rendering_ids_and_assistant_masks_match_transformers() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (mut checked, mut skipped) = (0, std::collections::BTreeSet::new());
    for (n, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let tok_name = case["tokenizer"].as_str().unwrap();
        let Some(tok_dir) = tokenizer_dir(tok_name) else {
            skipped.insert(tok_name.to_string());
            continue;
        };
        let what = format!(
            "{name} / {tok_name} / {} / add_generation_prompt={}",
            case["conversation"], case["add_generation_prompt"]
        );
        let source =
            std::fs::read_to_string(fixtures().join(format!("templates/{name}.jinja"))).unwrap();
        let dir = tmp.path().join(n.to_string());
        model_folder(&dir, &tok_dir, &source);
        let model_template = read_chat_template(&dir).unwrap().unwrap();
        let mut template = ChatTemplate::from_model(&model_template).unwrap();
        if name == "helpers" {
            let kwargs = serde_json::json!({"date_string": "26 Jul 2024"});
            template = template.with_kwargs(kwargs.as_object().unwrap());
        }
        let conversation =
            messages(&fixture["conversations"][case["conversation"].as_str().unwrap()]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&conversation, agp);
        if let Some(error) = case.get("error") {
            let err = rendered.expect_err(&what).to_string();
            assert!(err.contains(error.as_str().unwrap()), "{what}: {err}");
            checked += 1;
            continue;
        }
        let text = rendered.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: text");
        let tok = Tokenizer::from_model_dir(&dir).unwrap();
        let ids = tok.encode(&text, false).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{what}: token ids");
        if case.get("not_incremental").is_some() {
            let err = template
                .conversation(&conversation)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("assistant's text cannot be told apart"),
                "{what}: {err}"
            );
        } else if let Some(mask) = case.get("assistant_mask") {
            let chat = template
                .conversation(&conversation)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_eq!(chat.text, text, "{what}");
            let row = tokenize_chat(&tok, &chat, usize::MAX).unwrap();
            assert_eq!(row.ids, want_ids, "{what}: ids of the training row");
            let want: Vec<bool> = mask
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64() == Some(1))
                .collect();
            assert_eq!(row.learn, want, "{what}: assistant mask");
            assert!(want.iter().any(|&l| l), "{what}: something is learned");
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases checked");
    if !skipped.is_empty() {
        eprintln!("skipped the cases of tokenizers {skipped:?}: set DUSFLOW_*_TOKENIZER_DIR (scripts/test does)");
    }
}

#[test]
fn the_built_in_templates_are_the_published_ones() {
    let read = |f: &str| std::fs::read_to_string(fixtures().join("templates").join(f)).unwrap();
    assert_eq!(CHATML_TEMPLATE, read("chatml-openhermes-2.5.jinja"));
    assert_eq!(ALPACA_CHAT_TEMPLATE, read("solar-10.7b-instruct.jinja"));
}
