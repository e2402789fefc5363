//! Record layouts (`text`, `alpaca`, `prompt-completion`, `chat`, `preference`, `gsm8k`) and the typed
//! [`Example`] each JSON record becomes, with an optional field mapping for other layouts.

use anyhow::{bail, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a dataset's records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordFormat {
    /// `{text}`: a pretraining document.
    Text,
    /// `{instruction, input, output}` (Stanford Alpaca; `input` may be empty or absent).
    Alpaca,
    /// `{prompt, completion}`.
    PromptCompletion,
    /// `{messages: [{role, content}]}`, rendered with a chat template.
    Chat,
    /// `{prompt, chosen, rejected}` (preference pairs, for DPO).
    Preference,
    /// `{question, answer}` (GSM8K); becomes prompt `Question: {question}\nAnswer:`, completion ` {answer}`.
    Gsm8k,
}

impl RecordFormat {
    /// Parses a format name as written in `[datasets.*] format` or a dataset artifact's `info.json`.
    /// `auto` is not a format: see [`RecordFormat::detect`].
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "text" => Self::Text,
            "alpaca" => Self::Alpaca,
            "prompt-completion" | "prompt_completion" => Self::PromptCompletion,
            "chat" | "messages" => Self::Chat,
            "preference" => Self::Preference,
            "gsm8k" => Self::Gsm8k,
            other => bail!(
                "unknown dataset format {other:?} (expected text, alpaca, prompt-completion, chat, preference, gsm8k or auto)"
            ),
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Alpaca => "alpaca",
            Self::PromptCompletion => "prompt-completion",
            Self::Chat => "chat",
            Self::Preference => "preference",
            Self::Gsm8k => "gsm8k",
        }
    }

    /// The field names this layout reads.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Text => &["text"],
            Self::Alpaca => &["instruction", "input", "output"],
            Self::PromptCompletion => &["prompt", "completion"],
            Self::Chat => &["messages"],
            Self::Preference => &["prompt", "chosen", "rejected"],
            Self::Gsm8k => &["question", "answer"],
        }
    }

    /// Guesses the layout from one record's keys (after the field mapping): the first layout, in the order
    /// preference, chat, alpaca, prompt-completion, gsm8k, text, whose required fields are all present.
    pub fn detect(record: &Value, fields: &FieldMap) -> Option<Self> {
        let obj = record.as_object()?;
        [
            Self::Preference,
            Self::Chat,
            Self::Alpaca,
            Self::PromptCompletion,
            Self::Gsm8k,
            Self::Text,
        ]
        .into_iter()
        .find(|f| {
            f.required()
                .iter()
                .all(|k| obj.contains_key(fields.source(k)))
        })
    }

    fn required(self) -> &'static [&'static str] {
        match self {
            Self::Alpaca => &["instruction", "output"],
            other => other.fields(),
        }
    }
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
            RecordFormat::Preference => Example::Preference {
                prompt: get("prompt")?,
                chosen: get("chosen")?,
                rejected: get("rejected")?,
            },
            RecordFormat::Chat => {
                let name = fields.source("messages");
                let Some(list) = obj.get(name) else {
                    bail!("missing field {name:?} (format chat)")
                };
                let Value::Array(items) = list else {
                    bail!("field {name:?} must be a list of {{role, content}}")
                };
                let mut messages = Vec::with_capacity(items.len());
                for (i, m) in items.iter().enumerate() {
                    let message: Message = serde_json::from_value(m.clone()).map_err(|e| {
                        anyhow::anyhow!("{name}[{i}]: {e} (expected {{role, content}})")
                    })?;
                    if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
                        bail!(
                            "{name}[{i}]: unknown role {:?} (expected system, user or assistant)",
                            message.role
                        );
                    }
                    messages.push(message);
                }
                if !messages.iter().any(|m| m.role == "assistant") {
                    bail!("field {name:?} has no assistant message to learn");
                }
                Example::Chat(messages)
            }
        })
    }
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
            RecordFormat::detect(&json!({"question": "a", "answer": "b"}), &none),
            Some(RecordFormat::Gsm8k)
        );
        assert_eq!(
            RecordFormat::detect(
                &json!({"prompt": "a", "chosen": "b", "rejected": "c"}),
                &none
            ),
            Some(RecordFormat::Preference)
        );
    }
}
