"""GRPO rows: step-level rows replay their trajectory before the policy acts; VQA rows from a JSON file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent.chat import PromptTemplates
from ibisagent.render import overlay
from ibisagent.tools import build_tool
from ibisagent_training.grpo import Row, StepRows, VQARows, rollout
from tests.training.grpo.conftest import instructions, make_args


def test_step_rows_replay_the_trajectory_before_the_policy_acts(setup, tmp_path):
    """Mode (b): a row is step k of a simulated trajectory; its first k actions go through the tool, the policy sees
    that mask's overlay and acts once, and the reward is the step-level one with step_index k."""
    import torch

    from ibisagent_training.generate import GenerateConfig, generate

    root, _, model, processor = setup
    generate(root / "shapes", tmp_path / "traj", GenerateConfig(max_steps=4, stop_iou=0.8), progress=False)
    rows = StepRows(str(tmp_path / "traj"), instructions(root))
    picked = [i for i, (_, k) in enumerate(rows.items) if k > 0][:2]
    k_rows = [rows[i] for i in picked]
    assert k_rows and all(r.history and r.max_steps == 1 for r in k_rows)
    args = make_args(root, mode="step", data=str(tmp_path / "traj"))
    torch.manual_seed(0)
    rollouts, _ = rollout(
        model,
        processor,
        k_rows,
        args,
        [build_tool("classical") for _ in range(2)],
        PromptTemplates.load("ibis", args.template_dir),
        args.reward_config(),
    )
    for n, r in enumerate(rollouts):
        record = rows.records[rows.items[picked[n // args.num_generations]][0]]
        k = len(r.row.history)
        expected = record.load_trajectory().steps[k - 1].masks[r.row.target]
        assert np.array_equal(r.start_mask, expected)
        assert r.num_observations == 1 and np.array_equal(r.policy.images[0], overlay(r.row.image, expected))
        assert r.rewards["length"] == pytest.approx(1.0 - 0.2 * max(0, k + 1 - 5))
        assert r.rewards["format"] in (0.0, 1.0)


def test_vqa_rows(setup, tmp_path):
    root, _, _, _ = setup
    rows = VQARows(str(root / "vqa.json"))
    assert isinstance(rows[0], Row) and rows[0].solution == "yes" and rows[0].gt is None
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png", "question": "q"}]))
    with pytest.raises(ValueError, match=r"row 0 lacks \['answer'\]"):
        VQARows(str(tmp_path / "bad.json"))
