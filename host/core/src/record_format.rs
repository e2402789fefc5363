//! Record layouts of datasets (`[datasets.*] format`), shared by the workflow checks and the data readers.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
    /// `{system, question, chosen, rejected}` (Intel/orca_dpo_pairs), rendered as ChatML pairs.
    OrcaDpo,
    /// `{chosen: [messages], rejected: [messages]}` (UltraFeedback binarized), rendered as ChatML pairs.
    UltraFeedback,
    /// `{question, answer}` (GSM8K); becomes prompt `Question: {question}\nAnswer:`, completion ` {answer}`.
    Gsm8k,
    /// `{question, choices: {text, label}, answerKey}` (ARC); becomes prompt `Question: {question}\nAnswer:`,
    /// completion ` {text of the answerKey choice}` — the Open LLM Leaderboard's ARC prompt and target.
    Arc,
}

/// Every layout, in the order `auto` tries them.
pub const ALL_FORMATS: &[RecordFormat] = &[
    RecordFormat::UltraFeedback,
    RecordFormat::Preference,
    RecordFormat::OrcaDpo,
    RecordFormat::Chat,
    RecordFormat::Alpaca,
    RecordFormat::PromptCompletion,
    RecordFormat::Gsm8k,
    RecordFormat::Arc,
    RecordFormat::Text,
];

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
            "orca-dpo" | "orca_dpo" | "orca_dpo_pairs" => Self::OrcaDpo,
            "ultrafeedback" | "ultrafeedback-binarized" | "ultrafeedback_binarized" => {
                Self::UltraFeedback
            }
            "gsm8k" => Self::Gsm8k,
            "arc" | "multiple-choice" => Self::Arc,
            other => bail!(
                "unknown dataset format {other:?} (expected text, alpaca, prompt-completion, chat, preference, orca-dpo, ultrafeedback, gsm8k, arc or auto)"
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
            Self::OrcaDpo => "orca-dpo",
            Self::UltraFeedback => "ultrafeedback",
            Self::Gsm8k => "gsm8k",
            Self::Arc => "arc",
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
            Self::OrcaDpo => &["system", "question", "chosen", "rejected"],
            Self::UltraFeedback => &["chosen", "rejected"],
            Self::Gsm8k => &["question", "answer"],
            Self::Arc => &["question", "choices", "answerKey"],
        }
    }

    /// Whether records of this layout are preference pairs (for DPO).
    pub fn is_preference(self) -> bool {
        matches!(self, Self::Preference | Self::OrcaDpo | Self::UltraFeedback)
    }

    /// The fields a record must have for this layout (the rest may be absent).
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Self::Alpaca => &["instruction", "output"],
            Self::OrcaDpo => &["question", "chosen", "rejected"],
            other => other.fields(),
        }
    }
}

/// A dataset's `format`: one layout, or `auto` (detected from the first record when the data is read).
///
/// Parsed when the workflow loads, so a misspelt format is reported at its line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FormatChoice {
    /// Detect the layout from the first record.
    #[default]
    Auto,
    /// This layout.
    Known(RecordFormat),
}

impl TryFrom<String> for FormatChoice {
    type Error = anyhow::Error;
    fn try_from(name: String) -> Result<Self> {
        if name == "auto" {
            return Ok(Self::Auto);
        }
        RecordFormat::from_name(&name).map(Self::Known)
    }
}

impl From<FormatChoice> for String {
    fn from(choice: FormatChoice) -> String {
        match choice {
            FormatChoice::Auto => "auto".to_string(),
            FormatChoice::Known(f) => f.name().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_round_trips_through_its_name() {
        for f in ALL_FORMATS {
            assert_eq!(RecordFormat::from_name(f.name()).unwrap(), *f);
            let choice: FormatChoice = String::from(FormatChoice::Known(*f)).try_into().unwrap();
            assert_eq!(choice, FormatChoice::Known(*f));
        }
        let err = FormatChoice::try_from("alpacca".to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown dataset format \"alpacca\""), "{err}");
    }
}
