//! opt-score: score responses with a reward model, an external reward program or a sentiment
//! lexicon.

mod rm;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use optune_cli::{ChatTemplateArgs, RuntimeArgs};
use optune_resume::{file_stamps, Digest, Fingerprint, Journal};
use optune_reward::{RewardCommand, RewardRequest, SentimentLexicon};
use optune_shard::arrow::array::Float32Array;
use optune_shard::cli::{run_tool, OutputArgs, Summary};
use optune_shard::split::SliceSpec;
use optune_shard::{col, PromptText, Shard};
use rayon::prelude::*;
use rm::{Batching, RewardModel};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Score responses: the reward step of OPTune.
///
/// Reads a responses shard (one row per response: `response`, plus `prompt_id` and `prompt`
/// text or `messages`, as opt-gen writes it) and writes it back with two more columns:
/// `reward` (f32) and `reward_model` (the source's name). Rows keep the input's order and count;
/// a shard that already has these columns gets them replaced. Pipe the output into opt-select
/// (which prompts to regenerate) or opt-pairs (preference pairs).
///
/// Exactly one reward source:
///   --rm DIR           a Hugging Face *ForSequenceClassification reward model (Llama, Mistral,
///                      Qwen2, Qwen3; num_labels 1). Each (prompt, response) is rendered as a
///                      conversation with the RM's own chat template (a raw-text prompt becomes
///                      one user message, the response the final assistant message; variables
///                      from --chat-template-kwargs), tokenised
///                      with the RM's tokenizer and scored at its last token. Sequences run
///                      longest first, several to a forward pass (--batch-size, --batch-tokens).
///                      On a GPU a pass is packed: no padding, each sequence attending over its
///                      own tokens in a KV-cache slot of its own, a longer one fed in pieces;
///                      --batch-tokens is sized from the free memory, and the plan printed before
///                      the first pass (a pass that cannot fit is refused then). On the CPU's
///                      fused kernels (f32; bf16 where the CPU has bf16 products) a pass holds
///                      sequences of one length; with generic kernels it is packed, as on a GPU.
///                      A row's reward does not depend on the rows beside it, the batching or
///                      --shard (to the bit on the CPU's fused kernels; to rounding elsewhere).
///                      A conversation longer than --max-length is an error naming the row,
///                      unless --truncate left. With -o FILE, the rewards are kept every few
///                      seconds in FILE.journal: after a crash or a kill, the same command run
///                      again scores only the rest (the output is the same as an uninterrupted
///                      run's); a run with another model, input, --shard, --max-length,
///                      --truncate, device, precision or kernels is refused. The journal is
///                      removed once FILE is written; a device or a pipe gets none.
///                      --device, --dtype, --threads, --kernels and --tf32 apply to this
///                      source only (the others run no model and ignore them, so that a
///                      pipeline can pass the same flags to every tool). reward_model: the
///                      directory's name.
///   --reward-cmd PROGRAM [ARGS]...
///                      any program, started once without a shell. It reads one JSON line
///                      {"prompt_id", "prompt", "response"} per row on stdin and answers one
///                      line {"reward": x} per request, in order, flushing each. `prompt` is the
///                      raw prompt text or, for a message list, the content of its last user
///                      message. Exiting early, an answer that is not JSON or has no finite
///                      number, or no answer within --cmd-timeout is an error naming the row.
///                      Everything after --reward-cmd belongs to the program: put it last.
///                      reward_model: the command line.
///   --lexicon FILE     a VADER-style sentiment score of the response text, in [-1, 1], from a
///                      lexicon in VADER's format (word<TAB>mean valence<TAB>...), with its
///                      negation, intensifier, capitals, "but" and punctuation rules.
///                      reward_model: lexicon:<file name>.
///
/// `--shard K/N` scores only the responses of the K-th of N slices of the sorted prompt_ids (all
/// responses of a prompt stay together) and writes them grouped by prompt_id in sorted order,
/// input order within a prompt; concatenating the N outputs gives the unsplit output whenever
/// the input is sorted by prompt_id, as opt-gen writes it.
///
/// Examples:
///   opt-score responses.parquet --rm models/rm -o scored.parquet
///   opt-score responses.parquet --lexicon vader_lexicon.txt | opt-select --rho 0.7 > regen.parquet
///   opt-score responses.parquet -o scored.parquet --reward-cmd python3 my_reward.py --strict
// The doc comment above is the --help text, verbatim: its `[ARGS]` and `<TAB>` are usage, not
// links or HTML.
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
#[derive(Parser, Debug)]
#[command(name = "opt-score", version, verbatim_doc_comment)]
struct Args {
    /// Responses shard (Parquet, JSONL or CSV); `-` or none: stdin
    #[arg(value_name = "RESPONSES")]
    input: Option<PathBuf>,

    #[command(flatten)]
    output: OutputArgs,

    #[command(flatten)]
    source: Source,

    /// Most sequences in one reward-model forward pass (--rm)
    #[arg(long, default_value_t = 256, conflicts_with_all = ["reward_cmd", "lexicon"])]
    batch_size: usize,

    /// Most positions in one reward-model forward pass: its sequences × the longest of them. A
    /// longer conversation goes alone (in pieces of this many tokens where passes are packed)
    /// [default: 2048 on the CPU; on a GPU, what 0.9 of its free memory holds once the weights
    /// are in, at most 16384] (--rm)
    #[arg(long, value_name = "TOKENS", conflicts_with_all = ["reward_cmd", "lexicon"])]
    batch_tokens: Option<usize>,

    /// Longest conversation the reward model may read, in tokens after its chat template
    /// [default: the model's context: max_position_embeddings, or a YaRN config's longer one] (--rm)
    #[arg(long, value_name = "TOKENS", conflicts_with_all = ["reward_cmd", "lexicon"])]
    max_length: Option<usize>,

    /// What to do with a longer conversation (--rm)
    #[arg(long, value_enum, default_value_t = Truncate::Error, conflicts_with_all = ["reward_cmd", "lexicon"])]
    truncate: Truncate,

    /// Seconds to wait for each answer of the reward program before killing it (--reward-cmd)
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0, conflicts_with_all = ["rm", "lexicon"])]
    cmd_timeout: f64,

    /// Score only the K-th of N slices of the prompts (by prompt_id)
    #[arg(long, value_name = "K/N", value_parser = SliceSpec::parse)]
    shard: Option<SliceSpec>,

    /// Name written in the `reward_model` column [default: see the reward sources above]
    #[arg(long, value_name = "NAME")]
    reward_name: Option<String>,

    // --chat-template-kwargs: the reward model's template (--rm).
    #[command(flatten)]
    chat_template: ChatTemplateArgs,

    // --device, --dtype, --threads, --kernels, --tf32: used by --rm only (said under --rm).
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// The reward source: exactly one.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct Source {
    /// Reward model: a Hugging Face *ForSequenceClassification directory
    #[arg(long, value_name = "DIR")]
    rm: Option<PathBuf>,

    /// Reward program and its arguments: the rest of the command line
    #[arg(long, value_name = "PROGRAM [ARGS]", num_args = 1.., allow_hyphen_values = true)]
    reward_cmd: Option<Vec<String>>,

    /// Sentiment lexicon in VADER's format
    #[arg(long, value_name = "FILE")]
    lexicon: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Truncate {
    /// Fail, naming the row
    Error,
    /// Keep the last --max-length tokens (the end of the response)
    Left,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_tool("opt-score", || run(args))
}

/// The input with what every source needs, and the rows to score.
struct Input {
    shard: Shard,
    responses: Vec<String>,
    /// `None` when the shard has no prompt_id column (allowed for --lexicon).
    prompt_ids: Option<Vec<String>>,
    /// Input rows to score, in output order.
    rows: Vec<usize>,
}

impl Input {
    fn read(path: Option<&Path>, slice: Option<SliceSpec>) -> Result<Input> {
        let shard = Shard::read(path)?;
        let responses = owned(shard.strings(col::RESPONSE)?);
        let prompt_ids = if slice.is_some() || shard.has_column(col::PROMPT_ID) {
            Some(owned(shard.strings(col::PROMPT_ID)?))
        } else {
            None
        };
        let rows = match (slice, &prompt_ids) {
            (Some(slice), Some(ids)) => slice
                .rows(&ids.iter().map(String::as_str).collect::<Vec<_>>())
                .with_context(|| shard.name().to_string())?,
            _ => (0..shard.num_rows()).collect(),
        };
        Ok(Input {
            shard,
            responses,
            prompt_ids,
            rows,
        })
    }

    /// `responses.jsonl: row 3 (prompt_id 'p2')`, for errors; rows count from 1.
    fn row_label(&self, row: usize) -> String {
        match &self.prompt_ids {
            Some(ids) => format!(
                "{}: row {} (prompt_id '{}')",
                self.shard.name(),
                row + 1,
                ids[row]
            ),
            None => format!("{}: row {}", self.shard.name(), row + 1),
        }
    }
}

fn owned(values: Vec<&str>) -> Vec<String> {
    values.into_iter().map(str::to_string).collect()
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "opt-score {bar:30} {pos}/{len} responses  {msg}  eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

fn run(args: Args) -> Result<()> {
    args.output.check(&args.input)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.batch_tokens == Some(0) {
        bail!("--batch-tokens must be at least 1");
    }
    if args.max_length == Some(0) {
        bail!("--max-length must be at least 1");
    }
    if args.chat_template.chat_template_kwargs.is_some() && args.source.rm.is_none() {
        bail!("--chat-template-kwargs is for a reward model's chat template (--rm)");
    }
    args.chat_template.variables()?;
    let timeout = Duration::try_from_secs_f64(args.cmd_timeout)
        .ok()
        .filter(|timeout| !timeout.is_zero())
        .context("--cmd-timeout must be a positive number of seconds")?;
    let started = Instant::now();
    let input = Input::read(args.input.as_deref(), args.shard)?;
    let source = &args.source;
    // Source-specific summary fields, printed after the common ones.
    let mut details: Vec<(&str, String)> = Vec::new();
    let mut journal = None;
    let (rewards, default_name) = if let Some(dir) = &source.rm {
        let (rewards, stats, rm_journal) = score_with_rm(&input, dir, &args)?;
        journal = rm_journal;
        let per_s = input.rows.len() as f64 / stats.model_secs.max(1e-9);
        details.push(("tokens", stats.tokens.to_string()));
        details.push(("truncated", stats.truncated.to_string()));
        details.push(("resumed", stats.resumed.to_string()));
        details.push(("seq_per_s", format!("{per_s:.1}")));
        details.push(("model_s", format!("{:.2}", stats.model_secs)));
        details.push(("kernels", stats.kernels.to_string()));
        (rewards, dir_name(dir))
    } else if let Some(command_line) = &source.reward_cmd {
        (
            score_with_command(&input, command_line, timeout)?,
            command_line.join(" "),
        )
    } else if let Some(path) = &source.lexicon {
        (
            score_with_lexicon(&input, path)?,
            format!("lexicon:{}", file_name(path)),
        )
    } else {
        unreachable!("clap requires one reward source");
    };
    if let Some(position) = rewards.iter().position(|r| !r.is_finite()) {
        bail!(
            "{}: the reward source gave {}",
            input.row_label(input.rows[position]),
            rewards[position]
        );
    }

    let name = args.reward_name.clone().unwrap_or(default_name);
    let scored = if args.shard.is_some() {
        input.shard.take(&input.rows)?
    } else {
        input.shard
    };
    let out = scored
        .with_column(col::REWARD, Arc::new(Float32Array::from(rewards.clone())))?
        .with_column(
            col::REWARD_MODEL,
            Shard::string_column(rewards.iter().map(|_| name.as_str())),
        )?;
    args.output.write(&out)?;
    if let Some(journal) = journal {
        journal.remove()?;
    }
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len().max(1) as f64;
    let mut summary = Summary::new("opt-score")
        .field("rows", rewards.len())
        .field("reward_model", &name)
        .field("mean_reward", format!("{mean:.4}"));
    for (key, value) in details {
        summary = summary.field(key, value);
    }
    summary
        .field("total_s", format!("{:.2}", started.elapsed().as_secs_f64()))
        .print();
    Ok(())
}

/// The last component of `path`, or the path itself when it has none (`.`, `/`).
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A reward model's name: its directory's name, resolving `.` and `..`.
fn dir_name(dir: &Path) -> String {
    match dir.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => file_name(&dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())),
    }
}

fn score_with_lexicon(input: &Input, path: &Path) -> Result<Vec<f32>> {
    let lexicon = SentimentLexicon::load(path)?;
    Ok(input
        .rows
        .iter()
        .map(|&row| lexicon.score(&input.responses[row]))
        .collect())
}

/// What a reward program is sent as `prompt`: the raw text, or a conversation's last user
/// message.
fn command_prompt(text: &PromptText) -> Option<&str> {
    match text {
        PromptText::Text(text) => Some(text),
        PromptText::Messages(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str()),
    }
}

fn score_with_command(
    input: &Input,
    command_line: &[String],
    timeout: Duration,
) -> Result<Vec<f32>> {
    let prompt_ids = input.prompt_ids.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: missing required column 'prompt_id' (found: {})",
            input.shard.name(),
            input.shard.column_names().join(", ")
        )
    })?;
    let texts = input.shard.prompt_texts()?;
    let mut prompts = Vec::with_capacity(input.rows.len());
    for &row in &input.rows {
        let prompt = command_prompt(&texts[row]).ok_or_else(|| {
            anyhow!(
                "{}: the conversation has no user message",
                input.row_label(row)
            )
        })?;
        prompts.push(prompt);
    }
    let (program, program_args) = command_line.split_first().expect("clap requires a program");
    let mut command = RewardCommand::spawn(program, program_args, timeout)?;
    let bar = progress_bar(input.rows.len());
    let mut rewards = Vec::with_capacity(input.rows.len());
    // One request at a time, so that an error names exactly the row it is about.
    for (&row, prompt) in input.rows.iter().zip(prompts) {
        let request = RewardRequest {
            prompt_id: &prompt_ids[row],
            prompt,
            response: &input.responses[row],
        };
        let reward = command.score([request]).map_err(|err| {
            anyhow!(
                "{}: reward program `{}`: {}",
                input.row_label(row),
                command_line.join(" "),
                err.root_cause()
            )
        })?;
        rewards.extend(reward);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rewards)
}

struct RmStats {
    tokens: usize,
    truncated: usize,
    /// Rows whose rewards came from the journal of a killed run.
    resumed: usize,
    model_secs: f64,
    kernels: &'static str,
}

/// The rewards of `input`'s rows from the reward model in `dir`, and, when the output is a file,
/// the journal that kept them as they came (to remove once the output is written).
fn score_with_rm(
    input: &Input,
    dir: &Path,
    args: &Args,
) -> Result<(Vec<f32>, RmStats, Option<Journal<ScoredRow>>)> {
    let texts = input.shard.prompt_texts()?;
    let (device, dtype) = args.runtime.init()?;
    let model = RewardModel::load(dir, dtype, &device, &args.chat_template)?;
    let max_length = match args.max_length {
        Some(length) if length > model.max_positions() => bail!(
            "--max-length {length} is above the {} positions the reward model's config allows{}",
            model.max_positions(),
            model.position_limit_note()
        ),
        Some(length) => length,
        None => model.max_positions(),
    };
    // Rendering the template dominates the time outside the model: spread it over the threads,
    // then report the first failing row in input order.
    let tokenized: Vec<Result<Vec<u32>>> = input
        .rows
        .par_iter()
        .map(|&row| model.tokenize(&texts[row], &input.responses[row]))
        .collect();
    let mut sequences = Vec::with_capacity(input.rows.len());
    let mut truncated = 0;
    for (&row, tokens) in input.rows.iter().zip(tokenized) {
        let mut tokens = tokens.with_context(|| input.row_label(row))?;
        if tokens.len() > max_length {
            if args.truncate == Truncate::Error {
                bail!(
                    "{}: {} tokens after the reward model's chat template, above --max-length {max_length} \
                     (use --truncate left to keep the end)",
                    input.row_label(row),
                    tokens.len()
                );
            }
            tokens.drain(..tokens.len() - max_length);
            truncated += 1;
        }
        sequences.push(tokens);
    }
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    // The longest conversation (its input row and tokens) bounds the passes' memory.
    let longest = (0..sequences.len())
        .max_by_key(|&p| (sequences[p].len(), Reverse(p)))
        .map(|p| (input.rows[p], sequences[p].len()));
    let batching = batching(args, &device, &model, longest, input)?;

    // What an earlier, killed run with the same arguments scored.
    let destination = args.output.destination();
    let mut journal = match destination.resumable_file() {
        Some(path) => {
            let mut digest = Digest::new();
            for (&row, sequence) in input.rows.iter().zip(&sequences) {
                digest.u64(row as u64).u32s(sequence);
            }
            let fingerprint = Fingerprint::new()
                .with("--rm", dir.display())
                .with("the reward model's files", file_stamps(dir)?)
                .with(
                    "the rows (input, --shard, --max-length, --truncate, template)",
                    digest.hex(),
                )
                .with("--device", format!("{:?}", device.location()))
                .with("--dtype", optune_cli::runtime::precision(&device, dtype))
                .with(
                    "--kernels",
                    optune_kernels::autograd_path(&device, dtype).name(),
                );
            Some(Journal::<ScoredRow>::open(path, &fingerprint)?)
        }
        None => None,
    };
    let mut rewards: Vec<Option<f32>> = vec![None; sequences.len()];
    if let Some((journal, scored)) = &journal {
        let position: HashMap<usize, usize> = input
            .rows
            .iter()
            .enumerate()
            .map(|(p, &row)| (row, p))
            .collect();
        for scored in scored {
            let Some(&p) = position.get(&scored.row) else {
                bail!(
                    "{}: row {} is not one of this run's",
                    journal.path().display(),
                    scored.row + 1
                );
            };
            rewards[p] = Some(scored.reward);
        }
    }
    let resumed = rewards.iter().filter(|r| r.is_some()).count();
    let todo: Vec<usize> = (0..sequences.len())
        .filter(|&p| rewards[p].is_none())
        .collect();
    let todo_sequences: Vec<Vec<u32>> = todo.iter().map(|&p| sequences[p].clone()).collect();

    let bar = progress_bar(sequences.len());
    bar.set_position(resumed as u64);
    let model_started = Instant::now();
    let mut done = 0usize;
    let scored = model.score(&todo_sequences, batching, |batch, scores| {
        if let Some((journal, _)) = &mut journal {
            for (&i, &reward) in batch.iter().zip(scores) {
                let row = input.rows[todo[i]];
                journal.push(&ScoredRow { row, reward })?;
            }
        }
        bar.inc(batch.len() as u64);
        done += batch.len();
        bar.set_message(format!(
            "{:.1} seq/s",
            done as f64 / model_started.elapsed().as_secs_f64().max(1e-9)
        ));
        Ok(())
    })?;
    bar.finish_and_clear();
    for (&p, reward) in todo.iter().zip(scored) {
        rewards[p] = Some(reward);
    }
    Ok((
        rewards
            .into_iter()
            .map(|r| r.expect("journalled or scored"))
            .collect(),
        RmStats {
            tokens,
            truncated,
            resumed,
            model_secs: model_started.elapsed().as_secs_f64(),
            kernels: optune_kernels::autograd_path(&device, dtype).name(),
        },
        journal.map(|(journal, _)| journal),
    ))
}

/// The forward passes' sizes: at most --batch-size sequences and --batch-tokens positions, the
/// positions by default 2048 on the CPU and, on a GPU, what 0.9 of its free memory holds (at most
/// 16384). Packed passes (a GPU, the CPU's generic kernels) print their plan, and are refused
/// before the first pass when the longest conversation (`longest`: its input row and tokens) or
/// a pass cannot fit in that memory (on the CPU: its available memory).
fn batching(
    args: &Args,
    device: &candle_core::Device,
    model: &RewardModel,
    longest: Option<(usize, usize)>,
    input: &Input,
) -> Result<Batching> {
    const CPU_POSITIONS: usize = 2048;
    const GPU_MOST_POSITIONS: usize = 16384;
    let default = Batching {
        sequences: args.batch_size,
        positions: args.batch_tokens.unwrap_or(CPU_POSITIONS),
    };
    // Nothing to score (an empty input) needs no pass.
    let (true, Some((row, longest))) = (model.packed(), longest) else {
        return Ok(default);
    };
    let Some(free) = optune_cli::runtime::available_memory(device) else {
        if device.is_cuda() && args.batch_tokens.is_none() {
            bail!("cannot read the free memory of {device:?}; give --batch-tokens");
        }
        eprintln!(
            "opt-score: passes of at most {} sequences and {} positions (the free memory of \
             {device:?} is unknown: not checked)",
            default.sequences, default.positions
        );
        return Ok(default);
    };
    let budget = match device.is_cuda() {
        true => optune_cli::runtime::GPU_MEMORY_SHARE * free,
        false => free,
    };
    let memory = model.pass_memory();
    let gb = |bytes: f64| bytes / 1e9;
    let Some(fit) = memory.positions_within(budget, longest) else {
        bail!(
            "{}: the KV cache of its {longest} tokens ({:.2} GB) leaves no room for a pass in the \
             {:.2} GB allowed ({:.2} GB free on {device:?}): --max-length with --truncate left",
            input.row_label(row),
            gb(longest as f64 * memory.cache),
            gb(budget),
            gb(free)
        );
    };
    let positions = match args.batch_tokens {
        Some(positions) => positions,
        None if device.is_cuda() => fit.min(GPU_MOST_POSITIONS),
        None => fit.min(CPU_POSITIONS),
    };
    if memory.need(positions, longest) > budget {
        bail!(
            "--batch-tokens {positions}: a pass would need {:.2} GB (the longest conversation, \
             {}, has {longest} tokens), above the {:.2} GB allowed ({:.2} GB free on \
             {device:?}): lower --batch-tokens to {fit} or less",
            gb(memory.need(positions, longest)),
            input.row_label(row),
            gb(budget),
            gb(free)
        );
    }
    eprintln!(
        "opt-score: passes of at most {} sequences and {positions} positions: {:.2} GB of KV \
         cache and activations ({:.2} GB free after {:.2} GB of weights)",
        args.batch_size,
        gb(memory.need(positions, longest)),
        gb(free),
        gb(model.weight_bytes() as f64)
    );
    Ok(Batching {
        sequences: args.batch_size,
        positions,
    })
}

/// One scored row in the journal (see [`Journal`]): its row in the input, from 0.
#[derive(Serialize, Deserialize)]
struct ScoredRow {
    row: usize,
    reward: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use optune_shard::Message;

    #[test]
    fn command_prompt_is_the_text_or_the_last_user_message() {
        let message = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(command_prompt(&PromptText::Text("hi".into())), Some("hi"));
        let conversation = PromptText::Messages(vec![
            message("system", "S"),
            message("user", "first"),
            message("assistant", "A"),
            message("user", "second"),
        ]);
        assert_eq!(command_prompt(&conversation), Some("second"));
        assert_eq!(
            command_prompt(&PromptText::Messages(vec![message("system", "S")])),
            None
        );
    }

    #[test]
    fn names_of_sources() {
        assert_eq!(dir_name(Path::new("models/tiny-rm/")), "tiny-rm");
        assert_eq!(
            file_name(Path::new("data/vader_lexicon.txt")),
            "vader_lexicon.txt"
        );
    }
}
