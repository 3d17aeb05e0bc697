#!/usr/bin/env python3
"""Check that other Parquet readers can read the shards optune writes.

Usage: check_parquet_readers.py FILE.parquet...

Reads every file completely with DuckDB and with pyarrow, checks that both see
the same row count and column names, prints `ok FILE (N rows)` per file and
exits 1 if any file fails. Needs the `duckdb` and `pyarrow` modules
(`pip install duckdb pyarrow`).
"""

import sys

import duckdb
import pyarrow.parquet as pq


def check(path: str) -> str:
    """Reads `path` with both readers; returns a description of the file or raises."""
    connection = duckdb.connect()
    rows = connection.execute("select * from read_parquet(?)", [path]).fetchall()
    duckdb_columns = [column[0] for column in connection.description]
    table = pq.read_table(path)
    table.to_pylist()  # decode every value, not just the metadata
    if table.num_rows != len(rows):
        raise ValueError(f"pyarrow reads {table.num_rows} rows, duckdb {len(rows)}")
    if table.column_names != duckdb_columns:
        raise ValueError(f"pyarrow reads columns {table.column_names}, duckdb {duckdb_columns}")
    return f"{len(rows)} rows, columns: {', '.join(duckdb_columns)}"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    failures = 0
    for path in paths:
        try:
            print(f"ok {path} ({check(path)})")
        except Exception as error:  # any reader failure is a finding to report, not a crash
            failures += 1
            print(f"FAILED {path}: {type(error).__name__}: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
