//! [`Shard`]: one table plus the name it came from, with typed accessors that
//! enforce the column contract and builders for output shards.

use crate::contract::{describe_type, is_response_level, ColumnKind};
use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt64Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, UInt64Type};
use std::sync::Arc;

/// One table, with the name it was read from (a path or `<stdin>`) so that
/// every error can say which input is wrong. Row numbers in errors count
/// from 1, the first data row (the line number in a JSONL file without blank lines, which
/// hold no row).
#[derive(Clone, Debug)]
pub struct Shard {
    name: String,
    batch: RecordBatch,
}

impl Shard {
    pub fn new(name: impl Into<String>, batch: RecordBatch) -> Self {
        Shard {
            name: name.into(),
            batch,
        }
    }

    /// The name used in error messages: the path as given, or `<stdin>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    pub fn into_batch(self) -> RecordBatch {
        self.batch
    }

    pub fn schema(&self) -> SchemaRef {
        self.batch.schema()
    }

    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn has_column(&self, name: &str) -> bool {
        self.batch.schema_ref().index_of(name).is_ok()
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.batch
            .schema_ref()
            .fields()
            .iter()
            .map(|field| field.name().as_str())
            .collect()
    }

    /// The column called `name`, or an error listing the columns there are.
    pub fn column(&self, name: &str) -> Result<&ArrayRef> {
        self.batch.column_by_name(name).ok_or_else(|| {
            anyhow!(
                "{}: missing required column '{name}' (found: {})",
                self.name,
                self.found_columns()
            )
        })
    }

    /// Checks that every listed column exists and has an accepted type.
    pub fn require(&self, columns: &[(&str, ColumnKind)]) -> Result<()> {
        columns
            .iter()
            .try_for_each(|&(name, kind)| self.column_of_kind(name, kind).map(drop))
    }

    /// The column called `name` after checking that its type is of `kind`.
    pub fn column_of_kind(&self, name: &str, kind: ColumnKind) -> Result<&ArrayRef> {
        let column = self.column(name)?;
        if !kind.accepts(column.data_type()) {
            bail!(
                "{}: column '{name}': expected {kind}, found {}{}",
                self.name,
                describe_type(column.data_type()),
                first_non_number(column, kind).unwrap_or_default()
            );
        }
        Ok(column)
    }

    /// A text column's values; a null is an error naming its row.
    pub fn strings(&self, name: &str) -> Result<Vec<&str>> {
        let column = self
            .column_of_kind(name, ColumnKind::Utf8)?
            .as_string::<i32>();
        (0..column.len())
            .map(|row| {
                if column.is_null(row) {
                    Err(self.null_error(name, row))
                } else {
                    Ok(column.value(row))
                }
            })
            .collect()
    }

    /// A float (or integer) column's values as `f64`; a null is an error
    /// naming its row. NaN and infinities pass: see [`Shard::finite_floats`].
    pub fn floats(&self, name: &str) -> Result<Vec<f64>> {
        let column = self.column_of_kind(name, ColumnKind::Float)?;
        let widened = cast(column, &DataType::Float64)?;
        let values = widened.as_primitive::<Float64Type>();
        (0..values.len())
            .map(|row| {
                if values.is_null(row) {
                    Err(self.null_error(name, row))
                } else {
                    Ok(values.value(row))
                }
            })
            .collect()
    }

    /// Like [`Shard::floats`], but NaN and ±inf are errors naming the row.
    pub fn finite_floats(&self, name: &str) -> Result<Vec<f64>> {
        let values = self.floats(name)?;
        if let Some(row) = values.iter().position(|value| !value.is_finite()) {
            bail!(
                "{}: column '{name}': {} at row {}",
                self.name,
                values[row],
                row + 1
            );
        }
        Ok(values)
    }

    /// An integer column's values as `u64`; nulls and negative values are
    /// errors naming the row.
    pub fn uints(&self, name: &str) -> Result<Vec<u64>> {
        let column = self.column_of_kind(name, ColumnKind::UInt)?;
        if column.data_type().is_unsigned_integer() {
            let widened = cast(column, &DataType::UInt64)?;
            let values = widened.as_primitive::<UInt64Type>();
            return (0..values.len())
                .map(|row| {
                    if values.is_null(row) {
                        Err(self.null_error(name, row))
                    } else {
                        Ok(values.value(row))
                    }
                })
                .collect();
        }
        let widened = cast(column, &DataType::Int64)?;
        let values = widened.as_primitive::<Int64Type>();
        (0..values.len())
            .map(|row| {
                if values.is_null(row) {
                    return Err(self.null_error(name, row));
                }
                u64::try_from(values.value(row)).map_err(|_| {
                    anyhow!(
                        "{}: column '{name}': negative value {} at row {}",
                        self.name,
                        values.value(row),
                        row + 1
                    )
                })
            })
            .collect()
    }

    /// The rows at `rows`, in that order.
    pub fn take(&self, rows: &[usize]) -> Result<Shard> {
        let indices = UInt64Array::from_iter_values(rows.iter().map(|&row| row as u64));
        let batch = take_record_batch(&self.batch, &indices)
            .with_context(|| format!("{}: selecting rows", self.name))?;
        Ok(Shard::new(self.name.clone(), batch))
    }

    /// The rows at `rows` without the response-level columns and without the
    /// columns named in `varying`: one row per prompt, carrying every other
    /// prompt-level column (known or not).
    pub fn prompt_level(&self, rows: &[usize], varying: &[String]) -> Result<Shard> {
        let keep: Vec<usize> = self
            .batch
            .schema_ref()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, field)| {
                !is_response_level(field.name()) && !varying.contains(field.name())
            })
            .map(|(index, _)| index)
            .collect();
        let projected = Shard::new(self.name.clone(), self.batch.project(&keep)?);
        projected.take(rows)
    }

    /// The columns the contract does not name whose values differ between the
    /// rows of one of `groups` (the rows of each prompt): they belong to the
    /// responses, not to the prompt, so a one-row-per-prompt output cannot
    /// carry them as they are.
    pub fn varying_columns<'a>(
        &self,
        groups: impl IntoIterator<Item = &'a [usize]> + Clone,
    ) -> Vec<String> {
        let schema = self.batch.schema();
        schema
            .fields()
            .iter()
            .zip(self.batch.columns())
            .filter(|(field, _)| !crate::contract::is_contract_column(field.name()))
            .filter(|(_, column)| {
                groups.clone().into_iter().any(|rows| {
                    let first = column.slice(rows[0], 1).to_data();
                    rows[1..]
                        .iter()
                        .any(|&row| column.slice(row, 1).to_data() != first)
                })
            })
            .map(|(field, _)| field.name().clone())
            .collect()
    }

    /// Adds a column at the end, or replaces the column of that name in place
    /// (so re-running a step that fills a column does not duplicate it).
    pub fn with_column(self, name: &str, values: ArrayRef) -> Result<Shard> {
        if values.len() != self.num_rows() {
            bail!(
                "{}: new column '{name}' has {} values for {} rows",
                self.name,
                values.len(),
                self.num_rows()
            );
        }
        let field = Arc::new(Field::new(
            name,
            values.data_type().clone(),
            values.null_count() > 0,
        ));
        let mut fields: Vec<_> = self.batch.schema_ref().fields().iter().cloned().collect();
        let mut columns = self.batch.columns().to_vec();
        match fields.iter().position(|existing| existing.name() == name) {
            Some(index) => {
                fields[index] = field;
                columns[index] = values;
            }
            None => {
                fields.push(field);
                columns.push(values);
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        Ok(Shard::new(self.name, batch))
    }

    /// Builds a text column, for [`Shard::with_column`].
    pub fn string_column<'a>(values: impl IntoIterator<Item = &'a str>) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(values))
    }

    pub(crate) fn null_error(&self, column: &str, row: usize) -> anyhow::Error {
        anyhow!("{}: column '{column}': null at row {}", self.name, row + 1)
    }

    pub(crate) fn found_columns(&self) -> String {
        let names = self.column_names();
        if names.is_empty() {
            "no columns".into()
        } else {
            names.join(", ")
        }
    }
}

/// For a numeric column that JSONL or CSV typing read as text (one cell that is not a number
/// makes the whole column text): `" (row N: \"VALUE\" is not a number)"`, naming the first such
/// cell; `None` when the column is no text column of a numeric kind, or holds no number at all
/// (a text column named where a number belongs).
fn first_non_number(column: &ArrayRef, kind: ColumnKind) -> Option<String> {
    if !matches!(kind, ColumnKind::Float | ColumnKind::UInt | ColumnKind::Int) {
        return None;
    }
    let text = column.as_string_opt::<i32>()?;
    let is_number = |row: usize| text.value(row).trim().parse::<f64>().is_ok();
    let rows = || (0..text.len()).filter(|&row| text.is_valid(row));
    if !rows().any(is_number) {
        return None;
    }
    rows()
        .find(|&row| !is_number(row))
        .map(|row| format!(" (row {}: {:?} is not a number)", row + 1, text.value(row)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{Float32Array, Int64Array, StringArray, UInt32Array};

    /// A scored-like shard: prompt_id, prompt, sample, reward and a `note`
    /// column no tool knows.
    pub(crate) fn scored(rows: &[(&str, u32, f32)]) -> Shard {
        let ids: Vec<&str> = rows.iter().map(|row| row.0).collect();
        let prompts: Vec<String> = rows
            .iter()
            .map(|row| format!("prompt of {}", row.0))
            .collect();
        let responses: Vec<String> = rows
            .iter()
            .map(|row| format!("{} response {}", row.0, row.1))
            .collect();
        let batch = RecordBatch::try_from_iter([
            ("prompt_id", Arc::new(StringArray::from(ids)) as ArrayRef),
            ("prompt", Arc::new(StringArray::from(prompts)) as ArrayRef),
            (
                "note",
                Arc::new(StringArray::from(vec!["kept"; rows.len()])) as ArrayRef,
            ),
            (
                "sample",
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|row| row.1))) as ArrayRef,
            ),
            (
                "response",
                Arc::new(StringArray::from(responses)) as ArrayRef,
            ),
            (
                "reward",
                Arc::new(Float32Array::from_iter_values(rows.iter().map(|row| row.2))) as ArrayRef,
            ),
        ])
        .expect("valid test batch");
        Shard::new("scored.parquet", batch)
    }

    /// One cell that is not a number turns a JSONL or CSV column into text; the error names it.
    #[test]
    fn a_numeric_column_read_as_text_names_its_first_non_number() {
        let shard = Shard::from_bytes(
            "s.csv",
            b"prompt_id,sample\na,0\nb,1\nc,two\n".to_vec(),
            None,
        )
        .unwrap();
        let err = shard.uints("sample").unwrap_err();
        assert_eq!(
            err.to_string(),
            "s.csv: column 'sample': expected unsigned integer, found utf8 (row 3: \"two\" is \
             not a number)"
        );
    }

    #[test]
    fn require_names_the_missing_column_and_what_exists() {
        let shard = scored(&[("a", 0, 1.0)]);
        let err = shard
            .require(&[
                ("prompt_id", ColumnKind::Utf8),
                ("score", ColumnKind::Float),
            ])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: missing required column 'score' (found: prompt_id, prompt, note, sample, response, reward)"
        );
    }

    #[test]
    fn require_names_the_expected_and_found_types() {
        let shard = scored(&[("a", 0, 1.0)]);
        let err = shard.require(&[("prompt", ColumnKind::Float)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: column 'prompt': expected float, found utf8"
        );
    }

    #[test]
    fn accessors_widen_numbers() {
        let shard = scored(&[("a", 3, 0.5), ("b", 4, -1.0)]);
        assert_eq!(shard.strings("prompt_id").unwrap(), ["a", "b"]);
        assert_eq!(shard.floats("reward").unwrap(), [0.5, -1.0]);
        assert_eq!(shard.uints("sample").unwrap(), [3, 4]);
    }

    #[test]
    fn nulls_negative_and_non_finite_values_name_their_row() {
        let batch = RecordBatch::try_from_iter([
            (
                "id",
                Arc::new(StringArray::from(vec![Some("a"), None])) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(vec![1, -2])) as ArrayRef),
            (
                "x",
                Arc::new(Float32Array::from(vec![1.0, f32::NAN])) as ArrayRef,
            ),
        ])
        .unwrap();
        let shard = Shard::new("in.jsonl", batch);
        assert_eq!(
            shard.strings("id").unwrap_err().to_string(),
            "in.jsonl: column 'id': null at row 2"
        );
        assert_eq!(
            shard.uints("n").unwrap_err().to_string(),
            "in.jsonl: column 'n': negative value -2 at row 2"
        );
        assert_eq!(
            shard.finite_floats("x").unwrap_err().to_string(),
            "in.jsonl: column 'x': NaN at row 2"
        );
        assert!(shard.floats("x").unwrap()[1].is_nan());
    }

    #[test]
    fn prompt_level_drops_response_columns_and_keeps_unknown_ones() {
        let shard = scored(&[("a", 0, 1.0), ("a", 1, 2.0), ("b", 0, 3.0)]);
        let prompts = shard.prompt_level(&[2, 0], &[]).unwrap();
        assert_eq!(prompts.column_names(), ["prompt_id", "prompt", "note"]);
        assert_eq!(prompts.strings("prompt_id").unwrap(), ["b", "a"]);
        let without = shard.prompt_level(&[2, 0], &["note".into()]).unwrap();
        assert_eq!(without.column_names(), ["prompt_id", "prompt"]);
    }

    #[test]
    fn varying_columns_are_the_unknown_ones_that_differ_within_a_prompt() {
        let shard = scored(&[("a", 0, 1.0), ("a", 1, 2.0), ("b", 0, 3.0)])
            .with_column("judge", Shard::string_column(["x", "y", "z"]))
            .unwrap()
            .with_column("topic", Shard::string_column(["t", "t", "u"]))
            .unwrap();
        // `sample`, `response` and `reward` differ within prompt a too, but the contract places
        // them; `topic` differs only between prompts.
        let groups: [&[usize]; 2] = [&[0, 1], &[2]];
        assert_eq!(shard.varying_columns(groups), ["judge"]);
        let singles: [&[usize]; 3] = [&[0], &[1], &[2]];
        assert!(shard.varying_columns(singles).is_empty());
    }

    #[test]
    fn with_column_appends_or_replaces() {
        let shard = scored(&[("a", 0, 1.0)]);
        let shard = shard
            .with_column("extra", Shard::string_column(["x"]))
            .unwrap();
        let shard = shard
            .with_column("prompt", Shard::string_column(["new"]))
            .unwrap();
        assert_eq!(
            shard.column_names(),
            [
                "prompt_id",
                "prompt",
                "note",
                "sample",
                "response",
                "reward",
                "extra"
            ]
        );
        assert_eq!(shard.strings("prompt").unwrap(), ["new"]);
        let err = shard
            .with_column("y", Shard::string_column(["1", "2"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: new column 'y' has 2 values for 1 rows"
        );
    }
}
