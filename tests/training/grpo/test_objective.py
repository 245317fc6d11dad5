"""The GRPO objective: group advantages, the clipped loss and the learning-rate schedules."""

from __future__ import annotations

import pytest

from ibisagent_training.grpo import GRPOArguments, group_advantages, lr_factor, policy_loss


def test_group_advantages_and_clipped_loss():
    import torch

    adv = group_advantages([1.0, 3.0, 2.0, 2.0], 2)
    assert adv[0] == pytest.approx(-1.0, abs=1e-3) and adv[1] == pytest.approx(1.0, abs=1e-3)
    assert adv[2:] == [0.0, 0.0]  # equal rewards: no signal
    assert group_advantages([1.0, 3.0], 2, scale="none") == [-1.0, 1.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 2.0], 3)
    logps = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    mask = torch.tensor([[True, True], [True, False]])
    a = torch.tensor([1.0, -1.0])
    # ratio 1: the loss is -sum(A * tokens) / n_tokens (dapo) or -mean over sequences (grpo)
    assert float(policy_loss(logps, logps, a, mask, 0.2, 0.2, "dapo", 3.0)) == pytest.approx(-(2 - 1) / 3)
    assert float(policy_loss(logps, logps, a, mask, 0.2, 0.2, "grpo", 2.0)) == pytest.approx(0.0)
    # a ratio above 1 + eps earns no more for a positive advantage (clipped)
    high = torch.log(torch.tensor([[0.9, 0.9], [0.5, 0.5]]))
    loss = policy_loss(high, logps, torch.tensor([1.0, 0.0]), mask, 0.2, 0.2, "dapo", 3.0)
    assert float(loss) == pytest.approx(-2 * 1.2 / 3)


def test_learning_rate_schedules():
    assert [lr_factor(u, "constant", 2, 10) for u in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert [lr_factor(u, "linear", 0, 4) for u in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_factor(u, "cosine", 0, 4) for u in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(1, "linear", 2, 6) == pytest.approx(2 / 3)  # warm-up first, decay after it
    assert lr_factor(4, "linear", 2, 6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of constant, linear, cosine, got 'step'"):
        GRPOArguments(lr_scheduler_type="step")
