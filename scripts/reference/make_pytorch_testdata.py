#!/usr/bin/env python3
"""Write two test models in PyTorch's pickle format, as older Hugging Face checkpoints ship them.

Run by hand (never from CI), after make_testdata.py:

    runs/bench/venv/bin/python scripts/reference/make_pytorch_testdata.py

Writes (relative to the repository root):
    testdata/models/tiny-rm-mistral-pytorch/   tiny-rm-mistral's float32 weights in two shards,
        pytorch_model-0000{1,2}-of-00002.bin, listed by pytorch_model.bin.index.json
    testdata/models/tiny-llama-pytorch-bf16/   tiny-llama's weights cast to bfloat16 in one
        pytorch_model.bin (torch_dtype "bfloat16" in its config.json)

Each beside a copy of its model's other files (config, tokenizer, templates). The tensors are
read from the committed model.safetensors, so their names are the safetensors checkpoint's:
opt-convert's test checks that converting these directories gives those tensors back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "testdata" / "models"


def copy_other_files(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, target / path.name)


def sharded(name: str, shards: int) -> None:
    source, target = MODELS / name, MODELS / f"{name}-pytorch"
    copy_other_files(source, target)
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    weight_map, total = {}, 0
    for index in range(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n].contiguous() for n in names[index::shards]}
        torch.save(part, target / file)
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def single_bf16(name: str) -> None:
    source, target = MODELS / name, MODELS / f"{name}-pytorch-bf16"
    copy_other_files(source, target)
    tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in load_file(source / "model.safetensors").items()}
    torch.save(tensors, target / "pytorch_model.bin")
    config = json.loads((target / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    config.pop("dtype", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    sharded("tiny-rm-mistral", 2)
    single_bf16("tiny-llama")
    print("wrote", MODELS / "tiny-rm-mistral-pytorch", "and", MODELS / "tiny-llama-pytorch-bf16")
