//! Record layouts (`text`, `alpaca`, `prompt-completion`, `chat`, `preference`, `orca-dpo`,
//! `ultrafeedback`, `gsm8k`, `arc`) and the typed [`Example`] each JSON record becomes, with an optional field
//! mapping for other layouts.
//!
//! The two public preference layouts become conversational pairs ([`Example::ChatPreference`]), rendered
//! later with the training step's chat template:
//! - `orca-dpo` (Intel/orca_dpo_pairs: `{system, question, chosen, rejected}`, strings): context = a system
//!   message (left out when `system` is empty or absent) and the user's question; replies `chosen`,
//!   `rejected`.
//! - `ultrafeedback` (HuggingFaceH4/ultrafeedback_binarized: `chosen` and `rejected` are message lists
//!   ending in the assistant reply, with the same conversation before it): context = the messages before
//!   the last; replies = the last messages' contents.

use anyhow::{bail, Result};
pub use dusflow_core::record_format::{RecordFormat, FORMATS};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Guesses the layout from one record's keys (after the field mapping): the first layout, in the order
/// ultrafeedback, preference, orca-dpo, chat, alpaca, prompt-completion, gsm8k, arc, text, whose required
/// fields are all present — where `chosen` is a list for ultrafeedback and a string otherwise.
pub fn detect_format(record: &Value, fields: &FieldMap) -> Option<RecordFormat> {
    let obj = record.as_object()?;
    let chosen_is_list = obj
        .get(fields.source("chosen"))
        .is_some_and(Value::is_array);
    FORMATS.iter().map(|row| row.format).find(|f| {
        let typed = match f {
            RecordFormat::UltraFeedback => chosen_is_list,
            RecordFormat::Preference | RecordFormat::OrcaDpo => !chosen_is_list,
            _ => true,
        };
        typed
            && f.required()
                .iter()
                .all(|k| obj.contains_key(fields.source(k)))
    })
}

/// Renames from a layout's field names to the names used in a file, e.g. `{ prompt = "question" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMap(pub IndexMap<String, String>);

impl FieldMap {
    /// The file's name for layout field `field` (itself when not mapped).
    pub fn source<'a>(&'a self, field: &'a str) -> &'a str {
        self.0.get(field).map(String::as_str).unwrap_or(field)
    }

    /// Checks that every mapped key is a field of `format`.
    pub fn validate(&self, format: RecordFormat) -> Result<()> {
        for key in self.0.keys() {
            if !format.fields().contains(&key.as_str()) {
                bail!(
                    "field mapping names {key:?}, which is not a field of format {} (fields: {})",
                    format.name(),
                    format.fields().join(", ")
                );
            }
        }
        Ok(())
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A record in its typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A pretraining document.
    Text(String),
    /// An Alpaca triple (`input` empty when absent).
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional context.
        input: String,
        /// The response.
        output: String,
    },
    /// A prompt and the completion to learn (also GSM8K question/answer).
    PromptCompletion {
        /// Shown, not learned.
        prompt: String,
        /// Learned.
        completion: String,
    },
    /// A conversation; assistant turns are learned.
    Chat(Vec<Message>),
    /// A conversation and two assistant replies to it (`orca-dpo`, `ultrafeedback`), rendered with a chat
    /// template when used.
    ChatPreference {
        /// The conversation before the reply (system, user, …).
        context: Vec<Message>,
        /// The preferred reply's content.
        chosen: String,
        /// The dispreferred reply's content.
        rejected: String,
    },
    /// A preference pair.
    Preference {
        /// The prompt.
        prompt: String,
        /// The preferred response.
        chosen: String,
        /// The dispreferred response.
        rejected: String,
    },
}

impl Example {
    /// Reads `record` as `format` through `fields`. The error says which field is missing or mistyped.
    pub fn parse(record: &Value, format: RecordFormat, fields: &FieldMap) -> Result<Example> {
        let Some(obj) = record.as_object() else {
            bail!("record is not a JSON object")
        };
        let get = |k: &str| -> Result<String> {
            let name = fields.source(k);
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("field {name:?} must be a string, got {}", kind_of(other)),
                None => bail!("missing field {name:?} (format {})", format.name()),
            }
        };
        Ok(match format {
            RecordFormat::Text => Example::Text(get("text")?),
            RecordFormat::Alpaca => {
                let name = fields.source("input");
                let input = match obj.get(name) {
                    None | Some(Value::Null) => String::new(),
                    Some(_) => get("input")?,
                };
                Example::Alpaca {
                    instruction: get("instruction")?,
                    input,
                    output: get("output")?,
                }
            }
            RecordFormat::PromptCompletion => Example::PromptCompletion {
                prompt: get("prompt")?,
                completion: get("completion")?,
            },
            RecordFormat::Gsm8k => Example::PromptCompletion {
                prompt: super::template::question_prompt(&get("question")?),
                completion: format!(" {}", get("answer")?),
            },
            RecordFormat::Arc => {
                let name = fields.source("choices");
                let texts = obj
                    .get(name)
                    .and_then(|c| c.get("text"))
                    .and_then(Value::as_array);
                let labels = obj
                    .get(name)
                    .and_then(|c| c.get("label"))
                    .and_then(Value::as_array);
                let (Some(texts), Some(labels)) = (texts, labels) else {
                    bail!("field {name:?} must be {{text: [...], label: [...]}} (format arc)")
                };
                let key = get("answerKey")?;
                let Some(i) = labels.iter().position(|l| l.as_str() == Some(key.as_str())) else {
                    bail!("answerKey {key:?} is none of the labels in {name:?}")
                };
                let Some(Value::String(answer)) = texts.get(i) else {
                    bail!("{name:?}.text[{i}] must be a string")
                };
                Example::PromptCompletion {
                    prompt: super::template::question_prompt(&get("question")?),
                    completion: format!(" {answer}"),
                }
            }
            RecordFormat::Preference => Example::Preference {
                prompt: get("prompt")?,
                chosen: get("chosen")?,
                rejected: get("rejected")?,
            },
            RecordFormat::OrcaDpo => {
                let name = fields.source("system");
                let system = match obj.get(name) {
                    None | Some(Value::Null) => String::new(),
                    Some(_) => get("system")?,
                };
                let mut context = Vec::with_capacity(2);
                if !system.is_empty() {
                    context.push(Message {
                        role: "system".into(),
                        content: system,
                    });
                }
                context.push(Message {
                    role: "user".into(),
                    content: get("question")?,
                });
                Example::ChatPreference {
                    context,
                    chosen: get("chosen")?,
                    rejected: get("rejected")?,
                }
            }
            RecordFormat::UltraFeedback => {
                let chosen = messages(obj, fields.source("chosen"))?;
                let rejected = messages(obj, fields.source("rejected"))?;
                let (Some((c_last, c_context)), Some((r_last, r_context))) =
                    (chosen.split_last(), rejected.split_last())
                else {
                    bail!("chosen and rejected must each hold at least one message");
                };
                for (name, last) in [("chosen", c_last), ("rejected", r_last)] {
                    if last.role != "assistant" {
                        bail!(
                            "the last message of {:?} must be the assistant's reply, got role {:?}",
                            fields.source(name),
                            last.role
                        );
                    }
                }
                if c_context != r_context {
                    bail!(
                        "chosen and rejected must share the conversation before their last message"
                    );
                }
                Example::ChatPreference {
                    context: c_context.to_vec(),
                    chosen: c_last.content.clone(),
                    rejected: r_last.content.clone(),
                }
            }
            RecordFormat::Chat => {
                let name = fields.source("messages");
                let messages = messages(obj, name)?;
                if !messages.iter().any(|m| m.role == "assistant") {
                    bail!("field {name:?} has no assistant message to learn");
                }
                Example::Chat(messages)
            }
        })
    }
}

/// The `{role, content}` list in field `name`.
fn messages(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Vec<Message>> {
    let Some(list) = obj.get(name) else {
        bail!("missing field {name:?} (a list of {{role, content}} messages)")
    };
    let Value::Array(items) = list else {
        bail!("field {name:?} must be a list of {{role, content}}")
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let message: Message = serde_json::from_value(m.clone())
            .map_err(|e| anyhow::anyhow!("{name}[{i}]: {e} (expected {{role, content}})"))?;
        if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
            bail!(
                "{name}[{i}]: unknown role {:?} (expected system, user or assistant)",
                message.role
            );
        }
        messages.push(message);
    }
    Ok(messages)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arc_records_become_the_leaderboard_prompt_and_the_keyed_choice() {
        let none = FieldMap::default();
        let r = json!({"id": "x", "question": "What is 2 plus 3?",
            "choices": {"text": ["4", "5", "6", "7"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"});
        assert_eq!(detect_format(&r, &none), Some(RecordFormat::Arc));
        assert_eq!(
            Example::parse(&r, RecordFormat::Arc, &none).unwrap(),
            Example::PromptCompletion {
                prompt: "Question: What is 2 plus 3?\nAnswer:".into(),
                completion: " 5".into()
            }
        );
        let bad =
            json!({"question": "q", "choices": {"text": ["4"], "label": ["A"]}, "answerKey": "E"});
        let err = Example::parse(&bad, RecordFormat::Arc, &none).unwrap_err();
        assert!(err.to_string().contains("answerKey \"E\""), "{err}");
    }

    #[test]
    fn parses_each_layout_and_mapping() {
        let none = FieldMap::default();
        let a = Example::parse(
            &json!({"instruction": "i", "output": "o"}),
            RecordFormat::Alpaca,
            &none,
        )
        .unwrap();
        assert_eq!(
            a,
            Example::Alpaca {
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        let map = FieldMap(
            [("prompt".to_string(), "q".to_string())]
                .into_iter()
                .collect(),
        );
        let p = Example::parse(
            &json!({"q": "x", "completion": "y"}),
            RecordFormat::PromptCompletion,
            &map,
        )
        .unwrap();
        assert_eq!(
            p,
            Example::PromptCompletion {
                prompt: "x".into(),
                completion: "y".into()
            }
        );
        let err = Example::parse(&json!({"text": 3}), RecordFormat::Text, &none).unwrap_err();
        assert!(
            err.to_string().contains("\"text\" must be a string"),
            "{err}"
        );
        assert_eq!(
            detect_format(&json!({"question": "a", "answer": "b"}), &none),
            Some(RecordFormat::Gsm8k)
        );
        assert_eq!(
            detect_format(
                &json!({"prompt": "a", "chosen": "b", "rejected": "c"}),
                &none
            ),
            Some(RecordFormat::Preference)
        );
    }

    #[test]
    fn orca_and_ultrafeedback_become_conversational_pairs() {
        let none = FieldMap::default();
        let orca =
            json!({"system": "Be kind.", "question": "2+2?", "chosen": "4", "rejected": "5"});
        assert_eq!(detect_format(&orca, &none), Some(RecordFormat::OrcaDpo));
        let m = |role: &str, c: &str| Message {
            role: role.into(),
            content: c.into(),
        };
        assert_eq!(
            Example::parse(&orca, RecordFormat::OrcaDpo, &none).unwrap(),
            Example::ChatPreference {
                context: vec![m("system", "Be kind."), m("user", "2+2?")],
                chosen: "4".into(),
                rejected: "5".into(),
            }
        );
        let no_system = json!({"system": "", "question": "q", "chosen": "a", "rejected": "b"});
        let Example::ChatPreference { context, .. } =
            Example::parse(&no_system, RecordFormat::OrcaDpo, &none).unwrap()
        else {
            panic!("a preference pair")
        };
        assert_eq!(context, vec![m("user", "q")]);

        let msg = |role: &str, c: &str| json!({"role": role, "content": c});
        let uf = json!({
            "prompt": "2+2?",
            "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
            "rejected": [msg("user", "2+2?"), msg("assistant", "5")],
            "score_chosen": 9.0,
        });
        assert_eq!(detect_format(&uf, &none), Some(RecordFormat::UltraFeedback));
        assert_eq!(
            Example::parse(&uf, RecordFormat::UltraFeedback, &none).unwrap(),
            Example::ChatPreference {
                context: vec![m("user", "2+2?")],
                chosen: "4".into(),
                rejected: "5".into(),
            }
        );
        let differing = json!({
            "chosen": [msg("user", "a"), msg("assistant", "4")],
            "rejected": [msg("user", "b"), msg("assistant", "5")],
        });
        let err = Example::parse(&differing, RecordFormat::UltraFeedback, &none).unwrap_err();
        assert!(err.to_string().contains("share the conversation"), "{err}");
        let user_last = json!({"chosen": [msg("user", "a")], "rejected": [msg("user", "a")]});
        let err = Example::parse(&user_last, RecordFormat::UltraFeedback, &none).unwrap_err();
        assert!(err.to_string().contains("assistant's reply"), "{err}");
        assert!(RecordFormat::UltraFeedback.is_preference() && !RecordFormat::Chat.is_preference());
    }
}
