//! Shards: the tables that the optune tools pass to each other.
//!
//! Every tool reads and writes one table per invocation, a *shard*, through
//! this crate, so that all of them accept the same inputs (Parquet, JSONL or
//! CSV, from a file or stdin) and write the same outputs (Parquet or JSONL, to
//! a file written atomically or to stdout), validate columns with the same
//! messages, and carry columns they do not know through untouched.
//!
//! - [`Shard`]: one table with the name it came from (used in every error);
//!   typed accessors that validate the column contract ([`Shard::require`],
//!   [`Shard::strings`], [`Shard::floats`], …) and output builders
//!   ([`Shard::take`], [`Shard::with_column`], [`concat_shards`]).
//! - [`col`] and [`ColumnKind`]: the column contract.
//! - [`Prompt`], [`PromptText`], [`PreferencePair`]: prompts and preference
//!   pairs read from a shard, for the generation and training tools.
//! - [`cli`]: the arguments every tool shares (input, `-o`, `--format`).
//! - [`select`] and [`pairs`]: the logic of `opt-select` and `opt-pairs`.
//!
//! This crate deliberately does not depend on candle: the data tools build
//! in seconds and stay out of the model crates' dependency tree.

pub mod cli;
mod concat;
mod contract;
mod groups;
mod io;
pub mod pairs;
mod prompt;
pub mod select;
mod shard;
pub mod split;

/// The Arrow version the shards are built with, for tools that construct
/// columns (so they need no Arrow dependency of their own).
pub use arrow;

pub use concat::concat_shards;
pub use contract::{col, describe_type, is_response_level, ColumnKind, RESPONSE_LEVEL_COLUMNS};
pub use io::{write_shard, Destination, InputFormat, OutputFormat, STDIN_NAME};
pub use prompt::{Message, PreferencePair, Prompt, PromptText};
pub use shard::Shard;
