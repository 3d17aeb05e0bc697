//! Training building blocks for optune.

pub mod optim;
