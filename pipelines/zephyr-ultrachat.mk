# The OPTune paper's setting (Chen et al. 2024, arXiv 2406.07657, §5), as a recipe for a GPU
# machine: Zephyr-7B-SFT as the policy, a Mistral-7B sequence-classification reward model,
# UltraChat prompts; ρ = 0.7, 2 samples per prompt at temperature 1.0 and top-p 0.9,
# 3 iterations, bf16 on CUDA. It cannot run on a CPU in any useful time; `make pipeline-test`
# runs it in miniature (tiny models, --device cpu, 8 new tokens; everything else as below).
#
# The user downloads the models and the prompts and names them:
#   POLICY        a Hugging Face directory of the SFT policy (e.g. zephyr-7b-sft-full)
#   RM            a Hugging Face *ForSequenceClassification reward model directory
#                 (Mistral-7B based, num_labels 1)
#   PROMPTS_FILE  a prompts shard: Parquet or JSONL with prompt_id and prompt or messages
#                 (e.g. UltraChat's train_prefs prompts, about 48k rows, as published:
#                 prompt, prompt_id and messages, whose final assistant reply is left out)
#
#   make iter3 PIPELINE=pipelines/zephyr-ultrachat.mk POLICY=… RM=… PROMPTS_FILE=…
#
# The tools are built with CUDA (CARGO_FLAGS below; needs nvcc, see the CUDA notes in the
# README). For a quick look at what would run: `make -n iter1 PIPELINE=… POLICY=… RM=… PROMPTS_FILE=…`.

NAME = zephyr-ultrachat
POLICY =
RM =
PROMPTS_FILE =
REQUIRED_VARS = POLICY RM PROMPTS_FILE
SCORE_ARGS = $(if $(RM),--rm $(RM) --max-length 2048 --truncate left)
SCORE_DEPS = $(if $(RM),$(RM)/config.json)
EXTERNAL_INPUTS = $(if $(POLICY),$(POLICY)/config.json) $(SCORE_DEPS) $(PROMPTS_FILE)
EXTERNAL_HINT = Download it and name it with POLICY=, RM= or PROMPTS_FILE= (see pipelines/zephyr-ultrachat.mk).

PROMPTS = 0
EVAL_PROMPTS = 0
N = 2
TEMPERATURE = 1.0
TOP_P = 0.9
MAX_NEW_TOKENS = 512
# On a GPU opt-gen sizes its batch from the free memory (--kv-memory 0.9 by default), its KV
# cache paged: for Mistral-7B on an H200 about 920,000 positions, 600 sequences of 1024 + 512
# tokens, more of shorter prompts and responses (each takes blocks as it grows); GEN_BATCH caps
# them.
GEN_BATCH = 1024
GEN_ARGS = --max-prompt-tokens 1024 --truncate left
RHO = 0.7
ITERS = 3
REF = initial
DEVICE_ARGS = --device cuda --dtype bf16
# Training runs as one process on one GPU, with the wDPO weight exp(β2 · gap) on top of DPO, as
# in OPTune. TRAIN=lora (the default) trains LoRA adapters with the alignment-handbook's one-GPU
# Zephyr DPO settings (its QLoRA recipe without the 4-bit weights: rank 16, α 16, dropout 0.05 on
# every projection, β 0.01, lr 5e-6, cosine, 4 pairs a step, 1024 tokens) with activations
# recomputed: about 25 GB by opt-wdpo's memory plan for Mistral-7B in bf16; without the
# recomputation 63 GB (43 GB of activations), so on an H200 dropping --gradient-checkpointing
# from TRAIN_ARGS_lora saves its extra forward pass (opt-wdpo refuses it where it does not fit,
# and says so before training). TRAIN=full is Zephyr's own recipe (every weight, β 0.01,
# lr 5e-7, 128 pairs a step as 8 a micro-batch × 16; the paper's runs had 8 A100s). In one
# process on one GPU a 7B's f32 master weights, gradients and AdamW moments alone take 121 GB,
# so opt-wdpo refuses it on a single H100/H200 before training starts. With
# TRAIN_DEVICES="cuda:0 … cuda:7" the 16 micro-batches are dealt out 2 to a GPU (as the recipe's
# own 8 × 2 on 8 GPUs; it takes 1, 2, 4, 8 or 16 GPUs, which keep the 128 pairs, and refuses
# other counts) and each weight's f32 master,
# gradient sum and moments live on one of the eight: 62.4 GB a GPU by opt-wdpo's plan, which fits
# GPUs of 80 GB. TRAIN=lora on 8 GPUs runs 8 × 4 pairs a step (see docs/pipeline.md).
TRAIN = lora
TRAIN_ARGS_lora = --lora-rank 16 --lora-alpha 16 --lora-dropout 0.05 \
  --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 5e-6 --schedule cosine --batch-size 4 --grad-accum 1 --gradient-checkpointing
TRAIN_GPUS = $(if $(strip $(TRAIN_DEVICES)),$(words $(TRAIN_DEVICES)),1)
TRAIN_ARGS_full = --lr 5e-7 --batch-size 8 --grad-accum $(shell expr 16 / $(TRAIN_GPUS)) \
  --gradient-checkpointing $(if $(filter-out 0,$(shell expr 16 % $(TRAIN_GPUS))),$(error \
  TRAIN=full deals 16 micro-batches of 8 pairs over TRAIN_DEVICES: name 1, 2, 4, 8 or 16 GPUs, \
  not $(TRAIN_GPUS)))
TRAIN_ARGS = --loss sigmoid --beta 0.01 --weight exp --beta2 1.0 --epochs 1 --max-length 1024 \
  --warmup-ratio 0.1 $(TRAIN_ARGS_$(TRAIN))
CARGO_FLAGS = --features opt-gen/cuda,opt-score/cuda,opt-wdpo/cuda
