# Sourced by the bench scripts: the repository, the scratch directory, the release build of the
# tools, and the Python that runs the peer (transformers, TRL).
#
# Sets: repo (the checkout), bench_dir ($OPTUNE_BENCH_DIR [runs/bench], created and exported),
# target ($CARGO_TARGET_DIR [target]).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bench_dir="${OPTUNE_BENCH_DIR:-$repo/runs/bench}"
mkdir -p "$bench_dir"
export OPTUNE_BENCH_DIR="$bench_dir"
target="${CARGO_TARGET_DIR:-$repo/target}"

# bench_build
#   Builds the release binaries into $target with `make build`'s command, so the features are the
#   same and nothing is rebuilt after it.
bench_build() {
    CARGO_TARGET_DIR="$target" cargo build --release --quiet --workspace
}

# bench_python NAME IMPORTS PACKAGE...
#   Prints the path of a Python that can run `import IMPORTS`: $OPTUNE_BENCH_PYTHON when set,
#   else a throwaway virtual environment $bench_dir/NAME, made on first use with CPU torch from
#   download.pytorch.org ($OPTUNE_BENCH_TORCH_INDEX overrides; PyPI's torch when that index is out
#   of reach) and PACKAGE... from PyPI, and reused by later runs. Exits when the imports fail.
bench_python() {
    local name="$1" imports="$2"
    shift 2
    local python
    if [[ -n "${OPTUNE_BENCH_PYTHON:-}" ]]; then
        python="$OPTUNE_BENCH_PYTHON"
    else
        local venv="$bench_dir/$name"
        if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import $imports" 2>/dev/null; then
            echo "bench: creating a virtual environment with $imports in $venv" >&2
            python3 -m venv "$venv" >&2
            "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
            # The CPU-only wheel is a fifth of PyPI's CUDA build; where download.pytorch.org is
            # out of reach (only the package registries are), PyPI's runs on the CPU as well.
            "$venv/bin/python" -m pip install --quiet --timeout 15 --retries 1 torch \
                --index-url "${OPTUNE_BENCH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" >&2 ||
                "$venv/bin/python" -m pip install --quiet torch >&2
            "$venv/bin/python" -m pip install --quiet "$@" >&2
        fi
        python="$venv/bin/python"
    fi
    if ! "$python" -c "import $imports" >&2; then
        echo "bench: $python cannot import $imports" >&2
        exit 1
    fi
    echo "$python"
}
