#!/usr/bin/env bash
# The miniature OPTune pipeline end to end (`make pipeline-test`; CI runs it).
#
# Runs pipelines/tiny.mk (the testdata models, seconds per iteration) into a temporary
# RUNS directory and checks:
#   1. `make iter3` writes every expected file of iterations 0-3;
#   2. a second `make iter3` rewrites nothing;
#   3. after deleting iteration 3's files from the generation on (an interruption there),
#      `make iter3` redoes exactly those and leaves the selection alone;
#   4. `make report` writes the report and its four plots;
#   5. `make sweep RHOS="0.5 1.0" ITERS=2 SWEEP_MAX_NEW_TOKENS=6` writes both runs (with 6 new
#      tokens) and the sweep table, prints a measured and a predicted speedup per ρ, the second
#      run sharing the first run's iteration 1, and ρ = 1 regenerates every prompt; a sweep over
#      SWEEP_SELECTS="random history" writes one row per selection, and the history run's
#      iteration 3 selects with iteration 1's scored set as history;
#   6. DuckDB and pyarrow read every Parquet file (skipped when $OPTUNE_PYTHON lacks them,
#      a failure with OPTUNE_REQUIRE_DUCKDB=1);
#   7. the run again with SHARDS=3 DEVICES="cpu cpu" (make -j2) up to iteration 2: the same
#      contents as the unsharded run, every part merged and removed; and (make -n) the devices
#      of DEVICES="cuda:0 cuda:1" given to three shards in turn.
#   8. the paper's recipe, pipelines/zephyr-ultrachat.mk, in miniature: its own settings with
#      only what a CPU and the tiny models need changed (the testdata Mistral pair as POLICY
#      and RM with Mistral-7B's 32768 positions in their configs, UltraChat-layout prompts from
#      testdata/shards/ultrachat-prompts.jsonl, --device cpu, no CUDA build, 8 new tokens):
#      iterations 1-2 with TRAIN=lora, iteration 1 with TRAIN=full on TRAIN_DEVICES="cpu cpu",
#      and the refusals of a missing POLICY and of three training devices.
#   9. a Qwen3 policy and reward model (tiny-qwen3, tiny-rm-qwen3) through iteration 1, with and
#      without CHAT_TEMPLATE_KWARGS='{"enable_thinking": false}': the variables reach every
#      opt-gen and opt-wdpo run, and the prompts they render change the responses' log-probs.
# Ends with `pipeline-test: N passed, N failed`. KEEP_RUNS=1 keeps the temporary directory.
set -uo pipefail

cd "$(dirname "$0")/../.."
MAKE=${MAKE:-make}
PYTHON=${OPTUNE_PYTHON:-python3}
# Where make puts the tools (its CARGO_TARGET_DIR default, which it exports).
BIN_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/optune-target}/release
runs=$(mktemp -d "${TMPDIR:-/tmp}/optune-pipeline-test.XXXXXX")
log=$runs/make.log
passed=0 failed=0

finish() {
  echo "pipeline-test: $passed passed, $failed failed"
  if [ "${KEEP_RUNS:-0}" = 1 ] || [ "$failed" -gt 0 ]; then
    echo "pipeline-test: runs kept in $runs"
  else
    rm -rf "$runs"
  fi
}
trap finish EXIT

ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*"; }

# make with the tools as built, into the log: PIPELINE, then make's other arguments.
make_pipeline() {
  local pipeline=$1
  shift
  "$MAKE" --no-print-directory PIPELINE="$pipeline" BUILD_TOOLS=0 "$@" >>"$log" 2>&1
}
pipeline_make() { make_pipeline pipelines/tiny.mk RUNS="$runs" "$@"; }

# Build the tools once, through make (the stages then use them as they are).
if ! "$MAKE" --no-print-directory PIPELINE=pipelines/tiny.mk tools >"$log" 2>&1; then
  fail "building the tools"; tail -n 30 "$log"; exit 1
fi

run=$runs/tiny
expected_files() {
  local dir=$1 last=$2 i
  echo "$dir/run.env" "$dir/eval_prompts.parquet" "$dir/iter0/eval_responses.parquet" "$dir/iter0/eval_scored.parquet"
  echo "$dir/iter1/prompts.parquet"
  for i in $(seq 1 "$last"); do
    [ "$i" -ge 2 ] && echo "$dir/iter$i/regen.parquet" "$dir/iter$i/kept.parquet"
    for f in responses.parquet new_scored.parquet scored.parquet pairs.parquet policy/config.json \
      policy/model.safetensors metrics.csv timings.csv eval_responses.parquet eval_scored.parquet; do
      echo "$dir/iter$i/$f"
    done
  done
}

check_files() {
  local missing=0 f
  for f in $(expected_files "$1" "$2"); do
    [ -s "$f" ] || { echo "  missing: $f"; missing=1; }
  done
  return $missing
}

# 1. Iterations 1-3.
if pipeline_make iter3 && check_files "$run" 3; then ok "make iter3 wrote every expected file"
else fail "make iter3"; tail -n 30 "$log"; exit 1; fi
stages=$(cut -d, -f1 "$run/iter2/timings.csv" | tr '\n' ' ')
if [ "$stages" = "stage gen score select pairs train " ]; then ok "timings.csv has stage,seconds,rows,tokens for every stage"
else fail "iter2/timings.csv stages: $stages"; fi

# 2. Nothing is redone.
stamp=$runs/.stamp; touch "$stamp"; sleep 1
pipeline_make iter3
changed=$(find "$run" -type f -newer "$stamp" | grep -v '/\.' || true)
if [ -z "$changed" ]; then ok "a second make iter3 rewrote nothing"
else fail "a second make iter3 rewrote: $changed"; fi

# 3. Resume after an interruption during iteration 3's generation.
regen_before=$(stat -c %Y "$run/iter3/regen.parquet" 2>/dev/null || stat -f %m "$run/iter3/regen.parquet")
rm -rf "$run/iter3/responses.parquet" "$run/iter3/new_scored.parquet" "$run/iter3/scored.parquet" \
  "$run/iter3/pairs.parquet" "$run/iter3/policy" "$run/iter3/metrics.csv" "$run/iter3/timings.csv" \
  "$run/iter3/eval_responses.parquet" "$run/iter3/eval_scored.parquet"
touch "$stamp"; sleep 1
pipeline_make iter3
regen_after=$(stat -c %Y "$run/iter3/regen.parquet" 2>/dev/null || stat -f %m "$run/iter3/regen.parquet")
redone=$(find "$run" -type f -newer "$stamp" | grep -v '/\.' | grep -v '/logs/' | sed "s|$run/||" | sort | tr '\n' ' ')
if check_files "$run" 3 && [ "$regen_before" = "$regen_after" ] && ! echo "$redone" | grep -q 'iter[12]/'; then
  ok "resumed iteration 3 at the generation (redone: $redone)"
else fail "resume: regen.parquet $regen_before -> $regen_after; redone: $redone"; fi

# 4. The report.
if pipeline_make report && [ -s "$run/report.md" ] && grep -q '^| 3 |' "$run/report.md" \
  && [ "$(ls "$run"/plots/*.png 2>/dev/null | wc -l)" -eq 4 ]; then ok "make report wrote report.md and 4 plots"
else fail "make report"; fi

# 5. A two-ρ sweep of 2 iterations.
if pipeline_make sweep RHOS="0.5 1.0" ITERS=2 SWEEP_MAX_NEW_TOKENS=6 && check_files "$runs/tiny-rho0.5" 2 \
  && check_files "$runs/tiny-rho1.0" 2 && [ -s "$runs/tiny-sweep.md" ] && [ -s "$runs/tiny-sweep.png" ]; then
  ok "make sweep wrote both runs and tiny-sweep.md"
else fail "make sweep"; tail -n 30 "$log"; fi
if grep -qx 'MAX_NEW_TOKENS=6' "$runs/tiny-rho0.5/run.env" && grep -qx 'MAX_NEW_TOKENS=6' "$runs/tiny-rho1.0/run.env"; then
  ok "the sweep's runs sampled SWEEP_MAX_NEW_TOKENS"
else fail "the sweep's runs did not get SWEEP_MAX_NEW_TOKENS=6"; fi
# The speedup section as make printed it: a measured and a predicted speedup in each row.
if grep -q '^## Iteration speedup: measured and predicted' "$log" \
  && grep -qE '^\| 0\.5 \| .* \| [0-9.]+× \| [0-9.]+× \|$' "$log" && grep -qE '^\| 1 \| .* \| 1\.00× \| 1\.00× \|$' "$log"; then
  ok "make sweep printed the measured and predicted speedups"
else fail "make sweep did not print the measured and predicted speedups"; fi
if [ "$(stat -c %i "$runs/tiny-rho0.5/iter1/pairs.parquet" 2>/dev/null)" = "$(stat -c %i "$runs/tiny-rho1.0/iter1/pairs.parquet" 2>/dev/null)" ] \
  || cmp -s "$runs/tiny-rho0.5/iter1/pairs.parquet" "$runs/tiny-rho1.0/iter1/pairs.parquet"; then ok "the sweep's runs share iteration 1"
else fail "the sweep's iteration 1 differs between runs"; fi
regen_rows=$(sed -n 's/^select,[^,]*,\([0-9]*\),.*/\1/p' "$runs/tiny-rho1.0/iter2/timings.csv")
if [ "$regen_rows" = 8 ]; then ok "rho = 1 regenerates all 8 prompts"
else fail "rho = 1 selected '$regen_rows' prompts, not 8"; fi

# 5b. A sweep over two selections at one ρ, 3 iterations (the history run's iteration 3 reads
#     iteration 1's scored set).
if pipeline_make sweep SWEEP_NAME=sel SWEEP_SELECTS="random history" RHOS=0.5 ITERS=3 \
  && check_files "$runs/sel-random-rho0.5" 3 && check_files "$runs/sel-history-rho0.5" 3 \
  && grep -q '^| 0.5 | `--by max --strategy random` | `sel-random-rho0.5` |' "$runs/sel-sweep.md" \
  && grep -q '^| 0.5 | `--by max --skip-flat 2 --explore 0.1 + history` | `sel-history-rho0.5` |' "$runs/sel-sweep.md"; then
  ok "make sweep SWEEP_SELECTS wrote a row per selection"
else fail "make sweep SWEEP_SELECTS"; tail -n 30 "$log"; fi
if grep -q "opt-select: .* history=1 skipped=" "$log" && ! grep -q "history=2" "$log"; then
  ok "the history selection read iteration 1's scored set in iteration 3"
else fail "no opt-select summary with history=1 in the log"; fi

# 6. Other readers.
parquets=$(find "$runs" -name '*.parquet' -type f | sort)
if "$PYTHON" -c 'import duckdb, pyarrow' 2>/dev/null; then
  # shellcheck disable=SC2086
  if "$PYTHON" scripts/check_parquet_readers.py $parquets >"$runs/readers.log" 2>&1; then
    ok "DuckDB and pyarrow read all $(echo "$parquets" | wc -l) Parquet files"
  else fail "Parquet readers"; grep FAILED "$runs/readers.log"; fi
elif [ "${OPTUNE_REQUIRE_DUCKDB:-0}" = 1 ]; then
  fail "$PYTHON cannot import duckdb and pyarrow (OPTUNE_REQUIRE_DUCKDB=1)"
else
  echo "skipped: DuckDB/pyarrow cross-read ($PYTHON cannot import duckdb and pyarrow; pip install duckdb pyarrow)"
fi

# 7. Sharded stages, in place of the first run (paths recorded in the shards must agree).
mv "$run" "$runs/tiny-unsharded"
: >"$log"
if pipeline_make -j2 iter2 SHARDS=3 DEVICES="cpu cpu"; then
  if scripts/pipeline/compare_runs.sh "$runs/tiny-unsharded" "$run" >"$runs/compare.log" 2>&1 \
    || ! grep -v '^only in one run: iter3/' "$runs/compare.log" | grep -q -v '^compare_runs:'; then
    ok "SHARDS=3 gives the unsharded run's contents ($(grep -c '^only in one run: iter3/' "$runs/compare.log") iteration-3 files not redone)"
  else fail "SHARDS=3 differs from the unsharded run:"; grep -v '^only in one run: iter3/' "$runs/compare.log"; fi
  touch "$stamp"; sleep 1
  pipeline_make -j2 iter2 SHARDS=3 DEVICES="cpu cpu"
  changed=$(find "$run" -type f -newer "$stamp" | grep -v '/\.' || true)
  if [ -z "$changed" ]; then ok "a second make iter2 SHARDS=3 rewrote nothing (no part is redone once merged)"
  else fail "a second make iter2 SHARDS=3 rewrote: $changed"; fi
  leftovers=$(find "$run" -path '*/shards/*' -o -name shards | tr '\n' ' ')
  parts=$(grep -c -- '--shard [123]/3 ' "$log")
  with_device=$(grep -c -- '--shard [123]/3 -o [^ ]* --device cpu ' "$log")
  if [ -z "$leftovers" ] && [ "$parts" -gt 0 ] && [ "$parts" -eq "$with_device" ] \
    && [ "$(cut -d, -f1 "$run/iter2/logs/gen.csv")" = gen ]; then
    ok "$parts shard jobs, each with a device, parts merged and removed"
  else fail "shards: leftovers '$leftovers', $parts shard commands, $with_device with a device"; fi
else fail "make iter2 SHARDS=3"; tail -n 30 "$log"; fi
# Which device each shard gets, from the commands make would run.
devices=$("$MAKE" --no-print-directory -n PIPELINE=pipelines/tiny.mk RUNS="$runs/dry-run" BUILD_TOOLS=0 \
  SHARDS=3 DEVICES="cuda:0 cuda:1" "$runs/dry-run/tiny/iter1/responses.parquet" 2>&1 \
  | sed -n 's/.*--shard \([0-9]\)\/3 .*--device \([^ ]*\).*/\1:\2/p' | tr '\n' ' ')
if [ "$devices" = "1:cuda:0 2:cuda:1 3:cuda:0 " ]; then ok "DEVICES go to the shards in turn ($devices)"
else fail "DEVICES=\"cuda:0 cuda:1\" gave the shards: '$devices'"; fi

# 8. The paper's recipe in miniature. The tiny models hold 256 positions, under the recipe's
#    --max-length 2048 for scoring, which opt-score rightly refuses; copies that claim
#    Mistral-7B's 32768 let the recipe's own lengths through (the prompts are short).
recipe_models=$runs/recipe-models
mkdir -p "$recipe_models"
for model in tiny-mistral tiny-rm-mistral; do
  cp -r "testdata/models/$model" "$recipe_models/"
  sed -i 's/"max_position_embeddings": [0-9]*/"max_position_embeddings": 32768/' \
    "$recipe_models/$model/config.json"
done
recipe_make() {
  make_pipeline pipelines/zephyr-ultrachat.mk RUNS="$runs/recipe" CARGO_FLAGS= \
    DEVICE_ARGS="--device cpu --dtype bf16" MAX_NEW_TOKENS=8 \
    POLICY="$recipe_models/tiny-mistral" RM="$recipe_models/tiny-rm-mistral" \
    PROMPTS_FILE=testdata/shards/ultrachat-prompts.jsonl "$@"
}
recipe=$runs/recipe/zephyr-ultrachat
: >"$log"
recipe_files="$recipe/iter1/pairs.parquet $recipe/iter1/policy/model.safetensors $recipe/iter2/regen.parquet
  $recipe/iter2/kept.parquet $recipe/iter2/scored.parquet $recipe/iter2/policy/model.safetensors"
if recipe_make iter2 && ls $recipe_files >/dev/null 2>&1; then
  # ρ = 0.7 of the 8 prompts regenerated; LoRA on the 7 projections with recomputed activations.
  if grep -q "opt-select: rows_in=16 prompts=8 selected=6 .* rho=0.7 " "$log" \
    && [ "$(grep -c -- '--lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj .*--gradient-checkpointing' "$log")" = 2 ] \
    && [ "$(grep -c '^opt-wdpo: pairs=8 .* replicas=1 ' "$log")" = 2 ]; then
    ok "the zephyr-ultrachat recipe runs iterations 1-2 (rho 0.7: 6 of 8 prompts regenerated, LoRA trained twice)"
  else fail "the zephyr-ultrachat recipe's iterations ran otherwise than its settings say"; tail -n 30 "$log"; fi
else fail "make iter2 PIPELINE=pipelines/zephyr-ultrachat.mk"; tail -n 30 "$log"; fi
rm -rf "$recipe"
: >"$log"
if recipe_make iter1 TRAIN=full TRAIN_DEVICES="cpu cpu" \
  && grep -q -- '--grad-accum 8 --gradient-checkpointing .*--devices cpu,cpu' "$log" \
  && grep -q '^opt-wdpo: pairs=8 .* replicas=2 ' "$log"; then
  ok "TRAIN=full deals the recipe's 16 micro-batches over TRAIN_DEVICES=\"cpu cpu\" (8 each)"
else fail "TRAIN=full TRAIN_DEVICES=\"cpu cpu\""; tail -n 30 "$log"; fi
if ! recipe_make -n iter1 TRAIN=full TRAIN_DEVICES="cpu cpu cpu" \
  && grep -q "name 1, 2, 4, 8 or 16 GPUs, not 3" "$log" \
  && ! recipe_make iter1 POLICY= && grep -q "POLICY is not set" "$log"; then
  ok "the recipe refuses three training devices and a missing POLICY, naming them"
else fail "the recipe's refusals"; tail -n 10 "$log"; fi

# 9. Qwen3 with and without the template's variables.
qwen3_make() {
  pipeline_make POLICY=testdata/models/tiny-qwen3 SCORE_ARGS="--rm testdata/models/tiny-rm-qwen3" \
    SCORE_DEPS=testdata/models/tiny-rm-qwen3/config.json "$@"
}
# Each response's prompt_id, sample and summed log-prob, from iteration 1 of run $1.
qwen3_logps() {
  "$BIN_DIR/opt-cat" "$runs/$1/iter1/responses.parquet" --format jsonl \
    | sed 's/.*"prompt_id":"\([^"]*\)".*"sample":\([0-9]*\).*"logp":\([^,}]*\).*/\1 \2 \3/'
}
: >"$log"
if qwen3_make iter1 RUN_NAME=qwen3-no-thinking CHAT_TEMPLATE_KWARGS='{"enable_thinking": false}' \
  && qwen3_make iter1 RUN_NAME=qwen3; then
  # opt-gen for iteration 1 and the held-out prompts of policies 0 and 1, and opt-wdpo.
  flagged=$(grep -c -- "--chat-template-kwargs '{\"enable_thinking\": false}'" "$log")
  without=$(qwen3_logps qwen3) with=$(qwen3_logps qwen3-no-thinking)
  if [ "$flagged" = 4 ] && [ -n "$with" ] && [ "$(echo "$with" | wc -l)" = 16 ] && [ "$with" != "$without" ]; then
    ok "Qwen3 runs iteration 1; CHAT_TEMPLATE_KWARGS reaches its 4 opt-gen/opt-wdpo runs and changes the prompts"
  else fail "CHAT_TEMPLATE_KWARGS: $flagged runs given it; log-probs with: $(echo "$with" | head -n 2)"; tail -n 20 "$log"; fi
else fail "make iter1 with the Qwen3 models"; tail -n 30 "$log"; fi

[ "$failed" -eq 0 ]
