"""The GRPO trainer: checkpoint/resume to the same weights, per-step metrics, and the command line's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ibisagent_training.grpo import GRPOTrainer
from tests.training.grpo.conftest import make_args


def test_trainer_resumes_to_the_same_weights_and_logs_metrics(setup, tmp_path):
    """Two steps straight equal one step, a checkpoint, and a resumed second step (prompts, sampling and the decaying
    learning rate carry over); metrics.jsonl has one line per step with every reward component."""
    import torch

    root, model_dir, start, _ = setup
    common = dict(
        model_name_or_path=str(model_dir),
        max_steps=2,
        max_invalid=2,
        vqa_file=str(root / "vqa.json"),
        vqa_fraction=0.5,
        lr_scheduler_type="linear",
    )
    straight = GRPOTrainer(make_args(root, output_dir=str(tmp_path / "a"), **common))
    straight.train()
    first = GRPOTrainer(make_args(root, output_dir=str(tmp_path / "b"), save_steps=1, **{**common, "max_steps": 1}))
    first.train()
    resumed = GRPOTrainer(make_args(root, output_dir=str(tmp_path / "b"), resume_from_checkpoint="last", **common))
    assert resumed.step == 1
    resumed.train()
    a = dict(straight.accelerator.unwrap_model(straight.model).named_parameters())
    b = dict(resumed.accelerator.unwrap_model(resumed.model).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], p) for k, p in start.named_parameters())  # it did learn something
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    straight_lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["learning_rate"] for m in straight_lines] == pytest.approx([0.5e-3, 0.0])  # after each step's update
    for key in (
        "reward/format",
        "reward/answer",
        "reward/length",
        "reward/total",
        "iou",
        "episode_length",
        "vqa_accuracy",
        "loss",
        "steps_per_second",
    ):
        assert key in lines[0]
    assert (tmp_path / "b" / "config.json").is_file()  # the final model loads with from_pretrained


def test_grpo_cli_errors(setup, capsys):
    from ibisagent_training.cli import main

    root, model_dir, _, _ = setup
    assert main(["grpo", "--model_name_or_path", str(model_dir), "--data", str(root / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["grpo", "--model_name_or_path", str(model_dir), "--beta", "0.1"]) == 2
    assert "beta must be 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # ToolSpec's choices reach trl's parser
        main(["grpo", "--model_name_or_path", str(model_dir), "--tool", "nope"])
    assert info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    # the package runs as a module too (`accelerate launch -m ibisagent_training.grpo`)
    out = subprocess.run(
        [sys.executable, "-m", "ibisagent_training.grpo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--checkpoint" in out.stdout and "--model_name_or_path" in out.stdout
