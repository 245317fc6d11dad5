"""Agentic GRPO: what the training pass sees is what the policy saw (multi-turn), step-level rows replay their
trajectory, advantages and the clipped loss, VQA rows, checkpoint/resume, metrics and the CLI. The policy is a tiny
Qwen2.5-VL built from a config; the tool is the classical one; the images are synthetic (BiomedParse layout) and demo
trajectories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent.chat import PromptTemplates, assistant_message, system_message, user_message
from ibisagent.render import overlay
from ibisagent.tools import build_tool
from ibisagent_training.common import collate
from ibisagent_training.grpo import (
    IGNORE_INDEX,
    GRPOArguments,
    GRPOTrainer,
    RolloutError,
    Row,
    SegmentationRows,
    StepRows,
    VQARows,
    group_advantages,
    lr_factor,
    policy_loss,
    rollout,
    token_logps,
)
from ibisagent_training.prompts import INITIAL_FAMILIES, InstructionLibrary
from ibisagent_training.synthetic import write_synthetic_dataset

SHORT_TEMPLATES = {
    "ibis_system.txt": "Click to segment. Reply <think>..</think><action>name: positive (x, y)</action>.",
    "ibis_first.txt": "{instruction}",
    "ibis_refine.txt": "Refine: {instruction}",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ibisagent.testing import build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("grpo")
    write_synthetic_dataset(root / "shapes", 6, seed=0, size=112, objects=(1, 2), appearances=("bright", "dark"))
    (root / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "image": "shapes/train/train000000_Synthetic_shapes.png",
                    "question": "Is there a shape?",
                    "answer": "yes",
                },
                {"image": "shapes/train/train000001_Synthetic_shapes.png", "question": "Is it empty?", "answer": "no"},
            ]
        )
    )
    templates = root / "templates"
    templates.mkdir()
    for name, text in SHORT_TEMPLATES.items():
        (templates / name).write_text(text)
    (root / "instructions.json").write_text(
        json.dumps({"initial": {f: ["segment the {target}"] for f in INITIAL_FAMILIES}})
    )
    model_dir = root / "tiny"
    model, processor = build_tiny_qwen2_5_vl(max_pixels=112 * 112)
    rows = SegmentationRows(str(root / "shapes"), None, _library(root), 3)
    _teach(model, processor, PromptTemplates.load("ibis", templates), [rows[0], rows[1]])
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return root, model_dir, model, processor


def _library(root) -> InstructionLibrary:
    return InstructionLibrary.from_file(root / "instructions.json")


def _teach(model, processor, templates, rows, steps: int = 150) -> None:
    """A few plain gradient steps toward two valid turns (a click, an answer), so that sampled episodes mix valid
    and unusable turns and their rewards differ (an untrained model's are all equal: no advantage, no update)."""
    import torch

    from ibisagent_training.sft import Conversation, encode

    texts = [
        "<think></think><action>target: positive (0.5, 0.5)</action>",
        "<think></think><action>Terminate</action><answer>yes</answer>",
    ]
    encoded = []
    for text, row in [(t, r) for t in texts for r in rows]:
        for first in (True, False):
            messages = [
                system_message(templates, row.instruction, []),
                user_message(templates, row.instruction, [], first=first),
                assistant_message(text),
            ]
            encoded.append(encode(processor, Conversation("teach", messages, [row.image], [True])))
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()


def _args(root, **kw) -> GRPOArguments:
    base = dict(
        output_dir=str(root / "out"),
        data=str(root / "shapes"),
        template_dir=str(root / "templates"),
        num_generations=2,
        prompts_per_step=2,
        max_steps=1,
        max_turns=3,
        max_new_tokens=48,
        learning_rate=1e-3,
        instructions=str(root / "instructions.json"),
        save_steps=0,
        logging_steps=0,
    )
    base.update(kw)
    return GRPOArguments(**base)


def test_multi_turn_batch_holds_exactly_the_observations_and_model_tokens(setup):
    """Mode (a): every observation image of every episode is in the training sequence, the masked tokens are exactly
    the observation tokens, and the training forward pass gives the very log-probabilities the tokens were sampled
    with (so it is conditioned on the same images and text the policy saw)."""
    import torch

    root, _, model, processor = setup
    # max_invalid = max_turns: an unusable turn is retried with feedback, so every episode can run 3 turns.
    args = _args(root, max_invalid=3, num_generations=3)
    rows = SegmentationRows(args.data, None, _library(root), args.max_turns)
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


def test_step_rows_replay_the_trajectory_before_the_policy_acts(setup, tmp_path):
    """Mode (b): a row is step k of a simulated trajectory; its first k actions go through the tool, the policy sees
    that mask's overlay and acts once, and the reward is the step-level one with step_index k."""
    import torch

    from ibisagent_training.generate import GenerateConfig, generate

    root, _, model, processor = setup
    generate(root / "shapes", tmp_path / "traj", GenerateConfig(max_steps=4, stop_iou=0.8), progress=False)
    rows = StepRows(str(tmp_path / "traj"), _library(root))
    picked = [i for i, (_, k) in enumerate(rows.items) if k > 0][:2]
    k_rows = [rows[i] for i in picked]
    assert k_rows and all(r.history and r.max_steps == 1 for r in k_rows)
    args = _args(root, mode="step", data=str(tmp_path / "traj"))
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
    straight = GRPOTrainer(_args(root, output_dir=str(tmp_path / "a"), **common))
    straight.train()
    first = GRPOTrainer(_args(root, output_dir=str(tmp_path / "b"), save_steps=1, **{**common, "max_steps": 1}))
    first.train()
    resumed = GRPOTrainer(_args(root, output_dir=str(tmp_path / "b"), resume_from_checkpoint="last", **common))
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
    trainer = GRPOTrainer(_args(root, output_dir=str(tmp_path)), model=failing, processor=processor)
    before = {k: v.clone() for k, v in failing.state_dict().items()}
    with pytest.raises(RolloutError, match=r"policy_error: .*CUDA out of memory \(simulated\)") as info:
        trainer.train_step()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert trainer.step == 0 and all(torch.equal(v, failing.state_dict()[k]) for k, v in before.items())


def test_vqa_rows_and_bad_options(setup, tmp_path):
    root, _, _, _ = setup
    rows = VQARows(str(root / "vqa.json"))
    assert isinstance(rows[0], Row) and rows[0].solution == "yes" and rows[0].gt is None
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png", "question": "q"}]))
    with pytest.raises(ValueError, match=r"row 0 lacks \['answer'\]"):
        VQARows(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="beta must be 0"):
        _args(root, beta=0.04)
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        _args(root, num_generations=1)
    with pytest.raises(ValueError, match="vqa_fraction > 0 needs --vqa_file"):
        _args(root, vqa_fraction=0.3)
    with pytest.raises(ValueError, match="unknown reward option"):
        _args(root, rewards='{"click_bonus": 2, "nope": 1}')
    assert _args(root, rewards='{"click_bonus": 2}').reward_config().click_bonus == 2


def test_grpo_arguments_embed_the_tool_and_policy_specs():
    """The tool options are ToolSpec's fields, the shared policy options PolicySpec's (same help and checks); the
    old --tool_checkpoint still reads on the command line; policy_spec() is the sampling, full-history policy."""
    from ibisagent.specs import PolicySpec, SpecError, ToolSpec
    from ibisagent_training.grpo.trainer import build_parser

    args = GRPOArguments(tool="sam2", checkpoint="w.pt", tool_config="sam2.1_hiera_t", temperature=0.7, seed=3)
    assert isinstance(args, ToolSpec) and args.max_new_tokens == 256
    spec = args.policy_spec()
    assert isinstance(spec, PolicySpec) and spec.sample and spec.history == "full"
    assert (spec.temperature, spec.seed, spec.max_new_tokens) == (0.7, 3, 256)
    with pytest.raises(SpecError, match="tool 'nope' is invalid"):
        GRPOArguments(tool="nope")
    with pytest.raises(SpecError, match="temperature 0.0 is invalid"):
        GRPOArguments(temperature=0.0)
    with pytest.raises(SpecError, match="dialect 'x' is invalid"):
        GRPOArguments(dialect="x")
    parser = build_parser()
    (parsed,) = parser.parse_args_and_config(args=["--tool_checkpoint", "old.pt", "--tool_config", "t"])
    assert (parsed.checkpoint, parsed.tool_config) == ("old.pt", "t")
    (parsed,) = parser.parse_args_and_config(args=["--checkpoint", "new.pt"])
    assert parsed.checkpoint == "new.pt"
    assert "--tool_checkpoint" not in parser.format_help() and "--checkpoint" in parser.format_help()


def test_grpo_cli_errors(setup, capsys):
    from ibisagent_training.cli import main

    root, model_dir, _, _ = setup
    assert main(["grpo", "--model_name_or_path", str(model_dir), "--data", str(root / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["grpo", "--model_name_or_path", str(model_dir), "--beta", "0.1"]) == 2
    assert "beta must be 0" in capsys.readouterr().err


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
    args = _args(root, max_new_tokens=8, max_invalid=2, max_turns=2)
    rows = SegmentationRows(args.data, None, _library(root), args.max_turns)
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
