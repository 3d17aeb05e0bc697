#!/usr/bin/env python3
"""Reference values of TRL's preference losses for crates/optune-train (src/loss.rs).

`cases`: calls TRL's own `DPOTrainer.dpo_loss` (not a re-implementation) as an unbound function
on a `SimpleNamespace` that holds the attributes the method reads (beta, label_smoothing,
reference_free, f_divergence_type, accelerator.device): building a full trainer would need a
model, a tokenizer and a dataset, none of which the loss touches. For each of the loss types
sigmoid, ipo, hinge and robust at beta 0.1 and 0.5 and label smoothing 0.0 and 0.2, records the
inputs, the per-pair losses and the chosen/rejected rewards, in float32 as TRL trains.

`simpo_cases`: TRL's `CPOTrainer.cpo_loss` with loss_type="simpo" (SimPO; cpo_alpha = 0, so no
NLL term, as TRL's CPOConfig sets for SimPO), called the same way, on the per-token mean
log-probs (CPOTrainer passes average_log_prob=True for simpo), at beta 0.1 and 2.0, simpo_gamma
0.5 and 1.4 and label smoothing 0.0 and 0.2.

`nll_cases`: RPO (`DPOConfig(rpo_alpha=...)`) and TRL's "sft" loss type, whose NLL term TRL
computes inside `concatenated_forward` from the logits, so these come from a real
`DPOTrainer.get_batch_loss_metrics` on one batch of 6 text pairs: policy
testdata/models/tiny-llama, reference testdata/models/tiny-mistral (the same tokenizer), beta
0.1. Each case records the per-pair policy and reference log-probs, the number of completion
tokens of each chosen reply (EOS included), TRL's `nll_loss` and the batch loss TRL trains on.

crates/optune-train/tests/loss_reference.rs must match them within 1e-5 (relative above 1).

Inputs: summed log-probs of 8 pairs (values that exercise a zero logit, where policy equals
reference, and |beta * logit| up to ~40). For `ipo` the inputs are per-token mean log-probs,
the summed ones divided by the response lengths, because that is what TRL passes to dpo_loss
with loss_type="ipo" (concatenated_forward divides by loss_mask.sum(-1) for policy and
reference alike).

Needs torch, trl and datasets (trl 0.25.1, transformers 4.57.6, datasets 5.0.1 were used).
Usage:
    python scripts/reference/loss_reference.py [output]   # default testdata/reference/losses.json
"""

import json
import platform
import sys
from pathlib import Path
import tempfile
from types import SimpleNamespace

import datasets
import torch
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import CPOTrainer, DPOConfig, DPOTrainer
from trl.trainer.dpo_config import FDivergenceType

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]
BETAS = [0.1, 0.5]
LABEL_SMOOTHINGS = [0.0, 0.2]
SIMPO_BETAS = [0.1, 2.0]
SIMPO_GAMMAS = [0.5, 1.4]
MODELS = Path(__file__).resolve().parents[2] / "testdata" / "models"
# Text pairs for the NLL cases: replies of different lengths, so the token-level mean differs
# from the mean of per-reply means.
NLL_PAIRS = [
    ("Write one sentence about the sea.", "The sea was calm this morning.", "Sea."),
    ("Name a colour.", "Blue.", "I would rather talk about the weather today, if you do not mind."),
    ("What is two plus two?", "Two plus two is four.", "Five."),
    ("Say hello.", "Hello! How are you today?", "Go away."),
    ("Describe a cat.", "A small furry animal that purrs.", "A dog."),
    ("Give me a tip for sleeping well.", "Keep the room dark and cool, and put the phone away an hour before bed.", "Drink coffee."),
]
NLL_CASES = [
    {"loss_type": "sigmoid", "rpo_alpha": 1.0},
    {"loss_type": "sigmoid", "rpo_alpha": 0.5},
    {"loss_type": "sft", "rpo_alpha": None},
]


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


def trl_simpo_loss(beta, gamma, label_smoothing, logps):
    namespace = SimpleNamespace(
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    return CPOTrainer.cpo_loss(namespace, logps["policy_chosen"], logps["policy_rejected"])


@torch.no_grad()
def trl_nll_case(loss_type, rpo_alpha):
    """One batch of NLL_PAIRS through a real DPOTrainer: per-pair log-probs, chosen lengths,
    TRL's nll_loss and its batch loss."""
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "tiny-llama")
    policy = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-mistral", dtype=torch.float32)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in NLL_PAIRS],
            "chosen": [c for _, c, _ in NLL_PAIRS],
            "rejected": [r for _, _, r in NLL_PAIRS],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            beta=0.1,
            loss_type=loss_type,
            rpo_alpha=rpo_alpha,
            per_device_train_batch_size=len(NLL_PAIRS),
            report_to="none",
            use_cpu=True,
        )
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        rows = [trainer.train_dataset[i] for i in range(len(NLL_PAIRS))]
        chosen_tokens = [len(row["chosen_input_ids"]) for row in rows]
        # TRL's cross entropy ignores label id 0: no chosen reply may contain it.
        assert all(0 not in row["chosen_input_ids"] for row in rows)
        batch = trainer.data_collator(rows)
        policy_output = trainer.concatenated_forward(trainer.model, batch)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(batch)
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    return {
        "loss_type": loss_type,
        "rpo_alpha": rpo_alpha,
        "beta": 0.1,
        "policy_chosen": policy_output["chosen_logps"].tolist(),
        "policy_rejected": policy_output["rejected_logps"].tolist(),
        "ref_chosen": ref_chosen.tolist(),
        "ref_rejected": ref_rejected.tolist(),
        "chosen_tokens": chosen_tokens,
        "nll_loss": policy_output["nll_loss"].item(),
        "loss": loss.item(),
    }


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
    simpo_cases = []
    for beta in SIMPO_BETAS:
        for gamma in SIMPO_GAMMAS:
            for label_smoothing in LABEL_SMOOTHINGS:
                losses, chosen_rewards, rejected_rewards = trl_simpo_loss(beta, gamma, label_smoothing, mean)
                assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
                simpo_cases.append(
                    {
                        "beta": beta,
                        "simpo_gamma": gamma,
                        "label_smoothing": label_smoothing,
                        "logps": "mean",
                        "losses": losses.tolist(),
                        "chosen_rewards": chosen_rewards.tolist(),
                        "rejected_rewards": rejected_rewards.tolist(),
                    }
                )
    nll_cases = [trl_nll_case(**case) for case in NLL_CASES]
    reference = {
        "generator": "scripts/reference/loss_reference.py",
        "function": "trl.DPOTrainer.dpo_loss (called unbound on a SimpleNamespace)",
        "simpo_function": "trl.CPOTrainer.cpo_loss, loss_type simpo (called unbound on a SimpleNamespace)",
        "nll_function": "trl.DPOTrainer.get_batch_loss_metrics on one batch (policy tiny-llama, reference tiny-mistral)",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "dtype": "float32",
        "inputs": {
            "summed": {name: t.tolist() for name, t in summed.items()},
            "mean": {name: t.tolist() for name, t in mean.items()},
            "chosen_lengths": chosen_len.tolist(),
            "rejected_lengths": rejected_len.tolist(),
        },
        "cases": cases,
        "simpo_cases": simpo_cases,
        "nll_cases": nll_cases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {len(cases)} DPO, {len(simpo_cases)} SimPO and {len(nll_cases)} NLL cases to {output}")


if __name__ == "__main__":
    main()
