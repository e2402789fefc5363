//! Training: optimizer, learning-rate schedule, loss, micro-batches, checkpoints, metrics and the loop
//! (issue 6). [`trainer::train`] is the loop; the `pretrain`, `sft` and `dpo` steps prepare rows and call it.
//!
//! - [`optimizer`]: AdamW with fp32 master weights (torch semantics);
//! - [`schedule`]: warmup + cosine / linear / constant (transformers semantics);
//! - [`loss`]: weighted next-token negative log-likelihood (sum, normalised per optimizer step);
//! - [`batch`]: rows → padded tensors, targets, weights, packed masks;
//! - [`checkpoint`]: atomic checkpoints of masters + moments + step;
//! - [`metrics`]: `metrics.jsonl` and the loss-curve SVG;
//! - [`trainer`]: the loop, over an [`Objective`] (language modelling or DPO);
//! - [`model_io`]: a Hugging Face folder loaded for training (f32 masters) and saved back;
//! - [`dpo`]: DPO tokenisation, concatenated log-probs, losses, reference pass, metrics (TRL semantics);
//! - [`distributed`]: collectives (in-process, TCP hub) and data parallelism with ZeRO-1 over them.

pub mod batch;
pub mod checkpoint;
pub mod distributed;
pub mod dpo;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod schedule;
pub mod trainer;

pub use batch::{build_micro_batch, MicroBatch};
pub use checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, TrainState};
pub use distributed::{Collective, Parallel};
pub use loss::weighted_nll_sum;
pub use metrics::{plot_loss, MetricsLog, StepMetrics};
pub use optimizer::{
    round_bf16_stochastic, set_master, AdamW, AdamWConfig, Moment, MomentPrecision, Param,
    Quantized8, Q8_BLOCK,
};
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{
    checkpoint_dir, clip_gradients, global_norm, train, train_objective, train_objective_on,
    train_on, HeldOut, LmObjective, MicroLoss, Objective, TrainObserver, TrainOptions,
    TrainSummary, EVAL_LOSS,
};
pub mod model_io;
pub use model_io::{
    load_for_lora_training, load_for_training, move_contents, save_lora_trained, save_trained,
    sorted_vars, ComputeDType, ADAPTER_PART,
};
