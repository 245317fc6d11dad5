"""HFVLMPolicy on a real (tiny, random-weight) Qwen2.5-VL built from configs and saved to disk: loading, prompts in
both dialects and history modes, KV-cache reuse against recomputation, seeded sampling, templates, and a whole
episode with a real segmentation tool on a demo image. Random weights write noise, so these tests check plumbing,
never output quality."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the VLM policy needs torch")
pytest.importorskip("transformers", reason="the VLM policy needs transformers")

from ibisagent.chat import TEMPLATE_DIR, PromptTemplates  # noqa: E402
from ibisagent.episode import Episode  # noqa: E402
from ibisagent.loop import run_episode  # noqa: E402
from ibisagent.policies.base import Observation, Policy  # noqa: E402
from ibisagent.policies.hf_vlm import HFVLMPolicy  # noqa: E402
from ibisagent.testing import (  # noqa: E402
    _QWEN2_5_VL_CHAT_TEMPLATE,
    GRAMMAR_TOKENS,
    build_tiny_qwen2_5_vl,
    qwen2_5_vl_chat_template,
)
from ibisagent.trajectory import STOP_REASONS, Trajectory  # noqa: E402

DEMO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "biomedparse-demo"
DEMO = DEMO / "biomedparse_datasets" / "BiomedParseData-Demo"
DEMO_IMAGE = DEMO / "demo" / "04_CT_liver.png"
DEMO_MASK = DEMO / "demo_mask" / "04_CT_liver_tumor.png"
INSTRUCTION = "Please segment the liver tumor."
TARGETS = ["liver tumor"]
RELEASED_REFINE = (
    'This is a refinement step. User\'s original query: "{instruction}". Do you think the image with '
    "semi-transparent green mask need further segmentation? If so, please use point action; otherwise, use "
    "Terminate action."
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are too small to split: with more threads on a busy 2-core machine, OpenMP's waiting
    made generation 20x slower (3.8 s against 0.17 s for the same two turns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    build_tiny_qwen2_5_vl(out, seed=0)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """(model, processor) as HFVLMPolicy.from_pretrained loads them from disk; shared by the cheaper tests."""
    policy = HFVLMPolicy.from_pretrained(tiny_dir)
    return policy.model, policy.processor


def _images(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _obs(step: int, image: np.ndarray, feedback: str | None = None) -> Observation:
    return Observation(step, INSTRUCTION, image, image, step > 0, list(TARGETS), feedback=feedback)


def _run(policy: HFVLMPolicy, images: list[np.ndarray], feedback_at: int | None = None) -> list[str]:
    """Drive the policy over fixed observations (the image stands in for each step's overlay)."""
    policy.start(INSTRUCTION, TARGETS)
    texts = []
    for i, image in enumerate(images):
        texts.append(
            policy.act(_obs(i, image, "Your previous output could not be used." if i == feedback_at else None))
        )
    return texts


# -- the tiny model itself ------------------------------------------------------------------------------------------
def test_tiny_model_round_trips_through_auto_classes(tiny_dir, loaded):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(tiny_dir)).__name__ == "Qwen2_5_VLProcessor"
    rebuilt, _ = build_tiny_qwen2_5_vl(seed=0)  # the same seed gives the same weights
    reloaded = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    text_config = model.config.text_config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    assert sum(text_config.rope_parameters["mrope_section"]) == head_dim // 2
    tok = processor.tokenizer
    sample = "<think>\nnoch nichts — 肝</think>\n<action>\nliver tumor: positive (0.4120, 0.5533)\n</action>"
    assert tok.decode(tok(sample)["input_ids"], skip_special_tokens=True) == sample
    assert all(len(tok(tag)["input_ids"]) == 1 for tag in GRAMMAR_TOKENS)
    assert processor.chat_template == qwen2_5_vl_chat_template()
    trl = importlib.util.find_spec("trl")
    if trl is not None:  # the copy used without trl is the same template
        assert (
            _QWEN2_5_VL_CHAT_TEMPLATE == (Path(trl.origin).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text()
        )


# -- loading errors -------------------------------------------------------------------------------------------------
def test_missing_model_path_gives_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist as a local folder"):
        HFVLMPolicy.from_pretrained(tmp_path / "no-such-checkpoint")
    with pytest.raises(ValueError, match="does not exist as a local folder"):
        HFVLMPolicy.from_pretrained("./runs/missing")
    with pytest.raises(ValueError, match="has no config.json"):
        HFVLMPolicy.from_pretrained(tmp_path)
    # A Hub id that is not in the (empty) local cache, offline: a clear error and no connection attempted at all.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        HFVLMPolicy.from_pretrained("ibisagent-tests/no-such-model")


def test_constructor_checks_its_arguments(loaded):
    model, processor = loaded
    with pytest.raises(ValueError, match="history"):
        HFVLMPolicy(model, processor, history="last3")
    with pytest.raises(ValueError, match="dialect"):
        HFVLMPolicy(model, processor, dialect="json")
    policy = HFVLMPolicy(model, processor)
    assert isinstance(policy, Policy)


# -- prompts --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["ibis", "released"])
@pytest.mark.parametrize("history", ["full", "current"])
def test_prompts_hold_one_image_per_observation_in_full_mode_and_one_in_current(loaded, dialect, history):
    model, processor = loaded
    policy = HFVLMPolicy(model, processor, dialect=dialect, history=history, max_new_tokens=4)
    templates = PromptTemplates.load(dialect)
    policy.start(INSTRUCTION, TARGETS)
    for i, image in enumerate(_images(3)):
        obs = _obs(i, image)
        messages, images, _ = policy.build_messages(obs)
        expected = i + 1 if history == "full" else 1
        assert len(images) == expected
        assert sum(c["type"] == "image" for m in messages for c in m["content"]) == expected
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        assert grid.shape[0] == expected
        merge = processor.image_processor.merge_size
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == int(grid.prod(-1).sum()) // merge**2

        policy.act(obs)
        assert policy.last_prompt == prompt
        assert policy.last_stats["images"] == expected
        assert policy.last_stats["prompt_tokens"] == inputs["input_ids"].shape[1]
        assert prompt.startswith(f"<|im_start|>system\n{templates.system_text(INSTRUCTION, TARGETS)}<|im_end|>\n")
        user_text = templates.user_text(INSTRUCTION, TARGETS, first=i == 0)
        assert prompt.endswith(f"<|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.count("<|im_start|>assistant\n") == expected  # earlier answers stay only in full history
    if dialect == "released":
        assert user_text == RELEASED_REFINE.format(instruction=INSTRUCTION)
        assert templates.user_text(INSTRUCTION, TARGETS, first=True) == INSTRUCTION


def test_feedback_is_appended_to_the_user_turn(loaded):
    model, processor = loaded
    policy = HFVLMPolicy(model, processor, dialect="released", max_new_tokens=2)
    policy.start(INSTRUCTION, TARGETS)
    policy.act(_obs(0, _images(1)[0], feedback="Your previous output could not be used (missing_tag)."))
    assert policy.last_prompt.endswith(
        f"{INSTRUCTION}\n\nYour previous output could not be used (missing_tag).<|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_are_files_and_a_template_dir_overrides_them(loaded, tmp_path):
    for dialect in ("ibis", "released"):
        templates = PromptTemplates.load(dialect)
        for part in ("system", "first", "refine"):
            text = (TEMPLATE_DIR / f"{dialect}_{part}.txt").read_text(encoding="utf-8").removesuffix("\n")
            assert getattr(templates, part) == text
    released = PromptTemplates.load("released")
    assert released.system.startswith("You are a precise and expert medical segmentation agent.")
    assert released.system.endswith("you must also append a final, concise summary in an <answer> tag.")
    assert released.refine == RELEASED_REFINE
    ibis = PromptTemplates.load("ibis")
    for phrase in ("<target>: positive (x, y)", "Undo", "Terminate", "<answer>", "semi-transparent green mask"):
        assert phrase in ibis.system

    (tmp_path / "ibis_first.txt").write_text("CUSTOM {instruction} | {targets} | {{literal}}\n", encoding="utf-8")
    model, processor = loaded
    policy = HFVLMPolicy(model, processor, template_dir=tmp_path, max_new_tokens=2)
    assert policy.templates.system == ibis.system  # files the folder lacks come from the package
    policy.start(INSTRUCTION, TARGETS)
    policy.act(_obs(0, _images(1)[0]))
    assert f"<|vision_end|>CUSTOM {INSTRUCTION} | liver tumor | {{literal}}<|im_end|>" in policy.last_prompt

    (tmp_path / "ibis_refine.txt").write_text("Where is {organ}?", encoding="utf-8")
    with pytest.raises(ValueError, match=r"only fields are \{instruction\} and \{targets\}"):
        PromptTemplates.load("ibis", tmp_path)
    with pytest.raises(ValueError, match="holds none of"):
        PromptTemplates.load("released", tmp_path)


# -- generation -----------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(loaded):
    model, processor = loaded
    images = _images(2)

    def sample(seed):
        return _run(HFVLMPolicy(model, processor, do_sample=True, seed=seed, max_new_tokens=16), images)

    state = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample(7) == first
    assert sample(8) != first
    policy = HFVLMPolicy(model, processor, do_sample=True, seed=7, max_new_tokens=16)
    assert _run(policy, images) == first
    assert _run(policy, images) != first  # the next episode of the same policy draws fresh samples


@pytest.mark.parametrize("do_sample", [True, False])
def test_kv_cache_reuse_gives_the_same_outputs_as_recomputation(loaded, do_sample):
    model, processor = loaded
    images = _images(4)
    runs = {}
    for reuse in (True, False):
        policy = HFVLMPolicy(model, processor, do_sample=do_sample, seed=3, max_new_tokens=32, reuse_cache=reuse)
        runs[reuse] = (_run(policy, images, feedback_at=2), policy.episode_stats)
    assert runs[True][0] == runs[False][0]
    with_cache, without = runs[True][1], runs[False][1]
    assert [s["prompt_tokens"] for s in with_cache] == [s["prompt_tokens"] for s in without]
    assert all(s["prefill_tokens"] == s["prompt_tokens"] for s in without)
    assert with_cache[0]["prefill_tokens"] == with_cache[0]["prompt_tokens"]
    for s in with_cache[1:]:  # only the new turn (and any re-tokenised tail of the previous answer) is prefilled
        assert 0 < s["prefill_tokens"] < s["prompt_tokens"] // 2
        assert s["reused_tokens"] + s["prefill_tokens"] == s["prompt_tokens"]


# -- a whole episode with a real tool -------------------------------------------------------------------------------
@pytest.mark.skipif(not DEMO_IMAGE.is_file(), reason=f"shared demo data not found at {DEMO}")
def test_whole_episode_on_a_demo_image_with_a_real_tool(tiny_dir):
    from PIL import Image

    from ibisagent.tools import build_tool

    image = np.asarray(Image.open(DEMO_IMAGE).convert("RGB").resize((256, 256), Image.BILINEAR))
    gt = np.asarray(Image.open(DEMO_MASK).convert("RGB").resize((256, 256), Image.NEAREST))[..., 0] > 0
    policy = HFVLMPolicy.from_pretrained(tiny_dir, do_sample=True, seed=0, max_new_tokens=48)
    # The paper's tool: MedSAM2's architecture (SAM2.1 hiera-tiny at 512 px), random weights. No classical tool
    # existed when this test was written. The random policy's text rarely parses, so the tool mostly just encodes.
    tool = build_tool("medsam2")
    episode = Episode(tool, image, list(TARGETS), max_steps=4)
    trajectory = run_episode(policy, episode, INSTRUCTION, gt={TARGETS[0]: gt}, max_invalid=2)

    assert trajectory.stop_reason in STOP_REASONS and trajectory.stop_reason != "policy_error"
    assert trajectory.steps, "the policy must have written at least one turn"
    # The trajectory records exactly what the model generated: the policy's own transcript of its answers.
    answers = [m["content"][0]["text"] for m in policy.conversation if m["role"] == "assistant"]
    assert [s.text for s in trajectory.steps] == answers
    assert any(answers), "sampling from the random model should produce some text"
    for step, stats in zip(trajectory.steps, policy.episode_stats, strict=True):
        assert isinstance(step.text, str)
        assert (step.error is None) != (step.action is None and step.answer is None)
        if step.error is not None:
            assert step.action is None
        assert stats["images"] == step.index + 1  # full history: one image per observation so far
    if trajectory.steps[0].error is not None and len(trajectory.steps) > 1:
        second_user_turn = [m for m in policy.conversation if m["role"] == "user"][1]
        assert "could not be used" in second_user_turn["content"][1]["text"]

    data = json.loads(json.dumps(trajectory.to_dict()))
    assert Trajectory.from_dict(data).to_dict() == data
