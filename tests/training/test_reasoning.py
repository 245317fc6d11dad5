"""Step reasoning: the leak filter, the error-region analysis on shapes whose answer is known, every step kind,
determinism and variety, and no leak on many random and real (demo) oracle steps."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from scipy import ndimage

from ibisagent.simulator import next_click
from ibisagent.types import Click
from ibisagent_training.leaks import LeakError, assert_no_leak, find_leaks
from ibisagent_training.reasoning import (
    ADD,
    REMOVE,
    TERMINATE_CLOSE,
    StepContext,
    describe_step,
    error_region,
    image_where,
    oracle_facts,
    size_word,
    step_context,
    undo_context,
)
from tests.conftest import DEMO, needs_demo

H = W = 120


def disk(cy: float, cx: float, r: float, size: tuple[int, int] = (H, W)) -> np.ndarray:
    yy, xx = np.ogrid[: size[0], : size[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def sentences(text: str) -> int:
    return len(re.findall(r"[.!?](?=\s|$)", text))


def check_text(text: str, target: str = "liver") -> None:
    """What every generated reasoning text must satisfy."""
    assert not find_leaks(text, allow=(target,)), text
    assert 1 <= sentences(text) <= 3, text
    assert text[0].isupper() and text.endswith("."), text
    assert "{" not in text and "None" not in text and "  " not in text, text


# -- leak filter ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, leaks",
    [
        ("The red area spills over.", ["red"]),
        ("Two FPs and one FN remain.", ["FP", "FN"]),
        ("Compare with the Ground-Truth outline.", ["ground truth"]),
        ("the ground truth says so", ["ground truth"]),
        ("A false negative region.", ["false negative"]),
        ("The GT mask and the blue star.", ["blue", "star", "GT"]),
        ("The oracle's choice; IoU is 0.8.", ["oracle", "IoU"]),
        ("The mask covered the reduced area across the centre.", []),
        ("GTV and TP53 are different words; a starting point.", []),
        ("", []),
    ],
)
def test_find_leaks(text, leaks):
    assert find_leaks(text) == leaks


def test_allow_and_assert_no_leak():
    text = "The red blood cell cluster is not covered yet."
    assert find_leaks(text) == ["red"]
    assert find_leaks(text, allow=("red blood cell",)) == []
    with pytest.raises(LeakError, match=r"\['red'\].*green mask"):
        assert_no_leak(text)
    assert_no_leak(text, allow=("Red Blood Cell",))
    assert issubclass(LeakError, ValueError)


# -- error regions on known shapes ---------------------------------------------------------------------------------
def test_missing_part_beyond_the_right_edge():
    gt = disk(60, 60, 30)
    mask = gt & (np.arange(W)[None, :] < 60)  # the right half is missing
    click = next_click(mask, gt)
    region = error_region(mask, gt, click)
    assert click.positive and region.missing
    assert region.relation == "outside" and region.direction == "right"
    assert size_word(region.relative_size) == "sizeable"  # about half of the target
    for seed in range(10):
        text = describe_step(step_context(mask, gt, [click], "liver", "CT", step=1), random.Random(seed))
        check_text(text)
        assert "positive point" in text


def test_excess_beyond_the_lower_left_edge():
    gt = disk(50, 70, 25)
    mask = gt | disk(75, 45, 18)  # a lobe spilling to the lower left
    click = next_click(mask, gt)
    region = error_region(mask, gt, click)
    assert not click.positive and region.relation == "outside"
    assert region.direction == "lower-left"
    texts = {describe_step(step_context(mask, gt, [click], "liver", "CT", 1), random.Random(s)) for s in range(40)}
    assert len(texts) >= 3  # several phrasings
    for text in texts:
        check_text(text)
        assert "negative point" in text
    assert any("lower-left" in t for t in texts)


def test_gap_inside_the_mask():
    gt = disk(60, 60, 35)
    mask = gt & ~disk(60, 60, 10)
    click = next_click(mask, gt)
    region = error_region(mask, gt, click)
    assert click.positive and region.relation == "inside"
    text = describe_step(step_context(mask, gt, [click], "liver", "CT", 2), random.Random(0))
    check_text(text)
    assert re.search(r"gap|hole", text)


def test_excess_inside_a_ring_shaped_target():
    gt = disk(60, 60, 35) & ~disk(60, 60, 18)  # e.g. the myocardium around a cavity
    mask = disk(60, 60, 35)
    click = next_click(mask, gt)
    region = error_region(mask, gt, click)
    assert not click.positive and region.relation == "inside"
    text = describe_step(step_context(mask, gt, [click], "myocardium", "MRI", 2), random.Random(1))
    check_text(text, "myocardium")
    assert re.search(r"inside|[Ww]ithin", text)


def test_separate_part_not_covered_and_stray_patch():
    gt = disk(30, 30, 15) | disk(90, 90, 20)
    mask = disk(90, 90, 20)
    click = next_click(mask, gt)
    region = error_region(mask, gt, click)
    assert click.positive and region.relation == "separate"
    assert region.where == image_where(click.x, click.y, (H, W)) == "the upper-left part of the image"
    text = describe_step(step_context(mask, gt, [click], "kidney", "CT", 1), random.Random(0))
    check_text(text, "kidney")
    assert "upper-left part of the image" in text

    gt2 = disk(60, 60, 25)
    mask2 = gt2 | disk(15, 105, 10)
    click2 = next_click(mask2, gt2)
    assert not click2.positive and error_region(mask2, gt2, click2).relation == "separate"
    text2 = describe_step(step_context(mask2, gt2, [click2], "kidney", "CT", 1), random.Random(0))
    check_text(text2, "kidney")
    assert "upper-right part of the image" in text2


def test_mask_too_small_or_too_large_all_around():
    gt = disk(60, 60, 35)
    small, large = disk(60, 60, 22), disk(60, 60, 50)
    add = next_click(small, gt)
    remove = next_click(large, gt)
    assert error_region(small, gt, add).relation == "around"
    assert error_region(large, gt, remove).relation == "around"
    check_text(describe_step(step_context(small, gt, [add], "liver"), random.Random(0)))
    check_text(describe_step(step_context(large, gt, [remove], "liver"), random.Random(0)))


def test_mask_on_the_wrong_structure():
    gt = disk(30, 30, 15)
    mask = disk(90, 90, 20)
    click = Click(90.5, 90.5, False)
    region = error_region(mask, gt, click)
    assert region.relation == "wrong"
    text = describe_step(step_context(mask, gt, [click], "spleen", "CT", 1), random.Random(0))
    check_text(text, "spleen")
    assert re.search(r"not sit on|does not match", text)


# -- step kinds -----------------------------------------------------------------------------------------------------
def test_initial_step():
    gt = disk(30, 90, 15)
    click = next_click(np.zeros_like(gt), gt)
    ctx = step_context(np.zeros_like(gt), gt, [click], "liver tumor", "CT", step=0)
    assert ctx.kind == "initial"
    texts = {describe_step(ctx, random.Random(s)) for s in range(30)}
    assert len(texts) >= 4
    for text in texts:
        check_text(text, "liver tumor")
        assert re.search(r"^(No mask|Nothing|There is no|No green mask)", text)
        assert "upper-right part of the image" in text or "positive point" in text
    two = disk(30, 30, 12) | disk(90, 90, 16)
    ctx2 = step_context(np.zeros_like(two), two, [next_click(np.zeros_like(two), two)], "kidney", "MRI")
    text = describe_step(ctx2, random.Random(0))
    check_text(text, "kidney")
    assert "two separate" in text and "lower-right part of the image" in text


def test_terminate_undo_discard_absent():
    gt = disk(60, 60, 30)
    done = step_context(gt, gt, [], "liver", "CT", step=4)
    assert done.kind == "terminate"
    text = describe_step(done, random.Random(0))
    check_text(text)
    assert text in {
        t.format(the_target="the liver", the_target_s="the liver's", neighbour="neighbouring tissue", it="it")
        for t in TERMINATE_CLOSE
    }

    before = disk(60, 60, 28)
    leaked = before | disk(60, 100, 15)  # the last point leaked to the right
    text = describe_step(undo_context(leaked, before, gt, "liver", "CT", 3), random.Random(0))
    check_text(text)
    assert "right side" in text and re.search(r"revert|undo", text)
    cut = before & ~disk(30, 60, 18)  # the last point cut away the upper part
    text = describe_step(undo_context(cut, before, gt, "liver", "CT", 3), random.Random(1))
    check_text(text)
    assert re.search(r"cut away|dropped out", text)
    check_text(describe_step(StepContext((H, W), leaked, gt, kind="undo", target="liver"), random.Random(0)))

    wrong = disk(95, 95, 15)
    text = describe_step(
        StepContext((H, W), wrong, gt, kind="discard", target="liver", modality="CT"), random.Random(0)
    )
    check_text(text)
    assert "discard" in text
    empty = np.zeros((H, W), bool)
    text = describe_step(
        StepContext((H, W), empty, empty, kind="absent", target="liver", modality="CT"), random.Random(0)
    )
    check_text(text)
    assert "liver" in text


def test_plural_target_and_several_clicks():
    gt = disk(60, 60, 30) | disk(15, 15, 8)
    mask = gt & (np.arange(W)[None, :] < 60) & ~disk(15, 15, 8)
    first = next_click(mask, gt)
    second = next_click(mask, gt & ~(np.arange(W)[None, :] >= 60))  # the small separate part
    ctx = step_context(mask, gt, [first, second], "neoplastic cells", "pathology", step=2)
    text = describe_step(ctx, random.Random(0))
    check_text(text, "neoplastic cells")
    assert "I also place a positive point" in text
    for seed in range(20):
        t = describe_step(step_context(mask, gt, [first], "neoplastic cells", "pathology", 2), random.Random(seed))
        assert not re.search(r"(?<!of the )neoplastic cells(?:'s)? (?:is|appears|lies|extends|has)\b", t), t


def test_modality_wording():
    gt = disk(60, 60, 30)
    mask = gt & (np.arange(W)[None, :] < 60)
    click = next_click(mask, gt)
    words = {
        "CT": "attenuation",
        "ultrasound": "echo texture",
        "dermoscopy": "pigmentation",
        "pathology": "staining pattern",
    }
    for modality, word in words.items():
        texts = {
            describe_step(step_context(mask, gt, [click], "lesion", modality, 1), random.Random(s)) for s in range(40)
        }
        assert any(word in t for t in texts), (modality, texts)


def test_determinism():
    gt = disk(60, 60, 30)
    mask = disk(60, 50, 30)
    ctx = step_context(mask, gt, [next_click(mask, gt)], "liver", "CT", 1)
    assert [describe_step(ctx, random.Random(7)) for _ in range(3)] == [describe_step(ctx, random.Random(7))] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "guess"}, "unknown step kind"),
        ({"mask": np.zeros((5, 5), bool)}, "shape"),
        ({"kind": "add", "clicks": ()}, "needs the click"),
        ({"kind": "add", "clicks": (Click(1, 1, False),)}, "starts with a positive"),
        ({"kind": "remove", "clicks": (Click(1, 1, True),)}, "starts with a negative"),
        ({"kind": "remove", "clicks": (Click(1, 1, False),)}, "non-empty mask"),
        ({"kind": "initial", "clicks": (Click(1, 1, False),)}, "positive clicks only"),
    ],
)
def test_context_validation(kwargs, message):
    args = {"image_size": (H, W), "mask": np.zeros((H, W), bool), "gt": disk(60, 60, 10), "target": "liver"}
    with pytest.raises(ValueError, match=message):
        StepContext(**{**args, **kwargs})


def test_oracle_facts():
    gt = disk(60, 60, 30)
    mask = gt & (np.arange(W)[None, :] < 60)
    click = next_click(mask, gt)
    facts = oracle_facts(step_context(mask, gt, [click], "liver", "CT", 1, previous_iou=0.3))
    assert facts["kind"] == "add" and facts["modality"] == "CT" and facts["previous_iou"] == 0.3
    assert 0.4 < facts["target_fraction_covered"] < 0.6 and facts["mask_fraction_outside_target"] == 0.0
    (c,) = facts["clicks"]
    assert c["sign"] == "positive" and c["region_relation"] == "outside" and c["region_side"] == "right"
    assert c["x"] == pytest.approx(click.x / W, abs=1e-4) and c["y"] == pytest.approx(click.y / H, abs=1e-4)


def test_bank_structure():
    # every bank keeps a template that needs no {dir}, so steps with an unclear side always have a phrasing
    for bank in (*ADD.values(), *REMOVE.values()):
        assert any("{dir}" not in t for t in bank)


# -- many oracle steps ----------------------------------------------------------------------------------------------
def _paint(mask: np.ndarray, click: Click, radius: float) -> np.ndarray:
    blob = disk(click.y, click.x, radius, mask.shape)
    return mask | blob if click.positive else mask & ~blob


def _episode_texts(gt: np.ndarray, target: str, modality: str, rng: random.Random, start: np.ndarray, steps: int = 6):
    """Run the click simulator with a disk-painting stand-in tool and describe each step."""
    mask, clicked, out = start.copy(), [], []
    radius = max(3.0, float(np.sqrt(gt.sum() / np.pi)) * rng.uniform(0.3, 0.9))
    for step in range(steps):
        click = next_click(mask, gt, clicked, target)
        ctx = step_context(mask, gt, [click] if click else [], target, modality, step)
        out.append((ctx.kind, describe_step(ctx, rng)))
        if click is None:
            break
        previous, mask = mask, _paint(mask, click, radius)
        clicked.append(click)
        if rng.random() < 0.2 and previous.any():
            out.append(("undo", describe_step(undo_context(mask, previous, gt, target, modality, step), rng)))
            mask = previous
    out.append(("terminate", describe_step(step_context(mask, gt, [], target, modality, steps), rng)))
    return out


def _random_shape(rng: random.Random, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.ogrid[:h, :w]
    out = np.zeros(size, bool)
    for _ in range(rng.randint(1, 3)):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ay, ax, t = rng.uniform(0.04, 0.3) * h, rng.uniform(0.04, 0.3) * w, rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
        out |= (u / ay) ** 2 + (v / ax) ** 2 <= 1
    return out


def test_no_leak_on_random_oracle_steps():
    rng = random.Random(123)
    targets = ["liver", "neoplastic cells", "left kidney", "optic disc", "lung opacity"]
    modalities = ["CT", "MRI", "X-Ray", "pathology", "fundus", "OCT", "ultrasound", "dermoscopy", "endoscope", ""]
    kinds = set()
    for i in range(60):
        gt = _random_shape(rng, (96, 128))
        start = [np.zeros_like(gt), _random_shape(rng, (96, 128)), gt ^ _random_shape(rng, (96, 128))][i % 3]
        target, modality = targets[i % len(targets)], modalities[i % len(modalities)]
        for kind, text in _episode_texts(gt, target, modality, rng, start):
            kinds.add(kind)
            check_text(text, target)
    assert {"initial", "add", "remove", "terminate", "undo"} <= kinds


@needs_demo
def test_no_leak_on_demo_masks():
    from PIL import Image

    from ibisagent.datasets import list_biomedparse

    rng = random.Random(0)
    samples = list_biomedparse(DEMO)
    relations = set()
    for s in samples:
        arr = np.asarray(Image.open(s.mask))
        gt = (arr[..., 0] if arr.ndim == 3 else arr)[::4, ::4] > 0  # 256x256 keeps the test fast
        if not gt.any():
            continue
        shifted = np.roll(gt, rng.randint(-12, 12), axis=rng.randint(0, 1))
        grown = ndimage.binary_dilation(gt, iterations=3)
        for start in (np.zeros_like(gt), shifted, grown):
            for _, text in _episode_texts(gt, s.target, s.modality, rng, start, steps=4):
                check_text(text, s.target)
                assert not find_leaks(text), text  # the demo target names hold no forbidden word themselves
            click = next_click(start, gt)
            if click is not None:
                relations.add(error_region(start, gt, click).relation)
    assert len(relations) >= 3
