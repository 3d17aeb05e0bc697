//! `opt-cat`: concatenate shards and slice rows, the glue between the
//! pipeline's stages (the first K prompts of a prompt file as a Parquet shard;
//! the kept rows plus the newly scored ones as an iteration's full scored set).

use anyhow::{ensure, Result};
use clap::Parser;
use optune_shard::cli::{run_tool, OutputArgs, Summary};
use optune_shard::split::check_slices;
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
/// with the newly scored ones into the iteration's full scored shard, and to merge the outputs of a
/// stage split into `--shard K/N` runs (checked with --slices-of).
#[derive(Debug, Parser)]
#[command(
    name = TOOL,
    version,
    after_help = "Examples:\n  \
      The first 64 prompts of a JSONL file, as Parquet:\n    \
        opt-cat --head 64 prompts.jsonl -o prompts.parquet\n\n  \
      The kept rows and the new ones, one scored shard:\n    \
        opt-cat kept.parquet new_scored.parquet -o scored.parquet\n\n  \
      The outputs of opt-gen --shard 1/2 and 2/2, checked to cover the prompts exactly:\n    \
        opt-cat --slices-of prompts.parquet r1.parquet r2.parquet -o responses.parquet"
)]
struct Cli {
    /// Input shards: Parquet, JSONL or CSV. `-` or none: stdin
    #[arg(value_name = "INPUT")]
    inputs: Vec<PathBuf>,

    /// Keep at most N rows (after --skip); 0 keeps all
    #[arg(long, value_name = "N", default_value_t = 0)]
    head: usize,

    /// Drop the first N rows (N must be below the number of rows: nothing left is an error)
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip: usize,

    /// The INPUTs are the outputs of `--shard 1/N` … `N/N` (in that order) of one tool run over
    /// REF: fail unless each slice holds exactly the prompt_ids its --shard takes from REF, with
    /// the same number of rows per REF row for every prompt (nothing dropped or repeated)
    #[arg(long, value_name = "REF")]
    slices_of: Option<PathBuf>,

    #[command(flatten)]
    output: OutputArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_tool(TOOL, || run(&cli))
}

fn run(cli: &Cli) -> Result<()> {
    cli.output.check(cli.inputs.iter().chain(&cli.slices_of))?;
    let shards = Shard::read_all(&cli.inputs)?;
    let rows_in: usize = shards.iter().map(Shard::num_rows).sum();
    let rows_per_ref_row = match &cli.slices_of {
        Some(whole) => Some(check_slices(&Shard::read(Some(whole))?, &shards)?),
        None => None,
    };
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
    let summary = Summary::new(TOOL)
        .field("inputs", cli.inputs.len().max(1))
        .field("rows_in", rows_in)
        .field("rows", out.num_rows());
    match rows_per_ref_row {
        Some(ratio) => summary.field("rows_per_ref_row", ratio).print(),
        None => summary.print(),
    }
    Ok(())
}
