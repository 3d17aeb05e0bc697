//! Training building blocks for optune.

pub mod loss;
pub mod optim;
