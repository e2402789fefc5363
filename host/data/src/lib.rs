//! Training data: reading datasets, filtering, formatting, and turning examples into token rows (issue 6;
//! reused by the DPO and evaluation steps).
//!
//! The pipeline, one module per stage:
//! - [`source`]: resolve a step input (`[datasets.*]` or a dataset artifact) into files and read JSONL /
//!   Parquet records with their file and line;
//! - [`filter`]: the filter stage (data-filter plugins behind [`filter::RecordFilter`]), in batches, counted;
//! - [`plugin_filter`]: a data-filter plugin as a `RecordFilter`;
//! - [`format`]: record layouts and field mappings → typed [`format::Example`]s;
//! - [`load`]: one dataset (read → filter → parse → cap) and mixtures of several, seeded;
//! - [`template`]: Alpaca / prompt-completion text with learned and shown segments, and the training steps'
//!   `template` choice;
//! - [`chat_template`]: Jinja chat templates (a model's own, as transformers renders it; ChatML; SOLAR's
//!   Alpaca-styled one), assistant spans, TRL-style preference pairs;
//! - [`sequence`]: tokenisation, EOS, loss masks, packing, and the seeded micro-batch order.

pub mod chat_template;
pub mod filter;
pub mod format;
pub mod load;
pub mod plugin_filter;
pub mod sequence;
pub mod source;
pub mod template;

pub use chat_template::{ChatTemplate, PreferenceText, RenderedChat};
pub use filter::{apply_filters, FilterCount, FnFilter, RecordFilter, Verdict, FILTER_BATCH};
pub use format::{Example, FieldMap, Message, RecordFormat};
pub use load::{
    derive_seed, filter_records, load_dataset, load_mixture, DatasetReport, FilterFactory,
    LoadedDataset, Mixture,
};
pub use plugin_filter::PluginFilter;
pub use sequence::{
    pack_documents, pack_examples, tokenize_chat, tokenize_document, tokenize_segments,
    tokenize_sft, BatchOrder, TrainSequence,
};
pub use source::{expand_paths, read_records, DatasetSource, Origin, RawRecord, ReadStats};
pub use template::{
    alpaca_prompt, chatml, question_prompt, sft_segments, Segment, SftText, TemplateChoice,
    Templates,
};
