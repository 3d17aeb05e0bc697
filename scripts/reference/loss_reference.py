#!/usr/bin/env python3
"""Reference values of TRL's DPO losses for crates/optune-train (src/loss.rs).

Calls TRL's own `DPOTrainer.dpo_loss` (not a re-implementation) as an unbound function on a
`SimpleNamespace` that holds the attributes the method reads (beta, label_smoothing,
reference_free, f_divergence_type, accelerator.device): building a full trainer would need a
model, a tokenizer and a dataset, none of which the loss touches. For each of the loss types
sigmoid, ipo, hinge and robust at beta 0.1 and 0.5 and label smoothing 0.0 and 0.2, records the
inputs, the per-pair losses and the chosen/rejected rewards, in float32 as TRL trains.
crates/optune-train/tests/loss_reference.rs must match them within 1e-5 (relative above 1).

Inputs: summed log-probs of 8 pairs (values that exercise a zero logit, where policy equals
reference, and |beta * logit| up to ~40). For `ipo` the inputs are per-token mean log-probs,
the summed ones divided by the response lengths, because that is what TRL passes to dpo_loss
with loss_type="ipo" (concatenated_forward divides by loss_mask.sum(-1) for policy and
reference alike).

Needs torch and trl (0.25.1 was used, with transformers 4.57.6). Usage:
    python scripts/reference/loss_reference.py [output]   # default testdata/reference/losses.json
"""

import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
import trl
from trl import DPOTrainer
from trl.trainer.dpo_config import FDivergenceType

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]
BETAS = [0.1, 0.5]
LABEL_SMOOTHINGS = [0.0, 0.2]


def summed_inputs():
    """Summed log-probs of 8 pairs, float32, and the response lengths (chosen, rejected)."""
    generator = torch.Generator().manual_seed(0)
    chosen_len = torch.randint(5, 120, (8,), generator=generator)
    rejected_len = torch.randint(5, 120, (8,), generator=generator)
    ref_chosen = -chosen_len * (0.5 + 2.0 * torch.rand(8, generator=generator))
    ref_rejected = -rejected_len * (0.5 + 2.0 * torch.rand(8, generator=generator))
    # Policy = reference plus a drift, so logits cover both signs and a wide range.
    drift_chosen = 20.0 * torch.randn(8, generator=generator)
    drift_rejected = 20.0 * torch.randn(8, generator=generator)
    policy_chosen = ref_chosen + drift_chosen
    policy_rejected = ref_rejected + drift_rejected
    # Pair 0: policy equals reference (logit 0, the first training step).
    policy_chosen[0], policy_rejected[0] = ref_chosen[0], ref_rejected[0]
    # Pair 1: a large positive logit (|beta * logit| = 40 at beta 0.5); pair 2: a large negative one.
    policy_chosen[1] = ref_chosen[1] + 40.0
    policy_rejected[1] = ref_rejected[1] - 40.0
    policy_chosen[2] = ref_chosen[2] - 30.0
    policy_rejected[2] = ref_rejected[2] + 30.0
    logps = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    logps = {name: t.to(torch.float32) for name, t in logps.items()}
    return logps, chosen_len, rejected_len


def trl_dpo_loss(loss_type, beta, label_smoothing, logps):
    namespace = SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=[loss_type],
        reference_free=False,
        f_divergence_type=FDivergenceType.REVERSE_KL,
        f_divergence_params={},
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, rejected_rewards = DPOTrainer.dpo_loss(
        namespace,
        logps["policy_chosen"],
        logps["policy_rejected"],
        logps["ref_chosen"],
        logps["ref_rejected"],
        loss_type,
    )
    return losses, chosen_rewards, rejected_rewards


def main():
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "testdata/reference/losses.json")
    torch.set_num_threads(1)
    summed, chosen_len, rejected_len = summed_inputs()
    mean = {
        name: (t / (chosen_len if "chosen" in name else rejected_len)).to(torch.float32)
        for name, t in summed.items()
    }
    cases = []
    for loss_type in LOSS_TYPES:
        logps = mean if loss_type == "ipo" else summed
        for beta in BETAS:
            for label_smoothing in LABEL_SMOOTHINGS:
                losses, chosen_rewards, rejected_rewards = trl_dpo_loss(loss_type, beta, label_smoothing, logps)
                assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
                cases.append(
                    {
                        "loss_type": loss_type,
                        "beta": beta,
                        "label_smoothing": label_smoothing,
                        "logps": "mean" if loss_type == "ipo" else "summed",
                        "losses": losses.tolist(),
                        "chosen_rewards": chosen_rewards.tolist(),
                        "rejected_rewards": rejected_rewards.tolist(),
                    }
                )
    reference = {
        "generator": "scripts/reference/loss_reference.py",
        "function": "trl.DPOTrainer.dpo_loss (called unbound on a SimpleNamespace)",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": "float32",
        "inputs": {
            "summed": {name: t.tolist() for name, t in summed.items()},
            "mean": {name: t.tolist() for name, t in mean.items()},
            "chosen_lengths": chosen_len.tolist(),
            "rejected_lengths": rejected_len.tolist(),
        },
        "cases": cases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {output}")


if __name__ == "__main__":
    main()
