# optune: build and test. CI runs `make test` through .ci/run.

# The OPTune pipeline (`make iter1`, `make iter2`, …; the section at the end of
# this file, docs/pipeline.md): PIPELINE names the experiment, a makefile of
# variables and download rules under pipelines/.
PIPELINE ?= pipelines/smollm2-sentiment.mk
include $(PIPELINE)
# A pipeline file may define rules (downloads); plain `make` still builds.
.DEFAULT_GOAL := build

# One target dir outside the clone, shared by every checkout and by CI.
CARGO_TARGET_DIR ?= $(HOME)/.cache/optune-target
export CARGO_TARGET_DIR
# The Python the DuckDB/pyarrow cross-read test runs (scripts/check_parquet_readers.py).
OPTUNE_PYTHON ?= python3
export OPTUNE_PYTHON

.PHONY: build test lint

build:
	cargo build --release --workspace

# The cargo tests include the Parquet cross-read, which skips itself when
# $(OPTUNE_PYTHON) lacks duckdb or pyarrow (OPTUNE_REQUIRE_DUCKDB=1 makes that
# a failure); the last line says which happened. The workspace is then tested a second
# time with OPTUNE_KERNELS=generic: candle's generic ops, the op graph CUDA runs, so every
# commit tests it on the CPU (the whole workspace, not the model packages alone: a subset
# of packages resolves other features and rebuilds the dependencies, ~6 min cold).
test:
	cargo test --release --workspace
	OPTUNE_KERNELS=generic cargo test --release --workspace
	@if $(OPTUNE_PYTHON) -c 'import duckdb, pyarrow' 2>/dev/null; \
	then echo 'DuckDB/pyarrow cross-read: ran'; \
	else echo 'DuckDB/pyarrow cross-read: SKIPPED ($(OPTUNE_PYTHON) cannot import duckdb and pyarrow; pip install duckdb pyarrow)'; fi

# Formatting and clippy, warnings as errors (CI runs it before the tests).
lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings

# Generation speed of opt-gen against Hugging Face transformers on the CPU (batches 1, 16 and 32,
# f32 and bf16 on both sides, 128 new tokens, greedy): see scripts/bench/bench_gen.sh for the
# environment variables and docs/perf.md for the figures. BENCH_ARGS="--dtypes f32 --batches 1,16"
# narrows it. Not part of `make test`.
.PHONY: bench-gen
bench-gen:
	scripts/bench/bench_gen.sh $(BENCH_ARGS)

# Reward-scoring speed of opt-score --rm against transformers on the CPU (96 responses, f32 and
# bf16 on both sides): see scripts/bench/bench_score.sh and docs/perf.md. Not part of `make test`.
.PHONY: bench-score
bench-score:
	scripts/bench/bench_score.sh $(BENCH_ARGS)

# ===========================================================================
# The OPTune pipeline (docs/pipeline.md)
#
#   make iter1            iteration 1: generate for every prompt, score, pair, train policy 1
#   make iter2 iter3 …    iteration N ≥ 2: opt-select --rho RHO on iteration N-1's scored set,
#                         regenerate those prompts with policy N-1, score, pair with the kept
#                         rows, train policy N (any N: `make iter7` runs 1–7 as needed)
#   make report           runs/NAME/report.md and its plots
#   make sweep            RHOS="0.3 0.5 0.7 1.0" ITERS=3: one run per ρ, runs/NAME-sweep.md;
#                         SWEEP_SELECTS="max random history": one run per ρ and selection
#   make pipeline-test    the miniature pipeline (pipelines/tiny.mk) end to end, in a temp dir
#   make slurm-test       the miniature pipeline through a single-node Slurm started for it (root)
#
# Every stage writes one file under runs/NAME/iterN/ (its tool writes a temporary file and
# renames it), so an interrupted run resumes at the first missing file and a finished stage
# is never redone. Inputs from outside the run (model, prompts, lexicon) only have to exist:
# their timestamps never make a stage run again. To redo a stage, delete its file and those
# after it, or start a fresh run with RUN_NAME=… . Settings are recorded in runs/NAME/run.env
# when the run starts; a later `make` with other settings warns.
#
# The pipeline file (PIPELINE, included at the top) sets the variables below; the defaults
# here apply to what it leaves unset. Any of them can be given on the command line.

NAME ?= $(basename $(notdir $(PIPELINE)))
RUNS ?= runs
RUN_NAME ?= $(NAME)
RUN_DIR = $(RUNS)/$(RUN_NAME)
# Where the tools are; `tools` builds them there first (BUILD_TOOLS=0: use them as they are).
BIN ?= $(CARGO_TARGET_DIR)/release
BUILD_TOOLS ?= 1
CARGO_FLAGS ?=
TOOL_PACKAGES ?= opt-gen opt-score opt-select opt-pairs opt-wdpo opt-cat opt-report $(EXTRA_TOOL_PACKAGES)
PYTHON ?= python3
# The initial policy (a Hugging Face model directory) and the file make needs of it.
POLICY_DEPS ?= $(POLICY)/config.json
# The prompts: the first PROMPTS rows of PROMPTS_FILE (0: all), and optionally the next
# EVAL_PROMPTS rows as held-out prompts on which every policy is evaluated (EVAL_N samples each).
PROMPTS ?= 0
EVAL_PROMPTS ?= 0
EVAL_N ?= 1
EVAL_SEED ?= 1000
# Sampling (opt-gen); iteration N samples with seed SEED + N.
N ?= 2
TEMPERATURE ?= 1.0
TOP_P ?= 0.9
MAX_NEW_TOKENS ?= 256
GEN_BATCH ?= 16
GEN_ARGS ?=
SEED ?= 0
# Reward (opt-score): e.g. `--lexicon FILE`, `--rm DIR`, `--reward-cmd PROG ARGS…` (last).
SCORE_ARGS ?=
SCORE_DEPS ?=
# Selection (opt-select) and pairs (opt-pairs).
RHO ?= 0.7
SELECT_BY ?= max
SELECT_ARGS ?=
# SELECT_HISTORY=1: iteration N's selection also reads the scored sets of iterations 1..N-2
# (opt-select --history: rank by every round's rewards; with --skip-flat, skip flat prompts).
SELECT_HISTORY ?= 0
PAIRS_ARGS ?=
# Training (opt-wdpo): the reference is the initial policy (REF=initial), the policy being
# trained from (REF=previous) or a model directory.
REF ?= initial
TRAIN_ARGS ?=
# Given to opt-gen, opt-score and opt-wdpo, e.g. `--device cuda --dtype bf16`.
DEVICE_ARGS ?=
# Variables for the policy's chat template, given to opt-gen and opt-wdpo alike (a prompt's tokens
# are its rendering), e.g. CHAT_TEMPLATE_KWARGS='{"enable_thinking": false}' for Qwen3 replies
# without a reasoning block. A reward model's go into SCORE_ARGS (--chat-template-kwargs).
CHAT_TEMPLATE_KWARGS ?=
# Beyond one process (docs/pipeline.md): SHARDS=N runs generation, scoring, the reference
# log-probs and the held-out evaluation as N `--shard K/N` jobs, merged by opt-cat, which checks
# that the parts cover every prompt exactly once; make -j runs them side by side.
# DEVICES="cuda:0 cuda:1" gives shard K the
# K-th device (in turn when there are fewer devices than shards; the unsharded stages get the
# first); leave --device out of DEVICE_ARGS then. LAUNCHER=slurm runs every stage as a Slurm job
# (`srun SLURM_ARGS …`, which make waits for), so `make -j8 iter3 LAUNCHER=slurm SHARDS=8
# SLURM_ARGS="--gres=gpu:1"` runs on a cluster; RUNS must then be on a file system the nodes share.
SHARDS ?= 1
DEVICES ?=
# TRAIN_DEVICES="cuda:0 cuda:1 cuda:2 cuda:3" trains on those devices at once (opt-wdpo --devices:
# data parallel in one process, TRAIN_ARGS' --batch-size and --grad-accum per device, so a step
# takes that many times the pairs); a --device in DEVICE_ARGS must name the first of them.
TRAIN_DEVICES ?=
LAUNCHER ?= local
SLURM_ARGS ?=
# Variables a run cannot do without; files that must come from the user (make says which).
REQUIRED_VARS ?= POLICY PROMPTS_FILE SCORE_ARGS
EXTERNAL_INPUTS ?=
EXTERNAL_HINT ?= Set the variable that names it (see $(PIPELINE)).
MAX_ITER ?= 10
ITERS ?= 3
RHOS ?= 0.3 0.5 0.7 1.0
SWEEP_NAME ?= $(NAME)
# The sweep's response length: a pipeline file may give the sweep longer responses than its
# iterations, so that generation weighs in an iteration as in the paper (docs/pipeline.md);
# MAX_NEW_TOKENS on the command line still sets both.
SWEEP_MAX_NEW_TOKENS ?= $(MAX_NEW_TOKENS)
SWEEP_SHARE_ITER1 ?= 1
# Selections the sweep compares, by name: each runs with SELECT_BY=$(SELECT_BY_name) (default
# SELECT_BY), SELECT_ARGS=$(SELECT_ARGS_name) and SELECT_HISTORY=$(SELECT_HISTORY_name) (default
# 0) into runs/SWEEP_NAME-name-rhoR. Empty: one run per ρ with the selection settings as set,
# into runs/SWEEP_NAME-rhoR. Three are defined here: OPTune's lowest max reward, the random
# baseline, and the max over every iteration's rewards with GRESO-style skipping.
SWEEP_SELECTS ?=
SELECT_BY_max ?= max
SELECT_ARGS_random ?= --strategy random
SELECT_BY_history ?= max
SELECT_ARGS_history ?= --skip-flat 2 --explore 0.1
SELECT_HISTORY_history ?= 1

TIMED = scripts/pipeline/timed.sh
SETTINGS_VARS = PIPELINE NAME POLICY PROMPTS_FILE PROMPTS EVAL_PROMPTS EVAL_N EVAL_SEED N TEMPERATURE \
  TOP_P MAX_NEW_TOKENS GEN_BATCH GEN_ARGS SEED RHO SELECT_BY SELECT_ARGS SELECT_HISTORY PAIRS_ARGS REF SCORE_ARGS \
  TRAIN_ARGS DEVICE_ARGS TRAIN_DEVICES CHAT_TEMPLATE_KWARGS

# Rules exist for iterations 1..max(MAX_ITER, ITERS, any iterN named on the command line).
ITER_LAST := $(shell printf '%s\n' $(MAX_ITER) $(ITERS) $(patsubst iter%,%,$(filter iter%,$(MAKECMDGOALS))) \
  | grep -E '^[0-9]+$$' | sort -n | tail -n 1)
ITER_NUMS := $(shell seq 1 $(ITER_LAST))

iter_dir = $(RUN_DIR)/iter$(1)
template_args = $(if $(strip $(CHAT_TEMPLATE_KWARGS)),--chat-template-kwargs '$(subst ','"'"',$(strip $(CHAT_TEMPLATE_KWARGS)))')
# The policy that iteration N generates with and trains from is policy N-1; policy 0 is POLICY.
policy_of = $(if $(filter 0,$(1)),$(POLICY),$(RUN_DIR)/iter$(1)/policy)
policy_file = $(if $(filter 0,$(1)),,$(RUN_DIR)/iter$(1)/policy/config.json)
ref_of = $(if $(filter initial,$(REF)),$(POLICY),$(if $(filter previous,$(REF)),$(call policy_of,$(1)),$(REF)))
ref_file = $(if $(filter previous,$(REF)),$(call policy_file,$(1)))
# opt-wdpo's reference defaults to the policy it trains from: pass --ref only when it differs,
# and never to a reference-free loss (REF_FREE), which refuses it.
REF_FREE = $(filter simpo sft --loss=simpo --loss=sft,$(TRAIN_ARGS))
ref_arg = $(if $(or $(REF_FREE),$(filter $(call policy_of,$(1)),$(call ref_of,$(1)))),,--ref $(call ref_of,$(1)))
plus = $(shell expr $(1) + $(2))
# The scored sets before iteration N-1's ($(1) = N-1): iterations 1..N-2, with SELECT_HISTORY=1.
select_history = $(if $(filter 1,$(SELECT_HISTORY)),$(foreach k,$(wordlist 1,$(shell expr $(1) - 1),$(ITER_NUMS)),$(call iter_dir,$(k))/scored.parquet))
EVAL_ON = $(filter-out 0,$(EVAL_PROMPTS))

ifeq ($(filter local slurm,$(LAUNCHER)),)
$(error LAUNCHER=$(LAUNCHER): expected local or slurm)
endif
ifeq ($(shell echo '$(SHARDS)' | grep -xE '[1-9][0-9]*'),)
$(error SHARDS=$(SHARDS): expected a whole number >= 1)
endif
SHARD_NUMS := $(shell seq 1 $(SHARDS))
# How a stage's command is started; $(1) names the job.
launch = $(if $(filter slurm,$(LAUNCHER)),srun --quit-on-interrupt --job-name=$(1) $(SLURM_ARGS))
# `--device D` for shard $(1) (1-based) when DEVICES is set.
device_arg = $(if $(DEVICES),--device $(word $(shell expr \( $(1) - 1 \) % $(words $(DEVICES)) + 1),$(DEVICES)))
# Training's devices: all of TRAIN_DEVICES (data parallel), else as shard 1's.
comma := ,
train_device_args = $(if $(strip $(TRAIN_DEVICES)),--devices $(subst $(eval) ,$(comma),$(strip $(TRAIN_DEVICES))),$(call device_arg,1))
# Shard $(2) of stage output $(1): iterN/shards/responses.2-of-4.parquet.
shard_part = $(dir $(1))shards/$(basename $(notdir $(1))).$(2)-of-$(SHARDS).parquet
shard_parts = $(foreach k,$(SHARD_NUMS),$(call shard_part,$(1),$(k)))
# The files a sharded stage's recipe makes: its output, or its parts when SHARDS > 1.
stage_files = $(if $(filter 1,$(SHARDS)),$(1),$(call shard_parts,$(1)))
job_name = $(RUN_NAME)-$(subst /,-,$(patsubst $(RUN_DIR)/%,%,$(1)))

# A stage split by --shard: $(call sharded_stage,OUT,IN,STAGE) for the output OUT of the stage
# named STAGE in logs/, which splits the shard IN. The stage's recipe is written once, for the
# files $(call stage_files,OUT); it takes the output and the slice from SHARD_ARGS, the file of its
# timing line from SHARD_LOG and its launcher from LAUNCH. With SHARDS > 1 the rule here merges
# the parts and sums their timing lines (seconds of all parts, rows, tokens); the parts are
# deleted once merged, and make does not remake a missing part of a finished output (.SECONDARY).
sharded_stage = $(eval $(call $(if $(filter 1,$(SHARDS)),WHOLE_STAGE,SPLIT_STAGE),$(1),$(2),$(3)))

define WHOLE_STAGE
$(1): private SHARD_ARGS = -o $(1) $(call device_arg,1)
$(1): private SHARD_LOG = $(dir $(1))logs/$(3).csv
$(1): private LAUNCH = $(call launch,$(call job_name,$(dir $(1))$(3)))
endef

define SPLIT_STAGE
$(foreach k,$(SHARD_NUMS),$(eval $(call SHARD_PART,$(1),$(3),$(k))))
.SECONDARY: $(call shard_parts,$(1))
$(1): $(call shard_parts,$(1)) | tools
	$(BIN)/opt-cat --slices-of $(2) $$^ -o $$@
	awk -F, -v OFS=, '{ s += $$$$2; r += $$$$3; t += $$$$4; if ($$$$3 == "") nr = 1; if ($$$$4 == "") nt = 1 } \
	  END { print "$(3)", sprintf("%.3f", s), nr ? "" : r, nt ? "" : t }' \
	  $(foreach k,$(SHARD_NUMS),$(dir $(1))logs/$(3).$(k)-of-$(SHARDS).csv) >$(dir $(1))logs/$(3).csv.tmp
	mv $(dir $(1))logs/$(3).csv.tmp $(dir $(1))logs/$(3).csv
	rm -f $$^
	rmdir $(dir $(1))shards 2>/dev/null || true
endef

define SHARD_PART
$(call shard_part,$(1),$(3)): private SHARD_ARGS = --shard $(3)/$(SHARDS) -o $(call shard_part,$(1),$(3)) $(call device_arg,$(3))
$(call shard_part,$(1),$(3)): private SHARD_LOG = $(dir $(1))logs/$(2).$(3)-of-$(SHARDS).csv
$(call shard_part,$(1),$(3)): private LAUNCH = $(call launch,$(call job_name,$(dir $(1))$(2)).$(3)-of-$(SHARDS))
endef

# Whether the reference log-probs are a stage of their own: with the stages split (SHARDS > 1),
# unless the loss needs no reference (SimPO, SFT: opt-wdpo --reference-only refuses them).
REF_STAGE = $(if $(or $(filter 1,$(SHARDS)),$(REF_FREE)),,yes)

# One iteration's rules: $(1) = N, $(2) = N-1.
define ITERATION
$(call sharded_stage,$(call iter_dir,$(1))/responses.parquet,$(if $(filter 1,$(1)),$(call iter_dir,1)/prompts.parquet,$(call iter_dir,$(1))/regen.parquet),gen)
$(call stage_files,$(call iter_dir,$(1))/responses.parquet): $(if $(filter 1,$(1)),$(call iter_dir,1)/prompts.parquet,$(call iter_dir,$(1))/regen.parquet) $(call policy_file,$(2)) | $(POLICY_DEPS) tools settings
	@mkdir -p $$(@D)
	$$(LAUNCH) $(TIMED) gen $$(SHARD_LOG) --rows responses --tokens new_tokens -- \
	  $(BIN)/opt-gen --model $(call policy_of,$(2)) $$< $$(SHARD_ARGS) --n $(N) --temperature $(TEMPERATURE) \
	  --top-p $(TOP_P) --max-new-tokens $(MAX_NEW_TOKENS) --batch-size $(GEN_BATCH) \
	  --seed $(call plus,$(SEED),$(1)) $(GEN_ARGS) $(template_args) $(DEVICE_ARGS)

$(call sharded_stage,$(call iter_dir,$(1))/new_scored.parquet,$(call iter_dir,$(1))/responses.parquet,score)
$(call stage_files,$(call iter_dir,$(1))/new_scored.parquet): $(call iter_dir,$(1))/responses.parquet | $(SCORE_DEPS) tools settings
	@mkdir -p $$(@D)
	$$(LAUNCH) $(TIMED) score $$(SHARD_LOG) --rows rows,responses,scored --tokens tokens,response_tokens -- \
	  $(BIN)/opt-score $$< $$(SHARD_ARGS) $(DEVICE_ARGS) $(SCORE_ARGS)

$(call iter_dir,$(1))/scored.parquet: $(call iter_dir,$(1))/new_scored.parquet $(if $(filter 1,$(1)),,$(call iter_dir,$(1))/kept.parquet) | tools
	$(BIN)/opt-cat $(if $(filter 1,$(1)),,$(call iter_dir,$(1))/kept.parquet) $(call iter_dir,$(1))/new_scored.parquet -o $$@

$(call iter_dir,$(1))/pairs.parquet: $(call iter_dir,$(1))/new_scored.parquet $(if $(filter 1,$(1)),,$(call iter_dir,$(1))/kept.parquet) | tools settings
	$(call launch,$(call job_name,$(call iter_dir,$(1))/pairs)) $(TIMED) pairs $(call iter_dir,$(1))/logs/pairs.csv --rows pairs -- \
	  $(BIN)/opt-pairs $(if $(filter 1,$(1)),,$(call iter_dir,$(1))/kept.parquet) $(call iter_dir,$(1))/new_scored.parquet \
	  -o $$@ $(PAIRS_ARGS)

# With SHARDS > 1 the reference log-probs are a stage of their own (opt-wdpo --reference-only),
# split like the others; training then reads pairs_ref.parquet, which is deleted once the policy
# is written (pairs.parquet plus two columns). With SHARDS=1 opt-wdpo computes them itself, and a
# reference-free loss (REF_STAGE) has none.
ifneq ($(REF_STAGE),)
$(if $(REF_STAGE),$(call sharded_stage,$(call iter_dir,$(1))/pairs_ref.parquet,$(call iter_dir,$(1))/pairs.parquet,ref))
.SECONDARY: $(call iter_dir,$(1))/pairs_ref.parquet
$(call shard_parts,$(call iter_dir,$(1))/pairs_ref.parquet): $(call iter_dir,$(1))/pairs.parquet $(call policy_file,$(2)) $(call ref_file,$(2)) | $(POLICY_DEPS) tools settings
	@mkdir -p $$(@D)
	$$(LAUNCH) $(TIMED) ref $$(SHARD_LOG) --rows pairs -- \
	  $(BIN)/opt-wdpo --policy $(call policy_of,$(2)) $(call ref_arg,$(2)) $$< --reference-only $$(SHARD_ARGS) \
	  --seed $(call plus,$(SEED),$(1)) $(TRAIN_ARGS) $(template_args) $(DEVICE_ARGS)
endif

# A policy directory is complete once config.json is there; anything else in it is left
# over from an interrupted run. An interrupted opt-wdpo keeps its training state in
# policy.state beside it (on SIGTERM/SIGINT, or every --save-steps N steps in TRAIN_ARGS), and
# the next make continues from there.
$(call iter_dir,$(1))/policy/config.json: $(call iter_dir,$(1))/$(if $(REF_STAGE),pairs_ref,pairs).parquet $(call policy_file,$(2)) $(call ref_file,$(2)) | $(POLICY_DEPS) tools settings
	rm -rf $(call iter_dir,$(1))/policy
	$(call launch,$(call job_name,$(call iter_dir,$(1))/train)) $(TIMED) train $(call iter_dir,$(1))/logs/train.csv --rows pairs --tokens tokens -- \
	  $(BIN)/opt-wdpo --policy $(call policy_of,$(2)) $(call ref_arg,$(2)) $$< -o $(call iter_dir,$(1))/policy \
	  --seed $(call plus,$(SEED),$(1)) $(TRAIN_ARGS) $(template_args) $(DEVICE_ARGS) $(train_device_args)
	$(if $(REF_STAGE),rm -f $(call iter_dir,$(1))/pairs_ref.parquet)

$(call iter_dir,$(1))/metrics.csv: $(call iter_dir,$(1))/policy/config.json
	cp $(call iter_dir,$(1))/policy/metrics.csv $$@.tmp && mv $$@.tmp $$@

$(call iter_dir,$(1))/timings.csv: $(call iter_dir,$(1))/metrics.csv $(call iter_dir,$(1))/scored.parquet
	{ echo stage,seconds,rows,tokens; for s in gen score select pairs ref train; do \
	    cat $(call iter_dir,$(1))/logs/$$$$s.csv 2>/dev/null || true; done; } >$$@.tmp && mv $$@.tmp $$@


iter$(1): $(if $(filter 1,$(1)),,iter$(2)) $(call iter_dir,$(1))/timings.csv $(if $(EVAL_ON),$(call iter_dir,$(1))/eval_scored.parquet $(if $(filter 1,$(1)),$(call iter_dir,0)/eval_scored.parquet))
	@echo "$(RUN_NAME): iteration $(1) done ($(call iter_dir,$(1))/timings.csv):"; sed 's/^/  /' $(call iter_dir,$(1))/timings.csv
endef

$(foreach n,$(ITER_NUMS),$(eval $(call ITERATION,$(n),$(word $(n),0 $(ITER_NUMS)))))

# The held-out evaluation of policy $(1) (0: the initial policy) in iter$(1)/.
define EVALUATION
$(call sharded_stage,$(call iter_dir,$(1))/eval_responses.parquet,$(RUN_DIR)/eval_prompts.parquet,eval-gen)
$(call stage_files,$(call iter_dir,$(1))/eval_responses.parquet): $(RUN_DIR)/eval_prompts.parquet $(call policy_file,$(1)) | $(POLICY_DEPS) tools settings
	@mkdir -p $$(@D)
	$$(LAUNCH) $(TIMED) eval-gen $$(SHARD_LOG) --rows responses --tokens new_tokens -- \
	  $(BIN)/opt-gen --model $(call policy_of,$(1)) $$< $$(SHARD_ARGS) --n $(EVAL_N) --temperature $(TEMPERATURE) \
	  --top-p $(TOP_P) --max-new-tokens $(MAX_NEW_TOKENS) --batch-size $(GEN_BATCH) --seed $(EVAL_SEED) \
	  $(GEN_ARGS) $(template_args) $(DEVICE_ARGS)

$(call sharded_stage,$(call iter_dir,$(1))/eval_scored.parquet,$(call iter_dir,$(1))/eval_responses.parquet,eval-score)
$(call stage_files,$(call iter_dir,$(1))/eval_scored.parquet): $(call iter_dir,$(1))/eval_responses.parquet | $(SCORE_DEPS) tools settings
	@mkdir -p $$(@D)
	$$(LAUNCH) $(TIMED) eval-score $$(SHARD_LOG) --rows rows,responses,scored -- \
	  $(BIN)/opt-score $$< $$(SHARD_ARGS) $(DEVICE_ARGS) $(SCORE_ARGS)
endef

$(foreach n,0 $(ITER_NUMS),$(eval $(call EVALUATION,$(n))))

# Selection for iteration N ≥ 2. opt-select writes --rest (kept.parquet) before -o
# (regen.parquet), so regen.parquet's presence means both are complete.
define SELECTION
$(call iter_dir,$(1))/regen.parquet: $(call iter_dir,$(2))/scored.parquet $(call select_history,$(2)) | tools settings
	$(call launch,$(call job_name,$(call iter_dir,$(1))/select)) $(TIMED) select $(call iter_dir,$(1))/logs/select.csv --rows selected -- \
	  $(BIN)/opt-select --rho $(RHO) --by $(SELECT_BY) $(SELECT_ARGS) $$< \
	  $(if $(call select_history,$(2)),--history $(call select_history,$(2))) -o $$@ --rest $(call iter_dir,$(1))/kept.parquet

$(call iter_dir,$(1))/kept.parquet: $(call iter_dir,$(1))/regen.parquet
	@test -f $$@ || { echo "$$@ is missing: delete $$< to redo the selection" >&2; exit 1; }
endef

$(foreach n,$(wordlist 2,$(words $(ITER_NUMS)),$(ITER_NUMS)),$(eval $(call SELECTION,$(n),$(word $(n),0 $(ITER_NUMS)))))

$(RUN_DIR)/iter1/prompts.parquet: | $(PROMPTS_FILE) tools settings
	@mkdir -p $(@D)
	$(BIN)/opt-cat --head $(PROMPTS) $(PROMPTS_FILE) -o $@

$(RUN_DIR)/eval_prompts.parquet: | $(PROMPTS_FILE) tools settings
	@test "$(PROMPTS)" != 0 || { echo "EVAL_PROMPTS needs PROMPTS > 0: the held-out prompts follow the first PROMPTS rows" >&2; exit 1; }
	@mkdir -p $(@D)
	$(BIN)/opt-cat --skip $(PROMPTS) --head $(EVAL_PROMPTS) $(PROMPTS_FILE) -o $@

ifneq ($(strip $(EXTERNAL_INPUTS)),)
$(sort $(EXTERNAL_INPUTS)):
	@echo "error: $@ does not exist. $(EXTERNAL_HINT)" >&2; exit 1
endif

.PHONY: tools report-tool settings report sweep pipeline-test slurm-test $(addprefix iter,$(ITER_NUMS))

tools:
ifeq ($(BUILD_TOOLS),1)
	cargo build --release $(CARGO_FLAGS) $(addprefix -p ,$(TOOL_PACKAGES))
else
	@:
endif

report-tool:
ifeq ($(BUILD_TOOLS),1)
	cargo build --release -p opt-report
else
	@:
endif

# Checks the required variables and records the settings in run.env (or warns when they
# differ from the recorded ones).
settings:
	@$(foreach v,$(REQUIRED_VARS),test -n "$(strip $($(v)))" || { echo "error: $(v) is not set: $(PIPELINE) needs it (make … $(v)=…)" >&2; exit 1; };)
	@mkdir -p $(RUN_DIR)
	@printf '%s\n' $(foreach v,$(SETTINGS_VARS),'$(v)=$(subst ','"'"',$(strip $($(v))))') >$(RUN_DIR)/.run.env.new
	@if [ ! -f $(RUN_DIR)/run.env ]; then mv $(RUN_DIR)/.run.env.new $(RUN_DIR)/run.env; \
	elif cmp -s $(RUN_DIR)/run.env $(RUN_DIR)/.run.env.new; then rm -f $(RUN_DIR)/.run.env.new; \
	else echo "warning: these settings differ from $(RUN_DIR)/run.env, recorded when the run started;" \
	  "finished stages keep the old ones (use RUN_NAME=… for a separate run):" >&2; \
	  diff $(RUN_DIR)/run.env $(RUN_DIR)/.run.env.new | grep '^[<>]' >&2 || true; rm -f $(RUN_DIR)/.run.env.new; fi

report: report-tool
	$(BIN)/opt-report $(RUN_DIR) -o $(RUN_DIR)/report.md

# One run per ρ in RHOS (and per selection in SWEEP_SELECTS), ITERS iterations each, into
# $(RUNS)/$(SWEEP_NAME)[-SELECTION]-rhoR; then the table, and on the terminal its section on the
# measured and predicted speedups (opt-report's heading). Iteration 1 depends on neither ρ nor
# the selection: with SWEEP_SHARE_ITER1=1 the later runs start from hard links to the first
# run's iter1/ (and iter0/) instead of computing it again.
# Each run of the sweep as SELECTION/RHO (SELECTION `_`: SELECT_ARGS as set), and its directory.
sweep_runs = $(foreach sel,$(or $(SWEEP_SELECTS),_),$(foreach r,$(RHOS),$(sel)/$(r)))
sweep_dir = $(RUNS)/$(SWEEP_NAME)$(patsubst %,-%,$(patsubst _,,$(firstword $(subst /, ,$(1)))))-rho$(lastword $(subst /, ,$(1)))
close_paren := )
sweep: MAX_NEW_TOKENS := $(SWEEP_MAX_NEW_TOKENS)
sweep: tools
	@set -e; first=; for spec in $(sweep_runs); do \
	  sel=$${spec%%/*}; r=$${spec#*/}; \
	  if [ "$$sel" = _ ]; then run=$(RUNS)/$(SWEEP_NAME)-rho$$r; else run=$(RUNS)/$(SWEEP_NAME)-$$sel-rho$$r; fi; \
	  case $$sel in \
	    $(foreach sel,$(SWEEP_SELECTS),$(sel)$(close_paren) set -- "SELECT_BY=$(or $(SELECT_BY_$(sel)),$(SELECT_BY))" \
	      "SELECT_ARGS=$(SELECT_ARGS_$(sel))" "SELECT_HISTORY=$(or $(SELECT_HISTORY_$(sel)),0)";;) \
	    *$(close_paren) set --;; \
	  esac; \
	  if [ "$(SWEEP_SHARE_ITER1)" = 1 ] && [ -n "$$first" ]; then \
	    for d in iter0 iter1; do \
	      if [ -d $$first/$$d ] && [ ! -e $$run/$$d ]; then \
	        mkdir -p $$run; rm -rf $$run/.$$d.tmp; \
	        cp -al $$first/$$d $$run/.$$d.tmp 2>/dev/null || cp -a $$first/$$d $$run/.$$d.tmp; \
	        mv $$run/.$$d.tmp $$run/$$d; echo "sweep: $$run/$$d shared with $$first/$$d"; \
	      fi; \
	    done; \
	  fi; \
	  echo "sweep: rho=$$r $$* -> $$run"; \
	  $(MAKE) --no-print-directory iter$(ITERS) RHO=$$r RUN_NAME=$$(basename $$run) BUILD_TOOLS=0 \
	    MAX_NEW_TOKENS=$(MAX_NEW_TOKENS) "$$@"; \
	  $(BIN)/opt-report $$run -o $$run/report.md; \
	  first=$${first:-$$run}; \
	done
	$(BIN)/opt-report --sweep $(foreach spec,$(sweep_runs),$(call sweep_dir,$(spec))) -o $(RUNS)/$(SWEEP_NAME)-sweep.md
	@sed -n '/^## Iteration speedup: measured and predicted/,$$p' $(RUNS)/$(SWEEP_NAME)-sweep.md
	@echo "sweep: $(RUNS)/$(SWEEP_NAME)-sweep.md"

# The miniature pipeline on the testdata models, iterations 1-3 in a temporary RUNS
# directory: every expected file, resumption, the report, a two-ρ sweep, and (when
# $(OPTUNE_PYTHON) has duckdb and pyarrow) both readers on every Parquet file.
pipeline-test: tools
	scripts/pipeline/pipeline_test.sh

# The miniature pipeline with LAUNCHER=slurm SHARDS=2 on a single-node Slurm that it starts in a
# temporary directory (installing Debian's munge and Slurm packages when missing; needs root),
# against a local unsharded run: the same contents in every Parquet file and the same weights,
# at least 4 jobs through Slurm. Stops only the daemons it started.
slurm-test: tools
	scripts/pipeline/slurm_test.sh

# CUDA binaries (opt-gen, opt-wdpo, opt-score with --features cuda) for compute capability 9.0,
# built without a GPU or a system CUDA toolkit: nvcc and the CUDA libraries come from NVIDIA's PyPI
# wheels (cached in ~/.cache/optune-cuda), libcuda from a link-time stub. Stripped copies land in
# target/cuda-dist. `make cuda CUDA_ARGS=check` only compile-checks. See docs/cuda.md.
.PHONY: cuda
cuda:
	scripts/build-cuda.sh $(CUDA_ARGS)

# The device check (scripts/cuda/measure.py, docs/cuda.md) in its dry mode: every stage on the CPU
# with tiny models and the CPU release binaries, to try the script where no GPU is (about a minute
# on 2 cores; its figures mean nothing). The Python: $OPTUNE_BENCH_PYTHON, else the bench scripts'
# virtual environment (scripts/bench/python_env.sh) with peft added. CHECK_ARGS: more measure.py
# options (e.g. --stages logprobs). Not part of `make test`.
.PHONY: cuda-check-dry
cuda-check-dry: tools
	python=$$(bash -c 'source scripts/bench/python_env.sh && bench_python venv "torch, transformers, peft" "transformers>=4.57" safetensors peft') && \
	OPTUNE_MEASURE_OUT=$(RUNS)/cuda-check-dry PYTHON=$$python \
	  scripts/cuda/measure.sh $(BIN) --dry-run --work $(RUNS)/cuda-check-dry/work $(CHECK_ARGS)

# Seconds per DPO step of opt-wdpo against TRL's DPOTrainer on the CPU (8 pairs x ~130 tokens on a
# 12.9M random llama, same threads; SmolLM2-135M too when OPTUNE_SMOLLM2_DIR is set): see
# scripts/bench/bench_train.sh for the environment variables and docs/perf.md for the figures.
# `cargo bench -p optune-train --bench train_step` splits our step into forward, backward and
# optimiser. Not part of `make test`.
.PHONY: bench-train
bench-train:
	scripts/bench/bench_train.sh $(BENCH_ARGS)

# This machine's matrix-product roofs: our f32 (gemm) and bf16 (AVX512-BF16 or AVX2) products against
# torch's on the shapes of a SmolLM2 training and decode step, in one run; needs a Python with
# torch (OPTUNE_BENCH_PYTHON, else python3). Not part of `make test`.
.PHONY: bench-roof
bench-roof:
	$(or $(OPTUNE_BENCH_PYTHON),python3) scripts/bench/roof.py $(BENCH_ARGS)
