//! A model folder's chat template, read as transformers reads it: `chat_template.jinja` when the folder has
//! one (newer models ship it on its own), else the `chat_template` key of `tokenizer_config.json` (a string,
//! or a list of named templates of which `default` is used), together with the special-token strings
//! (`bos_token`, `eos_token`, …) that transformers hands every template.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The special-token attributes transformers passes to a chat template (`special_tokens_map`).
pub const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
];

/// A model's own chat template and the variables transformers renders it with.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// Where it came from, for messages: `<folder>/chat_template.jinja` or `<folder>/tokenizer_config.json`.
    pub origin: String,
    /// The special tokens as strings, by attribute name (only those the tokenizer defines), plus
    /// `additional_special_tokens` as a list of strings when present.
    pub special_tokens: Map<String, Value>,
}

/// The special-token strings of the tokenizer in `dir` (`tokenizer_config.json`, then
/// `special_tokens_map.json` for those it lacks), as transformers' `special_tokens_map`: a token written
/// as an `AddedToken` object contributes its `content`; `null` tokens are left out.
pub fn special_tokens_map(dir: &Path) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Some(config) = read_json(&dir.join(file))? else {
            continue;
        };
        for key in SPECIAL_TOKEN_KEYS {
            if out.contains_key(*key) {
                continue;
            }
            let value = match config.get(*key) {
                Some(Value::Array(items)) => {
                    let names: Vec<Value> = items
                        .iter()
                        .filter_map(token_text)
                        .map(Value::String)
                        .collect();
                    (!names.is_empty()).then_some(Value::Array(names))
                }
                Some(v) => token_text(v).map(Value::String),
                None => None,
            };
            if let Some(v) = value {
                out.insert(key.to_string(), v);
            }
        }
    }
    Ok(out)
}

/// Reads the chat template of the model folder `dir`; `None` when it has none.
pub fn read_chat_template(dir: &Path) -> Result<Option<ModelChatTemplate>> {
    let jinja = dir.join("chat_template.jinja");
    let config_path = dir.join("tokenizer_config.json");
    let (source, origin) = if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        (text, jinja.display().to_string())
    } else {
        let Some(config) = read_json(&config_path)? else {
            return Ok(None);
        };
        let origin = config_path.display().to_string();
        match config.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => (s.clone(), origin),
            Some(Value::Array(named)) => {
                let default = named.iter().find(|t| {
                    t.get("name").and_then(Value::as_str) == Some("default")
                });
                let Some(template) = default.and_then(|t| t.get("template")).and_then(Value::as_str)
                else {
                    let names: Vec<&str> = named
                        .iter()
                        .filter_map(|t| t.get("name").and_then(Value::as_str))
                        .collect();
                    bail!(
                        "{origin}: `chat_template` lists named templates ({}) but none is called \"default\"",
                        names.join(", ")
                    );
                };
                (template.to_string(), format!("{origin} (template \"default\")"))
            }
            Some(other) => bail!(
                "{origin}: `chat_template` must be a string or a list of {{name, template}}, got {other}"
            ),
        }
    };
    Ok(Some(ModelChatTemplate {
        source,
        origin,
        special_tokens: special_tokens_map(dir)?,
    }))
}

/// A special token's text: a string, or the `content` of an `AddedToken` object.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{}: invalid JSON", path.display())
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_jinja_file_wins_and_added_tokens_become_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
            "chat_template": "{{ messages[0].content }}",
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            json!({"unk_token": "<unk>", "eos_token": "ignored"}).to_string(),
        )
        .unwrap();
        let t = read_chat_template(dir.path()).unwrap().unwrap();
        assert_eq!(t.source, "{{ messages[0].content }}");
        assert!(t.origin.ends_with("tokenizer_config.json"));
        assert_eq!(
            Value::Object(t.special_tokens.clone()),
            json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}").unwrap();
        let t = read_chat_template(dir.path()).unwrap().unwrap();
        assert_eq!(t.source, "{{ bos_token }}");
        assert!(t.origin.ends_with("chat_template.jinja"));
    }

    #[test]
    fn named_templates_use_default_and_a_folder_without_one_has_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_chat_template(dir.path()).unwrap().is_none());
        let named = json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        std::fs::write(dir.path().join("tokenizer_config.json"), named.to_string()).unwrap();
        assert_eq!(read_chat_template(dir.path()).unwrap().unwrap().source, "D");
        let no_default = json!({"chat_template": [{"name": "rag", "template": "R"}]});
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            no_default.to_string(),
        )
        .unwrap();
        let err = read_chat_template(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("none is called \"default\"") && err.contains("rag"),
            "{err}"
        );
    }
}
