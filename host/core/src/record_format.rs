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
    #[serde(rename = "ultrafeedback")]
    UltraFeedback,
    /// `{question, answer}` (GSM8K); becomes prompt `Question: {question}\nAnswer:`, completion ` {answer}`.
    Gsm8k,
    /// `{question, choices: {text, label}, answerKey}` (ARC); becomes prompt `Question: {question}\nAnswer:`,
    /// completion ` {text of the answerKey choice}` — the Open LLM Leaderboard's ARC prompt and target.
    Arc,
}

/// One row of the layout table: everything the checks and readers know about a layout.
#[derive(Debug, Clone, Copy)]
pub struct FormatSpec {
    /// The layout.
    pub format: RecordFormat,
    /// Its canonical name.
    pub name: &'static str,
    /// Other spellings accepted in `format = "..."` and `info.json`.
    pub aliases: &'static [&'static str],
    /// The field names it reads.
    pub fields: &'static [&'static str],
    /// The fields a record must have (the rest may be absent).
    pub required: &'static [&'static str],
    /// Whether its records are preference pairs (for DPO).
    pub preference: bool,
}

/// The layouts, in the order `auto` tries them (the first whose required fields a record has wins).
/// Adding a layout: a variant of [`RecordFormat`], a row here, and its parsing in `dusflow-data`'s `format`.
pub const FORMATS: &[FormatSpec] = &[
    FormatSpec {
        format: RecordFormat::UltraFeedback,
        name: "ultrafeedback",
        aliases: &["ultrafeedback-binarized", "ultrafeedback_binarized"],
        fields: &["chosen", "rejected"],
        required: &["chosen", "rejected"],
        preference: true,
    },
    FormatSpec {
        format: RecordFormat::Preference,
        name: "preference",
        aliases: &[],
        fields: &["prompt", "chosen", "rejected"],
        required: &["prompt", "chosen", "rejected"],
        preference: true,
    },
    FormatSpec {
        format: RecordFormat::OrcaDpo,
        name: "orca-dpo",
        aliases: &["orca_dpo", "orca_dpo_pairs"],
        fields: &["system", "question", "chosen", "rejected"],
        required: &["question", "chosen", "rejected"],
        preference: true,
    },
    FormatSpec {
        format: RecordFormat::Chat,
        name: "chat",
        aliases: &["messages"],
        fields: &["messages"],
        required: &["messages"],
        preference: false,
    },
    FormatSpec {
        format: RecordFormat::Alpaca,
        name: "alpaca",
        aliases: &[],
        fields: &["instruction", "input", "output"],
        required: &["instruction", "output"],
        preference: false,
    },
    FormatSpec {
        format: RecordFormat::PromptCompletion,
        name: "prompt-completion",
        aliases: &["prompt_completion"],
        fields: &["prompt", "completion"],
        required: &["prompt", "completion"],
        preference: false,
    },
    FormatSpec {
        format: RecordFormat::Gsm8k,
        name: "gsm8k",
        aliases: &[],
        fields: &["question", "answer"],
        required: &["question", "answer"],
        preference: false,
    },
    FormatSpec {
        format: RecordFormat::Arc,
        name: "arc",
        aliases: &["multiple-choice"],
        fields: &["question", "choices", "answerKey"],
        required: &["question", "choices", "answerKey"],
        preference: false,
    },
    FormatSpec {
        format: RecordFormat::Text,
        name: "text",
        aliases: &[],
        fields: &["text"],
        required: &["text"],
        preference: false,
    },
];

impl RecordFormat {
    /// The layout's row in [`FORMATS`].
    pub fn spec(self) -> &'static FormatSpec {
        FORMATS
            .iter()
            .find(|f| f.format == self)
            .expect("every layout has a row in FORMATS (tested)")
    }

    /// Parses a format name as written in `[datasets.*] format` or a dataset artifact's `info.json`.
    /// `auto` is not a layout (see [`FormatChoice`]).
    pub fn from_name(name: &str) -> Result<Self> {
        match FORMATS
            .iter()
            .find(|f| f.name == name || f.aliases.contains(&name))
        {
            Some(f) => Ok(f.format),
            None => {
                let names: Vec<&str> = FORMATS.iter().map(|f| f.name).collect();
                bail!(
                    "unknown dataset format {name:?} (expected {} or auto)",
                    names.join(", ")
                )
            }
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The field names this layout reads.
    pub fn fields(self) -> &'static [&'static str] {
        self.spec().fields
    }

    /// Whether records of this layout are preference pairs (for DPO).
    pub fn is_preference(self) -> bool {
        self.spec().preference
    }

    /// The fields a record must have for this layout (the rest may be absent).
    pub fn required(self) -> &'static [&'static str] {
        self.spec().required
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
        for row in FORMATS {
            let f = row.format;
            assert_eq!(FORMATS.iter().filter(|r| r.format == f).count(), 1);
            assert_eq!(RecordFormat::from_name(f.name()).unwrap(), f);
            for alias in row.aliases {
                assert_eq!(RecordFormat::from_name(alias).unwrap(), f);
            }
            assert_eq!(
                serde_json::to_value(f).unwrap(),
                serde_json::json!(row.name)
            );
            assert!(row.required.iter().all(|r| row.fields.contains(r)));
            let choice: FormatChoice = String::from(FormatChoice::Known(f)).try_into().unwrap();
            assert_eq!(choice, FormatChoice::Known(f));
        }
        let err = FormatChoice::try_from("alpacca".to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown dataset format \"alpacca\""), "{err}");
    }
}
