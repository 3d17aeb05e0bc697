//! What every tool's command line shares: where the shard comes from, where
//! it goes and in which format, the one-line summary on stderr, and how
//! errors end the process.

use crate::io::{write_shard, Destination, OutputFormat, ReaderGone};
use crate::shard::Shard;
use anyhow::{bail, Result};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Input and output of a tool that turns one shard into another. Flatten it
/// into the tool's clap struct with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct ShardArgs {
    /// Input shard: Parquet, JSONL or CSV (by extension, else by content).
    /// `-` or none: stdin.
    #[arg(value_name = "INPUT")]
    pub input: Option<PathBuf>,

    #[command(flatten)]
    pub output: OutputArgs,
}

impl ShardArgs {
    pub fn read_input(&self) -> Result<Shard> {
        Shard::read(self.input.as_deref())
    }
}

/// Where a tool writes its output shard, for tools that take several
/// inputs and flatten only this.
#[derive(Clone, Debug, clap::Args)]
pub struct OutputArgs {
    /// Write the output shard to FILE (`-`: stdout) [default: stdout]. The
    /// file appears only once it is complete.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Output format [default: jsonl for a .jsonl/.ndjson/.json FILE,
    /// else parquet (zstd); a .csv FILE is an error: CSV is read, not written]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
}

impl OutputArgs {
    /// Where `-o` points.
    pub fn destination(&self) -> Destination {
        Destination::from_arg(self.output.as_deref())
    }

    /// Refuses, before any work, an `-o` no write could reach or whose format cannot be
    /// written (a `.csv` FILE; see [`Destination::check_writable`]), or that names one of the
    /// tool's `inputs`, which the write would replace. Tools call it first, so a long run never
    /// ends in such an error, nor leaves a journal for it.
    pub fn check<P: AsRef<Path>>(&self, inputs: impl IntoIterator<Item = P>) -> Result<()> {
        let destination = self.destination();
        self.check_destination(&destination)?;
        refuse_input_as_output(&destination, "-o", inputs)
    }

    /// [`OutputArgs::check`] for a secondary output (like `opt-select --rest`).
    pub fn check_destination(&self, destination: &Destination) -> Result<()> {
        OutputFormat::resolve(self.format, destination)?;
        destination.check_writable()
    }

    /// Writes the tool's output shard to `-o`.
    pub fn write(&self, shard: &Shard) -> Result<()> {
        self.write_to(&self.destination(), shard)
    }

    /// Writes a secondary output (like `opt-select --rest`) in the same
    /// format rules as the main one.
    pub fn write_to(&self, destination: &Destination, shard: &Shard) -> Result<()> {
        write_shard(
            shard,
            destination,
            OutputFormat::resolve(self.format, destination)?,
        )
    }
}

/// Refuses an output (`flag`, for the message) that names one of `inputs` however spelt: the
/// finished write would replace an input, and a failed one could remove it.
pub fn refuse_input_as_output<P: AsRef<Path>>(
    output: &Destination,
    flag: &str,
    inputs: impl IntoIterator<Item = P>,
) -> Result<()> {
    for input in inputs {
        let input = Destination::from_arg(Some(input.as_ref()));
        if matches!(input, Destination::File(_)) && output.names_same_file(&input) {
            bail!("{flag} {output} is an input ({input}): write the output elsewhere");
        }
    }
    Ok(())
}

/// The one line a tool prints on stderr when it succeeds:
/// `opt-select: rows_in=12 prompts=6 selected=3`, easy to read and to grep.
#[must_use = "a summary does nothing until printed"]
pub struct Summary {
    line: String,
}

impl Summary {
    pub fn new(tool: &str) -> Summary {
        Summary {
            line: format!("{tool}:"),
        }
    }

    pub fn field(mut self, key: &str, value: impl Display) -> Summary {
        self.line.push_str(&format!(" {key}={value}"));
        self
    }

    pub fn print(self) {
        eprintln!("{}", self.line);
    }
}

/// Runs a tool's body and turns an error into `TOOL: error: …` on stderr
/// and exit status 1 (clap's own usage errors exit with 2). A reader that
/// closed the output early (`opt-gen … | head`) ends the tool quietly with
/// status 0, as it ends `cat`: the reader has what it wanted, and a failing
/// reader reports its own failure.
pub fn run_tool(tool: &str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.chain().any(|cause| cause.is::<ReaderGone>()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{tool}: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
