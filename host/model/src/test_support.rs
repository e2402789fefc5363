//! Helpers the crate's unit tests share.

use candle_core::{DType, Tensor};

/// The largest |x| of `t`, in f64.
pub(crate) fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The largest |a − b|, computed in f64 whatever the dtypes.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}
