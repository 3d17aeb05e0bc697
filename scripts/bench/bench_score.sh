#!/usr/bin/env bash
# Reward-scoring benchmark: opt-score --rm against Hugging Face transformers on the CPU
# (`make bench-score`).
#
# Environment: as scripts/bench/bench_gen.sh (OPTUNE_BENCH_PYTHON, OPTUNE_BENCH_DIR,
# OPTUNE_SMOLLM2_DIR, CARGO_TARGET_DIR).
# Extra arguments go to bench_score.py (--repeats N, --rows N, --dtypes f32,bf16, --threads N,
# --models ...).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
cd "$repo"
python="$(bench_python venv 'torch, transformers' 'transformers>=4.57' safetensors)"

bench_build
exec "$python" "$repo/scripts/bench/bench_score.py" --opt-score "$target/release/opt-score" \
    --work "$bench_dir/score" "$@"
