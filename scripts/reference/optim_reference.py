#!/usr/bin/env python3
"""Reference trajectories for the optimisers in crates/optune-train (src/optim.rs).

Runs torch.optim.AdamW and torch.optim.RMSprop for a few steps on small tensors with fixed
gradients, with and without weight decay, Hugging Face learning-rate schedules and
torch.nn.utils.clip_grad_norm_, and records the learning rate, gradient norm and parameters after
every step. crates/optune-train/tests/optim_reference.rs replays the same steps and must match.

Needs torch and transformers. Usage:
    python scripts/reference/optim_reference.py [output]   # default testdata/reference/optim.json
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

STEPS = 5
SHAPES = {"w": (3, 4), "b": (4,)}
SCHEDULES = {
    "constant": get_constant_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
}


def initial_values(shape, generator):
    """Magnitudes in [0.5, 1.5] with random signs: no parameter near zero, so a relative
    tolerance is meaningful."""
    magnitude = 0.5 + torch.rand(shape, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return magnitude * sign


def make_optimizer(algorithm, groups, lr):
    if algorithm["kind"] == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=(algorithm["beta1"], algorithm["beta2"]), eps=algorithm["eps"]
        )
    return torch.optim.RMSprop(
        groups, lr=lr, alpha=algorithm["alpha"], eps=algorithm["eps"], momentum=algorithm["momentum"]
    )


def run_case(name, algorithm, lr, weight_decay, schedule=None, max_grad_norm=None, grad_scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {n: initial_values(shape, generator).requires_grad_() for n, shape in SHAPES.items()}
    record = {
        "name": name,
        "algorithm": algorithm,
        "lr": lr,
        "schedule": schedule,
        "max_grad_norm": max_grad_norm,
        "params": [
            {"name": n, "shape": list(p.shape), "weight_decay": weight_decay[n], "values": p.detach().flatten().tolist()}
            for n, p in params.items()
        ],
        "steps": [],
    }
    groups = [{"params": [p], "weight_decay": weight_decay[n]} for n, p in params.items()]
    optimizer = make_optimizer(algorithm, groups, lr)
    scheduler = None
    if schedule is not None:
        scheduler = SCHEDULES[schedule["decay"]](
            optimizer, schedule["warmup_steps"], **({} if schedule["decay"] == "constant" else {"num_training_steps": schedule["total_steps"]})
        )
    for _ in range(STEPS):
        step_lr = optimizer.param_groups[0]["lr"]
        grads = {n: torch.randn(p.shape, generator=generator) * grad_scale for n, p in params.items()}
        step = {"lr": step_lr, "grads": {n: g.flatten().tolist() for n, g in grads.items()}, "grad_norm": None}
        for n, p in params.items():
            p.grad = grads[n].clone()
        if max_grad_norm is not None:
            step["grad_norm"] = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm).item()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step["params"] = {n: p.detach().flatten().tolist() for n, p in params.items()}
        record["steps"].append(step)
    return record


def main():
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "testdata/reference/optim.json"
    torch.set_num_threads(1)
    adamw_defaults = {"kind": "adamw", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    rmsprop_defaults = {"kind": "rmsprop", "alpha": 0.99, "eps": 1e-8, "momentum": 0.0}
    cases = [
        run_case("adamw_defaults", adamw_defaults, 1e-3, {"w": 0.01, "b": 0.01}, seed=1),
        run_case(
            "adamw_groups_linear_warmup_clipped",
            {"kind": "adamw", "beta1": 0.8, "beta2": 0.95, "eps": 1e-6},
            1e-2,
            {"w": 0.1, "b": 0.0},
            schedule={"decay": "linear", "warmup_steps": 2, "total_steps": 5},
            max_grad_norm=1.0,
            grad_scale=2.0,
            seed=2,
        ),
        run_case(
            "adamw_cosine_unclipped_norm",
            adamw_defaults,
            5e-3,
            {"w": 0.05, "b": 0.05},
            schedule={"decay": "cosine", "warmup_steps": 1, "total_steps": 5},
            max_grad_norm=100.0,
            seed=3,
        ),
        run_case("rmsprop_defaults", rmsprop_defaults, 1e-2, {"w": 0.0, "b": 0.0}, seed=4),
        run_case(
            "rmsprop_momentum_decay_constant_warmup_clipped",
            {"kind": "rmsprop", "alpha": 0.9, "eps": 1e-8, "momentum": 0.9},
            1e-3,
            {"w": 0.01, "b": 0.0},
            schedule={"decay": "constant", "warmup_steps": 2, "total_steps": 5},
            max_grad_norm=0.5,
            grad_scale=1.0,
            seed=5,
        ),
    ]
    document = {
        "generator": "scripts/reference/optim_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cases": cases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {output}")


if __name__ == "__main__":
    main()
