# A miniature of the pipeline on the repo's test models, for CI (`make pipeline-test`) and for
# trying the Makefile quickly: iterations 1-3 take seconds. The policy is the tiny random
# llama of testdata/, the reward the tiny random sequence-classification model (a reward
# without meaning, but continuous, so every prompt gives a pair); 8 training and 4 held-out
# prompts, 8 new tokens.
#
#   make iter3 PIPELINE=pipelines/tiny.mk

NAME = tiny
POLICY = testdata/models/tiny-llama
SCORE_ARGS = --rm testdata/models/tiny-rm-llama
SCORE_DEPS = testdata/models/tiny-rm-llama/config.json
EXTERNAL_INPUTS = $(POLICY)/config.json $(SCORE_DEPS)
EXTERNAL_HINT = It is part of the repository's test data.

PROMPTS_FILE = pipelines/data/sentiment-prompts.jsonl
PROMPTS = 8
EVAL_PROMPTS = 4
EVAL_N = 1
N = 2
MAX_NEW_TOKENS = 8
GEN_BATCH = 16
RHO = 0.5
TRAIN_ARGS = --beta 0.1 --lora-rank 4 --lora-alpha 8 --lr 1e-3 --batch-size 4 --max-length 64
