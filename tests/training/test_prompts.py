"""The instruction and answer library: grammar of filled templates, families and styles, determinism, absent
targets, user template files, and every demo target/modality filled cleanly."""

from __future__ import annotations

import json
import random
import re

import pytest

from ibisagent_training.leaks import find_leaks
from ibisagent_training.prompts import (
    ANSWER_STYLES,
    INITIAL_FAMILIES,
    INTERROGATIVE_FAMILIES,
    REFINEMENT_KINDS,
    InstructionLibrary,
    Prompt,
    article,
    fill,
    find_unsupported,
    is_plural,
    modality_words,
)
from tests.conftest import DEMO, needs_demo

TARGETS = ["liver tumor", "adrenal gland", "neoplastic cells", "uterus", "pancreas", "optic disc", "COVID-19 infection"]
MODALITIES = ["CT", "MRI", "MRI-FLAIR", "X-Ray", "pathology", "ultrasound", "OCT", "endoscope", ""]


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("liver tumor", "a"),
        ("adrenal gland", "an"),
        ("optic disc", "an"),
        ("uterus", "a"),
        ("MRI scan", "an"),
        ("CT scan", "a"),
        ("X-ray image", "an"),
        ("OCT scan", "an"),
        ("FLAIR MRI scan", "a"),
        ("ultrasound image", "an"),
        ("endoscopy image", "an"),
        ("hour", "an"),
        ("COVID-19 infection", "a"),
        ("8 mm nodule", "an"),
        ("PET scan", "a"),
    ],
)
def test_article(phrase, expected):
    assert article(phrase) == expected


@pytest.mark.parametrize(
    "target, plural",
    [
        ("neoplastic cells", True),
        ("polyps", True),
        ("nuclei", True),
        ("liver tumor", False),
        ("pancreas", False),
        ("uterus", False),
        ("public symphysis", False),
        ("glandular structure", False),
    ],
)
def test_is_plural(target, plural):
    assert is_plural(target) is plural


def test_modality_words():
    assert modality_words("CT").image == "CT scan"
    assert modality_words("X-Ray").display == "X-ray"
    assert modality_words("MRI-T2").display == "T2 MRI"
    assert modality_words("endoscope").image == "endoscopy image"
    assert modality_words("").image == "image"
    assert modality_words("thermal").image == "thermal image"


def test_singular_and_plural_filling():
    lib = InstructionLibrary()
    template = "{Is_there} {a_target} in this {image}? If so, please segment {it}."
    assert (
        fill(template, "adrenal gland", "MRI")
        == "Is there an adrenal gland in this MRI scan? If so, please segment it."
    )
    assert fill(template, "neoplastic cells", "pathology") == (
        "Are there neoplastic cells in this pathology slide? If so, please segment them."
    )
    assert (
        fill("{The_target} {has} been segmented.", "polyp", "endoscope", plural=True)
        == "The polyp have been segmented."
    )
    assert lib.answer("liver", "CT", random.Random(0), style="direct")  # non-empty


def test_library_shape():
    lib = InstructionLibrary()
    assert set(INTERROGATIVE_FAMILIES) <= set(INITIAL_FAMILIES) and len(INTERROGATIVE_FAMILIES) == 5
    assert set(lib.initial_templates) == set(INITIAL_FAMILIES)
    assert all(len(t) >= 4 for t in lib.initial_templates.values())
    assert {"next_step", "error_correction", "verification"} == set(REFINEMENT_KINDS)
    assert all(len(t) >= 4 for t in lib.refinement_templates.values())
    assert len(ANSWER_STYLES) == 5 and all(len(lib.answer_templates[s]) >= 4 for s in ANSWER_STYLES)
    assert len(lib.absent_questions) >= 4 and len(lib.absent_refusals) >= 4


def _all_filled(lib: InstructionLibrary, target: str, modality: str) -> list[str]:
    groups = [*lib.initial_templates.values(), *lib.refinement_templates.values(), *lib.answer_templates.values()]
    groups += [lib.absent_questions, lib.absent_refusals]
    return [fill(t, target, modality) for g in groups for t in g]


@pytest.mark.parametrize("target", TARGETS)
def test_every_template_fills_cleanly(target):
    lib = InstructionLibrary()
    for modality in MODALITIES:
        for text in _all_filled(lib, target, modality):
            assert "{" not in text and "}" not in text, text
            assert "  " not in text and " ." not in text and " ?" not in text, text
            assert text[0].isupper() and text[-1] in ".?!", text
            assert not find_leaks(text), text
            assert not re.search(r"\ba (?:[aeio]|MRI|X-ray|OCT|ultrasound|adrenal|optic)", text), text
            assert not re.search(r"\ban (?:CT|liver|neoplastic|uterus|COVID|FLAIR|pathology|pancreas)\b", text), text
            assert "this  " not in text and "the the" not in text.lower(), text
            if is_plural(target):
                assert not re.search(rf"(?<!of )the {re.escape(target)} (?:is|was|has)\b", text, re.I), text
                assert "there is " + target not in text.lower(), text
            else:
                assert not re.search(rf"{re.escape(target)} (?:are|were|have)\b", text), text


def test_templates_ask_only_what_the_grammar_can_do():
    lib = InstructionLibrary()
    texts = [fill(t, "liver", "CT") for g in lib.initial_templates.values() for t in g]
    texts += [fill(t, "liver", "CT") for g in lib.refinement_templates.values() for t in g]
    texts += [fill(t, "liver", "CT") for t in lib.absent_questions]
    for text in texts:
        assert not find_unsupported(text), text
    assert find_unsupported("How many nodules? Measure the largest.") == ["how many", "measure"]


def test_sampling_is_deterministic_and_covers_families():
    lib = InstructionLibrary()

    def draw(seed: int) -> list:
        rng = random.Random(seed)
        out = [lib.initial("liver tumor", "CT", rng) for _ in range(300)]
        out += [lib.refinement(rng, target="liver tumor", modality="CT") for _ in range(100)]
        out += [lib.answer("liver tumor", "CT", rng) for _ in range(50)]
        out += [lib.absent("liver tumor", "CT", rng) for _ in range(20)]
        return out

    a, b, c = draw(1), draw(1), draw(2)
    assert a == b and a != c
    prompts = [p for p in a if isinstance(p, Prompt)]
    assert {p.family for p in prompts[:300]} == set(INITIAL_FAMILIES)
    assert {p.family for p in prompts[300:]} == set(REFINEMENT_KINDS)
    assert len({p.text for p in prompts[:300]}) >= 30  # many distinct instructions
    for family in INITIAL_FAMILIES:
        p = lib.initial("spleen", "MRI", random.Random(0), family=family)
        assert p.family == family and p.text in {fill(t, "spleen", "MRI") for t in lib.initial_templates[family]}
    for style in ANSWER_STYLES:
        text = lib.answer("spleen", "MRI", random.Random(0), style=style)
        assert text in {fill(t, "spleen", "MRI") for t in lib.answer_templates[style]}


def test_error_correction_prompts_follow_the_error():
    lib = InstructionLibrary()
    rng = random.Random(0)
    over = {lib.refinement(rng, "error_correction", "kidney", "CT", error="over").text for _ in range(50)}
    under = {lib.refinement(rng, "error_correction", "kidney", "CT", error="under").text for _ in range(50)}
    generic = {lib.refinement(rng, "error_correction", "kidney", "CT").text for _ in range(50)}
    assert over == {fill(t, "kidney", "CT") for t in lib.refinement_templates["error_correction_over"]}
    assert under == {fill(t, "kidney", "CT") for t in lib.refinement_templates["error_correction_under"]}
    assert generic == {fill(t, "kidney", "CT") for t in lib.refinement_templates["error_correction"]}
    assert not over & under and not generic & (over | under)
    with pytest.raises(ValueError, match="error hint"):
        lib.refinement(rng, "error_correction", error="sideways")
    with pytest.raises(ValueError, match="refinement kind"):
        lib.refinement(rng, "guess")
    with pytest.raises(ValueError, match="initial family"):
        lib.initial("kidney", "CT", rng, family="poetic")
    with pytest.raises(ValueError, match="answer style"):
        lib.answer("kidney", "CT", rng, style="rude")
    with pytest.raises(ValueError, match="target name is empty"):
        lib.initial(" ", "CT", rng)


def test_absent_questions_and_refusals():
    lib = InstructionLibrary()
    rng = random.Random(3)
    for target in TARGETS:
        for _ in range(20):
            question, refusal = lib.absent(target, "CT", rng)
            assert target in question
            assert re.search(r"\b(not|no|nothing|cannot)\b", refusal, re.IGNORECASE), refusal
            assert re.search(r"segment", refusal, re.IGNORECASE), refusal
            assert not re.search(rf"{re.escape(target)} (?:is|are|has been|have been) segmented", refusal), refusal


def test_user_template_file_replaces_defaults(tmp_path):
    data = {
        "initial": {"direct": ["Segment {the_target} now.", "Mask {the_target} on this {image}."]},
        "answers": {"direct": ["Finished with {the_target}."]},
        "absent_refusals": ["{The_target} {is} not visible, so nothing was segmented."],
    }
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(data))
    lib = InstructionLibrary.from_file(path)
    rng = random.Random(0)
    assert lib.initial("spleen", "CT", rng, family="direct").text in {
        "Segment the spleen now.",
        "Mask the spleen on this CT scan.",
    }
    assert lib.answer("spleen", "CT", rng, style="direct") == "Finished with the spleen."
    assert lib.absent("spleen", "CT", rng)[1] == "The spleen is not visible, so nothing was segmented."
    assert lib.initial_templates["goal"] == InstructionLibrary().initial_templates["goal"]  # untouched families stay

    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "all.yaml"
    ypath.write_text(yaml.safe_dump(InstructionLibrary().to_dict()))
    assert InstructionLibrary.from_file(ypath).to_dict() == InstructionLibrary().to_dict()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"initial": {"direct": ["Segment {organ}."]}}, "unknown field"),
        ({"initial": {"direct": ["Segment the red region of {the_target}."]}}, "forbidden"),
        ({"initial": {"direct": ["Count {the_target} and segment them."]}}, "cannot do"),
        ({"initial": {"direct": ["Segment it."]}}, "must name the target"),
        ({"initial": {"direct": []}}, "empty"),
        ({"initial": {"poetic": ["Segment {the_target}."]}}, "unknown name"),
        ({"questions": ["{target}?"]}, "unknown section"),
    ],
)
def test_bad_user_templates_are_refused(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        InstructionLibrary.from_file(path)


def test_bad_template_file_type(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("{}")
    with pytest.raises(ValueError, match="use .json"):
        InstructionLibrary.from_file(path)
    with pytest.raises(FileNotFoundError):
        InstructionLibrary.from_file(tmp_path / "missing.json")


@needs_demo
def test_demo_targets_and_modalities_fill_cleanly():
    from ibisagent.datasets import list_biomedparse

    samples = list_biomedparse(DEMO)
    assert len(samples) == 71
    lib = InstructionLibrary()
    for s in samples:
        for text in _all_filled(lib, s.target, s.modality):
            assert "{" not in text and "  " not in text, text
            assert not find_leaks(text, allow=(s.target,)), text
