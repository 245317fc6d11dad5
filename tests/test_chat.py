"""The one chat format (`ibisagent.chat`): the SFT conversation of a generated trajectory is, token for token and
pixel for pixel, what `HFVLMPolicy` is shown when it plays the same episode, and what a GRPO rollout holds.

The trajectories are simulated with the classical tool on synthetic images (`ibisagent_training.generate`); the
policy is the tiny random Qwen2.5-VL of `ibisagent.testing`, whose generation is replaced by the SFT answer of each
step, so the episode runs through the real agent loop and tool and reaches the same states as the trajectory."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the chat format is checked through a real processor")
pytest.importorskip("transformers", reason="the chat format is checked through a real processor")

from ibisagent.chat import END_OF_TURN, PromptTemplates, observation_image, pixel_budget, turn_messages  # noqa: E402
from ibisagent.episode import Episode  # noqa: E402
from ibisagent.loop import run_episode  # noqa: E402
from ibisagent.policies.hf_vlm import HFVLMPolicy  # noqa: E402
from ibisagent.tools import build_tool  # noqa: E402
from ibisagent_training.generate import GenerateConfig, generate  # noqa: E402
from ibisagent_training.grpo import RolloutPolicy  # noqa: E402
from ibisagent_training.records import VARIANTS, TrajectoryRecord, iter_kept  # noqa: E402
from ibisagent_training.sft import ConversationBuilder, encode  # noqa: E402
from ibisagent_training.synthetic import write_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from ibisagent.testing import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(max_pixels=112 * 112)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, TrajectoryRecord]:
    """One kept record per variant, each with at least two steps."""
    root = tmp_path_factory.mktemp("chat")
    write_synthetic_dataset(root / "shapes", 4, seed=0, size=112, objects=(2, 2))
    config = GenerateConfig(
        max_steps=5, stop_iou=0.95, max_length=5, min_dice=0.0, self_correction=1.0, user_inconsistency=1.0
    )
    generate(root / "shapes", root / "traj", config, progress=False)
    out = {}
    for r in iter_kept(root / "traj"):
        if r.variant not in out and r.num_steps >= 2:
            out[r.variant] = r
    assert set(out) == set(VARIANTS), f"no multi-step record of some variant: found {sorted(out)}"
    return out


class _Scripted(HFVLMPolicy):
    """The policy, except that its model 'writes' the given texts; it records what it was shown at each turn."""

    def __init__(self, model, processor, texts: list[str], **kwargs):
        super().__init__(model, processor, **kwargs)
        self.texts = texts
        self.shown: list[tuple[list[dict], list]] = []  # (messages, PIL images) per turn
        self.inputs: list[dict] = []  # the processor's output per turn: what the model would be run on

    def build_messages(self, obs):
        messages, images, user = super().build_messages(obs)
        self.shown.append((messages, images))
        return messages, images, user

    def _generate(self, inputs, num_images):
        self.inputs.append(inputs)
        text = self.texts[len(self.inputs) - 1]
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"], {}


def _play(policy, record: TrajectoryRecord, instruction: str):
    """Run the record's episode (same image, target and initial mask) with `policy` through the agent loop."""
    from ibisagent.io import read_image

    traj = record.load_trajectory()
    image = read_image(record.image)
    target = record.target
    initial = {target: traj.initial_masks[target]} if target in traj.initial_masks else None
    episode = Episode(build_tool("classical"), image, [target], initial_masks=initial, max_steps=len(traj.steps))
    return run_episode(policy, episode, instruction)


def _same_tokens_and_pixels(processor, messages: list[dict], images: list[np.ndarray], seen: dict) -> None:
    """`messages` + `images` (the SFT side), rendered and tokenised, equal the inputs the policy's model got."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(text=[text], images=[observation_image(im) for im in images], return_tensors="pt")
    assert expected["input_ids"].tolist() == seen["input_ids"].tolist()
    assert torch.equal(expected["pixel_values"], seen["pixel_values"])
    assert torch.equal(expected["image_grid_thw"], seen["image_grid_thw"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("history", ["full", "current"])
def test_sft_conversation_is_what_the_policy_sees(tiny, records, variant, history):
    model, processor = tiny
    record = records[variant]
    builder = ConversationBuilder(history=history, seed=3)
    conversations = builder.build(record)
    answers = (
        conversations[0].assistant_texts
        if history == "full"
        else [
            ConversationBuilder(history="full", seed=3).build(record)[0].assistant_texts[k]
            for k in range(record.num_steps)
        ]
    )
    policy = _Scripted(model, processor, answers, history=history)
    traj = _play(policy, record, conversations[0].instruction)
    assert [s.text for s in traj.steps] == answers and len(policy.inputs) == len(answers)

    if history == "full":
        (conv,) = conversations
        for k, ((messages, images), seen) in enumerate(zip(policy.shown, policy.inputs)):
            assert messages == conv.messages[: 2 * k + 2]  # system, then k earlier turns, then this user turn
            assert all(np.array_equal(np.asarray(a), b) for a, b in zip(images, conv.images[: k + 1], strict=True))
            _same_tokens_and_pixels(processor, conv.messages[: 2 * k + 2], conv.images[: k + 1], seen)
        # The training sequence continues the last prompt with the last answer; same images.
        enc = encode(processor, conv)
        last = policy.inputs[-1]["input_ids"][0]
        assert enc["input_ids"][: len(last)].tolist() == last.tolist()
        assert torch.equal(enc["pixel_values"], policy.inputs[-1]["pixel_values"])
    else:
        assert conversations, "every variant has trained steps"
        for conv in conversations:
            k = int(conv.id.rsplit("@", 1)[1])
            messages, images = policy.shown[k]
            assert messages == conv.messages[:2]
            assert len(images) == 1 and np.array_equal(np.asarray(images[0]), conv.images[0])
            _same_tokens_and_pixels(processor, conv.messages[:2], conv.images, policy.inputs[k])
            enc = encode(processor, conv)
            prompt = policy.inputs[k]["input_ids"][0]
            assert enc["input_ids"][: len(prompt)].tolist() == prompt.tolist()


class _ScriptedSampler:
    """The part of GRPO's batch sampler a rollout policy uses, 'sampling' the given texts."""

    def __init__(self, processor, texts: list[str]):
        self.processor, self.texts = processor, texts
        self.processor_lock = threading.Lock()
        self.requests: list[dict] = []

    def request(self, slot: int, inputs: dict):
        self.requests.append(inputs)
        ids = self.processor.tokenizer(self.texts[len(self.requests) - 1], add_special_tokens=False)["input_ids"]
        end = self.processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        return [*ids, end], [0.0] * (len(ids) + 1)


def test_grpo_rollout_holds_the_tokens_the_policy_sees(tiny, records):
    """GRPO's token-in, token-out rollout keeps ids without re-rendering; they equal the policy's prompts."""
    model, processor = tiny
    record = records["self_correction"]
    (conv,) = ConversationBuilder(history="full", seed=3).build(record)
    answers = conv.assistant_texts
    policy = _Scripted(model, processor, answers)
    _play(policy, record, conv.instruction)
    sampler = _ScriptedSampler(processor, answers)
    rollout_policy = RolloutPolicy(sampler, 0, PromptTemplates.load(), pixel_budget(processor, None, None))
    rollout_policy.start(conv.instruction, [record.target])
    traj = _play(rollout_policy, record, conv.instruction)
    assert [s.text for s in traj.steps] == answers
    for seen, held in zip(policy.inputs, sampler.requests, strict=True):
        assert held["input_ids"].tolist() == seen["input_ids"][0].tolist()
        assert torch.equal(held["pixel_values"], seen["pixel_values"])


def test_turn_messages_place_one_image_before_the_text():
    from ibisagent.policies.base import Observation

    image = np.zeros((8, 8, 3), np.uint8)
    obs = Observation(0, "segment the {x}", image, image, False, ["liver"], feedback="try again")
    system, user, pil = turn_messages(PromptTemplates.load(), obs)
    assert system["role"] == "system" and user["content"][0] == {"type": "image"}
    assert user["content"][1]["text"].endswith("\n\ntry again") and pil.mode == "RGB" and pil.size == (8, 8)
