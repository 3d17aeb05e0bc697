//! Reading shards (Parquet, JSONL, CSV; file or stdin) and writing them
//! (Parquet or JSONL; atomically to a file, or to stdout).

use crate::contract::TEXT_COLUMNS;
use crate::shard::Shard;
use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::fmt;
use std::io::{BufWriter, Cursor, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name stdin goes by in error messages.
pub const STDIN_NAME: &str = "<stdin>";

const PARQUET_MAGIC: &[u8] = b"PAR1";
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    Parquet,
    Jsonl,
    Csv,
}

impl InputFormat {
    /// The format a file name promises, if its extension is one we know.
    pub fn from_extension(path: &Path) -> Option<InputFormat> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "parquet" | "pq" => Some(InputFormat::Parquet),
            "jsonl" | "ndjson" | "json" => Some(InputFormat::Jsonl),
            "csv" => Some(InputFormat::Csv),
            _ => None,
        }
    }

    /// The format of unnamed bytes (stdin, odd extensions): the Parquet magic,
    /// else a JSON object, else CSV.
    pub fn sniff(bytes: &[u8]) -> InputFormat {
        if bytes.starts_with(PARQUET_MAGIC) {
            InputFormat::Parquet
        } else if bytes.trim_ascii_start().starts_with(b"{") {
            InputFormat::Jsonl
        } else {
            InputFormat::Csv
        }
    }
}

/// The file a path argument names: `None` for stdin/stdout (no path, or `-`).
fn named_file(path: Option<&Path>) -> Option<&Path> {
    path.filter(|path| *path != Path::new("-"))
}

impl Shard {
    /// Reads every shard named by `paths` in order; no paths at all reads one
    /// shard from stdin (the tools that take several inputs).
    pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Shard>> {
        if paths.is_empty() {
            return Ok(vec![Shard::read(None)?]);
        }
        paths.iter().map(|path| Shard::read(Some(path))).collect()
    }

    /// Reads a whole shard from `path`, or from stdin when `path` is `None`
    /// or `-`. Stdin is buffered completely: Parquet keeps its index in the
    /// footer.
    pub fn read(path: Option<&Path>) -> Result<Shard> {
        match named_file(path) {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                Shard::from_bytes(
                    path.display().to_string(),
                    bytes,
                    InputFormat::from_extension(path),
                )
            }
            None => {
                let mut stdin = std::io::stdin().lock();
                if stdin.is_terminal() {
                    bail!("no input: give a shard file, or pipe a shard into stdin");
                }
                let mut bytes = Vec::new();
                stdin.read_to_end(&mut bytes).context("reading stdin")?;
                Shard::from_bytes(STDIN_NAME, bytes, None)
            }
        }
    }

    /// Parses a shard from bytes; `format: None` sniffs it. Strings are
    /// normalised to `utf8` and lists to `list`, so callers see one type of
    /// each, and all record batches become one.
    pub fn from_bytes(
        name: impl Into<String>,
        bytes: Vec<u8>,
        format: Option<InputFormat>,
    ) -> Result<Shard> {
        let name = name.into();
        let mut bytes = bytes;
        // A text file saved with a byte-order mark (Windows editors do): the mark is no data.
        if bytes.starts_with(UTF8_BOM) {
            bytes.drain(..UTF8_BOM.len());
        }
        if bytes.is_empty() {
            bail!("{name}: empty input (0 bytes): expected a Parquet, JSONL or CSV shard");
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            bail!("{name}: empty input (only whitespace): expected a Parquet, JSONL or CSV shard");
        }
        let format = format.unwrap_or_else(|| InputFormat::sniff(&bytes));
        let batch = match format {
            InputFormat::Parquet => {
                let hint = if bytes.starts_with(PARQUET_MAGIC) {
                    ""
                } else {
                    " (it does not start with the Parquet magic bytes PAR1)"
                };
                read_parquet(bytes)
                    .map_err(|err| anyhow!("{name}: not a readable Parquet file{hint}: {err}"))
            }
            InputFormat::Jsonl => {
                read_jsonl(&bytes).with_context(|| format!("{name}: not a readable JSONL file"))
            }
            InputFormat::Csv => {
                read_csv(&bytes).with_context(|| format!("{name}: not a readable CSV file"))
            }
        }?;
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = batch
            .schema()
            .fields()
            .iter()
            .find(|field| !seen.insert(field.name().clone()))
        {
            bail!("{name}: column '{}' appears twice", twice.name());
        }
        let batch =
            normalise(batch).with_context(|| format!("{name}: normalising column types"))?;
        Ok(Shard::new(name, batch))
    }
}

fn read_parquet(bytes: Vec<u8>) -> Result<RecordBatch> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes))?;
    let schema = builder.schema().clone();
    let batches = builder.build()?.collect::<Result<Vec<_>, _>>()?;
    Ok(concat_batches(&schema, &batches)?)
}

fn read_jsonl(bytes: &[u8]) -> Result<RecordBatch> {
    // First, so that a malformed record is named by its line in the file: Arrow's reader
    // numbers its errors from the start of each line it reads ("line 1" whatever the line).
    let written = keys_in_written_order(bytes)?;
    let (schema, _) = arrow::json::reader::infer_json_schema(Cursor::new(bytes), None)?;
    let schema = in_written_order(schema, &written);
    let schema = Arc::new(text_columns_as_utf8(messages_role_first(schema)));
    // Coercion turns the numbers in a text column (`"prompt_id": 7`) into text.
    let reader = arrow::json::ReaderBuilder::new(schema.clone())
        .with_coerce_primitive(true)
        .build(Cursor::new(bytes))?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(concat_batches(&schema, &batches)?)
}

/// Every key the records of `jsonl` use, in the order the file first writes each; a record
/// that is not a JSON object, or that spans lines (Arrow's reader takes one record a line), is an
/// error naming its line in the file.
fn keys_in_written_order(jsonl: &[u8]) -> Result<Vec<String>> {
    let mut written: Vec<String> = Vec::new();
    let mut records = serde_json::Deserializer::from_slice(jsonl).into_iter::<ObjectKeys>();
    let newlines = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b'\n').count();
    let (mut end, mut line) = (0, 1);
    while let Some(keys) = records.next() {
        let start = end
            + jsonl[end..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
        line += newlines(&jsonl[end..start]);
        let ObjectKeys(keys) = keys.map_err(|err| {
            // serde notices an unclosed record where the next one begins: name its own line.
            if err.line() > line {
                anyhow!("line {line}: the record does not end on its line ({err})")
            } else {
                err.into()
            }
        })?;
        end = records.byte_offset();
        if jsonl[start..end].contains(&b'\n') {
            bail!("line {line}: a record spans several lines; JSONL holds one JSON object a line");
        }
        for key in keys {
            if !written.contains(&key) {
                written.push(key);
            }
        }
    }
    Ok(written)
}

/// Arrow's JSON inference sorts the columns by name; this puts them back in
/// the order the file first writes each key, as a person reading it expects.
fn in_written_order(schema: Schema, written: &[String]) -> Schema {
    let position = |name: &str| {
        written
            .iter()
            .position(|key| key == name)
            .unwrap_or(usize::MAX)
    };
    let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
    fields.sort_by_key(|field| position(field.name()));
    Schema::new(fields)
}

/// Arrow's JSON inference sorts the keys of nested objects by name too, so a conversation's
/// messages would come out as `struct<content, role>`; the contract, and every chat dataset,
/// puts the role first. A list of structs with both keys gets `role, content`, then the rest.
fn messages_role_first(schema: Schema) -> Schema {
    let fields: Vec<FieldRef> = schema
        .fields()
        .iter()
        .map(|field| message_members_role_first(field.clone()))
        .collect();
    Schema::new(fields)
}

/// One column of [`messages_role_first`].
fn message_members_role_first(field: FieldRef) -> FieldRef {
    let DataType::List(item) = field.data_type() else {
        return field;
    };
    let DataType::Struct(members) = item.data_type() else {
        return field;
    };
    if members.find("role").is_none() || members.find("content").is_none() {
        return field;
    }
    let mut ordered: Vec<FieldRef> = members.iter().cloned().collect();
    ordered.sort_by_key(|member| match member.name().as_str() {
        "role" => 0,
        "content" => 1,
        _ => 2,
    });
    let item = item
        .as_ref()
        .clone()
        .with_data_type(DataType::Struct(ordered.into()));
    Arc::new(
        field
            .as_ref()
            .clone()
            .with_data_type(DataType::List(Arc::new(item))),
    )
}

/// The top-level keys of one JSON object, in the order they are written.
struct ObjectKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> serde::de::Visitor<'de> for KeysVisitor {
            type Value = ObjectKeys;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ObjectKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(ObjectKeys(keys))
            }
        }
        deserializer.deserialize_map(KeysVisitor)
    }
}

fn read_csv(bytes: &[u8]) -> Result<RecordBatch> {
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (schema, _) = format.infer_schema(Cursor::new(bytes), None)?;
    let schema = Arc::new(text_columns_as_utf8(schema));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(format)
        .build(Cursor::new(bytes))?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(concat_batches(&schema, &batches)?)
}

/// Retypes the contract's text columns that type inference took for
/// numbers or booleans (see `TEXT_COLUMNS`).
fn text_columns_as_utf8(schema: Schema) -> Schema {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| {
            // Null: a CSV of a header alone, whose columns hold no value to type them by.
            let scalar = field.data_type().is_primitive()
                || matches!(field.data_type(), DataType::Boolean | DataType::Null);
            if scalar && TEXT_COLUMNS.contains(&field.name().as_str()) {
                field.as_ref().clone().with_data_type(DataType::Utf8)
            } else {
                field.as_ref().clone()
            }
        })
        .collect();
    Schema::new(fields)
}

/// The type a column is normalised to: one string type (`utf8`) and one list
/// type (`list`), also inside lists and structs.
fn normalised_type(data_type: &DataType) -> DataType {
    let normalised_field = |field: &Field| {
        field
            .clone()
            .with_data_type(normalised_type(field.data_type()))
    };
    match data_type {
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::Dictionary(_, values)
            if matches!(
                **values,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            DataType::Utf8
        }
        DataType::List(item)
        | DataType::LargeList(item)
        | DataType::ListView(item)
        | DataType::LargeListView(item) => DataType::List(Arc::new(normalised_field(item))),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|field| normalised_field(field)).collect())
        }
        other => other.clone(),
    }
}

/// Casts every column to its normalised type. Schema-level metadata (pandas
/// or Hugging Face descriptions of the columns) is dropped: it would go stale
/// as soon as a tool adds or removes a column.
fn normalise(batch: RecordBatch) -> Result<RecordBatch> {
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema_ref().fields().iter().zip(batch.columns()) {
        let target = normalised_type(field.data_type());
        if target == *field.data_type() {
            columns.push(column.clone());
        } else {
            columns
                .push(cast(column, &target).with_context(|| format!("column '{}'", field.name()))?);
        }
        fields.push(field.as_ref().clone().with_data_type(target));
    }
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &options,
    )?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Parquet, zstd-compressed
    Parquet,
    /// JSON Lines, one object per row
    Jsonl,
}

impl OutputFormat {
    /// The format to write: `explicit` when given, else what a file's
    /// extension says (`.jsonl`, `.ndjson`, `.json`: JSONL; `.csv`: an error,
    /// since shards hold nested columns CSV cannot; anything else and stdout:
    /// Parquet).
    pub fn resolve(
        explicit: Option<OutputFormat>,
        destination: &Destination,
    ) -> Result<OutputFormat> {
        if let Some(format) = explicit {
            return Ok(format);
        }
        let Destination::File(path) = destination else {
            return Ok(OutputFormat::Parquet);
        };
        match InputFormat::from_extension(path) {
            Some(InputFormat::Jsonl) => Ok(OutputFormat::Jsonl),
            Some(InputFormat::Csv) => {
                bail!(
                    "{}: cannot write CSV; name the file .parquet or .jsonl, or pass --format",
                    path.display()
                )
            }
            Some(InputFormat::Parquet) | None => Ok(OutputFormat::Parquet),
        }
    }
}

/// Where an output shard goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// `None` and `-` mean stdout.
    pub fn from_arg(path: Option<&Path>) -> Destination {
        match named_file(path) {
            Some(path) => Destination::File(path.to_path_buf()),
            None => Destination::Stdout,
        }
    }

    /// Refuses a destination no write could reach, before any work: a file in a directory that
    /// does not exist, or a path that is a directory. (A stream, a device or a pipe is left to
    /// the write itself.)
    pub fn check_writable(&self) -> Result<()> {
        let Destination::File(path) = self else {
            return Ok(());
        };
        if optune_fs::is_stream(path) {
            return Ok(());
        }
        if path.is_dir() {
            bail!("{}: is a directory; name a file to write", path.display());
        }
        optune_fs::require_parent_dir(path)
    }

    /// Whether `self` and `other` name one file, however written (`o/s.parquet` and
    /// `o/../o/s.parquet`, a link and its target): the same stream, or paths that resolve to one
    /// ([`optune_fs::resolved`]).
    pub fn names_same_file(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::File(a), Destination::File(b)) => {
                a == b
                    || optune_fs::resolved(a).is_some_and(|ra| optune_fs::resolved(b) == Some(ra))
            }
            (a, b) => a == b,
        }
    }

    /// The file a crash-resume journal can sit beside (`FILE.journal`): a named file, not stdout
    /// and not a device or a pipe (`-o /dev/null`, whose directory is no place for a journal and
    /// whose output no later run can resume into).
    pub fn resumable_file(&self) -> Option<&Path> {
        match self {
            Destination::File(path) if !optune_fs::is_stream(path) => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Stdout => f.write_str("<stdout>"),
            Destination::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The error of a write to stdout whose reader closed it early (`opt-gen … | head`): not a
/// failure of the tool, which [`crate::cli::run_tool`] ends quietly.
#[derive(Debug)]
pub struct ReaderGone;

impl fmt::Display for ReaderGone {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the reader of stdout closed it before the output was written")
    }
}

impl std::error::Error for ReaderGone {}

/// Writes `shard` to `destination`. A file is written under a temporary
/// name in the same directory and renamed into place only when complete, so
/// a failed run leaves neither a partial file nor a stale one under the
/// final name (a run killed by a signal may leave a `.NAME.*.partial` file).
pub fn write_shard(shard: &Shard, destination: &Destination, format: OutputFormat) -> Result<()> {
    match destination {
        Destination::Stdout => {
            let stdout = std::io::stdout();
            if format == OutputFormat::Parquet && stdout.is_terminal() {
                bail!("refusing to write Parquet to a terminal: pass -o FILE, --format jsonl, or pipe the output");
            }
            let mut out = BufWriter::new(stdout);
            let written = encode(shard.batch(), format, &mut out)
                .and_then(|()| out.flush().map_err(anyhow::Error::from));
            written.map_err(|err| {
                let broken_pipe = err.chain().any(|cause| {
                    cause
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                });
                if broken_pipe {
                    anyhow::Error::new(ReaderGone)
                } else {
                    err.context("writing to stdout")
                }
            })
        }
        Destination::File(path) => {
            { optune_fs::write_file_atomically(path, |out| encode(shard.batch(), format, out)) }
                .with_context(|| format!("{}: cannot write", path.display()))
        }
    }
}

fn encode<W: Write + Send>(batch: &RecordBatch, format: OutputFormat, out: W) -> Result<()> {
    match format {
        OutputFormat::Parquet => {
            let properties = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut writer = ArrowWriter::try_new(out, batch.schema(), Some(properties))?;
            writer.write(batch)?;
            writer.close()?;
        }
        OutputFormat::Jsonl => {
            // Explicit nulls keep a column that is null in every row, so the
            // columns survive a trip through JSONL.
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(out);
            writer.write(batch)?;
            writer.finish()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::scored;
    use arrow::array::{Array, LargeStringArray, StringViewArray};

    /// A journal goes beside a named file, never beside a device (nor for stdout).
    #[test]
    fn only_a_named_file_is_resumable() {
        let file = Destination::from_arg(Some(Path::new("out.parquet")));
        assert_eq!(file.resumable_file(), Some(Path::new("out.parquet")));
        assert_eq!(
            Destination::from_arg(Some(Path::new("-"))).resumable_file(),
            None
        );
        #[cfg(unix)]
        assert_eq!(
            Destination::from_arg(Some(Path::new("/dev/null"))).resumable_file(),
            None
        );
    }

    fn round_trip(shard: &Shard, format: OutputFormat, extension: &str) -> Shard {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(format!("out.{extension}"));
        write_shard(shard, &Destination::File(path.clone()), format).unwrap();
        let listing: Vec<_> = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            listing,
            [std::ffi::OsString::from(format!("out.{extension}"))],
            "no temporary file left"
        );
        Shard::read(Some(&path)).unwrap()
    }

    #[test]
    fn parquet_round_trip_keeps_types() {
        let shard = scored(&[("a", 0, 0.25), ("b", 1, -2.0)]);
        let back = round_trip(&shard, OutputFormat::Parquet, "parquet");
        assert_eq!(back.batch(), shard.batch());
        assert!(back.name().ends_with("out.parquet"));
    }

    #[test]
    fn jsonl_round_trip_keeps_values() {
        let shard = scored(&[("a", 0, 0.25), ("7", 1, -2.0)]);
        let back = round_trip(&shard, OutputFormat::Jsonl, "jsonl");
        assert_eq!(back.column_names(), shard.column_names());
        assert_eq!(back.strings("prompt_id").unwrap(), ["a", "7"]);
        assert_eq!(back.uints("sample").unwrap(), [0, 1]);
        assert_eq!(back.floats("reward").unwrap(), [0.25, -2.0]);
    }

    #[test]
    fn sniffs_formats_without_an_extension() {
        let shard = scored(&[("a", 0, 0.5)]);
        let mut parquet = Vec::new();
        encode(shard.batch(), OutputFormat::Parquet, &mut parquet).unwrap();
        assert_eq!(InputFormat::sniff(&parquet), InputFormat::Parquet);
        assert_eq!(
            Shard::from_bytes(STDIN_NAME, parquet, None)
                .unwrap()
                .batch(),
            shard.batch()
        );
        assert_eq!(InputFormat::sniff(b"\n  {\"a\": 1}"), InputFormat::Jsonl);
        assert_eq!(InputFormat::sniff(b"prompt_id,prompt\n"), InputFormat::Csv);
    }

    #[test]
    fn csv_reads_numeric_ids_as_text() {
        let csv = b"prompt_id,prompt,weight\n1,Say hi,0.5\n2,\"Count, to three\",1\n".to_vec();
        let shard = Shard::from_bytes("prompts.csv", csv, None).unwrap();
        assert_eq!(shard.strings("prompt_id").unwrap(), ["1", "2"]);
        assert_eq!(
            shard.strings("prompt").unwrap(),
            ["Say hi", "Count, to three"]
        );
        assert_eq!(shard.floats("weight").unwrap(), [0.5, 1.0]);
    }

    #[test]
    fn jsonl_reads_numeric_ids_as_text() {
        let jsonl =
            b"{\"prompt_id\": 7, \"prompt\": \"x\"}\n{\"prompt_id\": \"p8\", \"prompt\": \"y\"}\n"
                .to_vec();
        let shard = Shard::from_bytes("prompts.jsonl", jsonl, None).unwrap();
        assert_eq!(shard.strings("prompt_id").unwrap(), ["7", "p8"]);
    }

    #[test]
    fn large_and_view_strings_become_utf8() {
        let batch = RecordBatch::try_from_iter([
            (
                "large",
                Arc::new(LargeStringArray::from(vec!["a"])) as ArrayRef,
            ),
            (
                "view",
                Arc::new(StringViewArray::from(vec!["b"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut parquet = Vec::new();
        encode(&batch, OutputFormat::Parquet, &mut parquet).unwrap();
        let shard = Shard::from_bytes("strings.parquet", parquet, None).unwrap();
        assert_eq!(shard.strings("large").unwrap(), ["a"]);
        assert_eq!(shard.strings("view").unwrap(), ["b"]);
    }

    #[test]
    fn bad_bytes_are_errors_naming_the_input() {
        let err = Shard::from_bytes("x.parquet", Vec::new(), None).unwrap_err();
        assert!(
            err.to_string().starts_with("x.parquet: empty input"),
            "{err}"
        );
        let err = Shard::from_bytes("x.parquet", b"hello".to_vec(), Some(InputFormat::Parquet))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("x.parquet: not a readable Parquet file (it does not start"),
            "{err}"
        );
        let shard = scored(&[("a", 0, 0.5)]);
        let mut parquet = Vec::new();
        encode(shard.batch(), OutputFormat::Parquet, &mut parquet).unwrap();
        parquet.truncate(parquet.len() / 2);
        let err = Shard::from_bytes("cut.parquet", parquet, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cut.parquet: not a readable Parquet file: "),
            "{err}"
        );
    }

    /// A conversation read from JSONL has the contract's `struct<role, content>`, whatever order
    /// the file writes the keys in (Arrow's inference sorts them), and reads back the same.
    #[test]
    fn messages_from_jsonl_put_the_role_first() {
        let text = concat!(
            r#"{"prompt_id": "a", "messages": [{"content": "Hi", "role": "user", "name": "x"}]}"#,
            "\n",
            r#"{"prompt_id": "b", "messages": [{"role": "user", "content": "Yo"}]}"#,
            "\n"
        );
        let shard = Shard::from_bytes("p.jsonl", text.as_bytes().to_vec(), None).unwrap();
        let DataType::List(item) = shard.column("messages").unwrap().data_type().clone() else {
            panic!("messages is not a list");
        };
        let DataType::Struct(members) = item.data_type() else {
            panic!("a message is not a struct");
        };
        let names: Vec<&str> = members.iter().map(|m| m.name().as_str()).collect();
        assert_eq!(names, ["role", "content", "name"]);
        let contents: Vec<String> = shard
            .messages("messages")
            .unwrap()
            .into_iter()
            .map(|conversation| format!("{}:{}", conversation[0].role, conversation[0].content))
            .collect();
        assert_eq!(contents, ["user:Hi", "user:Yo"]);
    }

    /// Text input that a person may hand over: errors name the line of the file, not Arrow's
    /// line of one record; a byte-order mark, a CSV of a header alone and whitespace read as
    /// what they are.
    #[test]
    fn text_input_errors_name_the_line_and_odd_text_reads_plainly() {
        let jsonl = |text: &str| Shard::from_bytes("p.jsonl", text.as_bytes().to_vec(), None);
        let err = jsonl("{\"prompt_id\": \"a\"}\n\n{\"prompt_id\": \"b\"}\n{\"prompt_id\": \"c\n")
            .unwrap_err();
        assert!(format!("{err:#}").contains("line 4"), "{err:#}");
        let err = jsonl("{\"prompt_id\": \"a\"}\n[1, 2]\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = jsonl("{\"prompt_id\": \"a\"}\n\n{\"prompt_id\":\n \"b\"}\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("line 3: a record spans several lines"),
            "{err:#}"
        );
        let err = jsonl("{\"prompt_id\": \"a\"}\n{\"prompt_id\": \"b\"\n{\"prompt_id\": \"c\"}\n")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("line 2: the record does not end on its line"),
            "{err:#}"
        );

        let with_bom = [b"\xEF\xBB\xBF".as_slice(), b"{\"prompt_id\": \"a\"}\n"].concat();
        let shard = Shard::from_bytes("<stdin>", with_bom, None).unwrap();
        assert_eq!(shard.strings("prompt_id").unwrap(), ["a"]);

        let header_only = Shard::from_bytes("p.csv", b"prompt_id,prompt\n".to_vec(), None).unwrap();
        assert_eq!(header_only.num_rows(), 0);
        assert!(header_only.strings("prompt_id").unwrap().is_empty());

        let err = Shard::from_bytes("<stdin>", b"\n \n".to_vec(), None).unwrap_err();
        assert!(
            err.to_string().contains("empty input (only whitespace)"),
            "{err}"
        );
    }

    /// A shard with two columns of one name is refused by name, whatever else it holds.
    #[test]
    fn a_column_named_twice_is_refused() {
        let err = Shard::from_bytes("d.csv", b"prompt_id,reward,reward\na,1,x\n".to_vec(), None)
            .unwrap_err();
        assert_eq!(err.to_string(), "d.csv: column 'reward' appears twice");
    }

    /// A destination no write could reach is refused before any work, and two spellings of
    /// one file are one file.
    #[test]
    fn unreachable_destinations_are_refused_and_spellings_compared() {
        let tmp = tempfile::tempdir().unwrap();
        let file = |path: PathBuf| Destination::File(path);
        let missing = file(tmp.path().join("nodir/x.parquet"));
        let err = missing.check_writable().unwrap_err();
        assert!(err.to_string().contains("nodir does not exist"), "{err}");
        let err = file(tmp.path().to_path_buf()).check_writable().unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        file(tmp.path().join("x.parquet")).check_writable().unwrap();
        Destination::Stdout.check_writable().unwrap();

        std::fs::create_dir(tmp.path().join("o")).unwrap();
        let plain = file(tmp.path().join("o/s.parquet"));
        let roundabout = file(tmp.path().join("o/../o/s.parquet"));
        assert!(plain.names_same_file(&roundabout));
        assert!(!plain.names_same_file(&file(tmp.path().join("o/t.parquet"))));
        assert!(Destination::Stdout.names_same_file(&Destination::Stdout));
    }

    #[test]
    fn an_output_that_names_an_input_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("o")).unwrap();
        let input = tmp.path().join("o/s.parquet");
        let output = Destination::File(tmp.path().join("o/../o/s.parquet"));
        let other = tmp.path().join("o/t.parquet");
        let refusal = crate::cli::refuse_input_as_output(&output, "-o", [&other, &input])
            .unwrap_err()
            .to_string();
        assert!(refusal.starts_with("-o "), "{refusal}");
        assert!(
            refusal.ends_with(&format!(
                "is an input ({}): write the output elsewhere",
                input.display()
            )),
            "{refusal}"
        );
        crate::cli::refuse_input_as_output(&output, "-o", [&other]).unwrap();
        // A link to the output is the output.
        std::fs::write(&input, "x").unwrap();
        let link = tmp.path().join("link.parquet");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        assert!(crate::cli::refuse_input_as_output(&output, "-o", [&link]).is_err());
        // stdin as input and stdout as output are no clash.
        crate::cli::refuse_input_as_output(&Destination::Stdout, "-o", ["-"]).unwrap();
    }

    #[test]
    fn output_format_follows_the_extension_unless_given() {
        let file = |name: &str| Destination::File(PathBuf::from(name));
        assert_eq!(
            OutputFormat::resolve(None, &Destination::Stdout).unwrap(),
            OutputFormat::Parquet
        );
        assert_eq!(
            OutputFormat::resolve(None, &file("a.jsonl")).unwrap(),
            OutputFormat::Jsonl
        );
        assert_eq!(
            OutputFormat::resolve(None, &file("a.parquet")).unwrap(),
            OutputFormat::Parquet
        );
        assert_eq!(
            OutputFormat::resolve(Some(OutputFormat::Jsonl), &file("a.parquet")).unwrap(),
            OutputFormat::Jsonl
        );
        assert!(OutputFormat::resolve(None, &file("a.csv")).is_err());
    }

    #[test]
    fn zero_rows_survive_a_round_trip() {
        let shard = scored(&[]);
        let back = round_trip(&shard, OutputFormat::Parquet, "parquet");
        assert_eq!(back.num_rows(), 0);
        assert_eq!(back.column_names(), shard.column_names());
        assert!(back.column("reward").unwrap().is_empty());
    }
}
