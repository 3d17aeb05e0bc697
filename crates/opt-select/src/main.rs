//! opt-select: choose the prompts to regenerate in the next OPTune iteration.
//! The logic lives in `optune_shard::select`; this is the command line.

use anyhow::{bail, Result};
use clap::Parser;
use optune_shard::cli::{refuse_input_as_output, run_tool, ShardArgs, Summary};
use optune_shard::select::{
    parse_explore, parse_flat_tol, parse_rho, select_prompts, RankBy, SelectOptions, SkipFlat,
    Strategy,
};
use optune_shard::{Destination, Shard};
use std::path::PathBuf;
use std::process::ExitCode;

const TOOL: &str = "opt-select";

const ABOUT: &str = "Select the prompts to regenerate in the next OPTune iteration.";

const LONG_ABOUT: &str = "\
Select the prompts to regenerate in the next OPTune iteration.

Reads a scored shard (one row per response: prompt_id, prompt or messages,
sample, response, reward, ...), groups the rows by prompt_id, ranks the
prompts by a statistic of their rewards (--by) and writes the prompts shard of
the ceil(rho x prompts) that rank lowest (or, with --strategy, highest or at
random): one row per prompt, with every prompt-level column and without the
response-level ones (sample, response, response_tokens, finish_reason, policy,
seed, logp, reward, reward_model, ref_*logp, and any other column whose value
differs between one prompt's rows). Feed it to the generator; --rest keeps the
scored rows of the other prompts, to merge with the new scores before
opt-pairs. A prompt_id whose rows hold two different prompts is an error.

Use it between opt-score and opt-gen from the second iteration on. rho = 1
regenerates every prompt (vanilla online DPO).

The output lists the selected prompts in the order of their first rows in the
input. Ties in the statistic break by prompt_id; --strategy random draws from
--seed, independently of the input's row order.

History: --history takes the scored shards of earlier iterations, oldest
first. Each prompt of the input is then ranked by the rewards of all its
responses there and in the input, each response once (a row of an earlier
shard kept unchanged, same prompt_id, reward and sample/response/policy/seed,
counts once). A round of a prompt is a shard in which it has responses not
seen before.

Skipping (GRESO, arXiv 2506.02177): with --skip-flat K, a prompt whose rewards
spread (max - min) by no more than --flat-tol in each of its last K rounds is
not regenerated, unless a draw of probability --explore brings it back (one
draw per prompt from --seed, in prompt_id order). Skipped prompts go to
--rest; rho is then the fraction of the prompts not skipped. Without
--history every prompt has one round, the input.";

const EXAMPLES: &str = "\
Examples:
  Regenerate the 70% of prompts whose best response scored lowest:
    opt-select --rho 0.7 scored.parquet -o regen.parquet --rest kept.parquet

  In a pipe:
    opt-select --rho 0.7 < scored.parquet > regen.parquet
    cat scored.parquet | opt-select --rho 0.5 --by gap --format jsonl | head

  Random selection, an ablation baseline:
    opt-select --rho 0.5 --strategy random --seed 3 scored.parquet -o regen.parquet

  Rank by every iteration's rewards, skip prompts flat in their last 2 rounds:
    opt-select --rho 0.7 iter3/scored.parquet --history iter1/scored.parquet \
        iter2/scored.parquet --skip-flat 2 --explore 0.1 -o regen.parquet";

#[derive(Debug, Parser)]
#[command(name = TOOL, version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
struct Cli {
    /// Fraction of the prompts to select, 0 < RHO <= 1
    #[arg(long, value_parser = parse_rho)]
    rho: f64,

    /// Statistic of each prompt's rewards to rank by
    #[arg(long, value_enum, default_value_t = RankBy::Max)]
    by: RankBy,

    /// Which end of the ranking to select
    #[arg(long, value_enum, default_value_t = Strategy::Lowest)]
    strategy: Strategy,

    /// Seed of --strategy random and of the --explore draws
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Scored shards of earlier iterations, oldest first (put the input before them)
    #[arg(long, value_name = "FILES", num_args = 1..)]
    history: Vec<PathBuf>,

    /// Skip prompts whose rewards had no spread in each of their last K rounds
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    skip_flat: Option<u64>,

    /// With --skip-flat: probability that a prompt to skip is kept as a candidate
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0.1,
        requires = "skip_flat",
        value_parser = parse_explore
    )]
    explore: f64,

    /// With --skip-flat: the largest reward spread (max - min) that counts as none
    #[arg(
        long,
        value_name = "X",
        default_value_t = 0.0,
        requires = "skip_flat",
        value_parser = parse_flat_tol
    )]
    flat_tol: f64,

    /// Also write the scored rows (all columns) of the prompts not selected
    /// to FILE (`-`: stdout, when -o names a file)
    #[arg(long, value_name = "FILE")]
    rest: Option<PathBuf>,

    #[command(flatten)]
    shard: ShardArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_tool(TOOL, || run(&cli))
}

fn run(cli: &Cli) -> Result<()> {
    let output = &cli.shard.output;
    let rest = cli
        .rest
        .as_deref()
        .map(|path| Destination::from_arg(Some(path)));
    let inputs = || cli.shard.input.iter().chain(&cli.history);
    output.check(inputs())?;
    if let Some(rest) = &rest {
        output.check_destination(rest)?;
        refuse_input_as_output(rest, "--rest", inputs())?;
        if rest.names_same_file(&output.destination()) {
            bail!(
                "--rest and -o both name {}: give them different destinations",
                output.destination()
            );
        }
    }
    let scored = match cli.shard.read_input() {
        Err(err) if cli.shard.input.is_none() && !cli.history.is_empty() => {
            return Err(err.context(
                "no INPUT given, so it was read from stdin: --history takes every path after it; \
                 put INPUT before --history",
            ));
        }
        read => read?,
    };
    let history = cli
        .history
        .iter()
        .map(|path| Shard::read(Some(path)))
        .collect::<Result<Vec<_>>>()?;
    let options = SelectOptions {
        rho: cli.rho,
        by: cli.by,
        strategy: cli.strategy,
        seed: cli.seed,
        skip_flat: cli.skip_flat.map(|rounds| SkipFlat {
            rounds: rounds as usize,
            explore: cli.explore,
            tolerance: cli.flat_tol,
        }),
    };
    let selection = select_prompts(&scored, &history, &options)?;
    if let Some(rest) = &rest {
        output.write_to(rest, &selection.rest)?;
    }
    if let Err(err) = output.write(&selection.prompts) {
        // Both outputs or neither: a --rest without its selection would pass for a whole run.
        // Only a regular file: never a device or a pipe (`--rest /dev/null`), nor a link,
        // which was written through and would lose only itself.
        if let Some(path) = rest.as_ref().and_then(Destination::resumable_file) {
            if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = std::fs::remove_file(path);
            }
        }
        return Err(err);
    }
    let mut summary = Summary::new(TOOL)
        .field("rows_in", scored.num_rows())
        .field("prompts", selection.prompts_in)
        .field("selected", selection.prompts.num_rows())
        .field("rest_rows", selection.rest.num_rows())
        .field("rho", cli.rho)
        .field("by", format!("{:?}", cli.by).to_lowercase())
        .field("strategy", format!("{:?}", cli.strategy).to_lowercase());
    if !history.is_empty() {
        summary = summary.field("history", history.len());
    }
    if options.skip_flat.is_some() {
        summary = summary.field("skipped", selection.skipped);
    }
    summary.print();
    Ok(())
}
