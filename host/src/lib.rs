//! dusflow host library.
