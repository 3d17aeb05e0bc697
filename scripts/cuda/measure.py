#!/usr/bin/env python3
"""The device check: optune's CUDA binaries against PyTorch/transformers on one GPU, one table.

Run through scripts/cuda/measure.sh on a machine with an NVIDIA GPU (H100/H200), the CUDA
binaries of scripts/build-cuda.sh (opt-gen, opt-wdpo, opt-score built with `--features cuda`) and
a Python with torch (CUDA) and transformers; peft is used when importable. Nothing is downloaded:
the correctness rows use the repo's testdata models, the speed rows random llamas made there with
transformers (weights do not change the speed of a training step or of greedy decoding with EOS
ignored), all sharing tiny-llama's tokenizer so both sides see the same token ids.

Stages (--stages, comma-separated, run in the order given; default all seven, in this order: the
rows the issues' acceptance names first, then the 1.1B generation and scoring rows, cheapest to
rerun, and the sanitizer rows, which run when the others leave time within --budget-s):

  logprobs  Correctness on testdata/models (tiny llama/mistral/qwen2 policies, tiny reward models),
            CUDA against the CPU: teacher-forced response log-probs from `opt-wdpo --precompute-ref`
            (f32 within 1e-4 relative, bf16 within 1e-2), reward scores from `opt-score --rm` (f32
            1e-4, packed in one pass and each conversation alone in pieces; bf16 reported), `opt-gen` greedy (identical responses, KV-cache `logp`), `opt-gen`
            sampled at T 1.0 / top-p 0.9 with --n 2 and chunked prefill against the CPU's generic
            path (the same device sampler and uniforms: identical responses, `logp`) and
            three opt-wdpo training steps (losses after one and two updates: f32 1e-3, bf16 1e-1, see logprobs_training),
            three LoRA steps with dropout and --gradient-checkpointing (the trained change, f32, 1e-2),
            and `opt-wdpo --devices` with two replicas on the one GPU against one replica with
            twice the accumulation (the trained change, f32 1e-5, bf16 1e-2: in bf16 each replica
            keeps the f32 masters of the weights it owns only).
            The first CUDA runs also pay the driver's JIT of candle's PTX for the later stages.
  train-1b  One bf16 DPO optimiser step on a random llama of TinyLlama-1.1B's shape: LoRA r16 on
            q,k,v,o, then full fine-tuning. optune: `opt-wdpo --device cuda --dtype bf16`. Peer: a
            plain PyTorch DPO step of the same sizes (sigmoid loss, bf16 autocast, f32 trainable
            weights and fused AdamW, clip 1.0, reference log-probs computed before the steps as
            opt-wdpo does; LoRA through peft when importable, else a LoRA module written here).
            Seconds per step (median of steps 2..N), tokens/s, peak GPU memory.
  train-7b  The LoRA step of train-1b, with --train-pairs-7b (8) pairs, on a random llama of
            Llama-2-7B's shape, built on the GPU in bf16 and saved once under --work (reused by a
            later run on the same machine).
  gen-7b    Generation tokens/s on that 7B, greedy, --new-tokens per sequence, EOS ignored, at
            each of --batches: `opt-gen --device cuda --dtype bf16` against transformers
            `generate` (bf16, sdpa, left-padded, the same token ids), the ratio, and the fraction
            of the bandwidth roof: bytes of weights one decode step reads x steps per second
            (tokens/s / batch, prefill included) / the copy bandwidth measured at the start;
            then the prefill of one ~1,900-token prompt (one new token) against one transformers
            forward over it, and 64 more tokens decoded after it at batch 1 (ms per token, against
            the batch-1 row's short prompts: what a long context adds to a decode step), also
            with OPTUNE_ATTENTION=whole (each head's span in one block: what splitting it across
            blocks is worth); the prefill also with OPTUNE_ATTENTION=whole (each prompt token
            reading its keys itself: what the tiled kernel is worth).
  gen-1b    The rows of gen-7b on the 1.1B. Its 8 query heads per KV head take blocks of 4
            heads: the largest batch runs once more with OPTUNE_ATTENTION=whole (one head to a
            block; a row of its own, grouped/ungrouped), and its decode after the long prompt
            compares grouped and split against one head to a block, unsplit.
  score-1b  Reward scoring on the 1.1B made a reward model (transformers' sequence-classification
            head over its weights, seed 0): `opt-score --rm --dtype bf16` (packed passes,
            --batch-tokens from the free memory) against transformers' forward (bf16, sdpa) over
            the same token ids, longest first in right-padded batches of --score-batch (32), on
            --score-rows (512) conversations of up to --score-words (400) words: tokens/s of the
            model passes (opt-score's model_s; the peer timed after a warm-up batch), the rewards'
            largest difference (information: both sides bf16), opt-score's plan and peak memory.
  sanitize  Our kernels and candle's under NVIDIA's compute-sanitizer: memcheck (an access outside
            an allocation, a misaligned one, a device error) over opt-gen sampling in bf16 on
            tiny-qwen3 (--n 2, chunked prefill: the head norm, cache write, cache attention,
            add+norm, gate and sampler kernels) and over two opt-wdpo steps in bf16 on tiny-llama
            (the optimiser kernels); racecheck
            (shared-memory hazards between a block's threads, which the CPU emulator of our kernels
            cannot show: it runs a block's threads one at a time) over the opt-gen run (the
            training run for the norm's backward kernel), once per kernel of ours that uses shared
            memory (SHARED_MEMORY_KERNELS, one `--kernel-name kns=` filter a run); when racecheck
            fails itself ("Internal Sanitizer Error", as on the first GPU run), two controls: the
            opt-gen run watching none of our kernels, and PyTorch's softmax. Last by default: the
            logprobs rows already compare every kernel's results with the CPU's.
  kernels-1b  Not in the default run (--stages kernels-1b; --budget-s 360 lets its three parts
            start):
            train-1b's opt-wdpo steps (LoRA, then full) taken apart with Nsight Compute (`ncu`,
            each kernel's duration only): the kernels of a two-step run less those of a one-step
            run (reference log-probs computed beforehand), so exactly one step's, by name, with
            their sum against the step's wall time without the profiler (the GPU's busy share)
            and the matrix products' share. Then the prefill row's opt-gen run (one ~1,900-token
            prompt, one new token) under ncu, against its gen_s: where the prefill's time goes
            (4.7x transformers' forward on the first GPU run). The 25 longest kernels of each go
            to measure.md.

Cost: wall seconds of each stage on one H200, measured 2026-12-04 (docs/cuda.md, "sixth
session"), with the guesses made before any GPU run beside them:

  stage      what                                                          measured  guessed
  start      unpack the archive, import torch, copy bandwidth                  ~15       15
  logprobs   80 runs of the tools (57 on CUDA), the first ones JIT-compile
             candle's PTX                                                       47      155
  train-1b   build the 1.1B (2.2 GB), 2 x (optune run + peer)                    21       50
  train-7b   build the 7B (13.5 GB written once), optune LoRA run (load, 5
             steps, 13.5 GB merged checkpoint written), peer (loads the 7B)      71      100
  gen-7b     warm-up, 4 batch sizes x (opt-gen run incl. 13.5 GB load +
             generate), prefill, decode after it, each also whole              161      165
  gen-1b     the same on the 1.1B, and its largest batch whole                   62       95
  score-1b   the reward model written (2.2 GB), opt-score run, peer              14       25
  sanitize   memcheck and racecheck runs on tiny models                           6      150
  total                                                                         398      755
  kernels-1b (not in the default run) 2 x (a bare run, two runs under ncu)      275
             (before the prefill's profile was added; it adds about two opt-gen runs)

--budget-s (default 480) bounds the run: before each row the elapsed time plus that row's guessed
cost (ESTIMATE_S) must fit, else the row is skipped with a note; every tool run is killed at
--budget-s + 45 s, and a training or generation run after 3x its row's guess (at least 60 s); a
row's peer side starts only with the row's whole guess left before that limit. On the first GPU
run all seven stages finished in 398 s; should a later one run out, a second call (--stages
gen-1b,score-1b,sanitize) reuses the checkpoints under --work on the same machine. A row whose
peer fails or runs out of time keeps optune's figures, with the peer's cells empty and the reason
in its note.
Rows print as soon as they are measured and measure.md/measure.json are rewritten after each, so
a run stopped from outside still leaves its rows on stdout and in --out.

GPU memory: optune's peak is polled with nvidia-smi every ~0.1 s (the process's used_memory,
its CUDA context included; the device's memory.used above its value at the start when the
process is not listed), shown beside opt-wdpo's own plan (its "memory estimate" line); the
peer's is read the same way: torch.cuda.max_memory_reserved (its cache's high-water mark, as
optune's pool keeps what it reserved) plus the process's memory outside torch (nvidia-smi's
figure less torch's reservation), with torch's max allocated in the note. opt-wdpo trains with
the device to itself; opt-gen runs while this process holds the peer's bf16 model.

--dry-run runs every stage with the same code on the CPU (the "CUDA" runs use --device cpu with
--kernels generic, the op graph a GPU runs; torch on the CPU; tiny model shapes; fewer tokens),
reports that no GPU was present, and checks its own plumbing (every row made, files written,
summaries parsed). Its figures mean nothing.

Output: the table on stdout (streamed, then complete at the end) and with the detailed
correctness tables in --out/measure.md, the raw figures in --out/measure.json. Exit status 1 when
a correctness check or a row fails (or, in a dry run, the plumbing check).
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "testdata"
# One tiny model of each family and the reward models (optune_testkit's FAMILY_MODELS and
# REWARD_MODELS; OLMo 3 and Granite have none): the log-prob and reward rows run every one.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "exaone4", "gemma3"]
FAMILY_MODELS = [f"tiny-{f}" for f in FAMILIES + ["olmo3", "granite"]]
REWARD_MODELS = [f"tiny-rm-{f}" for f in FAMILIES]

sys.path.insert(0, str(REPO / "scripts/bench"))
sys.path.insert(0, str(REPO / "scripts/cuda"))
from bench_gen import PROMPTS  # noqa: E402  (the CPU generation benchmark's prompts)
from bench_score import conversation_ids, make_reward_model, padded_rewards, synthetic_responses  # noqa: E402

SHAPES = {
    "llama1b": dict(label="random llama 1.1B (TinyLlama shape)", vocab_size=32000, hidden_size=2048,
                    intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048),
    "llama7b": dict(label="random llama 6.7B (Llama-2-7B shape)", vocab_size=32000, hidden_size=4096,
                    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=4096),
    # --dry-run stand-ins for the two (the 7B's: untied and no GQA, like Llama-2-7B).
    "tiny": dict(label="random llama 0.1M (dry run)", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True, max_position_embeddings=1024),
    "tiny-mha": dict(label="random llama 0.3M (dry run)", vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     tie_word_embeddings=False, max_position_embeddings=1024),
}
MODEL_OF = {"1b": "llama1b", "7b": "llama7b"}
DRY_MODEL_OF = {"1b": "tiny", "7b": "tiny-mha"}
STAGES = ["logprobs", "train-1b", "train-7b", "gen-7b", "gen-1b", "score-1b", "sanitize"]
# Run only when --stages names them.
EXTRA_STAGES = ["kernels-1b"]

# Guessed cost in seconds on an H100 of each unit of work the budget is checked before (see the
# docstring); a dry run checks against 0 (its figures are the CPU's).
ESTIMATE_S = {
    "logprobs": 70,
    "build:1b": 15, "lora:1b": 15, "full:1b": 20, "warmup:1b": 15, "gen:1b": 12,
    "build:7b": 45, "lora:7b": 55, "warmup:7b": 35, "gen:7b": 22,
    "prefill:1b": 19, "prefill:7b": 40, "score:1b": 25,
    "sanitize": 30,
    # One kind's three opt-wdpo runs: one bare, two under Nsight Compute (~130 s each kind on the
    # H200).
    "kernels:1b": 140,
    # The prefill row's opt-gen run, bare and under ncu.
    "prefill-kernels:1b": 40,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# New tokens decoded after the long prompt of the prefill row.
LONG_DECODE = 64

# The GPU device as the binaries and torch name it; --dry-run sets it to "cpu".
GPU = "cuda"
T0 = time.monotonic()


def note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the report: one table, rows as they are measured
# ---------------------------------------------------------------------------------------------

class Report:
    COLUMNS = ["stage", "measurement", "optune", "peer", "optune / peer", "note"]

    def __init__(self, out: Path):
        self.out = out
        self.preamble = []
        self.rows = []
        self.details = []
        self.raw = {}
        self.failed = False
        self.table_started = False

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.preamble.append(text)

    def detail(self, text: str = "") -> None:
        note(text)
        self.details.append(text)

    @staticmethod
    def md(cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    def header(self) -> list:
        return [self.md(self.COLUMNS), self.md(["---", "---", "---:", "---:", "---:", "---"])]

    def row(self, stage, what, ours="", peer="", ratio="", note_text="", kind="ok") -> None:
        """kind: ok, fail (a check or a measurement failed), skip (budget)."""
        if not self.table_started:
            for h in self.header():
                print(h, flush=True)
            self.table_started = True
        cells = [stage, what, ours, peer, ratio, note_text]
        self.rows.append({"cells": cells, "kind": kind})
        self.failed |= kind == "fail"
        print(self.md(cells), flush=True)
        self.save()

    def table(self) -> list:
        return self.header() + [self.md(r["cells"]) for r in self.rows]

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = self.preamble + self.table() + ["", LEGEND, "", "## Details", ""] + self.details
        (self.out / "measure.md").write_text("\n".join(text) + "\n")
        (self.out / "measure.json").write_text(json.dumps({"rows": self.rows, **self.raw}, indent=1, default=str))


LEGEND = ("optune / peer: for s/step and GiB below 1 favours optune, for tok/s above 1. Peer: a plain "
          "PyTorch step (training), transformers `generate` (generation), transformers' sequence-classification "
          "forward in padded batches (scoring). Roof: bytes of weights read per "
          "decode step x steps/s / the measured copy bandwidth.")

REPORT = None  # the Report, made by main()


def elapsed() -> float:
    return time.monotonic() - T0


class Budget:
    """Whether the next unit of work fits in --budget-s; tool runs are killed past budget + grace."""

    GRACE_S = 45

    def __init__(self, seconds: float, dry_run: bool):
        self.seconds = seconds
        self.dry_run = dry_run

    def allows(self, unit: str) -> bool:
        need = 0 if self.dry_run else ESTIMATE_S[unit]
        return elapsed() + need <= self.seconds

    def skip(self, stage: str, what: str, unit: str) -> None:
        need = 0 if self.dry_run else ESTIMATE_S[unit]
        REPORT.row(stage, what, "", "", "", f"skipped: {elapsed():.0f} s elapsed + ~{need} s needed "
                   f"> --budget-s {self.seconds:.0f}", kind="skip")

    def timeout(self, unit: str = None):
        """Seconds a tool run may still take: to budget + grace, and for a unit of work at most
        3x its guess (at least a minute), so that one runaway row cannot eat the rows after it;
        and whether the first of these (the whole run's hard limit) is the one that binds."""
        left = self.seconds + self.GRACE_S - elapsed()
        cap = None if unit is None else max(60.0, 3 * ESTIMATE_S[unit])
        return (left, True) if cap is None or left <= cap else (cap, False)

    def ensure(self, unit: str, what: str) -> None:
        """Raises OutOfTime unless the unit's whole guess (a dry run: any time) is left before the
        hard limit: the check before Python work, such as a row's peer side, that no tool-run
        timeout bounds (the guess covers both sides of a row, so the peer's half fits in it)."""
        left = self.seconds + self.GRACE_S - elapsed()
        if left < (1 if self.dry_run else ESTIMATE_S[unit]):
            raise OutOfTime(f"{elapsed():.0f} s elapsed: no time left for {what} before the hard limit "
                            f"(--budget-s + {self.GRACE_S} s)")


class OutOfTime(RuntimeError):
    """A tool run stopped (or not started) at the whole run's hard limit: the row is skipped,
    not failed."""


class OverCap(RuntimeError):
    """A tool run killed at its own unit's cap (3x its guess), before the whole run's limit: a
    failure for a row that measures the tool, a skip for a row that only watches it run."""


BUDGET = None  # the Budget, made by main()


def first_line(error: Exception) -> str:
    """An error's first line, for a row's note (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def also(peer_note: str) -> str:
    """A row note's tail for `peer_note` (peer_side's), empty when the peer ran."""
    return f"; {peer_note}" if peer_note else ""


def peer_side(stage: str, unit: str, fn):
    """The peer's half of a row, run once optune's half is measured: (its result, "", "ok"), or
    when it fails or the time is out (None, a note for the row, "fail" or "skip"), so that the
    row still carries optune's figures."""
    try:
        BUDGET.ensure(unit, "the peer")
        return fn(), "", "ok"
    except OutOfTime as e:
        return None, f"peer skipped: {e}", "skip"
    except Exception as e:  # noqa: BLE001  (the peer's failure must not discard optune's figures)
        first = first_line(e)
        note(f"{stage}: the peer failed:\n{e}")
        return None, f"peer FAILED: {first[:160]}", "fail"


def guarded(stage: str, what: str, fn) -> None:
    """Runs fn(); a failure becomes a FAILED row (running out of the whole run's time a skipped
    one) and the check goes on."""
    try:
        fn()
    except OutOfTime as e:
        REPORT.row(stage, what, "", "", "", f"skipped: {e}", kind="skip")
    except Exception as e:  # noqa: BLE001  (one broken row must not hide the others)
        first = first_line(e)
        note(f"{stage} / {what} failed:\n{e}")
        REPORT.row(stage, what, "", "", "", f"FAILED: {first[:160]}", kind="fail")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def run(cmd, watch_gpu: bool = False, unit: str = None, env: dict = None):
    """Runs a tool (with `env` added to the environment), killed at BUDGET.timeout(unit); returns
    (stderr, peak GPU GiB or None, how the peak was read)."""
    cmd = [str(c) for c in cmd]
    if "-o" in cmd:
        # A run killed earlier (a time limit, an interrupted check) leaves its resume state beside
        # its output (opt-gen's OUT.journal, opt-wdpo's OUT.state/), and a rerun with other
        # arguments is then refused, one with the same resumed: these runs start afresh.
        out = cmd[cmd.index("-o") + 1]
        Path(out + ".journal").unlink(missing_ok=True)
        shutil.rmtree(out + ".state", ignore_errors=True)
    limit, hard = BUDGET.timeout(unit)
    if limit < 5:
        raise OutOfTime(f"{elapsed():.0f} s elapsed, the hard limit (--budget-s + {BUDGET.GRACE_S} s) "
                        f"is reached: {Path(cmd[0]).name} not started")
    peak = GpuMemoryPeak() if watch_gpu else None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env} if env else None)
        if peak:
            peak.watch(proc.pid)
        try:
            _, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            if hard:
                raise OutOfTime(f"{Path(cmd[0]).name} killed after {limit:.0f} s at the hard limit "
                                f"(--budget-s + {BUDGET.GRACE_S} s)")
            raise OverCap(f"killed after {limit:.0f} s (its time limit): {' '.join(cmd)}")
    finally:
        gib, how = peak.stop() if peak else (None, "")
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
    return stderr, gib, how


class GpuMemoryPeak:
    """Peak GPU memory of a child process, polled with nvidia-smi (~every 0.1 s) while it runs."""

    def __init__(self):
        self.pid = None
        self.process_mib = None
        self.device_mib = None
        self.baseline_mib = None
        self.done = threading.Event()
        self.thread = None
        if GPU == "cuda" and shutil.which("nvidia-smi"):
            self.baseline_mib = self.device_used()
            if self.baseline_mib is not None:
                self.thread = threading.Thread(target=self.poll, daemon=True)
                self.thread.start()

    @staticmethod
    def smi(query: str) -> list:
        """nvidia-smi's CSV lines as lists of numbers; lines that are not all numbers are left out."""
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        rows = []
        for line in out.strip().splitlines():
            try:
                rows.append([float(x) for x in line.split(",")])
            except ValueError:
                continue  # "[N/A]", "No running processes found"
        return rows

    def device_used(self):
        rows = self.smi("--query-gpu=memory.used")
        return rows[0][0] if rows else None

    def watch(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> None:
        while True:
            try:
                apps = self.smi("--query-compute-apps=pid,used_memory")
                used = self.device_used()
            except (OSError, subprocess.SubprocessError):
                return  # what was read so far stands
            for row in apps:
                if len(row) == 2 and row[0] == self.pid:
                    self.process_mib = max(self.process_mib or 0.0, row[1])
            if used is not None:
                self.device_mib = max(self.device_mib or 0.0, used)
            if self.done.wait(0.1):
                return

    def stop(self):
        if self.thread is None:
            return None, "n/a: no GPU" if GPU != "cuda" else "n/a: nvidia-smi not usable"
        self.done.set()
        self.thread.join()
        if self.process_mib is not None:
            return self.process_mib / 1024, "nvidia-smi, the process (CUDA context incl.)"
        if self.device_mib is not None:
            return (self.device_mib - self.baseline_mib) / 1024, "nvidia-smi, device used minus its start"
        return None, "n/a: nvidia-smi gave nothing"


def summary(stderr: str, tool: str) -> dict:
    lines = [l for l in stderr.splitlines() if l.startswith(tool + ":")]
    if not lines:
        raise RuntimeError(f"no '{tool}:' summary line in:\n{stderr[-2000:]}")
    return dict(kv.split("=", 1) for kv in lines[-1].split()[1:] if "=" in kv)


def read_jsonl(path: Path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def sync() -> None:
    import torch

    if GPU == "cuda":
        torch.cuda.synchronize()


def free_torch_memory() -> None:
    import gc
    import torch

    gc.collect()
    if GPU == "cuda":
        torch.cuda.empty_cache()


def dev(device: str) -> str:
    return GPU if device == "cuda" else device


def device_flags(device: str, dtype: str) -> list:
    # The op graph a GPU runs, also when a dry run puts the "cuda" side on the CPU. CUDA f32 is
    # held to the CPU at 1e-4, so it runs full f32 products: TF32 (on by default on CUDA) rounds
    # their inputs to a 10-bit mantissa.
    if device != "cuda":
        return []
    return ["--kernels", "generic"] + (["--tf32", "false"] if dtype == "f32" else [])


def gen_flags(device: str) -> list:
    # opt-gen's KV cache as a GPU sizes it (--kv-memory 0.9, its default there: paged), named so
    # that a dry run's "cuda" side on the CPU pages its cache too.
    return ["--kv-memory", "0.9"] if device == "cuda" else []


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def binaries_provenance(bin_dir: Path) -> str:
    """Whether the binaries were built from this tree's sources: the SOURCE_DIGEST that
    scripts/build-cuda.sh wrote beside them against the tree's own (scripts/cuda/source_digest.py).
    Stale binaries would measure older code than the table names; the check still runs, and says
    so first."""
    from source_digest import source_digest

    ours = source_digest(REPO)
    stamp = bin_dir / "SOURCE_DIGEST"
    if not stamp.exists():
        return f"sources of the binaries: unknown (no {stamp.name}: not built by scripts/build-cuda.sh build)"
    theirs = stamp.read_text().strip()
    if theirs == ours:
        return f"sources of the binaries: this tree's ({ours[:12]})"
    return (f"**STALE BINARIES: built from sources {theirs[:12]}, this tree is {ours[:12]}; rebuild with "
            f"scripts/build-cuda.sh build. The figures below are of the older code.**")


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def messages_of(case) -> list:
    if "messages" in case:
        return case["messages"]
    return [{"role": "user", "content": case["prompt"]}]


def verdict(value: float, tol: float) -> tuple:
    passed = value <= tol
    return f"≤ {tol:g}: {'pass' if passed else 'FAIL'}", ("ok" if passed else "fail")


# ---------------------------------------------------------------------------------------------
# copy bandwidth (the roof of the generation rows)
# ---------------------------------------------------------------------------------------------

def copy_bandwidth(size_bytes: int) -> float:
    """Bytes per second of a device-to-device tensor copy, bytes read + written, median of 5 x 10 copies."""
    import torch

    src = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8, device=GPU)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    rates = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync()
        rates.append(2 * size_bytes * 10 / (time.perf_counter() - start))
    assert torch.equal(dst, src)
    del src, dst
    free_torch_memory()
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------

def wdpo_ref_logps(bins: Path, model: Path, pairs: Path, work: Path, device: str, dtype: str, lr="0", epochs=1):
    """Runs opt-wdpo --precompute-ref on a copy of `pairs`; returns (chosen, rejected, metrics rows)."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "pairs.jsonl"
    shutil.copy(pairs, copy)
    metrics = work / "metrics.csv"
    run([bins / "opt-wdpo", "--policy", model, copy, "-o", work / "ckpt", "--precompute-ref",
         "--lr", lr, "--warmup-ratio", "0", "--schedule", "constant", "--batch-size", "4",
         "--epochs", str(epochs), "--metrics", metrics, "--device", dev(device), "--dtype", dtype,
         *device_flags(device, dtype)], unit="logprobs")
    rows = read_jsonl(copy)
    with open(metrics) as f:
        steps = list(csv.DictReader(f))
    return [r["ref_chosen_logp"] for r in rows], [r["ref_rejected_logp"] for r in rows], steps


RUNS = [("cpu", "f32"), ("cuda", "f32"), ("cuda", "bf16")]


def reference_pairs(name: str, path: Path) -> list:
    """Pairs of a testdata model's reference responses, each case's response chosen against the
    next one's, written to `path`; returns the cases."""
    cases = json.loads((TESTDATA / "reference" / f"{name}.json").read_text())["cases"]
    n = len(cases)
    write_jsonl(path, [{"messages": messages_of(c), "chosen": c["response"], "rejected": cases[(i + 1) % n]["response"]}
                       for i, c in enumerate(cases)])
    return cases


def logprobs_policies(bins: Path, work: Path) -> None:
    R = REPORT
    R.detail("### Log-probs: CUDA against CPU f32 (`opt-wdpo --precompute-ref`, summed over response + EOS)")
    R.detail()
    R.detail("| model | compared | log-probs | max rel. diff | tolerance | result |")
    R.detail("|---|---|---:|---:|---:|---|")
    worst = {"f32": 0.0, "bf16": 0.0, "hf": 0.0}
    count = 0
    for name in FAMILY_MODELS:
        model = TESTDATA / "models" / name
        pairs_file = work / f"{name}-pairs.jsonl"
        cases = reference_pairs(name, pairs_file)
        n = len(cases)
        got = {}
        for device, dtype in RUNS:
            c, r, _ = wdpo_ref_logps(bins, model, pairs_file, work / f"{name}-{device}-{dtype}", device, dtype)
            got[f"{device}-{dtype}"] = c + r
        cpu = got["cpu-f32"]
        hf = [float(c["sum_logp"]) for c in cases]
        count += len(cpu)
        for key, label, a, b, tol in [("cpu-hf", "CPU f32 vs transformers", cpu[:n], hf, 1e-4),
                                      ("hf", "CUDA f32 vs transformers", got["cuda-f32"][:n], hf, 1e-4),
                                      ("f32", "CUDA f32 vs CPU f32", got["cuda-f32"], cpu, 1e-4),
                                      ("bf16", "CUDA bf16 vs CPU f32", got["cuda-bf16"], cpu, 1e-2)]:
            w = max(rel(x, y) for x, y in zip(a, b))
            if key in worst:
                worst[key] = max(worst[key], w)
            R.detail(f"| {name} | {label} | {len(a)} | {w:.2e} | {tol:g} | {'pass' if w <= tol else 'FAIL'} |")
        R.raw.setdefault("logprobs", {})[name] = {"values": got, "transformers_chosen": hf}
    R.detail()
    for key, what, tol in [("f32", f"log-probs CUDA f32 vs CPU f32, max rel. diff ({count}, "
                                   f"{len(FAMILY_MODELS)} tiny models)", 1e-4),
                           ("bf16", f"log-probs CUDA bf16 vs CPU f32, max rel. diff ({count})", 1e-2),
                           ("hf", "log-probs CUDA f32 vs transformers (stored), max rel. diff", 1e-4)]:
        text, kind = verdict(worst[key], tol)
        R.row("logprobs", what, f"{worst[key]:.2e}", "", "", text, kind)


def logprobs_rewards(bins: Path, work: Path) -> None:
    R = REPORT
    PIECE = "48"  # tokens: the tiny reward models' conversations are 31-164 tokens long
    R.detail("### Reward-model scores from `opt-score --rm` (difference over the largest |score| of the model)")
    R.detail()
    R.detail("| reward model | compared | rows | max diff / max abs | tolerance | result |")
    R.detail("|---|---|---:|---:|---:|---|")
    worst = {"cuda-f32": 0.0, "cuda-bf16": 0.0}
    for name in REWARD_MODELS:
        model = TESTDATA / "models" / name
        cases = json.loads((TESTDATA / "reference" / f"{name}.json").read_text())["cases"]
        rows = [{"prompt_id": f"r{i}", "messages": messages_of(c), "response": c["response"]}
                for i, c in enumerate(cases)]
        shard = work / f"{name}-responses.jsonl"
        write_jsonl(shard, rows)
        got = {}
        # The CUDA runs pack the conversations into one pass; "in pieces" feeds each alone, in
        # pieces of PIECE tokens through its KV-cache slot.
        for device, dtype, extra in [*((d, t, []) for d, t in RUNS), ("cuda", "f32", ["--batch-tokens", PIECE])]:
            key = f"{device}-{dtype}" + ("-pieces" if extra else "")
            out = work / f"{name}-{key}.jsonl"
            run([bins / "opt-score", shard, "--rm", model, "-o", out, "--device", dev(device), "--dtype", dtype,
                 *device_flags(device, dtype), *extra], unit="logprobs")
            got[key] = [r["reward"] for r in read_jsonl(out)]
        hf = [float(c["score"]) for c in cases]
        scale = max(abs(x) for x in got["cpu-f32"])
        for key, label, a, b in [("cpu-hf", "CPU f32 vs transformers", got["cpu-f32"], hf),
                                 ("cuda-f32", "CUDA f32 vs CPU f32", got["cuda-f32"], got["cpu-f32"]),
                                 ("cuda-f32", f"CUDA f32 in pieces of {PIECE} vs CPU f32", got["cuda-f32-pieces"],
                                  got["cpu-f32"]),
                                 ("cuda-bf16", "CUDA bf16 vs CPU f32", got["cuda-bf16"], got["cpu-f32"])]:
            w = max(abs(x - y) for x, y in zip(a, b)) / scale
            if key in worst:
                worst[key] = max(worst[key], w)
            R.detail(f"| {name} | {label} | {len(a)} | {w:.2e} | {'-' if key == 'cuda-bf16' else '1e-4'} | "
                     f"{'(info)' if key == 'cuda-bf16' else ('pass' if w <= 1e-4 else 'FAIL')} |")
        R.raw.setdefault("rewards", {})[name] = {"values": got, "transformers": hf}
    R.detail()
    text, kind = verdict(worst["cuda-f32"], 1e-4)
    R.row("logprobs", "reward scores CUDA f32 (packed; in pieces) vs CPU f32, max diff / largest score (6 tiny RMs)",
          f"{worst['cuda-f32']:.2e}", "", "", text, kind)
    # A scalar head after bf16 layers moves by a few percent (1.7-2.8e-2 on the CPU's bf16 too):
    # reported, not judged.
    R.row("logprobs", "reward scores CUDA bf16 vs CPU f32, max diff / largest score",
          f"{worst['cuda-bf16']:.2e}", "", "", "info (not judged)")


def gen_prompts(work: Path) -> Path:
    """PROMPTS as a prompts shard under `work`, for the generation rows of the logprobs stage."""
    prompts = work / "gen-prompts.jsonl"
    write_jsonl(prompts, [{"prompt_id": f"g{i:02d}", "prompt": p} for i, p in enumerate(PROMPTS)])
    return prompts


def logprobs_generation(bins: Path, work: Path) -> None:
    model = TESTDATA / "models" / "tiny-llama"
    prompts = gen_prompts(work)
    got = {}
    for device, dtype in RUNS:
        out = work / f"gen-{device}-{dtype}.jsonl"
        run([bins / "opt-gen", "--model", model, prompts, "-o", out, "--n", "1", "--temperature", "0",
             "--max-new-tokens", "48", "--batch-size", "8", "--device", dev(device), "--dtype", dtype,
             *device_flags(device, dtype), *gen_flags(device)], unit="logprobs")
        got[f"{device}-{dtype}"] = read_jsonl(out)
    for key, tol in [("cuda-f32", 1e-4), ("cuda-bf16", 1e-2)]:
        same = [(a, b) for a, b in zip(got[key], got["cpu-f32"]) if a["response"] == b["response"]]
        worst = max((rel(a["logp"], b["logp"]) for a, b in same), default=float("nan"))
        label = "f32" if key == "cuda-f32" else "bf16"
        what = (f"opt-gen greedy CUDA {label} vs CPU f32 (tiny-llama, 16 x 48 tokens): identical "
                f"responses, max rel. diff of their logp")
        if key == "cuda-f32":
            passed = len(same) == len(got[key]) and worst <= tol
            text = f"all identical, ≤ {tol:g}: {'pass' if passed else 'FAIL'}"
        else:
            # bf16 greedy may pick other tokens on a near-flat random model: only the identical
            # responses are judged, and none identical is no verdict.
            passed = not same or worst <= tol
            text = f"≤ {tol:g}: {'pass' if passed else 'FAIL'}" if same else "n/a: none identical"
        REPORT.row("logprobs", what, f"{len(same)}/{len(got[key])}, {fmt(worst, '.2e')}", "", "", text,
                   "ok" if passed else "fail")


def logprobs_sampling(bins: Path, work: Path) -> None:
    """The paper's sampling (temperature 1.0, top-p 0.9) with two samples per prompt sharing one
    prefill, and prompts fed 7 tokens per step (chunked prefill beside decoding): CUDA f32
    against the CPU running the same op graph (--kernels generic: the same device sampler, the
    same uniforms from the same seeded streams), so the draws agree unless rounding moves a
    uniform across a boundary."""
    model = TESTDATA / "models" / "tiny-llama"
    prompts = gen_prompts(work)
    got = {}
    for device in ["cpu", "cuda"]:
        out = work / f"sampled-{device}.jsonl"
        # Both sides page their KV cache, as the GPU does by default.
        flags = device_flags(device, "f32") if device == "cuda" else ["--kernels", "generic"]
        flags += gen_flags("cuda")
        run([bins / "opt-gen", "--model", model, prompts, "-o", out, "--n", "2", "--temperature", "1.0",
             "--top-p", "0.9", "--seed", "11", "--prompt-tokens-per-step", "7", "--max-new-tokens", "48",
             "--batch-size", "8", "--device", dev(device), "--dtype", "f32", *flags], unit="logprobs")
        got[device] = read_jsonl(out)
    same = [(a, b) for a, b in zip(got["cuda"], got["cpu"]) if a["response"] == b["response"]]
    worst = max((rel(a["logp"], b["logp"]) for a, b in same), default=float("nan"))
    passed = len(same) >= 0.9 * len(got["cuda"]) and worst <= 1e-4
    what = ("opt-gen sampled CUDA f32 vs CPU f32 generic (tiny-llama, 16 prompts x 2 samples, T 1.0, "
            "top-p 0.9, 7 prompt tokens per step): identical responses, max rel. diff of their logp")
    REPORT.row("logprobs", what, f"{len(same)}/{len(got['cuda'])}, {fmt(worst, '.2e')}", "", "",
               f"≥ 90 % identical, ≤ 1e-4: {'pass' if passed else 'FAIL'}", "ok" if passed else "fail")


def logprobs_training(bins: Path, work: Path) -> None:
    # Step 1's loss is ln 2 everywhere (policy = reference); steps 2 and 3 depend on the updates
    # (gradients, clipping, AdamW), so they are the ones compared.
    R = REPORT
    model = TESTDATA / "models" / "tiny-llama"
    pairs_file = work / "tiny-llama-pairs.jsonl"
    R.detail("### Training: opt-wdpo on tiny-llama, 4 pairs, batch 4, lr 1e-3 constant (AdamW), 3 steps")
    R.detail()
    R.detail("| device | dtype | loss step 2 | loss step 3 | margin step 3 | max rel. diff of loss | finite after |")
    R.detail("|---|---|---:|---:|---:|---:|---|")
    losses = {}
    for device, dtype in RUNS:
        w = work / f"train-{device}-{dtype}"
        _, _, steps = wdpo_ref_logps(bins, model, pairs_file, w, device, dtype, lr="1e-3", epochs=3)
        losses[dtype if device == "cuda" else "cpu"] = [float(s["loss"]) for s in steps]
        # The trained checkpoint's log-probs, on the same device.
        c, r, _ = wdpo_ref_logps(bins, w / "ckpt", pairs_file, w / "after", device, dtype)
        finite = all(math.isfinite(x) for x in c + r + losses[dtype if device == "cuda" else "cpu"])
        l = losses[dtype if device == "cuda" else "cpu"]
        d = max(rel(a, b) for a, b in zip(l[1:], losses["cpu"][1:]))
        R.detail(f"| {device} | {dtype} | {l[1]:.6f} | {l[2]:.6f} | {float(steps[-1]['rewards/margins']):.5f} "
                 f"| {d:.2e} | {finite} |")
        if device == "cuda":
            # bf16: a response's log-prob sum (|logp| ~ 100 nats here) carries ~2^-8 of itself in
            # rounding, ~0.4 nats, and a DPO loss ℓ moves by about β·ℓ·Δmargin, so at β = 0.1
            # the loss moves by ~4 % of itself (3.9e-2 on the CPU's generic bf16, 2026-12-01).
            tol = 1e-3 if dtype == "f32" else 1e-1
            text, kind = verdict(d, tol)
            if not finite:
                text, kind = "non-finite log-probs after training: FAIL", "fail"
            R.row("logprobs", f"opt-wdpo loss after 1 and 2 updates, CUDA {dtype} vs CPU f32, max rel. diff "
                  f"(tiny-llama, lr 1e-3)", f"{d:.2e}", "", "", text, kind)
    R.detail()


def change_gap(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over the tensors of b: how far one run's trained change `a` is from another's.
    Norms, not the largest element: AdamW turns a rounding-sized gradient into a full-sized step,
    so single elements may differ by rounding alone."""
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    size = sum(float(b[k].pow(2).sum()) for k in b)
    return math.sqrt(diff / max(size, 1e-300))


def trained_change(bins: Path, pairs_file: Path, out: Path, flags: list, names=lambda name: True,
                   dtype: str = "f32") -> dict:
    """3 epochs of opt-wdpo in `dtype` on tiny-llama over `pairs_file` into `out` (constant
    learning rate, no warm-up) with `flags`; returns the trained change (merged − base) of each
    weight whose name `names` accepts."""
    from safetensors.torch import load_file

    model = TESTDATA / "models" / "tiny-llama"
    run([bins / "opt-wdpo", "--policy", model, pairs_file, "-o", out, "--warmup-ratio", "0",
         "--schedule", "constant", "--epochs", "3", "--dtype", dtype, *flags], unit="logprobs")
    base = load_file(str(model / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    return {k: merged[k].float() - base[k].float() for k in merged if names(k)}


def logprobs_data_parallel(bins: Path, work: Path) -> None:
    """`opt-wdpo --devices`: two replicas on the one GPU, each on a host thread of its own (the
    threads' CUDA work, each weight's gradients added on its owner replica, the weights sent
    back), against one replica with twice the accumulation, by the trained change of the weights.
    The owners add the replicas' gradients in the order one replica adds its micro-batches. In
    f32 the replicas split the moments only; in bf16 each keeps the f32 masters of the weights it
    owns and trains bf16 copies of the other's (the casts, and the masters gathered for the
    checkpoint, run on the GPU); bf16 is held at 1e-2, as its log-probs are."""
    pairs_file = work / "tiny-llama-dp-pairs.jsonl"
    reference_pairs("tiny-llama", pairs_file)
    for dtype, bound in [("f32", 1e-5), ("bf16", 1e-2)]:
        def delta(name: str, placement: list) -> dict:
            return trained_change(bins, pairs_file, work / f"data-parallel-{dtype}-{name}",
                                  ["--lr", "1e-3", "--batch-size", "2", *placement,
                                   *device_flags("cuda", dtype)], dtype=dtype)

        one = delta("one", ["--device", dev("cuda"), "--grad-accum", "2"])
        two = delta("two", ["--devices", "cuda:0,cuda:0" if GPU == "cuda" else "cpu,cpu"])
        d = change_gap(two, one)
        text, kind = verdict(d, bound)
        REPORT.row("logprobs", f"opt-wdpo --devices: 2 replicas on one GPU vs 1 with --grad-accum 2, 3 steps {dtype}: "
                   "trained weight change, ‖difference‖ / ‖change‖ (tiny-llama, full)", f"{d:.2e}", "", "",
                   text + ("; identical" if d == 0 else ""), kind)


def logprobs_lora_dropout(bins: Path, work: Path) -> None:
    """LoRA dropout's masks are drawn on the device by a kernel held to the CPU's form, and a
    recomputed block draws them again: 3 steps of LoRA with dropout 0.3 on every projection and
    --gradient-checkpointing, CUDA f32 against CPU f32 by the trained change of the weights
    (merged − base). Another seed on the CPU shows the size of a change with other masks."""
    R = REPORT
    pairs_file = work / "tiny-llama-dropout-pairs.jsonl"
    reference_pairs("tiny-llama", pairs_file)

    def delta(device: str, seed: int) -> dict:
        return trained_change(
            bins, pairs_file, work / f"dropout-{device}-{seed}",
            ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.3", "--lora-targets",
             "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--gradient-checkpointing",
             "--lr", "1e-2", "--batch-size", "4", "--seed", str(seed), "--device", dev(device),
             *device_flags(device, "f32")],
            names=lambda name: "proj" in name)

    cpu = delta("cpu", 5)
    cuda = delta("cuda", 5)
    other = delta("cpu", 6)
    d, seed_d = change_gap(cuda, cpu), change_gap(other, cpu)
    text, kind = verdict(d, 1e-2)
    R.row("logprobs", "LoRA dropout 0.3 + --gradient-checkpointing, 3 steps: trained weight change CUDA f32 "
          "vs CPU f32, ‖difference‖ / ‖change‖ (tiny-llama, 7 projections)", f"{d:.2e}", "", "",
          f"{text}; another seed's masks: {seed_d:.2e}", kind)


def stage_logprobs(args, models) -> None:
    if not BUDGET.allows("logprobs"):
        BUDGET.skip("logprobs", "correctness rows", "logprobs")
        return
    work = args.work / "logprobs"
    work.mkdir(parents=True, exist_ok=True)
    guarded("logprobs", "log-probs", lambda: logprobs_policies(args.bin, work))
    guarded("logprobs", "reward scores", lambda: logprobs_rewards(args.bin, work))
    guarded("logprobs", "opt-gen greedy", lambda: logprobs_generation(args.bin, work))
    guarded("logprobs", "opt-gen sampled", lambda: logprobs_sampling(args.bin, work))
    guarded("logprobs", "training steps", lambda: logprobs_training(args.bin, work))
    guarded("logprobs", "LoRA dropout", lambda: logprobs_lora_dropout(args.bin, work))
    guarded("logprobs", "data parallel", lambda: logprobs_data_parallel(args.bin, work))


def nvidia_tool(name: str):
    """The path of one of NVIDIA's tools (compute-sanitizer, ncu): on PATH, else in a CUDA
    toolkit's or an Nsight package's usual folders."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in [f"/usr/local/cuda*/bin/{name}", f"/usr/local/cuda*/{name}/{name}", f"/opt/nvidia/*/{name}",
                    f"/opt/nvidia/**/{name}"]:
        hits = sorted(p for p in Path("/").glob(pattern.lstrip("/")) if p.is_file() and os.access(p, os.X_OK))
        if hits:
            return str(hits[-1])
    return None


def sanitized_row(tool: str, what: str, cmd, sanitizer, env=None, kernel=None, log=None) -> str:
    """`cmd` under `compute-sanitizer --tool {tool}`, watching only the kernels whose names hold
    `kernel` when given (one `--kernel-name` filter: whether the option may repeat differs between
    versions, so a run watches one stem): passes when it reports no error. The sanitizer's log goes
    to `log` (default: beside the command's `-o` output); returns its text ("" when none). In a dry
    run (no GPU, no sanitizer) the command runs bare, which checks the row's plumbing only."""
    if sanitizer is None:
        if GPU == "cuda":
            REPORT.row("sanitize", what, "", "", "", "n/a: compute-sanitizer not found", kind="skip")
            return ""
        run(cmd, unit="sanitize", env=env)
        REPORT.row("sanitize", what, "", "", "", "dry run: the command ran without compute-sanitizer")
        return ""
    log = log or Path(cmd[cmd.index("-o") + 1]).with_suffix(f".{tool}.log")
    log.unlink(missing_ok=True)  # a rerun must not read an earlier run's log
    # API errors that candle or cuBLAS handle themselves would read as kernel faults: off.
    full = [sanitizer, "--tool", tool, "--error-exitcode", "97", "--print-limit", "20",
            "--report-api-errors", "no", "--log-file", log,
            *(["--kernel-name", f"kns={kernel}"] if kernel else []), *cmd]
    start = time.monotonic()
    failure = capped = None
    try:
        run(full, unit="sanitize", env=env)
    except OutOfTime:
        raise
    except OverCap as e:
        # Instrumenting every module (candle's PTX, cuBLAS) can outlast the row's cap: slow, not
        # faulty, unless the log already holds an error.
        capped = e
    except RuntimeError as e:
        failure = e
    report = log.read_text(errors="replace") if log.exists() else ""
    if "Device not supported" in report:
        # compute-sanitizer refuses some virtualised GPUs (seen on gVisor machines): the
        # machine's limit, not a fault of the kernels.
        REPORT.row("sanitize", what, "", "", "", "n/a: compute-sanitizer does not support this machine's "
                   "GPU (\"Device not supported\")", kind="skip")
        return report
    count = sanitizer_errors(report)
    if capped is not None and not count and not re.search(r"^=+ (Invalid|Error|.*[Hh]azard|.*[Rr]ace )", report, re.M):
        REPORT.row("sanitize", what, "", "", "", f"skipped: {str(capped).split(':')[0]} under "
                   "compute-sanitizer, no error reported by then", kind="skip")
        return report
    if count is None:
        raise failure or RuntimeError(f"no error summary in {log}:\n{report[-2000:]}")
    if count or failure is not None:
        REPORT.detail(f"### compute-sanitizer {tool}: {what}\n\n```\n{report[-3000:]}\n```\n")
        why = "" if count else f": {str(failure).splitlines()[0][:120]}"
        if SANITIZER_INTERNAL_ERROR in report:
            why += f"; the sanitizer's own \"{SANITIZER_INTERNAL_ERROR}\", no hazard named"
        REPORT.row("sanitize", what, f"{count} errors", "", "", f"FAIL (log in measure.md){why}", kind="fail")
        return report
    REPORT.row("sanitize", what, "0 errors", "", "", f"pass ({time.monotonic() - start:.0f} s)")
    return report


def sanitizer_errors(report: str):
    """The error count of a compute-sanitizer log: memcheck ends with `ERROR SUMMARY: N errors`,
    racecheck with `RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)`; None when
    neither is there."""
    found = re.search(r"ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?",
                      report)
    return None if found is None else int(found.group(1) or found.group(2))


def stage_sanitize(args) -> None:
    if not BUDGET.allows("sanitize"):
        BUDGET.skip("sanitize", "compute-sanitizer rows", "sanitize")
        return
    sanitizer = nvidia_tool("compute-sanitizer") if GPU == "cuda" else None
    work = args.work / "sanitize"
    work.mkdir(parents=True, exist_ok=True)
    # tiny-qwen3 for generation: the kernels tiny-llama's passes take, and Qwen3's head norm.
    model = TESTDATA / "models" / "tiny-llama"
    prompts = gen_prompts(work)
    gen = [args.bin / "opt-gen", "--model", TESTDATA / "models" / "tiny-qwen3", prompts, "-o", work / "sampled.jsonl", "--n", "2",
           "--temperature", "1.0", "--top-p", "0.9", "--seed", "11", "--prompt-tokens-per-step", "7",
           "--max-new-tokens", "16", "--batch-size", "8", "--device", GPU, "--dtype", "bf16",
           *device_flags("cuda", "bf16"), *gen_flags("cuda")]
    pairs = work / "pairs.jsonl"
    reference_pairs("tiny-llama", pairs)
    train = [args.bin / "opt-wdpo", "--policy", model, pairs, "-o", work / "ckpt", "--lr", "1e-3",
             "--warmup-ratio", "0", "--schedule", "constant", "--batch-size", "4", "--max-steps", "2",
             "--device", GPU, "--dtype", "bf16", *device_flags("cuda", "bf16")]
    # Memcheck's opt-gen run cuts every decode step's spans in chunks (OPTUNE_ATTENTION=split:4:
    # the split and merging kernels, which these short spans would not otherwise take); both runs
    # take the tiled kernel for the prompt chunks, racecheck's the per-token one whole to decode.
    split = {"OPTUNE_ATTENTION": "split:4"}
    runs = [
        ("memcheck", "memcheck: opt-gen sampling bf16 (tiny-qwen3, --n 2, 7 prompt tokens per step, "
         "decode attention split in chunks)", gen, split, None),
        ("memcheck", "memcheck: opt-wdpo, 2 steps bf16 (tiny-llama, AdamW)", train, None, None),
    ]
    # Racecheck: once per kernel of ours with shared memory, over the run that launches it.
    try:
        stems = shared_memory_kernels()
    except RuntimeError as e:
        stems = {}
        REPORT.row("sanitize", "racecheck: opt-gen sampling bf16", "", "", "", f"FAILED: {e}", kind="fail")
    run_of = {"gen": ("opt-gen sampling bf16", gen), "train": ("opt-wdpo, 2 steps bf16", train)}
    runs += [("racecheck", f"racecheck: {run_of[which][0]}, {stem}_* kernels (shared-memory hazards)",
              run_of[which][1], None, stem) for stem, which in stems.items()]
    reports = []
    for tool, what, cmd, env, kernel in runs:
        if not BUDGET.allows("sanitize"):
            BUDGET.skip("sanitize", what, "sanitize")
            continue
        guarded("sanitize", what, lambda: reports.append(sanitized_row(tool, what, cmd, sanitizer, env, kernel)))
    # The first GPU run's racecheck rows ended in the sanitizer's own "Internal Sanitizer Error"
    # (a hardware exception it could not handle) with no hazard named. Two controls tell whether
    # that is the machine's or ours: the same run watching none of our kernels, and PyTorch's
    # softmax (shared-memory reductions) under racecheck.
    if any(SANITIZER_INTERNAL_ERROR in r for r in reports):
        controls = [
            ("racecheck control: the same opt-gen run, watching no kernel of ours", gen,
             "no_kernel_has_this_name", work / "control-none.racecheck.log"),
            ("racecheck control: PyTorch's softmax over 2^20 values (not our binaries)",
             [sys.executable, "-c", "import torch; x = torch.randn(1 << 20, device='cuda'); "
              "print(float(x.softmax(0).sum()))"], None, work / "control-torch.racecheck.log"),
        ]
        for what, cmd, kernel, log in controls:
            guarded("sanitize", what, lambda: sanitized_row("racecheck", what, cmd, sanitizer, None, kernel, log))


# What compute-sanitizer writes when it fails itself rather than finding an error in the program.
SANITIZER_INTERNAL_ERROR = "Internal Sanitizer Error"


# The name stems of our CUDA kernels that use shared memory: what racecheck watches.
SHARED_MEMORY_KERNELS = {"cached_attention": "gen", "sample_rows": "gen", "add_rms_norm": "gen",
                         "rms_norm_backward": "train"}


def shared_memory_kernels() -> dict:
    """SHARED_MEMORY_KERNELS (stem: the run that launches it), checked against the sources: each
    stem names a kernel there, and each source with shared memory holds one. Memcheck watches every
    kernel; racecheck only ours, since a hazard it reports in candle's or cuBLAS's kernels is not
    ours to mend, and instrumenting them all is slow."""
    sources = {p.name: p.read_text() for p in sorted((REPO / "crates/optune-kernels/src/cuda").glob("*.cu"))}
    named = " ".join(sources.values())
    missing = [stem for stem in SHARED_MEMORY_KERNELS if not re.search(rf"\b{stem}_", named)]
    unwatched = [name for name, text in sources.items()
                 if "__shared__" in text and not any(stem in text for stem in SHARED_MEMORY_KERNELS)]
    if missing or unwatched:
        raise RuntimeError(f"SHARED_MEMORY_KERNELS is out of date: no kernel named {missing}; "
                           f"shared memory in {unwatched}")
    return SHARED_MEMORY_KERNELS


# ---------------------------------------------------------------------------------------------
# the random llamas: built once under --work; the peer's bf16 copy stays on the device
# ---------------------------------------------------------------------------------------------

class Models:
    def __init__(self, args):
        self.args = args
        self.loaded = None  # (role, model): the peer's bf16 model of one role at a time

    def key(self, role: str) -> str:
        return (DRY_MODEL_OF if self.args.dry_run else MODEL_OF)[role]

    def label(self, role: str) -> str:
        return SHAPES[self.key(role)]["label"]

    def path(self, role: str) -> Path:
        return self.args.work / f"random-{self.key(role)}"

    def ready(self, role: str) -> bool:
        return (self.path(role) / "config.json").exists()

    def build(self, role: str) -> None:
        """Random weights initialised on the device in bf16 (milliseconds on a GPU, so no
        init-skipping: uninitialised memory could hold NaNs), written once as safetensors. Not kept:
        optune's training runs get the device to themselves, and the peer loads it after."""
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        self.release()
        path = self.path(role)
        shape = {k: v for k, v in SHAPES[self.key(role)].items() if k != "label"}
        torch.manual_seed(0)
        config = LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                             pad_token_id=3, **shape)
        start = time.perf_counter()
        with torch.device(GPU):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        sync()
        init_s = time.perf_counter() - start
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(tmp)
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(TESTDATA / "models/tiny-llama" / name, tmp / name)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        total_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        del model
        free_torch_memory()
        REPORT.row(f"build {role}", f"{self.label(role)}: init on the {GPU} in bf16 + safetensors written "
                   f"({size / 1e9:.2f} GB)", "", "", "", f"{total_s:.1f} s (init {init_s:.1f} s)")
        REPORT.raw.setdefault("build", {})[role] = {"seconds": total_s, "init_s": init_s, "bytes": size}

    def peer(self, role: str):
        """The bf16 model on the device (transformers, sdpa attention), frozen."""
        import torch
        from transformers import AutoModelForCausalLM

        if self.loaded and self.loaded[0] == role:
            return self.loaded[1]
        self.release()
        model = AutoModelForCausalLM.from_pretrained(self.path(role), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").to(GPU)
        model.requires_grad_(False).eval()
        self.loaded = (role, model)
        return model

    def release(self) -> None:
        self.loaded = None
        free_torch_memory()


def ensure_model(models: Models, role: str) -> bool:
    """Builds the role's model unless --work holds it; False when the budget or the build says no."""
    if models.ready(role):
        return True
    if not BUDGET.allows(f"build:{role}"):
        BUDGET.skip(f"build {role}", models.label(role), f"build:{role}")
        return False
    guarded(f"build {role}", models.label(role), lambda: models.build(role))
    return models.ready(role)


def stage_may_start(models: Models, role: str, unit: str, stage: str, what: str) -> bool:
    """Whether a stage on the role's model may start: the model there (built if need be) and the
    stage's first unit of work within the budget (else a skipped row for `what`)."""
    if not ensure_model(models, role):
        return False
    if not BUDGET.allows(unit):
        BUDGET.skip(stage, what, unit)
        return False
    return True


def tokenizer_for(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_ids(tok, messages) -> list:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def make_train_pairs(tok, n_pairs: int, tokens: int, path: Path):
    """Pairs of ~`tokens` response tokens each; returns the (prompt ids, response ids + EOS) of every side."""
    words = " ".join(PROMPTS).split()

    def text_of(offset: int) -> str:
        out, i = [], offset
        while len(tok(" ".join(out), add_special_tokens=False)["input_ids"]) < tokens:
            out.append(words[i % len(words)])
            i += 1
        return " ".join(out)

    rows, sides = [], []
    for k in range(n_pairs):
        messages = [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}]
        chosen, rejected = text_of(3 * k), text_of(3 * k + 7)
        rows.append({"messages": messages, "chosen": chosen, "rejected": rejected})
        prompt = chat_ids(tok, messages)
        for resp in (chosen, rejected):
            sides.append((prompt, tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    write_jsonl(path, rows)
    return sides


def scratch_dir(work: Path, name: str, need_bytes: float) -> Path:
    """Where a large output that is deleted unread goes: memory (/dev/shm) when it has room, so
    that writing a 7B checkpoint costs seconds of the budget instead of tens; else `work`."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * need_bytes:
            return shm / f"optune-measure-{os.getpid()}-{name}"
    except OSError:
        pass
    return work / name


def wdpo_train_cmd(args, model_dir: Path, pairs: Path, n_pairs: int, ckpt: Path, metrics: Path, lora: bool,
                   steps: int) -> list:
    """The opt-wdpo command of the training rows: bf16 DPO steps of `n_pairs` pairs on the GPU."""
    cmd = [args.bin / "opt-wdpo", "--policy", model_dir, pairs, "-o", ckpt,
           "--lr", "1e-5" if lora else "1e-6", "--warmup-ratio", "0", "--schedule", "constant",
           "--batch-size", str(n_pairs), "--max-steps", str(steps),
           "--max-length", str(4 * args.train_tokens), "--metrics", metrics,
           "--device", GPU, "--dtype", "bf16", *device_flags("cuda", "bf16")]
    if lora:
        cmd += ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank),
                "--lora-targets", ",".join(LORA_TARGETS)]
    return cmd


def optune_train(args, model_dir: Path, pairs: Path, n_pairs: int, work: Path, lora: bool, unit: str) -> dict:
    metrics = work / "metrics.csv"
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    ckpt = scratch_dir(work, "ckpt", weights)
    cmd = wdpo_train_cmd(args, model_dir, pairs, n_pairs, ckpt, metrics, lora, args.train_steps)
    start = time.perf_counter()
    try:
        stderr, peak, how = run(cmd, watch_gpu=True, unit=unit)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # a merged 7B is 13.5 GB
    s = summary(stderr, "opt-wdpo")
    with open(metrics) as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    steps = int(s["steps"])
    if steps != args.train_steps or len(seconds) != steps:
        raise RuntimeError(f"opt-wdpo ran {steps} steps ({len(seconds)} in its metrics), not {args.train_steps}")
    planned = re.search(r"^opt-wdpo: memory estimate ([0-9.]+) GB", stderr, re.M)
    return {"step_s": seconds, "tokens_per_step": int(s["tokens"]) // steps, "peak_gib": peak, "peak_how": how,
            "planned_gib": float(planned.group(1)) * 1e9 / 2**30 if planned else None,
            "kernels": s.get("kernels", "?"), "peak_rss_mb": s.get("peak_rss_mb"), "wall_s": wall}


def lora_linear(base, rank: int, alpha: float):
    """y = base(x) + (alpha / r) * B(A(x)), A and B in f32 with B zero at the start (peft's layout):
    the peer's LoRA where peft is not importable."""
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            out_features, in_features = base.weight.shape
            device = base.weight.device
            self.lora_a = torch.nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
            torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    return LoraLinear()


def peft_module():
    """peft when it imports, else None (not only on ImportError: a version clash may raise anything)."""
    try:
        import peft
    except Exception:  # noqa: BLE001
        return None
    return peft


def attach_lora(model, rank: int, use_peft: bool):
    """Adapters on q,k,v,o of a frozen bf16 model, through peft or this script's module; returns
    (model to train, undo, what was used)."""
    if use_peft:
        peft = peft_module()
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        wrapped = peft.get_peft_model(model, config)  # adapters in f32 (autocast_adapter_dtype)
        return wrapped, wrapped.unload, f"peft {peft.__version__}"
    replaced = []
    for layer in model.model.layers:
        for name in LORA_TARGETS:
            base = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, lora_linear(base, rank, 2 * rank))
            replaced.append((layer.self_attn, name, base))

    def undo():
        for parent, name, base in replaced:
            setattr(parent, name, base)
        return model

    return model, undo, "LoRA module of this script"


def peer_dpo_steps(model, sides, steps: int, lr: float) -> dict:
    """A plain PyTorch DPO step: sigmoid loss (beta 0.1), bf16 autocast, AdamW (fused on a GPU) on
    the parameters that require grad, clip 1.0; reference log-probs computed before the steps."""
    import torch
    import torch.nn.functional as F

    width = max(len(p) + len(r) for p, r in sides)
    pad = 3
    ids = torch.full((len(sides), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sides), width), dtype=torch.long)
    labels_mask = torch.zeros((len(sides), width), dtype=torch.bool)
    for i, (p, r) in enumerate(sides):
        seq = p + r
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels_mask[i, len(p):len(seq)] = True
    ids, mask, labels_mask = ids.to(GPU), mask.to(GPU), labels_mask.to(GPU)

    def logps():
        with torch.autocast(GPU, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        lp = (lp * labels_mask[:, 1:]).sum(-1)
        return lp[0::2], lp[1::2]

    with torch.no_grad():
        ref_c, ref_r = logps()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, fused=(GPU == "cuda"))
    model.train()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        c, r = logps()
        loss = -F.logsigmoid(0.1 * ((c - ref_c) - (r - ref_r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    model.eval()
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"peer DPO loss not finite: {loss.item()}")
    return {"step_s": times, "tokens_per_step": int(mask.sum()),
            "trainable": sum(p.numel() for p in trainable), "dtype": str(trainable[0].dtype).removeprefix("torch.")}


def peer_peak() -> dict:
    """The peer's peak as nvidia-smi shows optune's: torch's peak reserved memory (its caching
    allocator's high-water mark, as optune's pool keeps what it reserved) plus what the process
    holds outside torch's allocator (CUDA context, library workspaces: its nvidia-smi figure now
    less torch's reservation now); with torch's peak allocated beside it."""
    import torch

    if GPU != "cuda":
        return {"peak_gib": None, "peak_how": "n/a: no GPU", "allocated_gib": None}
    reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    try:
        apps = GpuMemoryPeak.smi("--query-compute-apps=pid,used_memory")
    except (OSError, subprocess.SubprocessError):
        apps = []
    own = next((row[1] for row in apps if len(row) == 2 and row[0] == os.getpid()), None)
    if own is None:
        how = "torch max reserved; no context (nvidia-smi lists no process)"
        outside = 0
    else:
        how = "torch max reserved + the process's memory outside torch (context incl.)"
        outside = max(own * 2**20 - torch.cuda.memory_reserved(), 0)
    return {"peak_gib": (reserved + outside) / 2**30, "peak_how": how, "allocated_gib": allocated / 2**30}


def reset_peak() -> None:
    import torch

    free_torch_memory()
    if GPU == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peer_lora(args, models: Models, role: str, sides) -> dict:
    """The peer's LoRA steps: through peft when --peer-lora allows it and peft imports, else this
    script's LoRA module; with `auto`, a peft that fails in any way (an API that moved, an error
    inside its step) is replaced by the script's module for a second try, and the row says why."""
    model = models.peer(role)
    importable = peft_module() is not None
    if args.peer_lora == "peft" and not importable:
        raise RuntimeError("--peer-lora peft: peft is not importable")
    tries = [True, False] if args.peer_lora == "auto" and importable else [args.peer_lora == "peft"]
    why = " (peft not importable)" if args.peer_lora == "auto" and not importable else ""
    for use_peft in tries:
        reset_peak()
        undo = None
        try:
            wrapped, undo, used = attach_lora(model, args.lora_rank, use_peft)
            out = peer_dpo_steps(wrapped, sides, args.train_steps, 1e-5)
            break
        except Exception as e:  # noqa: BLE001  (any failure of peft: the script's module next)
            if not use_peft or len(tries) == 1:
                raise
            first = first_line(e)
            note(f"the peer's LoRA through peft failed; once more with this script's module:\n{e}")
            why = f" (peft failed: {first[:80]})"
            # peft may have put adapters in before it failed: the second try, and the later
            # stages that hold this model, get it afresh from the checkpoint.
            undo = None
            models.release()
            model = models.peer(role)
        finally:
            if undo is not None:
                undo()
    out.update(peer_peak(), used=used + why)
    return out


def peer_full(args, models: Models, role: str, sides) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    reset_peak()
    model = AutoModelForCausalLM.from_pretrained(models.path(role), dtype=torch.float32,
                                                 attn_implementation="sdpa").to(GPU)
    out = peer_dpo_steps(model, sides, args.train_steps, 1e-6)
    out.update(peer_peak(), used="transformers model in f32")
    del model
    free_torch_memory()
    return out


def train_row(args, models: Models, role: str, kind: str, pairs: Path, sides) -> None:
    stage = f"train {role} {'LoRA' if kind == 'lora' else 'full'}"
    unit = f"{kind}:{role}"
    work = args.work / "train" / f"{role}-{kind}"
    work.mkdir(parents=True, exist_ok=True)
    models.release()  # the whole device for opt-wdpo, whose memory plan reads what is free
    ours = optune_train(args, models.path(role), pairs, len(sides) // 2, work, lora=(kind == "lora"), unit=unit)
    theirs, peer_note, kind_of_row = peer_side(stage, unit, lambda: (peer_lora if kind == "lora" else peer_full)(
        args, models, role, sides))
    theirs = theirs or {}
    o = statistics.median(ours["step_s"][1:] or ours["step_s"])
    t = statistics.median(theirs["step_s"][1:] or theirs["step_s"]) if theirs else None
    ot = ours["tokens_per_step"] / o
    tt = theirs["tokens_per_step"] / t if theirs else None
    what = (f"LoRA r{args.lora_rank} on {','.join(p[0] for p in LORA_TARGETS)}" if kind == "lora"
            else "full fine-tuning")
    REPORT.row(stage, f"s/step, {what}, {len(sides) // 2} pairs x ~{args.train_tokens} response tokens "
               f"(median of steps 2..{args.train_steps})", f"{o:.3f}", fmt(t, ".3f"), ratio(o, t),
               (f"peer: {theirs['used']}, {theirs['trainable']:,} trainable in {theirs['dtype']}; " if theirs
                else f"{peer_note}; ") + f"optune kernels={ours['kernels']}", kind=kind_of_row)
    REPORT.row(stage, "tokens/s (prompt + response, both sides)", f"{ot:,.0f}", fmt(tt, ",.0f"), ratio(ot, tt),
               f"tokens/step: optune {ours['tokens_per_step']}, peer {theirs.get('tokens_per_step', 'n/a')}",
               kind=kind_of_row)
    REPORT.row(stage, "peak GPU memory, GiB", fmt(ours["peak_gib"], ".1f"), fmt(theirs.get("peak_gib"), ".1f"),
               ratio(ours["peak_gib"], theirs.get("peak_gib")),
               f"optune: {ours['peak_how']}, its own plan {fmt(ours['planned_gib'], '.1f')} GiB; "
               + (f"peer: {theirs['peak_how']}, torch max allocated {fmt(theirs['allocated_gib'], '.1f')} GiB"
                  if theirs else peer_note), kind=kind_of_row)
    REPORT.raw.setdefault("train", []).append({"role": role, "kind": kind, "optune": ours, "peer": theirs or peer_note})


def train_pairs(args, role: str) -> int:
    """Pairs per step (one micro-batch) of the role's training rows."""
    return args.train_pairs if role == "1b" else args.train_pairs_7b


def stage_train(args, models: Models, role: str, kinds) -> None:
    if not ensure_model(models, role):
        return
    model_dir = models.path(role)
    tok = tokenizer_for(model_dir)
    pairs = args.work / "train" / f"pairs-{role}.jsonl"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    n_pairs = train_pairs(args, role)
    sides = make_train_pairs(tok, n_pairs, args.train_tokens, pairs)
    for kind in kinds:
        stage = f"train {role} {'LoRA' if kind == 'lora' else 'full'}"
        if not BUDGET.allows(f"{kind}:{role}"):
            BUDGET.skip(stage, "DPO step rows", f"{kind}:{role}")
            continue
        guarded(stage, "DPO step", lambda: train_row(args, models, role, kind, pairs, sides))


# ---------------------------------------------------------------------------------------------
# kernels: where a training step's GPU time goes
# ---------------------------------------------------------------------------------------------

def kernel_times(ncu, cmd, report: Path, unit: str) -> dict:
    """{kernel name: [launches, ns]} of every kernel `cmd` runs, from Nsight Compute collecting
    only each kernel's duration (one pass: no replay, no cache flush, the clocks as they are)."""
    report.unlink(missing_ok=True)
    run([ncu, "--clock-control", "none", "--cache-control", "none", "--metrics", "gpu__time_duration.sum",
         "--export", report, "--force-overwrite", *cmd], unit=unit)
    table = subprocess.run([ncu, "--import", report, "--csv", "--page", "raw", "--print-units", "base",
                            "--metrics", "gpu__time_duration.sum"], capture_output=True, text=True)
    if table.returncode != 0:
        raise RuntimeError(f"ncu --import {report} failed ({table.returncode}):\n{table.stderr[-2000:]}")
    return parse_kernel_table(table.stdout)


def parse_kernel_table(text: str) -> dict:
    """ncu's raw page as CSV: a header row (from `"ID"`), a units row, then a row per launch."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise RuntimeError(f"no kernel table in ncu's output:\n{text[-2000:]}")
    times = {}
    for launch in csv.DictReader(lines[start:]):
        if not launch["ID"].strip().isdigit():
            continue
        entry = times.setdefault(short_kernel_name(launch["Kernel Name"]), [0, 0.0])
        entry[0] += 1
        entry[1] += float(launch["gpu__time_duration.sum"].replace(",", ""))
    return times


def short_kernel_name(name: str) -> str:
    """A kernel's name without its parameter list and return type (template arguments kept: a
    CUTLASS kernel's tile shape is in them)."""
    return name.split("(", 1)[0].removeprefix("void ").strip()[:110]


def is_matrix_product(kernel: str) -> bool:
    """cuBLAS's and CUTLASS's matrix-product kernels, by their names (cuBLAS 13 names its Hopper
    kernels `nvjet_sm90_*`)."""
    return any(k in kernel.lower() for k in ("gemm", "xmma", "cutlass", "cublas", "gemv", "nvjet"))


def stage_kernels(args, models: Models, role: str) -> None:
    """Each kind's opt-wdpo step of train-1b taken apart: the GPU time of every kernel in one
    step (the kernels of a two-step run less those of a one-step run, both under Nsight Compute,
    with reference log-probs computed beforehand so that the runs differ by the step alone),
    against the step's wall time in a run without the profiler. Their gap is time the GPU waits
    on the host (launches, allocations, synchronisations)."""
    if not ensure_model(models, role):
        return
    ncu = nvidia_tool("ncu") if GPU == "cuda" else None
    if GPU == "cuda" and ncu is None:
        REPORT.row(f"kernels {role}", "kernel times", "", "", "", "n/a: ncu (Nsight Compute) not found", kind="skip")
        return
    model_dir = models.path(role)
    work = args.work / "kernels" / role
    work.mkdir(parents=True, exist_ok=True)
    n_pairs = train_pairs(args, role)
    sides = make_train_pairs(tokenizer_for(model_dir), n_pairs, args.train_tokens, work / "pairs-raw.jsonl")
    pairs = work / "pairs.parquet"
    models.release()
    run([args.bin / "opt-wdpo", "--policy", model_dir, work / "pairs-raw.jsonl", "--reference-only", "-o", pairs,
         "--batch-size", str(n_pairs), "--max-length", str(4 * args.train_tokens), "--device", GPU,
         "--dtype", "bf16", *device_flags("cuda", "bf16")], unit=f"build:{role}")
    for kind in ("lora", "full"):
        stage = f"kernels {role} {'LoRA' if kind == 'lora' else 'full'}"
        if not BUDGET.allows(f"kernels:{role}"):
            BUDGET.skip(stage, "kernel times", f"kernels:{role}")
            continue
        guarded(stage, "kernel times", lambda: kernels_row(args, ncu, model_dir, pairs, len(sides) // 2, work / kind,
                                                            kind, stage, f"kernels:{role}"))
    stage = f"kernels {role} prefill"
    if not BUDGET.allows(f"prefill-kernels:{role}"):
        BUDGET.skip(stage, "kernel times", f"prefill-kernels:{role}")
        return
    guarded(stage, "kernel times", lambda: prefill_kernels_row(args, ncu, models, role, work / "prefill", stage))


def prefill_kernels_row(args, ncu, models: Models, role: str, work: Path, stage: str) -> None:
    """The prefill row's opt-gen run (one ~1,900-token prompt, one new token) under ncu: its
    kernels by GPU time, the weights' casts at load included (few, and named `cast_*`), against
    its gen_s without the profiler."""
    cmd, target, _ = long_prompt_run(args, models, role, work)
    unit = f"prefill-kernels:{role}"
    stderr, _, _ = run(cmd, unit=unit)
    gen_s = float(summary(stderr, "opt-gen")["gen_s"])
    if ncu is None:  # a dry run: the command's plumbing only
        REPORT.row(stage, "GPU time of the prefill", "", "", "", f"dry run: the command ran without ncu; "
                   f"gen_s {gen_s:.3f}")
        return
    kernels = kernel_times(ncu, cmd, work / "prefill.ncu-rep", unit)
    report_kernels(stage, f"the {target}-token prefill's kernels (the whole run under ncu)", kernels, gen_s,
                   "gen_s without ncu")


def kernels_row(args, ncu, model_dir: Path, pairs: Path, n_pairs: int, work: Path, kind: str, stage: str,
                unit: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    bare = optune_train(args, model_dir, pairs, n_pairs, work, lora=(kind == "lora"), unit=unit)
    wall_s = statistics.median(bare["step_s"][1:] or bare["step_s"])

    def profiled(steps: int) -> dict:
        cmd = wdpo_train_cmd(args, model_dir, pairs, n_pairs, work / f"ckpt-{steps}", work / f"metrics-{steps}.csv",
                             kind == "lora", steps)
        if ncu is None:  # a dry run: the command's plumbing only
            run(cmd, unit=unit)
            return {}
        return kernel_times(ncu, cmd, work / f"steps-{steps}.ncu-rep", unit)

    one, two = profiled(1), profiled(2)
    step = {name: [launches - one.get(name, [0, 0.0])[0], ns - one.get(name, [0, 0.0])[1]]
            for name, (launches, ns) in two.items()}
    step = {name: v for name, v in step.items() if v[0] > 0}
    if ncu is None:
        REPORT.row(stage, "GPU time per step", "", "", "", f"dry run: the commands ran without ncu; "
                   f"wall {wall_s:.3f} s/step")
        return
    report_kernels(stage, "one step's kernels (step 2 under ncu)", step, wall_s, "wall without ncu")


def report_kernels(stage: str, what: str, kernels: dict, wall_s: float, wall_what: str) -> None:
    """A row of `kernels`' total GPU time, launches and matrix products' share against `wall_s`,
    and their 25 longest in measure.md."""
    total_ns = sum(ns for _, ns in kernels.values())
    launches = sum(n for n, _ in kernels.values())
    products = sum(ns for name, (_, ns) in kernels.items() if is_matrix_product(name))
    REPORT.raw.setdefault("kernels", []).append({"stage": stage, "wall_s": wall_s, "kernels": kernels})
    busy = total_ns / 1e9 / wall_s
    REPORT.row(stage, f"GPU time in {what}, ms", f"{total_ns / 1e6:.1f}", "", "",
               f"{launches:,} launches; matrix products {products / 1e6:.1f} ms ({products / max(total_ns, 1):.0%}); "
               f"{wall_what} {wall_s * 1e3:.1f} ms: the GPU busy {busy:.0%} of it")
    lines = [f"### {stage}: {what} by GPU time ({wall_what} {wall_s * 1e3:.1f} ms)", "",
             "| kernel | launches | ms | share |", "|---|---:|---:|---:|"]
    for name, (n, ns) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]:
        lines.append(f"| `{name}` | {n} | {ns / 1e6:.2f} | {ns / max(total_ns, 1):.1%} |")
    REPORT.detail("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

def checkpoint_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def decode_weight_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor of the checkpoint once (from its
    safetensors headers), except the input embedding table (only the batch's rows are
    gathered) unless the output head is tied to it."""
    sizes = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes.update({name: t["data_offsets"][1] - t["data_offsets"][0]
                      for name, t in header.items() if name != "__metadata__"})
    total = sum(sizes.values())
    if not checkpoint_config(path).get("tie_word_embeddings", False):
        total -= sizes["model.embed_tokens.weight"]
    return total


def gen_command(args, models: Models, role: str, batch: int):
    """The opt-gen command of a batch row and its count of sequences (its prompts file written)."""
    work = args.work / "gen" / role
    count = args.prompts_batch1 if batch == 1 else batch
    prompts_file = work / f"prompts-{count}.jsonl"
    write_jsonl(prompts_file, [{"prompt_id": f"b{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(count)])
    cmd = [args.bin / "opt-gen", "--model", models.path(role), prompts_file, "-o", work / "out.jsonl", "--n", "1",
           "--temperature", "0", "--ignore-eos", "--max-new-tokens", str(args.new_tokens),
           "--batch-size", str(batch), "--device", GPU, "--dtype", "bf16", *device_flags("cuda", "bf16"),
           *gen_flags("cuda")]
    return cmd, count


def generated_tok_per_s(args, stderr: str, count: int) -> float:
    """opt-gen's tokens/s from its summary line, after checking it made every token asked for."""
    s = summary(stderr, "opt-gen")
    if int(s["new_tokens"]) != count * args.new_tokens:
        raise RuntimeError(f"opt-gen made {s['new_tokens']} tokens, not {count} x {args.new_tokens}")
    return float(s["tok_per_s"])


def gen_row(args, models: Models, role: str, batch: int, ids_all, bytes_per_step: int) -> None:
    import torch

    cmd, count = gen_command(args, models, role, batch)
    ids = [ids_all[i % len(PROMPTS)] for i in range(count)]
    pad = 3

    def peer_generate(batch_ids) -> float:
        width = max(len(x) for x in batch_ids)
        x = torch.tensor([[pad] * (width - len(s)) + s for s in batch_ids], device=GPU)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch_ids], device=GPU)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = models.peer(role).generate(input_ids=x, attention_mask=mask, do_sample=False,
                                             max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, pad_token_id=pad)
        sync()
        assert out.shape[1] - width == args.new_tokens, out.shape
        return time.perf_counter() - start

    ours, peaks, preemptions = [], [], []
    for _ in range(args.repeats):
        free_torch_memory()
        stderr, peak, how = run(cmd, watch_gpu=True, unit=f"gen:{role}")
        ours.append(generated_tok_per_s(args, stderr, count))
        peaks.append(peak)
        preemptions.append(int(summary(stderr, "opt-gen")["preemptions"]))

    def peer_runs():
        return [count * args.new_tokens / sum(peer_generate(ids[i:i + batch]) for i in range(0, count, batch))
                for _ in range(args.repeats)]

    theirs, peer_note, kind = peer_side(f"gen {role}", f"gen:{role}", peer_runs)
    o, t = statistics.median(ours), statistics.median(theirs) if theirs else None
    bw = REPORT.raw.get("copy_bytes_per_s")

    def roof(tok_s):
        return None if bw is None or tok_s is None else bytes_per_step * tok_s / batch / bw * 100

    goals = ""
    if role == "7b" and batch == 64 and t is not None:
        goals = f"; goal ≥ 3x transformers: {'met' if o >= 3 * t else 'not met'}"
    if role == "7b" and batch == 1 and bw is not None:
        goals = f"; goal ≥ 50 % of the roof: {'met' if roof(o) >= 50 else 'not met'}"
    REPORT.row(f"gen {role}", f"tok/s at batch {batch} (sequences: {count}, new tokens each: {args.new_tokens}"
               f"{', median of ' + str(args.repeats) + ' runs' if args.repeats > 1 else ''})",
               f"{o:,.1f}", fmt(t, ",.1f"), ratio(o, t),
               f"roof: optune {fmt(roof(o), '.1f')} %, peer {fmt(roof(t), '.1f')} %; optune peak GiB "
               f"{fmt(max((p for p in peaks if p is not None), default=None), '.1f')} ({how}); "
               f"KV cache preemptions {max(preemptions)}{goals}"
               + also(peer_note), kind=kind)
    REPORT.raw.setdefault("gen", []).append({"role": role, "batch": batch, "prompts": count, "optune": ours,
                                             "transformers": theirs or peer_note, "optune_peak_gib": peaks,
                                             "optune_preemptions": preemptions,
                                             "weight_bytes_per_step": bytes_per_step})


def ungrouped_row(args, models: Models, role: str, batch: int) -> None:
    """A GQA model's batch row once more with one query head to a block (OPTUNE_ATTENTION=whole:
    each head reads its KV head's keys and values itself, as before 2026-12-01; the prompts are
    short, so the prefill's tiles, also off, weigh little): what sharing them across a block is
    worth, against the row's own median."""
    cmd, count = gen_command(args, models, role, batch)
    free_torch_memory()
    stderr, _, _ = run(cmd, unit=f"gen:{role}", env={"OPTUNE_ATTENTION": "whole"})
    ungrouped = generated_tok_per_s(args, stderr, count)
    grouped = [g for g in REPORT.raw.get("gen", []) if g["role"] == role and g["batch"] == batch]
    o = statistics.median(grouped[0]["optune"]) if grouped else None
    REPORT.row(f"gen {role}", f"tok/s at batch {batch}, one query head to a block (OPTUNE_ATTENTION=whole, one run)",
               f"{ungrouped:,.1f}", "", "",
               f"grouped/ungrouped {ratio(o, ungrouped)} (the batch row's median over this; above 1 "
               "favours the groups)")
    REPORT.raw.setdefault("gen_ungrouped", []).append({"role": role, "batch": batch, "optune_tok_per_s": ungrouped})


def stage_gen(args, models: Models, role: str) -> None:
    if not stage_may_start(models, role, f"warmup:{role}", f"gen {role}", "generation rows"):
        return
    work = args.work / "gen" / role
    work.mkdir(parents=True, exist_ok=True)
    state = {}

    def warm_up():
        # The driver's PTX cache, the file cache, cuBLAS handles: one short run on each side.
        # The peer's half is its own: a peer that cannot load fails its rows' peer cells, not
        # optune's figures.
        import torch

        tok = tokenizer_for(models.path(role))
        state["ids"] = [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
        state["bytes"] = decode_weight_bytes(models.path(role))
        prompts = work / "warm-up.jsonl"
        write_jsonl(prompts, [{"prompt_id": f"w{i:02d}", "prompt": p} for i, p in enumerate(PROMPTS)])
        run([args.bin / "opt-gen", "--model", models.path(role), prompts, "-o", work / "out.jsonl", "--n", "1",
             "--temperature", "0", "--ignore-eos", "--max-new-tokens", "8", "--batch-size", "16",
             "--device", GPU, "--dtype", "bf16", *device_flags("cuda", "bf16")], unit=f"warmup:{role}")
        REPORT.raw.setdefault("weight_bytes_per_step", {})[role] = state["bytes"]

        def peer_warm_up():
            with torch.inference_mode():
                x = torch.tensor([state["ids"][0]], device=GPU)
                models.peer(role).generate(input_ids=x, do_sample=False, max_new_tokens=8, pad_token_id=3)

        _, peer_note, _ = peer_side(f"gen {role}", f"warmup:{role}", peer_warm_up)
        if peer_note:
            REPORT.detail(f"gen {role} warm-up: {peer_note}")

    guarded(f"gen {role}", "warm-up", warm_up)
    if "bytes" not in state:
        return
    for batch in args.batches:
        if not BUDGET.allows(f"gen:{role}"):
            BUDGET.skip(f"gen {role}", f"tok/s at batch {batch}", f"gen:{role}")
            continue
        guarded(f"gen {role}", f"tok/s at batch {batch}",
                lambda: gen_row(args, models, role, batch, state["ids"], state["bytes"]))
    # A GQA model's largest batch with one query head to a block, as a row of its own.
    config = checkpoint_config(models.path(role))
    if config["num_key_value_heads"] < config["num_attention_heads"]:
        batch = max(args.batches)
        if BUDGET.allows(f"gen:{role}"):
            guarded(f"gen {role}", f"tok/s at batch {batch}, one query head to a block",
                    lambda: ungrouped_row(args, models, role, batch))
        else:
            BUDGET.skip(f"gen {role}", f"tok/s at batch {batch}, one query head to a block", f"gen:{role}")
    if BUDGET.allows(f"prefill:{role}"):
        guarded(f"gen {role}", "prefill of a long prompt", lambda: prefill_row(args, models, role))
    else:
        BUDGET.skip(f"gen {role}", "prefill of a long prompt", f"prefill:{role}")


def long_prompt_run(args, models: Models, role: str, work: Path):
    """The opt-gen command of one long prompt (~1,900 tokens, its tail kept) and one new token,
    greedy, in bf16 on the GPU; with the prompt's length and its token ids."""
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(models.path(role))
    positions = checkpoint_config(models.path(role))["max_position_embeddings"]
    target = min(1900, positions - 8 - (1 + LONG_DECODE))
    text = " ".join(PROMPTS)
    while len(chat_ids(tok, [{"role": "user", "content": text}])) < target:
        text = text + " " + " ".join(PROMPTS)
    ids = chat_ids(tok, [{"role": "user", "content": text}])[-target:]
    prompts_file = work / "long-prompt.jsonl"
    write_jsonl(prompts_file, [{"prompt_id": "long", "prompt": text}])
    cmd = [args.bin / "opt-gen", "--model", models.path(role), prompts_file, "-o", work / "long.jsonl", "--n", "1",
           "--temperature", "0", "--ignore-eos", "--max-new-tokens", "1", "--batch-size", "1",
           "--max-prompt-tokens", str(target), "--truncate", "left", "--device", GPU, "--dtype", "bf16",
           *device_flags("cuda", "bf16")]
    return cmd, target, ids


def prefill_row(args, models: Models, role: str) -> None:
    """One long prompt, one new token: the prefill alone. opt-gen attends the prompt's tokens over
    their slot through the tiled cache kernel (tiles of 16 tokens sharing each key they load, on
    CUDA cores), where transformers runs sdpa over the whole prompt; this row says what that
    costs on long prompts. Then a second row: the decode steps after that prompt, per token."""
    import torch

    cmd, target, ids = long_prompt_run(args, models, role, args.work / "gen" / role)
    unit = f"prefill:{role}"
    ours = []
    for _ in range(max(2, args.repeats)):
        free_torch_memory()
        stderr, _, _ = run(cmd, unit=unit)
        ours.append(float(summary(stderr, "opt-gen")["gen_s"]))
    o = min(ours)
    # The same prefill through the per-token kernel (OPTUNE_ATTENTION=whole: each prompt token
    # reads its keys itself, as before the tiled kernel): what the tiles are worth here.
    whole = {"OPTUNE_ATTENTION": "whole"}
    stderr, _, _ = run(cmd, unit=unit, env=whole)
    o_whole = float(summary(stderr, "opt-gen")["gen_s"])
    x = torch.tensor([ids], device=GPU)

    def peer_prefill():
        peer = models.peer(role)
        with torch.inference_mode():
            peer(input_ids=x[:, :16])
        times = []
        for _ in range(len(ours)):
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                peer(input_ids=x)
            sync()
            times.append(time.perf_counter() - start)
        return times

    theirs, peer_note, kind = peer_side(f"gen {role}", unit, peer_prefill)
    t = min(theirs) if theirs else None
    REPORT.row(f"gen {role}", f"prefill of one {target}-token prompt + 1 new token, seconds (best of {len(ours)})",
               f"{o:.3f}", fmt(t, ".3f"), ratio(o, t),
               f"per-token attention instead of tiles (OPTUNE_ATTENTION=whole, one run): {o_whole:.3f} s, "
               f"tiled/per-token {ratio(o, o_whole)}; "
               "optune: opt-gen's gen_s (prefill, one decode step, sampling); peer: one transformers forward "
               "(bf16, sdpa) over the prompt; below 1 favours optune" + also(peer_note),
               kind=kind)
    REPORT.raw.setdefault("prefill", []).append({"role": role, "tokens": target, "optune_s": ours,
                                                 "optune_per_token_attention_s": o_whole,
                                                 "transformers_s": theirs or peer_note})

    # Decoding after that prompt: each new token attends over ~target positions. The same run with
    # LONG_DECODE more tokens, less the one above, per token; set against the batch-1 row's short
    # prompts, this is what a long context adds to a decode step. opt-gen splits each head's span
    # across blocks at batch 1 (cached_attention.rs, shape_for); the run again with
    # OPTUNE_ATTENTION=whole (one block per head walking all the positions, as before 2026-12-01,
    # less its own prefill) says what the split is worth on this GPU, with, on a GQA model, the
    # query heads' sharing of a block. On the CPU (the dry run) neither applies: the host kernel
    # attends.
    at = cmd.index("--max-new-tokens") + 1
    longer = cmd[:at] + [str(1 + LONG_DECODE)] + cmd[at + 1:]

    def per_token_ms(env, prefill_s):
        stderr, _, _ = run(longer, unit=f"prefill:{role}", env=env)
        return (float(summary(stderr, "opt-gen")["gen_s"]) - prefill_s) / LONG_DECODE * 1e3

    ours_ms = per_token_ms(None, o)
    unsplit_ms = per_token_ms(whole, o_whole)

    def peer_decode():
        if t is None:
            raise RuntimeError("no peer prefill to subtract")
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            models.peer(role).generate(input_ids=x, do_sample=False, max_new_tokens=1 + LONG_DECODE,
                          min_new_tokens=1 + LONG_DECODE, pad_token_id=3)
        sync()
        return (time.perf_counter() - start - t) / LONG_DECODE * 1e3

    theirs_ms, peer_note, kind = peer_side(f"gen {role}", unit, peer_decode)
    short = [g for g in REPORT.raw.get("gen", []) if g["role"] == role and g["batch"] == 1]
    if short:
        short_ms = 1e3 / statistics.median(short[0]["optune"])
        context = f"optune at batch 1 after the short prompts: {short_ms:.2f} ms per token"
    else:
        context = "no batch-1 row to set it against"
    REPORT.row(f"gen {role}", f"decode after the {target}-token prompt, batch 1, ms per new token "
               f"({LONG_DECODE} tokens, one run)", f"{ours_ms:.2f}", fmt(theirs_ms, ".2f"), ratio(ours_ms, theirs_ms),
               f"{context}; with each head's span unsplit and one query head to a block "
               f"(OPTUNE_ATTENTION=whole): {unsplit_ms:.2f} ms per token, ours/whole "
               f"{ratio(ours_ms, unsplit_ms)}; below 1 favours optune" + also(peer_note),
               kind=kind)
    REPORT.raw.setdefault("long_decode", []).append({"role": role, "tokens": target, "optune_ms": ours_ms,
                                                     "optune_unsplit_ms": unsplit_ms,
                                                     "transformers_ms": theirs_ms})


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# reward scoring
# ---------------------------------------------------------------------------------------------

def score_row(args, models: Models, role: str) -> None:
    """opt-score --rm in bf16 (packed passes, --batch-tokens from the free memory) against
    transformers' sequence-classification forward (bf16, sdpa) over the same token ids, longest
    first in right-padded batches of --score-batch (bench_score's padded_rewards): tokens/s of
    the model passes, the rewards' largest difference (info: both sides in bf16; the ids are
    checked by their count), opt-score's plan and peak memory."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work = args.work / "score" / role
    work.mkdir(parents=True, exist_ok=True)
    rm = work / "rm"
    models.release()  # the device to opt-score, whose plan reads what is free
    make_reward_model(models.path(role), rm, torch.bfloat16)
    free_torch_memory()
    tok = AutoTokenizer.from_pretrained(rm)
    rows = synthetic_responses(args.score_rows, args.score_words)
    ids = [conversation_ids(tok, row["messages"], row["response"]) for row in rows]
    responses = work / "responses.jsonl"
    write_jsonl(responses, rows)
    out = work / "scored.jsonl"
    stderr, peak, how = run([args.bin / "opt-score", responses, "--rm", rm, "-o", out, "--device", GPU,
                             "--dtype", "bf16", *device_flags("cuda", "bf16")], watch_gpu=True, unit=f"score:{role}")
    s = summary(stderr, "opt-score")
    tokens = sum(len(x) for x in ids)
    if int(s["tokens"]) != tokens:
        raise RuntimeError(f"opt-score read {s['tokens']} tokens, transformers {tokens}: not the same ids")
    ours_tok_s = tokens / float(s["model_s"])
    ours = [r["reward"] for r in read_jsonl(out)]
    plan = next((l for l in stderr.splitlines() if l.startswith("opt-score: passes")), "no plan line")

    def peer_scores():
        peer = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa").to(GPU).eval()
        try:
            return padded_rewards(peer, ids, args.score_batch, GPU)
        finally:
            del peer
            free_torch_memory()

    peer, peer_note, kind = peer_side(f"score {role}", f"score:{role}", peer_scores)
    theirs, seconds = peer or (None, None)
    peer_tok_s = tokens / seconds if peer else None
    gap = (max(abs(a - b) for a, b in zip(ours, theirs)) / max(max(abs(b) for b in theirs), 1e-30) if peer
           else None)
    REPORT.row(f"score {role}", f"reward scoring tokens/s, {len(ids)} conversations of "
               f"{min(map(len, ids))}-{max(map(len, ids))} tokens, bf16 (peer: padded batches of {args.score_batch})",
               f"{ours_tok_s:,.0f}", fmt(peer_tok_s, ",.0f"), ratio(ours_tok_s, peer_tok_s),
               f"rewards max diff / largest {fmt(gap, '.1e')} (info); optune peak GiB {fmt(peak, '.1f')} ({how}); "
               f"{plan.removeprefix('opt-score: ')}" + also(peer_note), kind=kind)
    REPORT.raw.setdefault("score", []).append({"role": role, "tokens": tokens, "optune_tok_per_s": ours_tok_s,
                                               "peer_tok_per_s": peer_tok_s, "reward_gap": gap, "plan": plan,
                                               "optune_peak_gib": peak, "summary": s})


def stage_score(args, models: Models, role: str) -> None:
    if not stage_may_start(models, role, f"score:{role}", f"score {role}", "reward-scoring row"):
        return
    guarded(f"score {role}", "reward scoring", lambda: score_row(args, models, role))


def plumbing_check(args, rows_before_check: int) -> bool:
    """Dry run: every row made (a row exists only once its tool's outputs and summary line were
    read) and none failed or skipped, the files written, the checkpoints there."""
    problems = []
    rows = REPORT.rows[:rows_before_check]
    kinds = [r["kind"] for r in rows]
    if "fail" in kinds or "skip" in kinds:
        problems.append(f"{kinds.count('fail')} failed and {kinds.count('skip')} skipped rows")
    # Each stage's rows: the batch rows, the prefill and the decode after it (and, on the 1.1B's
    # grouped-query shape, the largest batch with one head to a block).
    expected = {"logprobs": 13, "train-1b": 6, "train-7b": 3, "gen-7b": len(args.batches) + 2,
                "gen-1b": len(args.batches) + 3, "score-1b": 1, "sanitize": 2 + len(SHARED_MEMORY_KERNELS),
                "kernels-1b": 3}
    want = sum(expected[s] for s in args.stages)
    made = sum(1 for r in rows if r["kind"] == "ok" and not r["cells"][0].startswith(("build", "setup")))
    if made != want:
        problems.append(f"{made} measured rows, {want} expected")
    for f in ["measure.md", "measure.json"]:
        if not (args.out / f).stat().st_size:
            problems.append(f"{args.out / f} empty")
    for role in ("1b", "7b"):
        checkpoint = args.work / f"random-{DRY_MODEL_OF[role]}"
        if any(s.endswith(role) for s in args.stages) and not list(checkpoint.glob("*.safetensors")):
            problems.append(f"no checkpoint in {checkpoint}")
    ok = not problems
    REPORT.row("dry run", "plumbing: rows made, summaries parsed, files written", "", "", "",
               "ok" if ok else "FAILED: " + "; ".join(problems), "ok" if ok else "fail")
    return ok


def main() -> None:
    global GPU, REPORT, BUDGET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, required=True, help="folder with the CUDA opt-gen, opt-wdpo, opt-score")
    ap.add_argument("--work", type=Path, default=Path("/tmp/optune-cuda-measure"), help="scratch folder")
    ap.add_argument("--out", type=Path, default=Path("runs/cuda-measure"), help="measure.md and measure.json go here")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated, run in the order given, of: {','.join(STAGES)} "
                         f"(the default), and {','.join(EXTRA_STAGES)}")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="start no row whose guessed cost overruns this; tool runs are killed 45 s past it")
    ap.add_argument("--batches", default="1,16,64,256", help="generation batch sizes")
    ap.add_argument("--prompts-batch1", type=int, help="prompts run one at a time at batch 1 [2; dry run 1]")
    ap.add_argument("--new-tokens", type=int, help="new tokens per generated sequence [128; dry run 16]")
    ap.add_argument("--repeats", type=int, default=1, help="generation runs per side and batch (median)")
    ap.add_argument("--train-pairs", type=int, default=8, help="pairs per step (one micro-batch) on the 1.1B")
    ap.add_argument("--train-pairs-7b", type=int, default=8,
                    help="pairs per step on the 7B (8: about 34 GB by opt-wdpo's plan, sides of ~220 tokens)")
    ap.add_argument("--train-tokens", type=int, help="response tokens per side [128; dry run 32]")
    ap.add_argument("--train-steps", type=int, help="optimiser steps per run [5; dry run 3]")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank) on q,k,v,o")
    ap.add_argument("--peer-lora", choices=["auto", "peft", "torch"], default="auto",
                    help="the peer's LoRA: peft (auto: when importable) or this script's module")
    ap.add_argument("--score-rows", type=int, help="conversations scored in the score stage [512; dry run 16]")
    ap.add_argument("--score-words", type=int,
                    help="most words of a scored response [400; dry run 40]; above ~620 a conversation "
                         "outgrows the 1.1B's 2048 positions and opt-score refuses it")
    ap.add_argument("--score-batch", type=int, default=32, help="the peer's batch size in the score stage")
    ap.add_argument("--copy-mib", type=int, help="size of the bandwidth copy [2048; dry run 64]")
    ap.add_argument("--dry-run", action="store_true",
                    help="everything on the CPU with tiny models (no GPU here): tries the script, figures mean nothing")
    args = ap.parse_args()
    dry = args.dry_run
    for name, gpu_default, dry_default in [("prompts_batch1", 2, 1), ("new_tokens", 128, 16), ("train_tokens", 128, 32),
                                           ("train_steps", 5, 3), ("copy_mib", 2048, 64), ("score_rows", 512, 16),
                                           ("score_words", 400, 40)]:
        if getattr(args, name) is None:
            setattr(args, name, dry_default if dry else gpu_default)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES) - set(EXTRA_STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; known: {STAGES + EXTRA_STAGES}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.bin = args.bin.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    GPU = "cpu" if dry else "cuda"
    REPORT = Report(args.out)
    BUDGET = Budget(args.budget_s, dry)

    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of peft/transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    peft = peft_module()
    peft_version = peft.__version__ if peft else "not importable"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible to torch"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = ""
    R = REPORT
    R.line(f"# optune device check, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    R.line()
    R.line(f"- GPU: {gpu} ({smi or 'nvidia-smi n/a'}); torch {torch.__version__} (CUDA {torch.version.cuda}), "
           f"transformers {transformers.__version__}, peft {peft_version}")
    R.line(f"- binaries: {args.bin}; stages: {','.join(args.stages)}; budget {args.budget_s:.0f} s")
    R.line(f"- {binaries_provenance(args.bin)}")
    if dry:
        R.line("- DRY RUN (--dry-run): NO GPU. Every 'CUDA' run and torch ran on the CPU (the binaries with "
               "--kernels generic), on tiny models; the figures say nothing about a GPU.")
    if GPU == "cuda" and not torch.cuda.is_available():
        R.line("- torch sees no GPU: the peer rows will fail (run with --dry-run on a machine without one)")
    R.line()
    R.raw["env"] = {"gpu": gpu, "nvidia_smi": smi, "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft_version, "dry_run": dry, "args": vars(args)}

    def bandwidth():
        bw = copy_bandwidth(args.copy_mib * 2**20)
        R.raw["copy_bytes_per_s"] = bw
        R.row("setup", f"copy bandwidth (torch copy_ of {args.copy_mib} MiB, bytes read + written, median of 5)",
              "", "", "", f"{bw / 1e12:.3f} TB/s")

    guarded("setup", "copy bandwidth", bandwidth)
    models = Models(args)
    run_stage = {
        "logprobs": lambda: stage_logprobs(args, models),
        "train-1b": lambda: stage_train(args, models, "1b", ["lora", "full"]),
        "gen-1b": lambda: stage_gen(args, models, "1b"),
        "train-7b": lambda: stage_train(args, models, "7b", ["lora"]),
        "gen-7b": lambda: stage_gen(args, models, "7b"),
        "score-1b": lambda: stage_score(args, models, "1b"),
        "sanitize": lambda: stage_sanitize(args),
        "kernels-1b": lambda: stage_kernels(args, models, "1b"),
    }
    walls = []
    for stage in args.stages:
        start = elapsed()
        guarded(stage, "stage", run_stage[stage])
        walls.append(f"{stage} {elapsed() - start:.0f}")
        note(f"-- {stage} done at {elapsed():.0f} s")
    models.release()
    rows_measured = len(R.rows)
    R.row("time", "wall seconds per stage", "", "", "",
          f"{', '.join(walls)}; total {elapsed():.0f} of --budget-s {args.budget_s:.0f}")
    ok = plumbing_check(args, rows_measured) if dry else True
    print(flush=True)
    print("## Device check: the complete table", flush=True)
    print(flush=True)
    print("\n".join(R.table()), flush=True)
    print(flush=True)
    print(LEGEND, flush=True)
    R.save()
    if R.failed or not ok:
        print("Some checks or rows FAILED (see the table; details in measure.md and on stderr).", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
