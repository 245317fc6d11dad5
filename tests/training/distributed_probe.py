"""Runs the GRPO and SFT entry points (`ibisagent_training.grpo.main`, `ibisagent_training.sft.main`) with the
arguments given, and records per process and optimisation step what the multi-process tests compare: a checksum of
the parameters, the learning rate, and for GRPO the prompts, the rollouts' total rewards and the number of sequences
with a non-zero advantage of that process.

    accelerate launch --multi_gpu --num_processes 2 -m tests.training.distributed_probe \
        grpo <record prefix> <grpo options> [--- sft <record prefix> <sft options> ...]

Each run writes `<record prefix>.rank<r>.jsonl`, one line per step. `run` does the same in this process (1 process).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock


def checksum(model) -> str:
    """sha256 of every parameter's bytes, in name order: equal only if the weights are bit for bit the same."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _write(prefix: str, record: dict) -> None:
    with Path(f"{prefix}.rank{_rank()}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _run_grpo(prefix: str, argv: list[str]) -> int:
    from ibisagent_training.grpo import trainer as module

    real_step, real_rollout = module.GRPOTrainer.train_step, module.rollout
    rollouts = []

    def rollout(*args, **kwargs):
        out, timings = real_rollout(*args, **kwargs)
        rollouts[:] = out
        return out, timings

    def train_step(self):
        step = self.step
        metrics = real_step(self)
        model = self.accelerator.unwrap_model(self.model)
        record = {
            "step": self.step,
            "checksum": checksum(model),
            "lr": self.optimizer.param_groups[0]["lr"],
            "prompts": [row.id for row in self.prompts(step)],
            "rewards": [r.rewards["total"] for r in rollouts],
            "trained": sum(r.advantage != 0.0 for r in rollouts),  # sequences with a gradient on this process
        }
        _write(prefix, record)
        return metrics

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(module, "rollout", rollout))
        stack.enter_context(mock.patch.object(module.GRPOTrainer, "train_step", train_step))
        return module.main(argv)


def _run_sft(prefix: str, argv: list[str]) -> int:
    from ibisagent._compat import ensure_torchvision
    from ibisagent_training import sft

    ensure_torchvision()  # before transformers imports torchvision (a CPU-only torch)
    from transformers import TrainerCallback

    real_build = sft.build_trainer

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            _write(
                prefix, {"step": state.global_step, "checksum": checksum(model), "lr": optimizer.param_groups[0]["lr"]}
            )

    def build_trainer(*args, **kwargs):
        return real_build(*args, **kwargs, callbacks=[Record()])

    with mock.patch.object(sft, "build_trainer", build_trainer):
        return sft.main(argv)


def run(kind: str, prefix: str, argv: list[str]) -> int:
    """One run of `kind` (grpo or sft) with `argv`, recorded to `<prefix>.rank<r>.jsonl`."""
    return {"grpo": _run_grpo, "sft": _run_sft}[kind](prefix, argv)


def main(argv: list[str]) -> int:
    runs, current = [], []
    for arg in [*argv, "---"]:
        if arg == "---":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    for kind, prefix, *options in runs:
        code = run(kind, prefix, options)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
