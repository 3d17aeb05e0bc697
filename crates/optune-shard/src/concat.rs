//! Stacking shards whose columns differ a little (the rows an iteration kept
//! plus the rows it generated anew).

use crate::contract::{describe_type, ColumnKind};
use crate::shard::Shard;
use anyhow::{bail, ensure, Context, Result};
use arrow::array::{new_null_array, ArrayRef, RecordBatch};
use arrow::compute::{can_cast_types, cast_with_options, concat_batches, CastOptions};
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::Arc;

/// One output column: its type and which input first gave it that type.
struct MergedColumn {
    name: String,
    data_type: DataType,
    typed_by: usize,
    nullable: bool,
}

/// Stacks the rows of `shards` in order. A column missing from some inputs
/// is null in their rows. Numeric columns of different widths are widened
/// to one type (a JSONL `i64` beside a Parquet `u32`); message lists whose
/// structs order their fields differently are unified; any other type
/// difference is an error naming both files.
pub fn concat_shards(shards: &[Shard]) -> Result<Shard> {
    ensure!(!shards.is_empty(), "no shards to concatenate");
    let mut merged: Vec<MergedColumn> = Vec::new();
    for (input, shard) in shards.iter().enumerate() {
        for field in shard.schema().fields() {
            match merged
                .iter_mut()
                .find(|column| column.name == *field.name())
            {
                None => merged.push(MergedColumn {
                    name: field.name().clone(),
                    data_type: field.data_type().clone(),
                    typed_by: input,
                    nullable: field.is_nullable(),
                }),
                Some(column) => {
                    let Some(common) = common_type(&column.data_type, field.data_type()) else {
                        bail!(
                            "column '{}': {} in {} conflicts with {} in {}",
                            column.name,
                            describe_type(&column.data_type),
                            shards[column.typed_by].name(),
                            describe_type(field.data_type()),
                            shard.name()
                        );
                    };
                    column.data_type = common;
                    column.nullable |= field.is_nullable();
                }
            }
        }
    }
    for column in &mut merged {
        column.nullable |= shards.iter().any(|shard| !shard.has_column(&column.name));
    }

    let schema = Arc::new(Schema::new(
        merged
            .iter()
            .map(|column| Field::new(&column.name, column.data_type.clone(), column.nullable))
            .collect::<Vec<_>>(),
    ));
    // Casts that would lose values (a u64 above i64::MAX) must fail, not turn into nulls.
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let batches = shards
        .iter()
        .map(|shard| {
            let columns = merged
                .iter()
                .map(|column| match shard.batch().column_by_name(&column.name) {
                    None => Ok(new_null_array(&column.data_type, shard.num_rows())),
                    Some(values) => cast_with_options(values, &column.data_type, &strict)
                        .with_context(|| format!("{}: column '{}'", shard.name(), column.name)),
                })
                .collect::<Result<Vec<ArrayRef>>>()?;
            Ok(RecordBatch::try_new(schema.clone(), columns)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let name = shards
        .iter()
        .map(Shard::name)
        .collect::<Vec<_>>()
        .join(" + ");
    Ok(Shard::new(name, concat_batches(&schema, &batches)?))
}

/// The type both inputs' values fit in, if they are close enough to merge.
fn common_type(a: &DataType, b: &DataType) -> Option<DataType> {
    let numeric = |t: &DataType| t.is_integer() || t.is_floating();
    let messages = |t: &DataType| ColumnKind::Messages.accepts(t);
    match (a, b) {
        _ if a == b => Some(a.clone()),
        (DataType::Null, other) | (other, DataType::Null) => Some(other.clone()),
        _ if numeric(a) && numeric(b) => Some(if a.is_floating() || b.is_floating() {
            DataType::Float64
        } else if a.is_unsigned_integer() && b.is_unsigned_integer() {
            DataType::UInt64
        } else {
            DataType::Int64
        }),
        _ if messages(a) && messages(b) && can_cast_types(b, a) => Some(a.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::scored;
    use arrow::array::{Array, Int64Array, StringArray};

    #[test]
    fn fills_missing_columns_with_nulls_and_widens_numbers() {
        let first = scored(&[("a", 0, 1.0)]);
        let batch = RecordBatch::try_from_iter([
            (
                "prompt_id",
                Arc::new(StringArray::from(vec!["b"])) as ArrayRef,
            ),
            ("sample", Arc::new(Int64Array::from(vec![7])) as ArrayRef),
            ("judge", Arc::new(StringArray::from(vec!["ok"])) as ArrayRef),
        ])
        .unwrap();
        let second = Shard::new("new.jsonl", batch);
        let merged = concat_shards(&[first, second]).unwrap();
        assert_eq!(merged.name(), "scored.parquet + new.jsonl");
        assert_eq!(
            merged.column_names(),
            [
                "prompt_id",
                "prompt",
                "note",
                "sample",
                "response",
                "reward",
                "judge"
            ]
        );
        assert_eq!(merged.strings("prompt_id").unwrap(), ["a", "b"]);
        assert_eq!(merged.uints("sample").unwrap(), [0, 7]);
        assert_eq!(
            merged.column("sample").unwrap().data_type(),
            &DataType::Int64
        );
        assert!(merged.column("prompt").unwrap().is_null(1));
        assert!(merged.column("judge").unwrap().is_null(0));
    }

    #[test]
    fn type_conflicts_name_both_files() {
        let first = scored(&[("a", 0, 1.0)]);
        let batch = RecordBatch::try_from_iter([(
            "reward",
            Arc::new(StringArray::from(vec!["high"])) as ArrayRef,
        )])
        .unwrap();
        let err = concat_shards(&[first, Shard::new("other.jsonl", batch)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column 'reward': float32 in scored.parquet conflicts with utf8 in other.jsonl"
        );
    }
}
