from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibisagent.grammar import ActionParseError, Grammar
from ibisagent.types import Action, Click

SIZE = (480, 640)  # H, W


TARGETS = st.sampled_from(["liver tumor", "left kidney", "polyp"])


def pixel_clicks(draw_target=TARGETS):
    return st.builds(
        lambda col, row, pos, t: Click(col + 0.5, row + 0.5, pos, t),
        st.integers(0, SIZE[1] - 1),
        st.integers(0, SIZE[0] - 1),
        st.booleans(),
        draw_target,
    )


@given(st.lists(pixel_clicks(), min_size=1, max_size=4), st.text(max_size=40).filter(lambda s: "<" not in s))
def test_ibis_round_trip_multi_target(clicks, think):
    g = Grammar("ibis")
    text = g.format(Action(tuple(clicks)), SIZE, think=think)
    parsed = g.parse(text, SIZE)
    assert parsed.action == Action(tuple(clicks))
    assert parsed.think == think.strip()


@given(pixel_clicks(st.just("target")))
def test_released_round_trip(click):
    g = Grammar("released")
    text = g.format(Action((click,)), SIZE, think="look")
    assert ("Positive Point (" if click.positive else "Negative Point (") in text
    assert g.parse(text, SIZE).action == Action((click,))


def test_released_checkpoint_text_is_understood():
    text = "<think>\nThe lesion is bright.\n</think>\n<action>\nPositive Point (0.5000, 0.2500)\n</action>"
    action = Grammar("released").parse(text, (100, 200), default_target="liver tumor").action
    assert action.clicks == (Click(100.5, 25.5, True, "liver tumor"),)
    for end in ("Terminate", "Termination"):
        parsed = Grammar("released").parse(
            f"<think>\nok\n</think>\n<action>\n{end}\n</action>\n<answer>\nDone.\n</answer>", SIZE
        )
        assert parsed.action.terminate and parsed.answer == "Done."


def test_terminate_undo_and_answer_only():
    g = Grammar("ibis")
    assert (
        g.parse(g.format(Action(terminate=True), SIZE, "fine", answer="The liver is segmented."), SIZE).answer
        == "The liver is segmented."
    )
    assert g.parse("<think>wrong click</think><action>Undo</action>", SIZE).action.undo
    vqa = g.parse("<think>no mask needed</think><answer>B</answer>", SIZE)
    assert vqa.action is None and vqa.answer == "B"


def test_coordinate_edges_map_into_the_image():
    g = Grammar("ibis")
    a = g.parse("<action>t: positive (1.0, 0.0)</action>", SIZE).action
    assert a.clicks[0].pixel(*SIZE) == (0, SIZE[1] - 1)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("no tags at all", "missing_tag"),
        ("<think>x</think>", "missing_tag"),
        ("<action>t: positive (0.1, 0.2)", "unclosed_tag"),
        ("t: positive (0.1, 0.2)</action>", "missing_tag"),
        ("<action>  \n </action>", "empty_action"),
        ("<action>t: positive (0.1, abc)</action>", "bad_number"),
        ("<action>t: positive (nan, 0.2)</action>", "bad_number"),
        ("<action>t: positive (1.5, 0.2)</action>", "out_of_range"),
        ("<action>t: positive (-0.1, 0.2)</action>", "out_of_range"),
        ("<action>t: sideways (0.1, 0.2)</action>", "unknown_attribute"),
        ("<action>click somewhere</action>", "bad_syntax"),
        ("<action>Terminate\nt: positive (0.1, 0.2)</action>", "mixed_action"),
        ("<action>t: positive (0.1, 0.2)</action><answer>done</answer>", "mixed_action"),
    ],
)
def test_errors_are_typed_and_located(text, kind):
    with pytest.raises(ActionParseError) as info:
        Grammar("ibis").parse(text, SIZE)
    assert info.value.kind == kind
    assert kind in str(info.value)


def test_error_position_points_at_the_bad_number():
    text = "<think>a</think><action>\nliver: positive (0.1, 0.x2)\n</action>"
    with pytest.raises(ActionParseError) as info:
        Grammar("ibis").parse(text, SIZE)
    assert text[info.value.position :].startswith("0.x2")


def test_scale_1000():
    g = Grammar("ibis", scale=1000, decimals=0)
    a = g.parse("<action>t: negative (500, 250)</action>", (100, 200)).action
    assert a.clicks[0] == Click(100.5, 25.5, False, "t")
    text = g.format(a, (100, 200))
    assert "(502, 255)" in text  # the pixel centre of column 100, row 25
    assert g.parse(text, (100, 200)).action == a


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/thinkactoswer:()., 0123456789-+eEPNpTUdx\n;")), max_size=120))
def test_arbitrary_text_never_escapes(text):
    for dialect in ("ibis", "released"):
        try:
            Grammar(dialect).parse(text, SIZE)
        except ActionParseError:
            pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_unicode_never_escapes(text):
    for wrapped in (
        text,
        f"<action>{text}</action>",
        f"<think>{text}</think><action>liver: positive ({text})</action>",
    ):
        try:
            Grammar("ibis").parse(wrapped, SIZE)
        except ActionParseError:
            pass


def test_target_from_instruction():
    from ibisagent.grammar import target_from_instruction

    assert target_from_instruction("Segment the liver tumor.") == "liver tumor"
    assert target_from_instruction("please segment left kidney") == "left kidney"
    assert target_from_instruction("Is there a polyp?") == "target"
