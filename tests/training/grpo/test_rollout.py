"""GRPO rollouts: what the training pass sees is what the policy saw (multi-turn), the model never writes image
placeholders, and a failed generation fails the step instead of being trained on."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.chat import PromptTemplates
from ibisagent.render import overlay
from ibisagent.tools import build_tool
from ibisagent_training.common import collate
from ibisagent_training.grpo import IGNORE_INDEX, GRPOTrainer, RolloutError, SegmentationRows, rollout, token_logps
from tests.training.grpo.conftest import instructions, make_args


def test_multi_turn_batch_holds_exactly_the_observations_and_model_tokens(setup):
    """Mode (a): every observation image of every episode is in the training sequence, the masked tokens are exactly
    the observation tokens, and the training forward pass gives the very log-probabilities the tokens were sampled
    with (so it is conditioned on the same images and text the policy saw)."""
    import torch

    root, _, model, processor = setup
    # max_invalid = max_turns: an unusable turn is retried with feedback, so every episode can run 3 turns.
    args = make_args(root, max_invalid=3, num_generations=3)
    rows = SegmentationRows(args.data, None, instructions(root), args.max_turns)
    templates = PromptTemplates.load("ibis", args.template_dir)
    torch.manual_seed(0)
    rollouts, timings = rollout(
        model,
        processor,
        [rows[0], rows[1]],
        args,
        [build_tool("classical") for _ in range(2)],
        templates,
        args.reward_config(),
    )
    # one batched generate call per round of turns, for all 6 episodes together
    assert len(rollouts) == 6 and timings["generate_calls"] == max(len(r.trajectory.steps) for r in rollouts)
    encoded = [r.policy.encoded() for r in rollouts]
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    observations = sum(len(r.trajectory.steps) for r in rollouts)
    assert observations == sum(r.num_observations for r in rollouts) > 6
    assert any(s.action is not None and s.action.clicks for r in rollouts for s in r.trajectory.steps)
    assert batch["image_grid_thw"].shape[0] == observations
    image_id = model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    for r, enc in zip(rollouts, encoded):
        obs_ids = [t for s in r.policy.segments if not s.model for t in s.ids]
        model_ids = [t for s in r.policy.segments if s.model for t in s.ids]
        masked = enc["input_ids"][enc["labels"] == IGNORE_INDEX].tolist()
        trained = enc["labels"][enc["labels"] != IGNORE_INDEX].tolist()
        assert masked == obs_ids and trained == model_ids
        # the model's text, decoded from the trained tokens, is what the loop parsed at each step
        texts = [processor.tokenizer.decode(s.ids, skip_special_tokens=True) for s in r.policy.segments if s.model]
        assert texts == [s.text for s in r.trajectory.steps]
        # each observation is the overlay of the masks the policy acted on: none first, then each step's result (an
        # unusable turn changes nothing)
        shown = [np.zeros(r.row.image.shape[:2], bool)]
        for step in r.trajectory.steps[:-1]:
            shown.append(np.logical_or.reduce([shown[0], *step.masks.values()]) if step.masks else shown[-1])
        assert len(r.policy.images) == len(shown)
        assert all(np.array_equal(im, overlay(r.row.image, m)) for im, m in zip(r.policy.images, shown))
    with torch.no_grad():
        logps, mask = token_logps(model, {k: v for k, v in batch.items()}, args.temperature)
    sampled = torch.tensor([x for r in rollouts for s in r.policy.segments if s.model for x in s.logps])
    assert mask.sum() == len(sampled)
    assert torch.allclose(logps[mask], sampled, atol=1e-4)


def test_sampling_never_writes_image_placeholders(setup):
    """A policy that would rather write <|image_pad|> (and the other vision tokens) than anything else is kept from
    it: such a token would be an image slot without features in the next turn and in the training pass."""
    import copy

    import torch

    root, _, model, processor = setup
    biased = copy.deepcopy(model)
    config = biased.config
    vision = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    with torch.no_grad():
        head = biased.lm_head.weight
        hidden = torch.randn(head.shape[1])
        head.zero_()
        head[vision] = hidden * 50  # every other token's logit is 0: the vision tokens' logits are large
    args = make_args(root, max_new_tokens=8, max_invalid=2, max_turns=2)
    rows = SegmentationRows(args.data, None, instructions(root), args.max_turns)
    templates = PromptTemplates.load("ibis", args.template_dir)
    torch.manual_seed(0)
    rollouts, _ = rollout(
        biased, processor, [rows[0]], args, [build_tool("classical")], templates, args.reward_config()
    )
    written = {t for r in rollouts for s in r.policy.segments if s.model for t in s.ids}
    assert written and not written & set(vision)
    batch = collate([r.policy.encoded() for r in rollouts], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        token_logps(biased, batch)  # image slots and features agree


def test_a_failed_generation_fails_the_step_instead_of_being_trained_on(setup, tmp_path, monkeypatch):
    """A `generate` that raises reaches every waiting episode, which the agent loop ends as a policy_error; the
    rollout raises that error, so the training step stops before any update instead of training on the failure."""
    import copy

    import torch

    root, _, model, processor = setup
    failing = copy.deepcopy(model)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(failing, "generate", out_of_memory)
    trainer = GRPOTrainer(make_args(root, output_dir=str(tmp_path)), model=failing, processor=processor)
    before = {k: v.clone() for k, v in failing.state_dict().items()}
    with pytest.raises(RolloutError, match=r"policy_error: .*CUDA out of memory \(simulated\)") as info:
        trainer.train_step()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert trainer.step == 0 and all(torch.equal(v, failing.state_dict()[k]) for k, v in before.items())
