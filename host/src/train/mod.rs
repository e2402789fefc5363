//! Training: optimizer, learning-rate schedule, loss, micro-batches, checkpoints, metrics and the loop.
