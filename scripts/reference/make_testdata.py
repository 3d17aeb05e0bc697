#!/usr/bin/env python3
"""Generate tiny deterministic test models and Hugging Face reference values.

Run by hand (never from CI):

    /work/.venv-ref/bin/python scripts/reference/make_testdata.py

Writes (relative to the repository root):
    testdata/models/tiny-{llama,mistral,qwen2,qwen3,phi3,smollm3,olmo2,olmo3,exaone4,gemma3,granite}/ causal LMs
    testdata/models/tiny-rm-{llama,mistral,qwen2,qwen3,phi3,smollm3,olmo2,exaone4,gemma3}/    reward models
    testdata/reference/{tiny-*,tiny-rm-*}.json                  log-probs / logits / scores
    testdata/reference/chat_templates.json                      rendered chat templates

Everything is deterministic: fixed seeds, one CPU thread, no network.
Nothing is ever fetched from the Hugging Face Hub.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Exaone4Config,
    Exaone4ForCausalLM,
    Exaone4ForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    GenerationConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo2PreTrainedModel,
    Olmo3Config,
    Olmo3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    SmolLM3ForSequenceClassification,
)
from transformers.modeling_layers import GenericForSequenceClassification  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "testdata" / "models"
REFS = REPO / "testdata" / "reference"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ids 0, 1, 2, 3
PAD_ID = 3

# ---------------------------------------------------------------------------
# Tokenizer corpus (small, varied English: reviews, travel, chat).
# ---------------------------------------------------------------------------
CORPUS = [
    "This blender is loud, but it crushes ice in seconds and the jar is easy to clean.",
    "I returned the headphones after two days because the left ear kept cutting out.",
    "Great value for the price. The battery lasts all week and charging is fast.",
    "The hotel room was small and noisy, yet the staff were friendly and helpful.",
    "Terrible customer service: nobody answered my emails for three weeks.",
    "The book starts slowly, but the last hundred pages are impossible to put down.",
    "We loved the pasta, the wine list was excellent, and dessert was even better.",
    "Shipping took forever and the box arrived crushed. Would not order again.",
    "Five stars! My kids use this tablet every day and it still works perfectly.",
    "The jacket looks nice but the zipper broke after one month of normal use.",
    "Lisbon is built on seven hills, so bring comfortable shoes for the steep streets.",
    "Take the early train from Paris to Lyon; the views of the countryside are lovely.",
    "In Kyoto, visit the temples at sunrise before the tour buses arrive.",
    "The ferry to the island leaves every hour in summer and twice a day in winter.",
    "Our flight was delayed by four hours, so we missed the connection in Madrid.",
    "Hiking the coastal path took all afternoon, and the sunset over the cliffs was worth it.",
    "Remember to carry cash at the small market, since many stalls do not accept cards.",
    "The museum is free on the first Sunday of the month, but the lines are very long.",
    "We rented bikes and rode along the river to the old castle and back.",
    "A night bus is cheaper than a hotel, but you will arrive tired and hungry.",
    "Hi! How are you doing today?",
    "I am fine, thank you. What would you like to talk about?",
    "Can you help me write a short email to my landlord about the broken heater?",
    "Sure. Here is a polite draft you can adapt to your situation.",
    "What is the capital of Australia? Many people guess Sydney, but it is Canberra.",
    "Please summarize the main points of the meeting in three bullet points.",
    "Thanks, that was really helpful. Could you make it a little shorter?",
    "I think the answer is wrong; two plus two is four, not five.",
    "You are a helpful assistant. Answer the question as clearly as you can.",
    "The user asked for a recipe, so the assistant listed the ingredients first.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The sea was calm this morning, and the fishing boats left the harbour early.",
    "She opened the window, listened to the rain, and decided to stay home.",
    "Learning a new language takes patience, practice, and a lot of listening.",
    "The weather will be sunny tomorrow with a light breeze from the west.",
    "He fixed the bug in the parser and added a test so it would not come back.",
    "Good morning! Did you sleep well? Breakfast is ready in the kitchen.",
    "Numbers like 42, 2024 and 3.14 appear in text all the time.",
    "Coffee in the small cafe near the station is strong and cheap.",
    "Do you prefer the mountains or the beach for a quiet holiday?",
]

# ---------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------
# SmolLM2-Instruct's template, verbatim (default system message when the first
# message is not a system message).
CHATML_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain ChatML (Qwen1.5 / OpenHermes style), no default system prompt.
CHATML_PLAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Turns in the manner of Phi-3's template (written for these tests, not Microsoft's text): a
# role tag on its own line, the content, an end tag; EOS after the last turn unless a reply is
# asked for. The shared tokenizer has no <|user|> tokens, so the tags are plain text here.
PHI3_TURNS = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# ChatML in the manner of Qwen3's templates (written for these tests, not Qwen's text): an
# assistant turn keeps only what follows its last '</think>' (Python string methods .split,
# .lstrip and a negative index), and `enable_thinking=false` opens the reply with an empty
# think block.
CHATML_REASONING = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\n') %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)

# Turns in the manner of OLMo 2's (Tulu's) template (written for these tests, not AI2's text): BOS
# first (OLMo 2's BOS is its EOS, <|endoftext|>), a role tag line, the content, EOS after each
# assistant turn.
TULU_TURNS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class Olmo2ForSequenceClassification(GenericForSequenceClassification, Olmo2PreTrainedModel):
    """transformers 4.57 has no sequence-classification class for OLMo 2; this one is built as
    transformers builds its own (LlamaForSequenceClassification is the same two bases): the
    model under `model.`, `score.weight` on top, read at the last non-padding token."""


AutoModelForSequenceClassification.register(Olmo2Config, Olmo2ForSequenceClassification)

# Turns in the manner of EXAONE 4's template (written for these tests, not LG's text): a
# bracketed role tag, the content, an end-of-turn tag (here <|im_end|>, the EOS).
EXAONE_TURNS = (
    "{% for message in messages %}{{ '[|' + message['role'] + '|]' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

# Turns in the manner of Gemma's template (written for these tests, not Google's text): BOS first,
# `<start_of_turn>` and the role (`model` for the assistant) as text, the content, an end-of-turn
# tag (here <|im_end|>, the EOS).
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Llama-2-chat's template, verbatim: uses bos_token, eos_token, .strip() and
# raise_exception; ignores add_generation_prompt (the prompt ends in " [/INST]").
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Extra templates that only exist in chat_templates.json (not attached to a model):
# they exercise transformers' Jinja environment settings (trim_blocks=True,
# lstrip_blocks=True), whitespace control, namespace() and filters.
ZEPHYR_MULTILINE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

INDENTED_NAMESPACE = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] | trim %}
    {%- endif %}
{%- endfor %}
{%- if ns.system %}
    {{- '[SYS] ' + ns.system + '\n' }}
{%- endif %}
{%- for message in messages if message['role'] != 'system' %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message['role'] == 'user' %}
        {{- '### User ' ~ ns.turns ~ ':\n' + message['content'] | trim + '\n' }}
    {%- else %}
        {{- '### Assistant:\n' + message['content'] | trim + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '### Assistant (' ~ (messages | length) ~ ' messages):\n' }}
{%- endif %}
"""

ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 64 (not 32) so that, with head_dim 16 and theta 5e5, the three llama3
    # bands are all hit: wavelength 6.3 (< 16: kept), 32.5 (in [16, 64]:
    # smoothly interpolated), >= 168 (> 64: divided by factor).
    "original_max_position_embeddings": 64,
}

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    hidden_act="silu",
    pad_token_id=PAD_ID,
)

# name -> everything that differs between the three families.
FAMILIES = {
    "llama": dict(
        config_cls=LlamaConfig,
        lm_cls=LlamaForCausalLM,
        rm_cls=LlamaForSequenceClassification,
        config=dict(
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=ROPE_LLAMA3,
            bos_token_id=1,
            eos_token_id=2,
        ),
        tokenizer=dict(bos_token="<|im_start|>", eos_token="<|im_end|>"),
        chat_template=CHATML_SMOLLM2,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
        seed=1001,
    ),
    "mistral": dict(
        config_cls=MistralConfig,
        lm_cls=MistralForCausalLM,
        rm_cls=MistralForSequenceClassification,
        config=dict(
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=8,
            head_dim=16,
            bos_token_id=1,
            eos_token_id=0,
        ),
        tokenizer=dict(bos_token="<|im_start|>", eos_token="<|endoftext|>"),
        chat_template=LLAMA2_CHAT,
        # saved as chat_template.jinja (transformers' newer default layout)
        template_in_tokenizer_config=False,
        generation=dict(bos_token_id=1, eos_token_id=0, pad_token_id=PAD_ID),
        seed=2002,
    ),
    "qwen2": dict(
        config_cls=Qwen2Config,
        lm_cls=Qwen2ForCausalLM,
        rm_cls=Qwen2ForSequenceClassification,
        config=dict(
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=2,
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>"),
        chat_template=CHATML_PLAIN,
        template_in_tokenizer_config=True,
        # Like Qwen2.5-Instruct: config has one eos, generation_config two.
        generation=dict(bos_token_id=None, eos_token_id=[2, 0], pad_token_id=PAD_ID),
        seed=3003,
    ),
    "qwen3": dict(
        config_cls=Qwen3Config,
        lm_cls=Qwen3ForCausalLM,
        rm_cls=Qwen3ForSequenceClassification,
        config=dict(
            # Like Qwen3-0.6B: head_dim set apart from hidden_size / heads (4 x 32 = 128 wide
            # q against a 64-wide stream), tied embeddings, no biases, q/k RMS norms per head.
            head_dim=32,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            attention_bias=False,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=2,
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>"),
        chat_template=CHATML_REASONING,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=None, eos_token_id=[2, 0], pad_token_id=PAD_ID),
        seed=4004,
    ),
    "phi3": dict(
        config_cls=Phi3Config,
        lm_cls=Phi3ForCausalLM,
        rm_cls=Phi3ForSequenceClassification,
        config=dict(
            # Like Phi-3-mini-4k: the projections fused in the checkpoint (self_attn.qkv_proj,
            # mlp.gate_up_proj), a sliding window (8 here, 2047 there), untied embeddings.
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=8,
            original_max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=0,
            pad_token_id=PAD_ID,
        ),
        tokenizer=dict(bos_token="<|im_start|>", eos_token="<|endoftext|>"),
        chat_template=PHI3_TURNS,
        template_in_tokenizer_config=True,
        # Like Phi-3: generation also stops at the end-of-turn tag.
        generation=dict(bos_token_id=1, eos_token_id=[0, 2], pad_token_id=PAD_ID),
        seed=5005,
    ),
    "smollm3": dict(
        config_cls=SmolLM3Config,
        lm_cls=SmolLM3ForCausalLM,
        rm_cls=SmolLM3ForSequenceClassification,
        config=dict(
            # Like SmolLM3-3B: some layers without a rotary embedding ("NoPE"; there every
            # fourth, here the second of two), tied embeddings, no biases.
            no_rope_layers=[1, 0],
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=5000000.0,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=2,
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>"),
        chat_template=CHATML_PLAIN,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=None, eos_token_id=2, pad_token_id=PAD_ID),
        seed=6006,
    ),
    "olmo2": dict(
        config_cls=Olmo2Config,
        lm_cls=Olmo2ForCausalLM,
        rm_cls=Olmo2ForSequenceClassification,
        config=dict(
            # Like OLMo-2-1B: norms after each sublayer (post_attention_layernorm,
            # post_feedforward_layernorm), RMS norms of the whole q and k projections, untied
            # embeddings, BOS = EOS. GQA here (the 32B has it); the reward model is MHA as the
            # 1B/7B/13B are, where the q and k norms are of one width.
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
            attention_bias=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=PAD_ID,
        ),
        rm_config=dict(num_key_value_heads=4),
        tokenizer=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        chat_template=TULU_TURNS,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=0, eos_token_id=0, pad_token_id=PAD_ID),
        seed=7007,
    ),
    "olmo3": dict(
        config_cls=Olmo3Config,
        lm_cls=Olmo3ForCausalLM,
        # No reward model: its layers are tiny-olmo3's, which the feeding tests run.
        rm_cls=None,
        config=dict(
            # Like OLMo-3-7B: OLMo 2's blocks, sliding-window layers (layer_types; three of four
            # there, 4096 positions) turned by the plain rotation and full layers by YaRN with
            # its stated attention factor.
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            rope_scaling=dict(
                rope_type="yarn", factor=2.0, original_max_position_embeddings=128,
                attention_factor=1.2, beta_fast=32.0, beta_slow=1.0,
            ),
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
            attention_bias=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=PAD_ID,
        ),
        tokenizer=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        chat_template=TULU_TURNS,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=0, eos_token_id=0, pad_token_id=PAD_ID),
        seed=8008,
    ),
    "exaone4": dict(
        config_cls=Exaone4Config,
        lm_cls=Exaone4ForCausalLM,
        rm_cls=Exaone4ForSequenceClassification,
        config=dict(
            # Like EXAONE-4.0-32B: OLMo 2's norms after the sublayers with Qwen3's norms of each
            # query and key head; sliding layers (three of four there, "LLLG") with a rotary
            # embedding, full layers without one.
            sliding_window=8,
            sliding_window_pattern=2,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_ID,
        ),
        tokenizer=dict(bos_token="<|im_start|>", eos_token="<|im_end|>"),
        chat_template=EXAONE_TURNS,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
        seed=9009,
    ),
    "gemma3": dict(
        config_cls=Gemma3TextConfig,
        lm_cls=Gemma3ForCausalLM,
        rm_cls=Gemma3TextForSequenceClassification,
        config=dict(
            # Like Gemma-3-1B-it: norms before and after each sublayer, all scaling by 1 + weight;
            # the embedding scaled by sqrt(hidden); a GELU (tanh) gate; norms of each query and
            # key head; head_dim apart from the stream (32 against 64 here) and scores scaled by
            # query_pre_attn_scalar; sliding layers turned by rope_local_base_freq, full layers
            # by rope_theta with rope_scaling (linear, as the 4B to 27B); tied embeddings.
            head_dim=32,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_ID,
        ),
        tokenizer=dict(bos_token="<|im_start|>", eos_token="<|im_end|>"),
        chat_template=GEMMA_TURNS,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
        seed=10010,
    ),
    "granite": dict(
        config_cls=GraniteConfig,
        lm_cls=GraniteForCausalLM,
        # No reward model: transformers has no sequence-classification class for Granite.
        rm_cls=None,
        config=dict(
            # Like Granite-3.3-2B-Instruct: Llama's blocks with four multipliers (the embedding,
            # each sublayer's output before the residual add, the attention scores in place of
            # 1/sqrt(head_dim), and the logits divided), tied embeddings.
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.1,
            logits_scaling=2.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=10000000.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=PAD_ID,
        ),
        tokenizer=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        chat_template=CHATML_PLAIN,
        template_in_tokenizer_config=True,
        generation=dict(bos_token_id=0, eos_token_id=0, pad_token_id=PAD_ID),
        seed=11011,
    ),
}

# ---------------------------------------------------------------------------
# Reference cases
# ---------------------------------------------------------------------------
RAW_PROMPT_NOTE = (
    "A case with a raw-text 'prompt' is wrapped as a single user message "
    "[{'role': 'user', 'content': prompt}] and rendered with the chat template "
    "(add_generation_prompt=True), exactly like a 'messages' case."
)

LM_CASES = [
    {
        "messages": [
            {"role": "system", "content": "You are a concise travel guide."},
            {"role": "user", "content": "What should I see in Lisbon?"},
        ],
        "response": "Walk up to the castle at sunrise, ride the old tram through the steep streets, "
        "and finish with coffee by the river.",
    },
    {
        "messages": [{"role": "user", "content": "Is this blender any good?"}],
        "response": "Yes.",
    },
    {
        "messages": [
            {"role": "user", "content": "Hi! Can you help me write an email?"},
            {"role": "assistant", "content": "Sure. Who is it for?"},
            {"role": "user", "content": "My landlord, about the broken heater."},
        ],
        "response": "Dear landlord, the heater in the kitchen is broken again. Could you send someone this week? Merci, caf\u00e9 \u2615",
    },
    {
        "prompt": "Write one sentence about the sea.",
        "response": "The sea was calm this morning.",
    },
]

RM_CASES = LM_CASES + [
    {
        # a 'rejected' answer to case 0's prompt
        "messages": LM_CASES[0]["messages"],
        "response": "I don't know.",
    },
]

TEMPLATE_CASES = [
    ("single_user", [{"role": "user", "content": "Hello there!"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the capital of Australia?"},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ),
    (
        "system_multi_turn_ends_with_assistant",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ),
    (
        "whitespace_and_unicode",
        [
            {"role": "user", "content": "  padded question with caf\u00e9 \u2615 \n"},
            {"role": "assistant", "content": "\n answer with trailing space  "},
            {"role": "user", "content": "line one\nline two"},
        ],
    ),
    (
        "assistant_with_reasoning",
        [
            {"role": "user", "content": "Is 17 prime?"},
            {"role": "assistant", "content": "<think>\nCheck 2, 3 and 4.\n</think>\n\nYes, 17 is prime."},
            {"role": "user", "content": "And 21?"},
        ],
    ),
    (
        "non_alternating_roles",
        [
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second"},
        ],
    ),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def fl(x) -> float:
    """float32 tensor element -> python float (exact float32 value)."""
    return float(x)


def fl_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().to(torch.float32).reshape(-1).tolist()]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def make_hf_tokenizer(tok: Tokenizer, fam: dict) -> PreTrainedTokenizerFast:
    t = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),
        bos_token=fam["tokenizer"]["bos_token"],
        eos_token=fam["tokenizer"]["eos_token"],
        pad_token="<pad>",
        unk_token=None,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    t.chat_template = fam["chat_template"]
    return t


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Large-ish random init so logits are far from uniform; norms around 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name or "lm_head" in name or name.startswith("score"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def save_model(model, tokenizer, fam, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out, save_jinja_files=not fam["template_in_tokenizer_config"])


def patch_qwen2_config(out: Path) -> None:
    """Make config.json look like a hub Qwen2.5 config saved by older transformers:
    no layer_types, and a sliding_window value that is present but DISABLED by
    use_sliding_window=false. Small values (8, max_window_layers=1) on purpose: a
    loader that applies the window anyway gets different logits (checked below)."""
    p = out / "config.json"
    d = json.loads(p.read_text())
    d.pop("layer_types", None)
    d["sliding_window"] = 8
    d["max_window_layers"] = 1
    d["use_sliding_window"] = False
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def load_model(path: Path, causal: bool):
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    m = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, local_files_only=True)
    m.eval()
    return m


def case_messages(case: dict) -> list[dict]:
    if "messages" in case:
        return case["messages"]
    return [{"role": "user", "content": case["prompt"]}]


# ---------------------------------------------------------------------------
# Independent re-implementation (plain torch) to pin down the semantics that
# the Rust side must reproduce: GQA, RoPE (incl. llama3 scaling), sliding window,
# qkv biases, tied embeddings.
# ---------------------------------------------------------------------------
def ref_inv_freq(cfg) -> torch.Tensor:
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = getattr(cfg, "rope_scaling", None)
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        out = []
        for f in inv.tolist():
            wl = 2 * math.pi / f
            if wl < hi_wl:
                out.append(f)
            elif wl > lo_wl:
                out.append(f / factor)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        inv = torch.tensor(out, dtype=torch.float32)
    return inv


def unfused(sd: dict, cfg) -> dict:
    """Phi-3's qkv_proj (q rows, k rows, v rows) and gate_up_proj (gate rows, up rows) as the
    separate Llama weights."""
    sd = dict(sd)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    for name in [n for n in sd if n.endswith("self_attn.qkv_proj.weight")]:
        p = name[: -len("qkv_proj.weight")]
        q, k, v = sd.pop(name).split([H * hd, KV * hd, KV * hd])
        sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"] = q, k, v
    for name in [n for n in sd if n.endswith("mlp.gate_up_proj.weight")]:
        p = name[: -len("gate_up_proj.weight")]
        sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"] = sd.pop(name).chunk(2)
    return sd


def ref_hidden(sd: dict, cfg, ids: list[int], skip_qk_norm: bool = False) -> torch.Tensor:
    T = len(ids)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // H
    eps = cfg.rms_norm_eps
    gemma = cfg.model_type == "gemma3_text"

    def rms(x, w):  # Gemma's norms scale by 1 + weight
        return ((1.0 + w) if gemma else w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        if name + ".bias" in sd:
            y = y + sd[name + ".bias"]
        return y

    def tables(inv, scale=1.0):
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
        return torch.cat([ang.cos(), ang.cos()], -1) * scale, torch.cat([ang.sin(), ang.sin()], -1) * scale

    rs = getattr(cfg, "rope_scaling", None) or {}
    if rs.get("rope_type", rs.get("type")) in (None, "default", "llama3"):
        scaled = tables(ref_inv_freq(cfg))
    else:  # YaRN and the others: transformers' own frequencies (rope_scaling.json checks them)
        inv, factor = ROPE_INIT_FUNCTIONS[rs.get("rope_type", rs.get("type"))](cfg, None)
        scaled = tables(inv.float(), factor)
    local_theta = getattr(cfg, "rope_local_base_freq", None) or cfg.rope_theta
    plain = tables(1.0 / (local_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)))

    def rope(x, cos_sin):  # x: [heads, T, hd]  (rotate_half convention)
        cos, sin = cos_sin
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    # Per layer: its window (None: full attention) and its rotary tables (None: no rotation), as
    # transformers reads the config: every layer of Mistral and Phi-3 windowed; Qwen2's under
    # use_sliding_window; OLMo 3's sliding layers (layer_types) windowed and turned by the plain
    # rotation; EXAONE 4's sliding layers windowed, its full ones not turned; SmolLM3's NoPE
    # layers not turned.
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    windows, turns = [], []
    for layer in range(cfg.num_hidden_layers):
        sliding = types[layer] == "sliding_attention"
        if cfg.model_type in ("mistral", "phi3"):
            windows.append(cfg.sliding_window)
        elif cfg.model_type in ("olmo3", "exaone4", "gemma3_text") or getattr(cfg, "use_sliding_window", False):
            windows.append(cfg.sliding_window if sliding else None)
        else:
            windows.append(None)
        if getattr(cfg, "no_rope_layers", None) is not None and not cfg.no_rope_layers[layer]:
            turns.append(None)
        elif cfg.model_type == "exaone4" and cfg.sliding_window is not None and not sliding:
            turns.append(None)
        else:
            turns.append(plain if cfg.model_type in ("olmo3", "gemma3_text") and sliding else scaled)
    sd = unfused(sd, cfg)
    q_idx = torch.arange(T)[:, None]
    k_idx = torch.arange(T)[None, :]

    def allowed(window):
        causal = k_idx <= q_idx
        return causal if window is None else causal & (k_idx > q_idx - window)  # window tokens, self included

    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    if gemma:
        x = x * torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32)
    granite = cfg.model_type == "granite"
    if granite:
        x = x * cfg.embedding_multiplier
    residual = cfg.residual_multiplier if granite else 1.0
    scale = cfg.query_pre_attn_scalar**-0.5 if gemma else cfg.attention_multiplier if granite else 1.0 / math.sqrt(hd)
    act = (lambda g: F.gelu(g, approximate="tanh")) if gemma else F.silu
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        # Each sublayer's norms: before it (Llama), after it (OLMo 2), or both (Gemma 3).
        after = p + "post_feedforward_layernorm.weight" in sd
        attn_before = sd.get(p + "input_layernorm.weight")
        attn_after = sd[p + "post_attention_layernorm.weight"] if after else None
        mlp_before = sd.get(p + "pre_feedforward_layernorm.weight", None if after else sd.get(p + "post_attention_layernorm.weight"))
        mlp_after = sd[p + "post_feedforward_layernorm.weight"] if after else None
        h = x if attn_before is None else rms(x, attn_before)
        q = lin(h, p + "self_attn.q_proj")
        k = lin(h, p + "self_attn.k_proj")
        qk_norm = p + "self_attn.q_norm.weight" in sd and not skip_qk_norm
        per_head = qk_norm and sd[p + "self_attn.q_norm.weight"].numel() == hd
        if qk_norm and not per_head:  # OLMo 2: the whole projection, before rope
            q = rms(q, sd[p + "self_attn.q_norm.weight"])
            k = rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = q.view(T, H, hd), k.view(T, KV, hd)
        if per_head:  # Qwen3: each head, before rope
            q = rms(q, sd[p + "self_attn.q_norm.weight"])
            k = rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        v = lin(h, p + "self_attn.v_proj").view(T, KV, hd).transpose(0, 1)
        if turns[layer] is not None:
            q, k = rope(q, turns[layer]), rope(k, turns[layer])
        k = k.repeat_interleave(H // KV, 0)
        v = v.repeat_interleave(H // KV, 0)
        att = (q @ k.transpose(-1, -2)) * scale
        att = att.masked_fill(~allowed(windows[layer]), float("-inf")).softmax(-1)
        o = (att @ v).transpose(0, 1).reshape(T, H * hd)
        o = lin(o, p + "self_attn.o_proj")
        x = x + (o if attn_after is None else rms(o, attn_after)) * residual
        h = x if mlp_before is None else rms(x, mlp_before)
        m = lin(act(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = x + (m if mlp_after is None else rms(m, mlp_after)) * residual
    return rms(x, sd["model.norm.weight"])


def ref_logits(sd, cfg, ids, skip_qk_norm=False):
    h = ref_hidden(sd, cfg, ids, skip_qk_norm)
    w = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return (h @ w.T) / (cfg.logits_scaling if cfg.model_type == "granite" else 1.0)


# ---------------------------------------------------------------------------
# Reference computations
# ---------------------------------------------------------------------------
def right_pad(seqs: list[list[int]]):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def lm_reference(name: str, path: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = load_model(path, causal=True)
    cfg = model.config
    eos = tok.eos_token_id
    cases = []
    seqs = []
    for c in LM_CASES:
        msgs = case_messages(c)
        prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
        response_ids = tok(c["response"], add_special_tokens=False).input_ids + [eos]
        entry = {k: c[k] for k in ("messages", "prompt") if k in c}
        entry.update(
            response=c["response"],
            prompt_text=prompt_text,
            prompt_ids=prompt_ids,
            response_ids=response_ids,
        )
        cases.append(entry)
        seqs.append(prompt_ids + response_ids)
    assert any(len(c["response_ids"]) > 8 for c in cases)
    assert all(len(s) > 20 for s in seqs), [len(s) for s in seqs]
    assert len({len(s) for s in seqs}) == len(seqs), "want unequal lengths so padding is exercised"

    ids, mask = right_pad(seqs)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits.log_softmax(-1)

    def per_case(lp: torch.Tensor, c: dict) -> torch.Tensor:
        P, R = len(c["prompt_ids"]), len(c["response_ids"])
        pos = torch.arange(P - 1, P + R - 1)
        return lp[pos, torch.tensor(c["response_ids"])]

    sd = {k: v.float() for k, v in model.state_dict().items()}
    for i, c in enumerate(cases):
        tl = per_case(logp[i], c)
        c["token_logps"] = fl_list(tl)
        c["sum_logp"] = fl(tl.sum())
        c["mean_logp"] = fl(tl.mean())
        c["num_tokens"] = len(seqs[i])
        # alone (no padding) must match the padded batch
        alone_logits = model(input_ids=torch.tensor([seqs[i]])).logits.float()[0]
        alone = per_case(alone_logits.log_softmax(-1), c)
        assert torch.allclose(alone, tl, atol=1e-5, rtol=0), (name, i, (alone - tl).abs().max())
        # independent plain-torch implementation must agree
        mine = ref_logits(sd, cfg, seqs[i])
        err = (mine - logits[i, : len(seqs[i])]).abs().max().item()
        assert err < 1e-4, (name, i, err)

    c0 = cases[0]
    P, R = len(c0["prompt_ids"]), len(c0["response_ids"])
    logits_sample = {
        "case": 0,
        "last_prompt_position": P - 1,
        "last_prompt_position_logits": fl_list(logits[0, P - 1]),
        "last_response_position": P + R - 1,
        "last_response_position_logits": fl_list(logits[0, P + R - 1]),
    }
    # Spread check: logits must not be near-uniform.
    lg = logits[0, : P + R]
    assert lg.std(-1).min().item() > 0.5, lg.std(-1).min().item()

    extra = {}
    if cfg.model_type in ("mistral", "phi3"):
        # Show that the sliding window matters for these sequences.
        cfg_full = type(cfg).from_dict(cfg.to_dict())
        cfg_full.sliding_window = None
        s = seqs[0]
        with_w = ref_logits(sd, cfg, s)
        without_w = ref_logits(sd, cfg_full, s)
        d = (with_w - without_w).abs().max(-1).values
        assert d[: cfg.sliding_window].max().item() == 0.0
        assert d[cfg.sliding_window :].min().item() > 1e-3
        extra["sliding_window_note"] = (
            "transformers eager attention lets query position q attend to key positions k with "
            f"q - {cfg.sliding_window} < k <= q ({cfg.sliding_window} tokens including itself). Logits of "
            f"positions 0..{cfg.sliding_window - 1} are identical with or without the window; from position "
            f"{cfg.sliding_window} on they differ (max abs diff at the last position of case 0: {fl(d[-1]):.4f})."
        )
    if cfg.model_type == "qwen2":
        assert cfg.use_sliding_window is False and cfg.sliding_window is None
        assert all(t == "full_attention" for t in cfg.layer_types)
        cfg_win = type(cfg).from_dict(cfg.to_dict())
        cfg_win.use_sliding_window, cfg_win.sliding_window = True, 8
        cfg_win.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
        d = (ref_logits(sd, cfg_win, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["sliding_window_note"] = (
            "config.json has sliding_window=8 and max_window_layers=1 but use_sliding_window=false: "
            "transformers ignores the window (it sets sliding_window=None and all layers to full "
            f"attention). Applying an 8-token window anyway would change case 0's logits by up to {d:.4f}."
        )
    if cfg.model_type == "smollm3":
        cfg_all = type(cfg).from_dict(cfg.to_dict())
        cfg_all.no_rope_layers = [1] * cfg.num_hidden_layers
        d = (ref_logits(sd, cfg_all, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["no_rope_note"] = (
            f"no_rope_layers {cfg.no_rope_layers}: layer 1 attends without a rotary embedding; "
            f"rotating it too would change case 0's logits by up to {d:.4f}."
        )
    if cfg.model_type == "qwen3":
        assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
        d = (ref_logits(sd, cfg, seqs[0], skip_qk_norm=True) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["qk_norm_note"] = (
            "q and k pass through RMS norms over each head's 32 values (self_attn.q_norm / k_norm) "
            f"before the rotary embedding; leaving them out would change case 0's logits by up to {d:.4f}."
        )
    if cfg.model_type == "olmo3":
        # Both the window of the sliding layer and its plain rotation matter.
        as_full = type(cfg).from_dict({**cfg.to_dict(), "layer_types": ["full_attention"] * cfg.num_hidden_layers})
        d_window = (ref_logits(sd, as_full, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        unwindowed = type(cfg).from_dict({**cfg.to_dict(), "sliding_window": 10**6})
        d_rotation = (ref_logits(sd, unwindowed, seqs[0]) - ref_logits(sd, as_full, seqs[0])).abs().max().item()
        assert d_window > 1e-3 and d_rotation > 1e-3, (d_window, d_rotation)
        extra["layer_types_note"] = (
            f"layer_types {cfg.layer_types}, sliding_window {cfg.sliding_window}: layer 0 attends to the last "
            f"{cfg.sliding_window} positions and turns by the plain rotation of rope_theta, layer 1 attends to "
            f"all and turns by YaRN. Reading both layers as full ones would change case 0's logits by up to "
            f"{d_window:.4f}; of that, the sliding layer's rotation alone (no window) accounts for up to {d_rotation:.4f}."
        )
    if cfg.model_type == "granite":
        plain = type(cfg).from_dict({**cfg.to_dict(), "residual_multiplier": 1.0})
        d = (ref_logits(sd, plain, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["multipliers_note"] = (
            f"embedding_multiplier {cfg.embedding_multiplier}, residual_multiplier {cfg.residual_multiplier}, "
            f"attention_multiplier {cfg.attention_multiplier} (the scores' scale), logits_scaling "
            f"{cfg.logits_scaling} (the logits divided); leaving out the residual multiplier alone would change "
            f"case 0's logits by up to {d:.4f}."
        )
    if cfg.model_type == "gemma3_text":
        # A loader that scaled by the stored weight (not 1 + weight) would read every norm as
        # this model with each norm weight one less.
        plain = {k: (v - 1.0 if k.endswith("norm.weight") else v) for k, v in sd.items()}
        d = (ref_logits(plain, cfg, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["norm_offset_note"] = (
            "Every RMS norm (before and after each sublayer, of each query and key head, the final "
            "one) scales by 1 + weight; scaling by the stored weight instead would change case 0's "
            f"logits by up to {d:.4f}."
        )
    if cfg.model_type == "exaone4":
        as_full = type(cfg).from_dict({**cfg.to_dict(), "sliding_window": None,
                                       "layer_types": ["full_attention"] * cfg.num_hidden_layers})
        d = (ref_logits(sd, as_full, seqs[0]) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["layer_types_note"] = (
            f"layer_types {cfg.layer_types}, sliding_window {cfg.sliding_window}: layer 0 attends to the last "
            f"{cfg.sliding_window} positions with a rotary embedding, layer 1 to all without one. Reading both "
            f"as full layers with a rotary embedding would change case 0's logits by up to {d:.4f}."
        )
    if cfg.model_type == "olmo2":
        d = (ref_logits(sd, cfg, seqs[0], skip_qk_norm=True) - logits[0, : len(seqs[0])]).abs().max().item()
        assert d > 1e-3, d
        extra["qk_norm_note"] = (
            "q and k pass through RMS norms over each token's whole projection "
            f"({sd['model.layers.0.self_attn.q_norm.weight'].numel()} and "
            f"{sd['model.layers.0.self_attn.k_norm.weight'].numel()} values: "
            "self_attn.q_norm / k_norm) before the rotary embedding; leaving them out would change "
            f"case 0's logits by up to {d:.4f}. The blocks normalise each sublayer's output "
            "(post_attention_layernorm, post_feedforward_layernorm) before the residual add."
        )
    if getattr(cfg, "rope_scaling", None) and cfg.rope_scaling.get("rope_type") == "llama3":
        inv_default = 1.0 / (cfg.rope_theta ** (torch.arange(0, 16, 2).float() / 16))
        extra["rope_inv_freq_default"] = fl_list(inv_default)
        extra["rope_inv_freq_scaled"] = fl_list(ref_inv_freq(cfg))
        hf_inv = model.model.rotary_emb.inv_freq.float()
        assert torch.allclose(hf_inv, ref_inv_freq(cfg), rtol=1e-6, atol=0), (hf_inv, ref_inv_freq(cfg))

    return {
        "model": f"testdata/models/{name}",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "note": RAW_PROMPT_NOTE
        + " prompt_ids = tokenizer(prompt_text, add_special_tokens=False); response_ids = "
        "tokenizer(response, add_special_tokens=False) + [tokenizer.eos_token_id] (TRL DPO rule). "
        "token_logps[j] = log_softmax(logits[len(prompt_ids) - 1 + j])[response_ids[j]], computed on one "
        "right-padded batch (pad id 3, attention_mask) of all cases; each case alone agrees within 1e-5.",
        "eos_token_id": eos,
        "pad_token_id": PAD_ID,
        **extra,
        "cases": cases,
        "logits_sample": logits_sample,
    }


@torch.no_grad()
def rm_reference(name: str, path: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = load_model(path, causal=False)
    cases = []
    seqs = []
    for c in RM_CASES:
        msgs = case_messages(c) + [{"role": "assistant", "content": c["response"]}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        input_ids = tok(text, add_special_tokens=False).input_ids
        assert PAD_ID not in input_ids
        entry = {k: c[k] for k in ("messages", "prompt") if k in c}
        entry.update(response=c["response"], text=text, input_ids=input_ids)
        cases.append(entry)
        seqs.append(input_ids)
    ids, mask = right_pad(seqs)
    scores = model(input_ids=ids, attention_mask=mask).logits.float()
    assert scores.shape == (len(seqs), 1)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for i, c in enumerate(cases):
        c["score"] = fl(scores[i, 0])
        alone = model(input_ids=torch.tensor([seqs[i]])).logits.float()[0, 0]
        assert abs(alone.item() - c["score"]) < 1e-5, (name, i, alone.item(), c["score"])
        h = ref_hidden(sd, model.config, seqs[i])
        mine = (h[-1] @ sd["score.weight"].T)[0]
        assert abs(mine.item() - c["score"]) < 1e-4, (name, i, mine.item(), c["score"])
    return {
        "model": f"testdata/models/{name}",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "note": RAW_PROMPT_NOTE.replace("(add_generation_prompt=True)", "")
        + " text = apply_chat_template(messages + [assistant response], tokenize=False); "
        "input_ids = tokenizer(text, add_special_tokens=False); score = the *ForSequenceClassification "
        "logit (num_labels=1) at the last non-pad token, computed on one right-padded batch (pad id 3); "
        "each case alone agrees within 1e-5.",
        "pad_token_id": PAD_ID,
        "cases": cases,
    }


def template_reference() -> dict:
    out = {
        "transformers_version": transformers.__version__,
        "note": "Rendered with tokenizer.apply_chat_template(messages, tokenize=False, "
        "add_generation_prompt=...). 'error' holds the raise_exception message where rendering fails.",
        "models": {},
    }
    for fam_name in FAMILIES:
        path = MODELS / f"tiny-{fam_name}"
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        entries = []
        for case_name, msgs in TEMPLATE_CASES:
            for agp in (False, True):
                e = {"name": case_name, "messages": msgs, "add_generation_prompt": agp}
                try:
                    e["rendered"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
                except Exception as exc:  # jinja2 TemplateError from raise_exception
                    e["error"] = str(exc)
                entries.append(e)
        out["models"][f"tiny-{fam_name}"] = {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "chat_template": tok.chat_template,
            "cases": entries,
        }
    # Variables beside the messages, as apply_chat_template(**kwargs) passes them.
    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen3", local_files_only=True)
    entries = []
    for variables in ({"enable_thinking": False}, {"enable_thinking": True}):
        for case_name, msgs in TEMPLATE_CASES:
            for agp in (False, True):
                rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **variables)
                entries.append(
                    {"name": case_name, "messages": msgs, "add_generation_prompt": agp, "variables": variables,
                     "rendered": rendered}
                )
    assert any("<think>" in e["rendered"] for e in entries)
    out["template_variables"] = {"tiny-qwen3": entries}
    out["extra_templates"] = {}
    base = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2", local_files_only=True)
    for tname, tmpl in (("zephyr_multiline", ZEPHYR_MULTILINE), ("indented_namespace", INDENTED_NAMESPACE)):
        entries = []
        for case_name, msgs in TEMPLATE_CASES:
            for agp in (False, True):
                e = {"name": case_name, "messages": msgs, "add_generation_prompt": agp}
                e["rendered"] = base.apply_chat_template(
                    msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=agp,
                    bos_token="<|im_start|>", eos_token="<|endoftext|>",
                )
                entries.append(e)
        out["extra_templates"][tname] = {
            "bos_token": "<|im_start|>",
            "eos_token": "<|endoftext|>",
            "chat_template": tmpl,
            "cases": entries,
        }
    return out


def main() -> None:
    base_tok = build_tokenizer()
    for fam_name, fam in FAMILIES.items():
        cfg_kwargs = {**COMMON, **fam["config"]}
        hf_tok = make_hf_tokenizer(base_tok, fam)

        # causal LM
        cfg = fam["config_cls"](**cfg_kwargs)
        if fam_name == "qwen2":
            cfg.attention_dropout = 0.0
        torch.manual_seed(fam["seed"])
        lm = fam["lm_cls"](cfg).eval()
        init_weights(lm, fam["seed"])
        lm.generation_config = GenerationConfig(**fam["generation"])
        save_model(lm, hf_tok, fam, MODELS / f"tiny-{fam_name}")
        if fam_name == "qwen2":
            patch_qwen2_config(MODELS / f"tiny-{fam_name}")

        # reward model
        if fam["rm_cls"] is None:
            continue
        rm_cfg = fam["config_cls"](
            **{**cfg_kwargs, "tie_word_embeddings": False, **fam.get("rm_config", {})}, num_labels=1
        )
        torch.manual_seed(fam["seed"] + 7)
        rm = fam["rm_cls"](rm_cfg).eval()
        init_weights(rm, fam["seed"] + 7)
        save_model(rm, hf_tok, fam, MODELS / f"tiny-rm-{fam_name}")
        if fam_name == "qwen2":
            patch_qwen2_config(MODELS / f"tiny-rm-{fam_name}")

    for fam_name in FAMILIES:
        write_json(REFS / f"tiny-{fam_name}.json", lm_reference(f"tiny-{fam_name}", MODELS / f"tiny-{fam_name}"))
        if FAMILIES[fam_name]["rm_cls"] is not None:
            write_json(REFS / f"tiny-rm-{fam_name}.json", rm_reference(f"tiny-rm-{fam_name}", MODELS / f"tiny-rm-{fam_name}"))
    write_json(REFS / "chat_templates.json", template_reference())

    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    print(f"testdata/models: {total} bytes")
    assert total < 12 * 1024 * 1024
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
