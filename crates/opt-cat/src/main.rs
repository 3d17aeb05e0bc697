//! `opt-cat`: concatenate shards and slice rows, the glue between the
//! pipeline's stages (the first K prompts of a prompt file as a Parquet shard;
//! the kept rows plus the newly scored ones as an iteration's full scored set).

use anyhow::{ensure, Result};
use clap::Parser;
use optune_shard::cli::{run_tool, OutputArgs, Summary};
use optune_shard::{concat_shards, Shard};
use std::path::PathBuf;
use std::process::ExitCode;

const TOOL: &str = "opt-cat";

/// Concatenate shards, optionally keeping a slice of the rows.
///
/// Reads every INPUT (Parquet, JSONL or CSV), stacks their rows in order and
/// writes one shard. A column missing from some inputs is null in their rows;
/// numeric columns of different widths are widened to one type. --skip and
/// --head then cut the stacked rows: the rows [SKIP, SKIP + HEAD).
///
/// The OPTune pipeline uses it to turn the first PROMPTS rows of a prompt file
/// into the iteration's prompts shard, and to join the rows opt-select kept
/// with the newly scored ones into the iteration's full scored shard.
#[derive(Debug, Parser)]
#[command(
    name = TOOL,
    version,
    after_help = "Examples:\n  \
      The first 64 prompts of a JSONL file, as Parquet:\n    \
        opt-cat --head 64 prompts.jsonl -o prompts.parquet\n\n  \
      The kept rows and the new ones, one scored shard:\n    \
        opt-cat kept.parquet new_scored.parquet -o scored.parquet"
)]
struct Cli {
    /// Input shards: Parquet, JSONL or CSV. `-` or none: stdin
    #[arg(value_name = "INPUT")]
    inputs: Vec<PathBuf>,

    /// Keep at most N rows (after --skip); 0 keeps all
    #[arg(long, value_name = "N", default_value_t = 0)]
    head: usize,

    /// Drop the first N rows
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip: usize,

    #[command(flatten)]
    output: OutputArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_tool(TOOL, || run(&cli))
}

fn run(cli: &Cli) -> Result<()> {
    let shards = Shard::read_all(&cli.inputs)?;
    let rows_in: usize = shards.iter().map(Shard::num_rows).sum();
    let stacked = if shards.len() == 1 {
        shards.into_iter().next().expect("one shard")
    } else {
        concat_shards(&shards)?
    };
    let start = cli.skip.min(rows_in);
    let end = if cli.head == 0 {
        rows_in
    } else {
        (start + cli.head).min(rows_in)
    };
    ensure!(
        cli.skip == 0 || cli.skip < rows_in,
        "--skip {} leaves none of the {rows_in} rows",
        cli.skip
    );
    let out = if start == 0 && end == rows_in {
        stacked
    } else {
        stacked.take(&(start..end).collect::<Vec<_>>())?
    };
    cli.output.write(&out)?;
    Summary::new(TOOL)
        .field("inputs", cli.inputs.len().max(1))
        .field("rows_in", rows_in)
        .field("rows", out.num_rows())
        .print();
    Ok(())
}
