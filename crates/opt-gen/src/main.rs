//! opt-gen: sample responses to prompts with a policy model.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use optune_cli::{ChatTemplateArgs, RuntimeArgs};
use optune_model::generate::{
    generate, stream_seed, FinishReason, Generated, Generation, GenerationRequest, SamplingParams,
    StopStrings, Stopping,
};
use optune_model::load_model;
use optune_resume::{file_stamps, Digest, Fingerprint, Journal};
use optune_shard::arrow::array::{Float32Array, UInt32Array, UInt64Array};
use optune_shard::cli::{run_tool, OutputArgs, Summary};
use optune_shard::split::SliceSpec;
use optune_shard::Shard;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Sample responses to prompts with a policy model: the generation step of OPTune.
///
/// Reads a prompts shard (`prompt_id` plus `prompt` text or `messages`; a `messages` conversation
/// that ends with the assistant's reply, as UltraChat's does, is prompted without that reply),
/// renders each prompt with the model's chat template (raw text becomes one user message; for a
/// model without a template it is tokenised as transformers' tokenizer(prompt) does, BOS
/// included when the tokenizer adds it), samples --n responses per prompt and writes the
/// responses shard: the prompt's columns plus `sample`, `response`,
/// `response_tokens`, `finish_reason` (stop|length), `policy`, `seed` and `logp` (the summed
/// log-probability of the response under the policy at temperature 1, EOS included).
///
/// Rows come out sorted by (prompt_id, sample). A fixed --seed gives identical output whatever
/// --batch-size, --kv-memory, --prompt-tokens-per-step or --threads (on the CPU's fused kernels;
/// see below for elsewhere), and `--shard K/N` runs the K-th of N slices so that concatenating
/// the N outputs equals the unsplit run.
///
/// With -o FILE, finished responses are kept every few seconds in FILE.journal: after a crash or
/// a kill, the same command run again generates only the rest, and a run with other arguments
/// or prompts is refused. The output is then the uninterrupted run's, byte for byte on the CPU
/// (fused kernels); elsewhere the batch a response shares changes its log-prob in the last bits,
/// as another --batch-size does (and, rarely, which side of a --top-p cut-off a token falls on).
/// The journal is removed once FILE is written. A device or a pipe (-o /dev/null) gets no
/// journal and is written through, never replaced.
///
/// Example:
///   opt-gen --model runs/policy prompts.jsonl --n 2 --max-new-tokens 64 -o responses.parquet
#[derive(Parser, Debug)]
#[command(name = "opt-gen", version, verbatim_doc_comment)]
struct Args {
    /// Policy: a Hugging Face model directory or a llama-family .gguf file
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,

    /// Prompts shard (Parquet, JSONL or CSV); `-` or none: stdin
    #[arg(value_name = "PROMPTS")]
    input: Option<PathBuf>,

    #[command(flatten)]
    output: OutputArgs,

    /// Responses per prompt
    #[arg(long, default_value_t = 2)]
    n: u32,

    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,

    /// Keep only the K most likely tokens (0 = off)
    #[arg(long, default_value_t = 0)]
    top_k: usize,

    /// Keep only tokens at least P times as likely as the most likely one, after the
    /// temperature, --top-k and --top-p (vLLM's and transformers' min_p; 0 = off)
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    min_p: f64,

    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,

    /// Do not stop at EOS: every response gets --max-new-tokens tokens (for benchmarks)
    #[arg(long)]
    ignore_eos: bool,

    /// End a response once its text completes TEXT (repeatable; vLLM's stop), e.g.
    /// '\n\nHuman:' for a base model continuing HH-style transcripts. The response is the text
    /// before the first stop string, with finish_reason stop; response_tokens and logp count the
    /// tokens sampled, through the one that completed it. \n, \t, \r and \\ are read as
    /// escapes
    #[arg(long, value_name = "TEXT", value_parser = parse_stop)]
    stop: Vec<String>,

    /// Token ids that end a response as EOS does, kept as its last token (comma-separated; vLLM's
    /// stop_token_ids), beside the EOS ids of generation_config.json: for a model whose config
    /// lacks its end-of-turn token. --ignore-eos leaves these in force
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    stop_token_ids: Vec<u32>,

    /// Longest templated prompt accepted, in tokens
    #[arg(long, default_value_t = 1024)]
    max_prompt_tokens: usize,

    /// What to do with a longer prompt
    #[arg(long, value_enum, default_value_t = Truncate::Error)]
    truncate: Truncate,

    /// Sequences decoded together (finished ones are replaced at once) [default: 16 on the CPU;
    /// on a GPU or with --kv-memory, as many as fit, at most 1024; this caps them]
    #[arg(long)]
    batch_size: Option<usize>,

    /// Size the batch from memory: of FRACTION of the device's free memory (measured once the
    /// model is loaded), set a step's activations and logits aside (its sequences' and
    /// --prompt-tokens-per-step prompt tokens') and give the rest to the KV cache. On a GPU (or
    /// in bf16/f16) the cache is paged in blocks of 32 positions, as vLLM's: a sequence starts
    /// once its prompt's blocks are free and takes more as it grows; when none is free, the
    /// sequence started last gives its blocks back and is computed again later from the tokens
    /// it sampled, its random stream going on (the run says how often); the --n samples of a
    /// prompt share its prompt's blocks. The CPU's f32 cache holds as many slots of the longest
    /// prompt and --max-new-tokens as fit. --batch-size caps the sequences. Like vLLM's
    /// gpu_memory_utilization, but of the free memory. Default on a GPU: 0.9
    #[arg(long, value_name = "FRACTION")]
    kv_memory: Option<f64>,

    /// Prompt tokens fed per step at most: a longer prompt goes in over several steps while the
    /// sequences beside it keep decoding (chunked prefill); the output does not depend on it
    #[arg(long, value_name = "N", default_value_t = optune_model::generate::Batching::PROMPT_TOKENS_PER_STEP)]
    prompt_tokens_per_step: usize,

    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Process only the K-th of N slices of the prompts (by prompt_id)
    #[arg(long, value_name = "K/N", value_parser = SliceSpec::parse, default_value = "1/1")]
    shard: SliceSpec,

    /// Name written in the `policy` column [default: the --model path]
    #[arg(long)]
    policy_name: Option<String>,

    #[command(flatten)]
    chat_template: ChatTemplateArgs,

    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Truncate {
    /// Fail, naming the prompt
    Error,
    /// Keep the last --max-prompt-tokens tokens
    Left,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_tool("opt-gen", || run(args))
}

fn run(args: Args) -> Result<()> {
    args.output.check(&args.input)?;
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    // Written as ranges so that NaN is refused too.
    if !(0.0..=f64::INFINITY).contains(&args.temperature)
        || !(f64::MIN_POSITIVE..=1.0).contains(&args.top_p)
    {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    if !(0.0..=1.0).contains(&args.min_p) {
        bail!("--min-p {}: expected a share in [0, 1]", args.min_p);
    }
    if let Some(f) = args.kv_memory.filter(|f| !(f > &0.0 && f <= &1.0)) {
        bail!("--kv-memory {f}: expected a fraction in (0, 1]");
    }
    if args.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    if args.max_prompt_tokens == 0 {
        bail!("--max-prompt-tokens must be at least 1");
    }
    if args.prompt_tokens_per_step == 0 {
        bail!("--prompt-tokens-per-step must be at least 1");
    }
    args.chat_template.variables()?;
    let (device, dtype) = args.runtime.init()?;
    let shard = Shard::read(args.input.as_deref())?;
    let prompts = shard.prompts()?;
    let ids: Vec<&str> = prompts.iter().map(|p| p.prompt_id.as_str()).collect();
    let rows = args.shard.select(&ids).with_context(|| {
        let hint = if shard.has_column(optune_shard::col::RESPONSE) {
            " (it holds responses, a row per sample; opt-gen takes a row per prompt, as \
             opt-select writes them)"
        } else {
            ""
        };
        format!("{}{hint}", shard.name())
    })?;

    let started = Instant::now();
    let (mut model, mut tokenizer, meta) = load_model(&args.model, dtype, &device)?;
    args.chat_template.apply_to(&mut tokenizer)?;
    let stop_strings = match args.stop.is_empty() {
        true => None,
        false => Some(StopStrings::new(args.stop.clone(), &tokenizer)?),
    };
    model.prepare_to_feed()?;
    if meta.eos_token_ids.is_empty() && !args.ignore_eos && args.stop_token_ids.is_empty() {
        bail!(
            "{}: no eos_token_id in generation_config.json, config.json or the tokenizer (give \
             --stop-token-ids, or --ignore-eos)",
            args.model.display()
        );
    }
    let vocab = meta.config.vocab_size;
    if let Some(id) = args.stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("--stop-token-ids {id}: outside the model's vocabulary of {vocab}");
    }
    let mut requests = Vec::with_capacity(rows.len() * args.n as usize);
    for &row in &rows {
        let prompt = &prompts[row];
        let mut ids = tokenizer
            .encode_prompt(&optune_cli::model_prompt(&prompt.text))
            .with_context(|| format!("{}: prompt_id '{}'", shard.name(), prompt.prompt_id))?;
        if ids.len() > args.max_prompt_tokens {
            match args.truncate {
                Truncate::Error => bail!(
                    "{}: prompt_id '{}' has {} tokens after templating, above --max-prompt-tokens {} \
                     (use --truncate left to keep its end)",
                    shard.name(), prompt.prompt_id, ids.len(), args.max_prompt_tokens
                ),
                Truncate::Left => ids = ids.split_off(ids.len() - args.max_prompt_tokens),
            }
        }
        if ids.is_empty() {
            bail!(
                "{}: prompt_id '{}' has no tokens (an empty text, and a tokenizer that adds no \
                 BOS): the first response token has nothing to be predicted from",
                shard.name(),
                prompt.prompt_id
            );
        }
        for sample in 0..args.n {
            requests.push(GenerationRequest {
                prompt_ids: ids.clone(),
                seed: stream_seed(args.seed, &prompt.prompt_id, sample),
            });
        }
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: (args.top_k > 0).then_some(args.top_k),
        min_p: args.min_p,
        max_new_tokens: args.max_new_tokens,
    };
    let keys: Vec<(&str, u32)> = rows
        .iter()
        .flat_map(|&r| {
            let prompt_id = prompts[r].prompt_id.as_str();
            (0..args.n).map(move |sample| (prompt_id, sample))
        })
        .collect();
    // What an earlier, killed run with the same arguments finished.
    let destination = args.output.destination();
    let mut journal = match destination.resumable_file() {
        Some(path) => Some(Journal::<Finished>::open(
            path,
            &fingerprint(&args, &device, dtype, &keys, &requests)?,
        )?),
        None => None,
    };
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    if let Some((journal, finished)) = &journal {
        let index: HashMap<(&str, u32), usize> =
            keys.iter().enumerate().map(|(i, &key)| (key, i)).collect();
        for row in finished {
            let Some(&i) = index.get(&(row.prompt_id.as_str(), row.sample)) else {
                bail!(
                    "{}: prompt_id '{}' sample {} is not one of this run's",
                    journal.path().display(),
                    row.prompt_id,
                    row.sample
                );
            };
            results[i] = Some(row.generation()?);
        }
    }
    let resumed = results.iter().filter(|r| r.is_some()).count();
    let todo: Vec<usize> = (0..requests.len())
        .filter(|&i| results[i].is_none())
        .collect();
    let todo_requests: Vec<GenerationRequest> = todo.iter().map(|&i| requests[i].clone()).collect();
    let progress = indicatif::ProgressBar::new(requests.len() as u64);
    progress.set_position(resumed as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "opt-gen {bar:30} {pos}/{len} responses  {msg}  eta {eta}",
        )
        .expect("valid template"),
    );
    let (batch_size, kv_blocks) = batch_size(&args, &device, &model, &todo_requests, &params)?;
    let decode_started = Instant::now();
    let cpu_started = process_cpu_seconds();
    let mut tokens_done = 0usize;
    let mut eos_ids: Vec<u32> = match args.ignore_eos {
        true => Vec::new(),
        false => meta.eos_token_ids.clone(),
    };
    eos_ids.extend(&args.stop_token_ids);
    let mut journal_error = None;
    let Generated {
        generations: generated,
        preemptions,
        recomputed_tokens,
    } = generate(
        &model,
        &todo_requests,
        &params,
        Stopping {
            eos_ids: &eos_ids,
            strings: stop_strings.as_ref(),
        },
        optune_model::generate::Batching {
            slots: batch_size,
            prompt_tokens_per_step: args.prompt_tokens_per_step,
            kv_blocks,
        },
        |i, generation| {
            if let (Some((journal, _)), None) = (&mut journal, &journal_error) {
                let (prompt_id, sample) = keys[todo[i]];
                journal_error = journal
                    .push(&Finished::new(prompt_id, sample, generation))
                    .err();
            }
            tokens_done += generation.tokens.len();
            progress.inc(1);
            let rate = tokens_done as f64 / decode_started.elapsed().as_secs_f64().max(1e-9);
            progress.set_message(format!("{rate:.0} tok/s"));
        },
    )?;
    progress.finish_and_clear();
    if let Some(err) = journal_error {
        return Err(err);
    }
    if preemptions > 0 {
        eprintln!(
            "opt-gen: the KV cache ran short {preemptions} times: sequences gave their blocks \
             back and {recomputed_tokens} positions were computed again; a larger --kv-memory \
             (or a smaller --batch-size) avoids that"
        );
    }
    for (&i, generation) in todo.iter().zip(generated) {
        results[i] = Some(generation);
    }
    let generations: Vec<Generation> = results
        .into_iter()
        .map(|g| g.expect("journalled or generated"))
        .collect();

    let mut texts = Vec::with_capacity(generations.len());
    for g in &generations {
        let text = tokenizer.decode(&g.tokens)?;
        texts.push(match &stop_strings {
            Some(stop) => stop.cut(&text).to_string(),
            None => text,
        });
    }
    let out_rows: Vec<usize> = rows
        .iter()
        .flat_map(|&r| std::iter::repeat_n(r, args.n as usize))
        .collect();
    let policy = args
        .policy_name
        .clone()
        .unwrap_or_else(|| args.model.display().to_string());
    // The prompt-level columns: a reward or a log-prob that came with the prompts belongs to
    // other responses and would read as these ones'.
    let out = shard
        .prompt_level(&out_rows, &[])?
        .with_column(
            "sample",
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().flat_map(|_| 0..args.n),
            )),
        )?
        .with_column(
            "response",
            Shard::string_column(texts.iter().map(String::as_str)),
        )?
        .with_column(
            "response_tokens",
            Arc::new(UInt32Array::from_iter_values(
                generations.iter().map(|g| g.tokens.len() as u32),
            )),
        )?
        .with_column(
            "finish_reason",
            Shard::string_column(generations.iter().map(|g| g.finish.as_str())),
        )?
        .with_column(
            "policy",
            Shard::string_column(generations.iter().map(|_| policy.as_str())),
        )?
        .with_column(
            "seed",
            Arc::new(UInt64Array::from_iter_values(
                generations.iter().map(|_| args.seed),
            )),
        )?
        .with_column(
            "logp",
            Arc::new(Float32Array::from_iter_values(
                generations.iter().map(|g| g.logp as f32),
            )),
        )?;
    args.output.write(&out)?;
    if let Some((journal, _)) = journal {
        journal.remove()?;
    }
    let total_tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
    let decode_secs = decode_started.elapsed().as_secs_f64();
    let gen_cpu = cpu_started.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    let summary = Summary::new("opt-gen")
        .field("prompts", rows.len())
        .field("responses", generations.len())
        .field("new_tokens", total_tokens)
        .field("resumed", resumed)
        .field("batch", batch_size)
        .field("preemptions", preemptions)
        .field("recomputed_tokens", recomputed_tokens)
        .field(
            "tok_per_s",
            format!("{:.1}", tokens_done as f64 / decode_secs.max(1e-9)),
        )
        .field("gen_s", format!("{decode_secs:.2}"));
    // CPU seconds of all threads while generating (Linux only): on a busy machine this says
    // more about the work done than the wall clock does.
    let summary = match gen_cpu {
        Some(cpu) => summary.field("gen_cpu_s", format!("{cpu:.2}")),
        None => summary,
    };
    let summary = summary.field(
        "kernels",
        optune_kernels::decode_path(&device, dtype).name(),
    );
    let summary = match optune_cli::runtime::peak_rss_mb() {
        Some(mb) => summary.field("peak_rss_mb", format!("{mb:.0}")),
        None => summary,
    };
    summary
        .field("total_s", format!("{:.2}", started.elapsed().as_secs_f64()))
        .print();
    Ok(())
}

/// A --stop value with its escapes read: \n, \t, \r and \\; an empty string, or any other
/// backslash, is refused.
fn parse_stop(text: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('\\') => '\\',
            other => {
                let escape = other.map_or(String::new(), String::from);
                return Err(format!(
                    "'\\{escape}' is not an escape --stop reads (\\n, \\t, \\r, \\\\)"
                ));
            }
        });
    }
    match out.is_empty() {
        true => Err("an empty stop string would end every response at once".into()),
        false => Ok(out),
    }
}

/// One finished response in the journal (see [`Journal`]): enough to rebuild its output row.
#[derive(Serialize, Deserialize)]
struct Finished {
    prompt_id: String,
    sample: u32,
    tokens: Vec<u32>,
    finish: String,
    logp: f64,
}

impl Finished {
    fn new(prompt_id: &str, sample: u32, generation: &Generation) -> Finished {
        Finished {
            prompt_id: prompt_id.to_string(),
            sample,
            tokens: generation.tokens.clone(),
            finish: generation.finish.as_str().to_string(),
            logp: generation.logp,
        }
    }

    fn generation(&self) -> Result<Generation> {
        let finish = match self.finish.as_str() {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            other => bail!("journal: unknown finish reason '{other}'"),
        };
        Ok(Generation {
            tokens: self.tokens.clone(),
            finish,
            logp: self.logp,
        })
    }
}

/// Sequences decoded together without --kv-memory on the CPU.
const DEFAULT_BATCH: usize = 16;

/// The share of the free memory the KV cache is sized from: --kv-memory, else 0.9 on a GPU
/// (whatever --batch-size says: it caps the batch, it does not switch the sizing off, which
/// would let a large --batch-size run out of GPU memory); `None`: no sizing (the CPU's default).
fn kv_memory_fraction(kv_memory: Option<f64>, on_gpu: bool) -> Option<f64> {
    kv_memory.or(on_gpu.then_some(optune_cli::runtime::GPU_MEMORY_SHARE))
}

/// Sequences decoded together at most: --batch-size (16 by default), or what the KV cache's share
/// of the free memory ([`kv_memory_fraction`]) holds, capped by --batch-size; with the blocks of a
/// paged cache when it is one (a tensor cache sized from memory).
fn batch_size(
    args: &Args,
    device: &candle_core::Device,
    model: &optune_model::Transformer,
    requests: &[GenerationRequest],
    params: &SamplingParams,
) -> Result<(usize, Option<(usize, usize)>)> {
    const MOST_SLOTS: usize = 1024;
    let Some(fraction) = kv_memory_fraction(args.kv_memory, device.is_cuda()) else {
        return Ok((args.batch_size.unwrap_or(DEFAULT_BATCH), None));
    };
    let Some(free) = optune_cli::runtime::available_memory(device) else {
        bail!("--kv-memory: cannot read the free memory of {device:?}; give --batch-size instead");
    };
    let most = args.batch_size.unwrap_or(MOST_SLOTS);
    let size = optune_model::generate::cache_for_memory(
        model,
        requests,
        params,
        fraction * free,
        most,
        args.prompt_tokens_per_step,
    )
    .context("--kv-memory")?;
    let share = format!(
        "{:.2} GB for a step's activations; {fraction} of {:.2} GB free",
        size.working_bytes / 1e9,
        free / 1e9
    );
    match size.blocks {
        Some(blocks) => eprintln!(
            "opt-gen: up to {} sequences at a time: paged KV cache of {blocks} blocks of {} \
             positions, {:.2} GB ({share})",
            size.slots,
            optune_model::KvCache::BLOCK,
            size.bytes / 1e9,
        ),
        None => eprintln!(
            "opt-gen: {} sequences at a time: KV cache of {:.2} GB ({share}, at most {most})",
            size.slots,
            size.bytes / 1e9,
        ),
    }
    Ok((
        size.slots,
        size.blocks.map(|b| (b, optune_model::KvCache::BLOCK)),
    ))
}

/// What fixes this run's responses: a journal is continued only by a run with the same. The
/// prompts' digest covers the input rows, --shard, --n, --seed, the chat template and
/// --max-prompt-tokens/--truncate (every request's tokens and random stream); --batch-size,
/// --kv-memory, --prompt-tokens-per-step and --threads may differ: on the CPU's fused kernels
/// they do not change the output, elsewhere only its rounding (which sequences share a step; a
/// GPU's KV pool also follows its free memory), as the help says of the journal.
fn fingerprint(
    args: &Args,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    keys: &[(&str, u32)],
    requests: &[GenerationRequest],
) -> Result<Fingerprint> {
    let mut prompts = Digest::new();
    for (&(prompt_id, sample), request) in keys.iter().zip(requests) {
        prompts
            .str(prompt_id)
            .u64(sample as u64)
            .u32s(&request.prompt_ids)
            .u64(request.seed);
    }
    Ok(Fingerprint::new()
        .with("--model", args.model.display())
        .with("the model's files", file_stamps(&args.model)?)
        .with(
            "the prompts (input, --shard, --n, --seed, template)",
            prompts.hex(),
        )
        .with("--temperature", args.temperature)
        .with("--top-p", args.top_p)
        .with("--top-k", args.top_k)
        .with("--min-p", args.min_p)
        .with("--max-new-tokens", args.max_new_tokens)
        .with("--ignore-eos", args.ignore_eos)
        .with("--stop", format!("{:?}", args.stop))
        .with("--stop-token-ids", format!("{:?}", args.stop_token_ids))
        .with("--device", format!("{:?}", device.location()))
        .with("--dtype", optune_cli::runtime::precision(device, dtype))
        .with(
            "--kernels",
            optune_kernels::decode_path(device, dtype).name(),
        ))
}

/// CPU time used so far by every live thread of this process, from /proc (Linux); `None`
/// elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::{kv_memory_fraction, parse_stop};

    #[test]
    fn stop_strings_read_four_escapes_and_refuse_the_rest() {
        assert_eq!(parse_stop(r"\n\nHuman:").unwrap(), "\n\nHuman:");
        assert_eq!(parse_stop(r"a\tb\rc\\d").unwrap(), "a\tb\rc\\d");
        assert_eq!(parse_stop("</answer>").unwrap(), "</answer>");
        assert!(parse_stop(r"\boxed").unwrap_err().contains(r"'\b'"));
        // A backslash ending the text, and one before a space.
        assert!(parse_stop("end\\").unwrap_err().contains(r"'\'"));
        assert!(parse_stop("a\\ b").unwrap_err().contains(r"'\ '"));
        assert!(parse_stop("").is_err());
    }

    /// On a GPU the batch is sized from memory even with --batch-size (which caps it).
    #[test]
    fn a_gpu_sizes_the_batch_from_memory_unless_told_another_share() {
        assert_eq!(kv_memory_fraction(None, true), Some(0.9));
        assert_eq!(kv_memory_fraction(Some(0.5), true), Some(0.5));
        assert_eq!(kv_memory_fraction(None, false), None);
        assert_eq!(kv_memory_fraction(Some(0.3), false), Some(0.3));
    }
}
