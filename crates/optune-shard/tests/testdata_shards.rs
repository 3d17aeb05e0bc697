//! The committed test shards read as documented, and survive a round trip
//! through both output formats unchanged.

use optune_shard::{write_shard, Destination, Message, OutputFormat, PromptText, Shard};
use std::path::{Path, PathBuf};

fn testdata(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../../testdata/shards")
        .join(name)
}

fn read(path: &Path) -> Shard {
    Shard::read(Some(path)).unwrap()
}

#[test]
fn csv_prompts_are_text_with_numeric_ids() {
    let shard = read(&testdata("prompts.csv"));
    assert_eq!(shard.column_names(), ["prompt_id", "prompt", "topic"]);
    let prompts = shard.prompts().unwrap();
    let ids: Vec<&str> = prompts
        .iter()
        .map(|prompt| prompt.prompt_id.as_str())
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
    assert_eq!(
        prompts[0].text,
        PromptText::Text("Write a limerick about a cat, a hat and a mat.".into())
    );
}

#[test]
fn jsonl_prompts_are_conversations() {
    let shard = read(&testdata("prompts.jsonl"));
    assert_eq!(shard.column_names(), ["prompt_id", "messages", "topic"]);
    let prompts = shard.prompts().unwrap();
    assert_eq!(prompts.len(), 3);
    assert_eq!(
        prompts[1].text,
        PromptText::Messages(vec![Message {
            role: "user".into(),
            content: "Write one sentence about the sea.".into()
        }])
    );
}

#[test]
fn scored_shard_has_every_contract_column() {
    let shard = read(&testdata("scored.jsonl"));
    assert_eq!(
        shard.column_names(),
        [
            "prompt_id",
            "prompt",
            "topic",
            "sample",
            "response",
            "response_tokens",
            "finish_reason",
            "policy",
            "seed",
            "logp",
            "reward",
            "reward_model"
        ]
    );
    assert_eq!(shard.num_rows(), 12);
    assert_eq!(shard.uints("sample").unwrap()[..4], [0, 1, 0, 1]);
}

#[test]
fn every_committed_shard_round_trips_through_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["scored.jsonl", "prompts.jsonl", "prompts.csv"] {
        let original = read(&testdata(name));
        for (format, extension) in [
            (OutputFormat::Parquet, "parquet"),
            (OutputFormat::Jsonl, "jsonl"),
        ] {
            let path = dir.path().join(format!("{name}.{extension}"));
            write_shard(&original, &Destination::File(path.clone()), format).unwrap();
            let back = read(&path);
            assert_eq!(back.batch(), original.batch(), "{name} as {extension}");
        }
    }
}
