//! Turning examples into text segments, each marked learned or not: the Stanford Alpaca prompt (exact
//! text), plain prompt/completion, GSM8K question/answer; and the `template` choice of the training steps,
//! which renders conversations with a chat template ([`super::chat_template`]).

use super::chat_template::{ChatTemplate, PreferenceText, RenderedChat};
use super::format::{Example, Message};
use anyhow::{bail, Context, Result};
use dusflow_model::ModelChatTemplate;
use serde::{Deserialize, Serialize};

/// Alpaca prompt for records with a non-empty `input` (stanford_alpaca `PROMPT_DICT["prompt_input"]`).
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
/// Alpaca prompt for records without `input` (`PROMPT_DICT["prompt_no_input"]`).
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// A piece of rendered text and whether the loss covers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Whether its tokens are training targets.
    pub learn: bool,
}

impl Segment {
    fn shown(text: impl Into<String>) -> Self {
        Segment {
            text: text.into(),
            learn: false,
        }
    }
    fn learned(text: impl Into<String>) -> Self {
        Segment {
            text: text.into(),
            learn: true,
        }
    }
}

/// The Alpaca prompt for an instruction and optional input, exactly as stanford_alpaca formats it.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

/// GSM8K-style prompt `Question: {q}\nAnswer:` (the evaluation harness's format); the answer follows after a space.
pub fn question_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

/// ChatML rendering of a conversation: `<|im_start|>{role}\n{content}<|im_end|>\n` per message; the
/// content and closing tag of assistant messages are learned, everything else is shown.
pub fn chatml(messages: &[Message]) -> Vec<Segment> {
    let mut out = Vec::with_capacity(messages.len() * 2);
    for m in messages {
        out.push(Segment::shown(format!("<|im_start|>{}\n", m.role)));
        let body = format!("{}<|im_end|>\n", m.content);
        out.push(if m.role == "assistant" {
            Segment::learned(body)
        } else {
            Segment::shown(body)
        });
    }
    out
}

/// The `template` key of `sft` and `dpo`: how conversations (`chat`, `orca-dpo`, `ultrafeedback` records) and
/// Alpaca records are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateChoice {
    /// The model's own chat template when its folder has one, else ChatML; Alpaca records with the
    /// Stanford Alpaca prompt.
    #[default]
    Auto,
    /// The model's own chat template (an error when it has none), also for Alpaca records (as a user turn —
    /// the instruction, then a blank line and the input when there is one — and the assistant's output).
    Model,
    /// The built-in ChatML template, also for Alpaca records (as a conversation, as for `model`).
    Chatml,
    /// The paper's: Alpaca records with the Stanford Alpaca prompt, conversations with SOLAR's
    /// Alpaca-styled chat template (`### System:` / `### User:` / `### Assistant:`).
    Alpaca,
}

impl TemplateChoice {
    /// Whether this is the default (left out of normalised configs so adding the key changed no key).
    pub fn is_auto(&self) -> bool {
        *self == TemplateChoice::Auto
    }
}

/// The text of one SFT example: segments tokenised one by one (Alpaca prompt, prompt/completion), or a
/// conversation rendered by a chat template and tokenised whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftText {
    /// Shown and learned pieces.
    Segments(Vec<Segment>),
    /// A rendered conversation.
    Chat(RenderedChat),
}

/// The templates a training step renders its examples with, resolved from its `template` choice and the
/// model's folder. A model's template is compiled when the first conversation needs it, so data without
/// conversations never depends on it.
#[derive(Debug)]
pub struct Templates {
    source: ChatSource,
    compiled: std::sync::OnceLock<ChatTemplate>,
    alpaca_as_chat: bool,
}

#[derive(Debug)]
enum ChatSource {
    Model(ModelChatTemplate, String),
    Chatml,
    Alpaca,
}

impl Templates {
    /// Resolves `choice` for a model whose folder's chat template is `model` (`None` when it has none);
    /// `model_name` names it in errors.
    pub fn resolve(
        choice: TemplateChoice,
        model: Option<&ModelChatTemplate>,
        model_name: &str,
    ) -> Result<Self> {
        let from_model =
            |t: &ModelChatTemplate| ChatSource::Model(t.clone(), model_name.to_string());
        let (source, alpaca_as_chat) = match (choice, model) {
            (TemplateChoice::Auto, Some(t)) => (from_model(t), false),
            (TemplateChoice::Auto, None) => (ChatSource::Chatml, false),
            (TemplateChoice::Model, Some(t)) => (from_model(t), true),
            (TemplateChoice::Model, None) => bail!(
                "template = \"model\", but model `{model_name}` has no chat template (no \
                 chat_template.jinja, and no `chat_template` in its tokenizer_config.json); use \
                 template = \"chatml\" or \"alpaca\""
            ),
            (TemplateChoice::Chatml, _) => (ChatSource::Chatml, true),
            (TemplateChoice::Alpaca, _) => (ChatSource::Alpaca, false),
        };
        Ok(Templates {
            source,
            compiled: std::sync::OnceLock::new(),
            alpaca_as_chat,
        })
    }

    /// The chat template conversations are rendered with (compiled on first use).
    pub fn chat(&self) -> Result<&ChatTemplate> {
        if let Some(t) = self.compiled.get() {
            return Ok(t);
        }
        let t = match &self.source {
            ChatSource::Model(t, name) => {
                ChatTemplate::from_model(t).with_context(|| format!("model `{name}`"))?
            }
            ChatSource::Chatml => ChatTemplate::chatml(),
            ChatSource::Alpaca => ChatTemplate::alpaca_chat(),
        };
        Ok(self.compiled.get_or_init(|| t))
    }

    /// What renders what, for reports: e.g. `conversations: chatml (built-in); alpaca records: Stanford
    /// Alpaca prompt`.
    pub fn describe(&self) -> String {
        let alpaca = if self.alpaca_as_chat {
            "as conversations"
        } else {
            "Stanford Alpaca prompt"
        };
        let chat = match &self.source {
            ChatSource::Model(t, _) => t.origin.clone(),
            ChatSource::Chatml => "chatml (built-in)".into(),
            ChatSource::Alpaca => "alpaca (built-in)".into(),
        };
        format!("conversations: {chat}; alpaca records: {alpaca}")
    }

    /// The text of an SFT example.
    pub fn sft(&self, example: &Example) -> Result<SftText> {
        Ok(match example {
            Example::Chat(messages) => SftText::Chat(self.chat()?.conversation(messages)?),
            Example::Alpaca {
                instruction,
                input,
                output,
            } if self.alpaca_as_chat => {
                let user = if input.is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                SftText::Chat(self.chat()?.conversation(&[
                    Message {
                        role: "user".into(),
                        content: user,
                    },
                    Message {
                        role: "assistant".into(),
                        content: output.clone(),
                    },
                ])?)
            }
            other => SftText::Segments(sft_segments(other)?),
        })
    }

    /// The text of a preference pair: plain pairs as written, conversational ones through the chat template.
    pub fn preference(&self, example: &Example) -> Result<PreferenceText> {
        match example {
            Example::Preference {
                prompt,
                chosen,
                rejected,
            } => Ok(PreferenceText {
                prompt: prompt.clone(),
                chosen: chosen.clone(),
                rejected: rejected.clone(),
                add_special_tokens: true,
            }),
            Example::ChatPreference {
                context,
                chosen,
                rejected,
            } => self.chat()?.preference(context, chosen, rejected),
            _ => bail!("not a preference pair"),
        }
    }
}

/// Segments of an SFT example: Alpaca → prompt + output; prompt/completion → as written (TRL
/// semantics: plain concatenation; GSM8K records arrive already as `Question: …\nAnswer:` + ` answer`);
/// chat → the built-in ChatML ([`Templates::sft`] renders chat with the step's template instead). EOS is
/// appended by the tokenisation step. Text and preference records are not SFT examples.
pub fn sft_segments(example: &Example) -> Result<Vec<Segment>> {
    Ok(match example {
        Example::Alpaca {
            instruction,
            input,
            output,
        } => {
            vec![
                Segment::shown(alpaca_prompt(instruction, input)),
                Segment::learned(output.clone()),
            ]
        }
        Example::PromptCompletion { prompt, completion } => {
            vec![
                Segment::shown(prompt.clone()),
                Segment::learned(completion.clone()),
            ]
        }
        Example::Chat(messages) => chatml(messages),
        Example::Text(_) => bail!("a text record is not an SFT example (use the pretrain step)"),
        Example::Preference { .. } | Example::ChatPreference { .. } => {
            bail!("a preference record is not an SFT example (use the dpo step)")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_prompts_match_stanford_alpaca() {
        assert_eq!(
            alpaca_prompt("Add.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Response:"
        );
        assert!(alpaca_prompt("Add.", "2 3").ends_with("### Input:\n2 3\n\n### Response:"));
    }

    #[test]
    fn template_choices_resolve_lazily_and_a_missing_model_template_is_an_error() {
        let err = Templates::resolve(TemplateChoice::Model, None, "tiny")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model `tiny` has no chat template"), "{err}");
        let auto = Templates::resolve(TemplateChoice::Auto, None, "tiny").unwrap();
        assert_eq!(
            auto.describe(),
            "conversations: chatml (built-in); alpaca records: Stanford Alpaca prompt"
        );
        let alpaca = Example::Alpaca {
            instruction: "Add.".into(),
            input: "2 3".into(),
            output: "5".into(),
        };
        let chatml = Templates::resolve(TemplateChoice::Chatml, None, "tiny").unwrap();
        let SftText::Chat(chat) = chatml.sft(&alpaca).unwrap() else {
            panic!("an Alpaca record as a conversation")
        };
        assert_eq!(
            chat.text,
            "<|im_start|>user\nAdd.\n\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        );
        assert_eq!(&chat.text[chat.learned[0].clone()], "5<|im_end|>\n");
        // A model template that does not compile fails only when a conversation needs it.
        let broken = ModelChatTemplate {
            source: "{% for %}".into(),
            origin: "m/tokenizer_config.json".into(),
            special_tokens: Default::default(),
        };
        let t = Templates::resolve(TemplateChoice::Auto, Some(&broken), "m").unwrap();
        assert!(matches!(t.sft(&alpaca).unwrap(), SftText::Segments(_)));
        let conversation = Example::Chat(vec![
            Message {
                role: "user".into(),
                content: "q".into(),
            },
            Message {
                role: "assistant".into(),
                content: "a".into(),
            },
        ]);
        let err = format!("{:#}", t.sft(&conversation).unwrap_err());
        assert!(
            err.contains("does not compile") && err.contains("model `m`"),
            "{err}"
        );
    }

    #[test]
    fn chatml_learns_assistant_turns_only() {
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let segs = chatml(&[
            m("system", "Be brief."),
            m("user", "2+2?"),
            m("assistant", "4"),
        ]);
        let text: String = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        );
        let learned: Vec<&str> = segs
            .iter()
            .filter(|s| s.learn)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(learned, vec!["4<|im_end|>\n"]);
    }
}
