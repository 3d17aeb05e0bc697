//! The column contract: the names the tools agree on and the kinds of Arrow
//! type each accepts.

use arrow::datatypes::DataType;
use std::fmt;

/// Column names of the shard contract.
pub mod col {
    pub const PROMPT_ID: &str = "prompt_id";
    pub const PROMPT: &str = "prompt";
    pub const MESSAGES: &str = "messages";
    pub const SAMPLE: &str = "sample";
    pub const RESPONSE: &str = "response";
    pub const RESPONSE_TOKENS: &str = "response_tokens";
    pub const FINISH_REASON: &str = "finish_reason";
    pub const POLICY: &str = "policy";
    pub const SEED: &str = "seed";
    pub const LOGP: &str = "logp";
    pub const REWARD: &str = "reward";
    pub const REWARD_MODEL: &str = "reward_model";
    pub const CHOSEN: &str = "chosen";
    pub const REJECTED: &str = "rejected";
    pub const CHOSEN_REWARD: &str = "chosen_reward";
    pub const REJECTED_REWARD: &str = "rejected_reward";
    pub const REWARD_GAP: &str = "reward_gap";
    pub const REF_CHOSEN_LOGP: &str = "ref_chosen_logp";
    pub const REF_REJECTED_LOGP: &str = "ref_rejected_logp";
    /// UltraFeedback's names for the chosen and rejected replies' scores.
    pub const SCORE_CHOSEN: &str = "score_chosen";
    pub const SCORE_REJECTED: &str = "score_rejected";
}

/// Columns that describe one response rather than its prompt. When a tool
/// collapses a prompt's responses into one row (the prompts `opt-select`
/// writes, the pairs `opt-pairs` writes) it drops these and keeps the rest.
/// Reference log-prob columns (`ref_…logp`) count too: see
/// [`is_response_level`].
pub const RESPONSE_LEVEL_COLUMNS: &[&str] = &[
    col::SAMPLE,
    col::RESPONSE,
    col::RESPONSE_TOKENS,
    col::FINISH_REASON,
    col::POLICY,
    col::SEED,
    col::LOGP,
    col::REWARD,
    col::REWARD_MODEL,
];

/// Whether a column belongs to one response (see [`RESPONSE_LEVEL_COLUMNS`]).
pub fn is_response_level(name: &str) -> bool {
    RESPONSE_LEVEL_COLUMNS.contains(&name) || (name.starts_with("ref_") && name.ends_with("logp"))
}

/// Whether the contract places a column: a prompt's own (`prompt_id`,
/// `prompt`, `messages`) or a response's. Others are the user's, carried
/// through as they are.
pub(crate) fn is_contract_column(name: &str) -> bool {
    is_response_level(name) || [col::PROMPT_ID, col::PROMPT, col::MESSAGES].contains(&name)
}

/// Columns that are text by contract. JSONL and CSV carry no types, so the
/// readers would otherwise type ids like `1` or `42` as integers and every
/// tool would reject them; these columns are read as text whenever the file
/// holds plain scalars in them.
pub(crate) const TEXT_COLUMNS: &[&str] = &[
    col::PROMPT_ID,
    col::PROMPT,
    col::RESPONSE,
    col::FINISH_REASON,
    col::POLICY,
    col::REWARD_MODEL,
    col::CHOSEN,
    col::REJECTED,
];

/// The kinds of column the contract distinguishes. Each accepts a family of
/// Arrow types, because shards come from several writers (our tools write
/// `f32`/`u32`, JSONL and CSV infer `f64`/`i64`, pyarrow may write `f64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// `utf8` (large and view strings are normalised to it on read).
    Utf8,
    /// `f16`, `f32` or `f64`; integer columns are accepted and widened,
    /// since JSONL and CSV type a column of whole numbers as integers.
    Float,
    /// Any integer type; negative values are rejected when read.
    UInt,
    /// Any integer type.
    Int,
    /// `list<struct<role: utf8, content: utf8>>` (other struct fields allowed).
    Messages,
}

impl ColumnKind {
    pub fn accepts(self, data_type: &DataType) -> bool {
        match self {
            ColumnKind::Utf8 => *data_type == DataType::Utf8,
            ColumnKind::Float => data_type.is_floating() || data_type.is_integer(),
            ColumnKind::UInt | ColumnKind::Int => data_type.is_integer(),
            ColumnKind::Messages => is_message_list(data_type),
        }
    }
}

impl fmt::Display for ColumnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColumnKind::Utf8 => "utf8",
            ColumnKind::Float => "float",
            ColumnKind::UInt => "unsigned integer",
            ColumnKind::Int => "integer",
            ColumnKind::Messages => "list<struct<role: utf8, content: utf8>>",
        })
    }
}

fn is_message_list(data_type: &DataType) -> bool {
    let DataType::List(item) = data_type else {
        return false;
    };
    let DataType::Struct(fields) = item.data_type() else {
        return false;
    };
    ["role", "content"].iter().all(|name| {
        fields
            .iter()
            .any(|field| field.name() == name && *field.data_type() == DataType::Utf8)
    })
}

/// A short, lower-case name for an Arrow type, as the error messages print
/// it (`utf8`, `float32`, `list<struct<role: utf8, content: utf8>>`).
pub fn describe_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Utf8 => "utf8".into(),
        DataType::List(item) | DataType::LargeList(item) => {
            format!("list<{}>", describe_type(item.data_type()))
        }
        DataType::Struct(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|field| format!("{}: {}", field.name(), describe_type(field.data_type())))
                .collect();
            format!("struct<{}>", fields.join(", "))
        }
        other => other.to_string().to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Fields};
    use std::sync::Arc;

    fn message_list(role_type: DataType) -> DataType {
        let fields = Fields::from(vec![
            Field::new("role", role_type, true),
            Field::new("content", DataType::Utf8, true),
        ]);
        DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
    }

    #[test]
    fn kinds_accept_their_type_families() {
        assert!(ColumnKind::Float.accepts(&DataType::Float16));
        assert!(ColumnKind::Float.accepts(&DataType::Float32));
        assert!(ColumnKind::Float.accepts(&DataType::Int64));
        assert!(!ColumnKind::Float.accepts(&DataType::Utf8));
        assert!(ColumnKind::UInt.accepts(&DataType::UInt32));
        assert!(ColumnKind::UInt.accepts(&DataType::Int64));
        assert!(!ColumnKind::Int.accepts(&DataType::Float64));
        assert!(ColumnKind::Utf8.accepts(&DataType::Utf8));
        assert!(!ColumnKind::Utf8.accepts(&DataType::Int64));
        assert!(ColumnKind::Messages.accepts(&message_list(DataType::Utf8)));
        assert!(!ColumnKind::Messages.accepts(&message_list(DataType::Int32)));
        assert!(!ColumnKind::Messages.accepts(&DataType::Utf8));
    }

    #[test]
    fn describes_types_in_lower_case() {
        assert_eq!(describe_type(&DataType::Utf8), "utf8");
        assert_eq!(describe_type(&DataType::Float32), "float32");
        assert_eq!(
            describe_type(&message_list(DataType::Utf8)),
            "list<struct<role: utf8, content: utf8>>"
        );
    }

    #[test]
    fn response_level_columns_include_reference_logps() {
        assert!(is_response_level("reward"));
        assert!(is_response_level("ref_chosen_logp"));
        assert!(is_response_level("ref_logp"));
        assert!(!is_response_level("prompt"));
        assert!(!is_response_level("reference"));
    }
}
