//! opt-pairs: turn scored responses into preference pairs for opt-wdpo.
//! The logic lives in `optune_shard::pairs`; this is the command line.

use anyhow::Result;
use clap::Parser;
use optune_shard::cli::{run_tool, OutputArgs, Summary};
use optune_shard::pairs::{build_pairs, keep_top_fraction, parse_min_gap, parse_top_frac};
use optune_shard::Shard;
use std::path::PathBuf;
use std::process::ExitCode;

const TOOL: &str = "opt-pairs";

const ABOUT: &str = "Build one preference pair per prompt from scored responses.";

const LONG_ABOUT: &str = "\
Build one preference pair per prompt from scored responses.

Reads one or more scored shards (one row per response: prompt_id, prompt or
messages, sample, response, reward, ...), groups all their rows by prompt_id
and pairs each prompt's highest-rewarded response (chosen) with its
lowest-rewarded one whose text differs from the chosen one (rejected); among
equal rewards the lower sample is taken. Writes the pairs shard: the
prompt-level columns, then chosen, rejected, chosen_reward, rejected_reward
and reward_gap (float32), then chosen_NAME and rejected_NAME for each column
NAME of yours whose value differs between a paired prompt's responses.

A prompt is skipped when it has fewer than two responses (skipped_single),
when all its responses are the same text (skipped_same), or when
chosen_reward - rejected_reward is not greater than --min-gap (skipped_gap;
with the default 0, a prompt whose rewards are all equal is skipped); the
counts go to the summary on stderr. A (prompt_id, sample) that occurs twice,
a prompt_id whose rows hold two different prompts, or a reward that is NaN or
infinite, is an error.

--top-frac F then keeps only the ceil(F x pairs) pairs with the largest
reward gap (at least one; equal gaps keep the lower prompt_id), the margin
rule of \"Less is More\" (arXiv 2502.14560): fewer pairs, the clearest
preferences. The dropped count goes to the summary as skipped_top_frac.

Use it after opt-score, before opt-wdpo. From the second OPTune iteration on,
pass the rows opt-select kept (--rest) together with the newly scored rows.

The pairs come out sorted by prompt_id.";

const EXAMPLES: &str = "\
Examples:
  Pairs from one scored shard:
    opt-pairs scored.parquet -o pairs.parquet

  An OPTune iteration: the kept rows plus the regenerated ones:
    opt-pairs kept.parquet rescored.parquet -o pairs.parquet

  In a pipe, keeping only clear preferences:
    opt-score ... | opt-pairs --min-gap 0.5 > pairs.parquet

  The tenth of the pairs with the largest reward gap:
    opt-pairs scored.parquet --top-frac 0.1 -o pairs.parquet";

#[derive(Debug, Parser)]
#[command(name = TOOL, version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
struct Cli {
    /// Scored shards: Parquet, JSONL or CSV. `-` or none: stdin
    #[arg(value_name = "INPUT")]
    inputs: Vec<PathBuf>,

    /// Keep a prompt only when its reward gap is greater than this
    #[arg(long, value_name = "GAP", default_value_t = 0.0, value_parser = parse_min_gap)]
    min_gap: f64,

    /// Keep only this fraction of the pairs, those with the largest reward gap, 0 < F <= 1
    #[arg(long, value_name = "F", value_parser = parse_top_frac)]
    top_frac: Option<f64>,

    #[command(flatten)]
    output: OutputArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_tool(TOOL, || run(&cli))
}

fn run(cli: &Cli) -> Result<()> {
    cli.output.check(&cli.inputs)?;
    let inputs = Shard::read_all(&cli.inputs)?;
    let mut pairs = build_pairs(&inputs, cli.min_gap)?;
    if let Some(frac) = cli.top_frac {
        keep_top_fraction(&mut pairs, frac)?;
    }
    cli.output.write(&pairs.shard)?;
    let mut summary = Summary::new(TOOL)
        .field("rows_in", pairs.rows_in)
        .field("prompts", pairs.prompts_in)
        .field("pairs", pairs.shard.num_rows())
        .field("skipped_single", pairs.skipped_single)
        .field("skipped_same", pairs.skipped_same)
        .field("skipped_gap", pairs.skipped_gap)
        .field("min_gap", cli.min_gap);
    if let Some(frac) = cli.top_frac {
        summary = summary
            .field("skipped_top_frac", pairs.skipped_top_frac)
            .field("top_frac", frac);
    }
    summary.print();
    Ok(())
}
