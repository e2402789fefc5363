//! Turning examples into text segments, each marked learned or not: the Stanford Alpaca prompt (exact
//! text), plain prompt/completion, GSM8K question/answer, and a ChatML chat template.

use super::format::{Example, Message};
use anyhow::{bail, Result};

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

/// Segments of an SFT example: Alpaca → prompt + output; prompt/completion → as written (TRL
/// semantics: plain concatenation; GSM8K records arrive already as `Question: …\nAnswer:` + ` answer`);
/// chat → ChatML. EOS is appended by the tokenisation step.
/// Text and preference records are not SFT examples.
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
        Example::Preference { .. } => {
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
