# optune: build and test. CI runs `make test` through .ci/run.

# One target dir outside the clone, shared by every checkout and by CI.
CARGO_TARGET_DIR ?= $(HOME)/.cache/optune-target
export CARGO_TARGET_DIR
# The Python the DuckDB/pyarrow cross-read test runs (scripts/check_parquet_readers.py).
OPTUNE_PYTHON ?= python3
export OPTUNE_PYTHON

.PHONY: build test

build:
	cargo build --release --workspace

# The cargo tests include the Parquet cross-read, which skips itself when
# $(OPTUNE_PYTHON) lacks duckdb or pyarrow (OPTUNE_REQUIRE_DUCKDB=1 makes that
# a failure); the last line says which happened.
test:
	cargo test --release --workspace
	@if $(OPTUNE_PYTHON) -c 'import duckdb, pyarrow' 2>/dev/null; \
	then echo 'DuckDB/pyarrow cross-read: ran'; \
	else echo 'DuckDB/pyarrow cross-read: SKIPPED ($(OPTUNE_PYTHON) cannot import duckdb and pyarrow; pip install duckdb pyarrow)'; fi

# Generation speed of opt-gen against Hugging Face transformers on the CPU (batch 1 and 16, 128
# new tokens, greedy): see scripts/bench/bench_gen.sh for the environment variables and
# docs/perf.md for the figures. Not part of `make test`.
.PHONY: bench-gen
bench-gen:
	scripts/bench/bench_gen.sh $(BENCH_ARGS)
