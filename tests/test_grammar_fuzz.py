"""Fuzzing the action grammar (issue #5, hardening): generated model outputs must parse into clicks inside the image
or raise `ActionParseError`, never anything else, and valid actions must survive format -> parse unchanged.

Counts: `test_generated_outputs_parse_or_raise_action_parse_error` feeds 100,000 outputs from a seeded
`random.Random` (50,000 per dialect: random text, near-valid turns assembled from grammar pieces, and mutations of
both); the hypothesis tests add up to 7,000 structured outputs and 2,000 round trips.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ibisagent.grammar import DIALECTS, ActionParseError, Grammar
from ibisagent.types import Action, Click, ParsedOutput

KINDS = {
    "missing_tag",
    "unclosed_tag",
    "empty_action",
    "bad_syntax",
    "bad_number",
    "out_of_range",
    "unknown_attribute",
    "mixed_action",
}
N_GENERATED = 100_000
# 4 decimals of a [0, 1] coordinate pin down a pixel only on sides shorter than 10**4 (the error of rounding,
# 0.5e-4 x side, must stay under half a pixel); text -> click -> text holds there.
MAX_SIDE = 9_999

# -- grammar pieces ------------------------------------------------------------------------------------------------
TAGS = ["think", "action", "answer"]
BAD_TAGS = ["<Action>", "< action>", "<action >", "</ action>", "<<action>>", "<action/>", "<act", "ion>", "</answer"]
ATTRIBUTES = ["positive", "negative", "pos", "neg", "Positive", "NEGATIVE", "Pos", "positive point"]
BAD_ATTRIBUTES = ["neutral", "posit1ve", "", "pos-itive", "po\u017fitive", "\u0440ositive", "positive_", "-", "P"]
COMMANDS = ["Terminate", "Termination", "terminate.", "TERMINATE", "Undo", "undo.", "UNDO"]
BAD_COMMANDS = ["Terminated", "Terminate!", "Undo it", "stop", "Termin ate", "T\u0435rminate", "\u0130ndo"]
TARGETS = ["liver tumor", "left kidney", "polyp", "target", "a", "liver: left lobe", "\u809d\u810f", "x (y)", "7"]
# numbers in text: in range, odd but readable (float() takes "_", other scripts' digits), or bad (nan, inf, huge,
# negative, exponents out of range, lookalike characters)
GOOD_NUMBERS = [
    *"0 1 0.5 0.0000 1.0000 0.4120 .5 5. +0.25 -0 -0.0 1e-3 5E-1 1e0 0.1_5 1e-400".split(" "),
    *("\u0660.\u0665", "\uff10.\uff15", "0." + "9" * 400, "0" * 300 + ".5"),
]
BAD_NUMBERS = [
    *"nan NaN -nan inf -inf Infinity 1e400 -1e400 1.0001 -0.0001 2 -1 1e5 0x1 0..5 1_ _1 1e e1 --1 0.5.5".split(" "),
    *("9" * 400, "\u00bd", "\u22120.5", "1\u0301", "0.5\u200b", "\U0001d7ce", "\u0661e1", "True", "None", "1/2"),
]
JOINERS = ["\n", "\n", "\n", ";", "\r\n", "\n\n", " ; ", "\u2028", "\t\n"]
SPACES = ["", " ", " ", "  ", "\t", "\u00a0", "\u3000"]
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r;:,.()<>/+-_eE!?'\"[]{}\\|#*&%$@^~`"
    "\u00e9\u00df\u0130\u0131\u017f\u212a\u0301\u200b\u200f\u2028\u2029\u3000\ufeff\u00a0\u0660\u0665\uff10\uff15"
    "\u809d\u810f\u80bf\u7624\u0645\u0631\u0636\U0001f600\U0001d7ce\ud800"
)


class _Generator:
    """Seeded model outputs: random text, near-valid turns built from grammar pieces, and mutations of both."""

    def __init__(self, seed: int, dialect: str):
        self.r = random.Random(seed)
        self.dialect = dialect

    def size(self) -> tuple[int, int]:
        r = self.r
        pick = r.random()
        if pick < 0.1:
            return 1, 1
        if pick < 0.2:
            return r.randint(1, 3), r.randint(1, 3)
        return r.randint(1, 4096), r.randint(1, 4096)

    def text(self, n: int) -> str:
        return "".join(self.r.choice(ALPHABET) for _ in range(n))

    def number(self) -> str:
        r = self.r
        pick = r.random()
        if pick < 0.55:
            return f"{r.random():.{r.randint(0, 6)}f}"
        if pick < 0.7:
            return r.choice(GOOD_NUMBERS)
        if pick < 0.88:
            return r.choice(BAD_NUMBERS)
        if pick < 0.96:
            return f"{r.uniform(-9.99, 9.99):.{r.randint(0, 8)}f}{r.choice('eE')}{r.randint(-330, 330)}"
        return self.text(r.randint(0, 5))

    def click_line(self) -> str:
        r = self.r
        s = lambda: r.choice(SPACES)  # noqa: E731
        attr = r.choice(ATTRIBUTES) if r.random() < 0.9 else r.choice(BAD_ATTRIBUTES)
        coords = f"({s()}{self.number()}{s()},{s()}{self.number()}{s()})"
        if r.random() < 0.05:
            coords = r.choice(["", "(0.5)", "(0.5, 0.5, 0.5)", "[0.5, 0.5]", "(0.5, 0.5", "0.5, 0.5)", "()"])
        released = f"{attr.capitalize()}{s()} Point{s()}{coords}"
        ibis = f"{r.choice(TARGETS) if r.random() < 0.9 else self.text(r.randint(0, 8))}{s()}:{s()}{attr}{s()}{coords}"
        own, other = (released, ibis) if self.dialect == "released" else (ibis, released)
        return own if r.random() < 0.9 else other

    def action_body(self) -> str:
        r = self.r
        pick = r.random()
        if pick < 0.12:
            return r.choice(COMMANDS)
        if pick < 0.15:
            return r.choice(BAD_COMMANDS)
        if pick < 0.18:
            return r.choice(["", " ", "\n\n", ";", self.text(r.randint(1, 20))])
        lines = [self.click_line() for _ in range(r.choice([1, 1, 1, 2, 3, 5]))]
        if r.random() < 0.05:
            lines.insert(r.randint(0, len(lines)), r.choice(COMMANDS))
        return r.choice(JOINERS).join(lines)

    def turn(self) -> str:
        r = self.r
        parts = []
        if r.random() < 0.8:
            parts.append(f"<think>\n{self.text(r.randint(0, 40))}\n</think>")
        body = self.action_body()
        if r.random() < 0.95:
            parts.append(f"<action>\n{body}\n</action>")
        if r.random() < (0.6 if body.lower().startswith("termin") else 0.05):
            parts.append(f"<answer>\n{self.text(r.randint(0, 30))}\n</answer>")
        return r.choice(["\n", "", " "]).join(parts)

    def mutate(self, text: str) -> str:
        r = self.r
        for _ in range(r.randint(1, 3)):
            i, j = sorted(r.randint(0, len(text)) for _ in range(2))
            pick = r.random()
            if pick < 0.2:
                text = text[:i] + text[j:]  # cut a span (a tag, a digit, a bracket...)
            elif pick < 0.4:
                text = text[:i] + self.text(r.randint(1, 3)) + text[i:]
            elif pick < 0.55:
                tag = r.choice(TAGS)
                text = text[:i] + r.choice([f"<{tag}>", f"</{tag}>", r.choice(BAD_TAGS)]) + text[i:]
            elif pick < 0.65:
                text = text[:i]  # the model ran out of tokens
            elif pick < 0.75:
                text = text[:i] + text[i:j] * r.randint(2, 4) + text[j:]
            elif pick < 0.85:
                text = f"<action>{text}</action>"  # nested sections
            else:
                text = text.replace(r.choice(["(", ")", ",", ":", "\n", "<", ">", " "]), r.choice(["", " ", ";"]))
        return text

    def output(self) -> str:
        r = self.r
        pick = r.random()
        if pick < 0.1:
            return self.text(r.randint(0, 120))
        if pick < 0.6:
            return self.turn()
        return self.mutate(self.turn())


def _check(grammar: Grammar, text: str, size: tuple[int, int]) -> str:
    """Parse and check one output; returns "ok" or the error's kind. Any exception but ActionParseError escapes."""
    try:
        out = grammar.parse(text, size)
    except ActionParseError as exc:
        assert exc.kind in KINDS, exc.kind
        assert exc.position == -1 or 0 <= exc.position <= len(text), (exc.position, len(text))
        return exc.kind
    assert isinstance(out, ParsedOutput) and out.raw == text
    assert out.action is not None or out.answer is not None
    if out.action is not None:
        h, w = size
        for click in out.action.clicks:
            assert 0 <= click.x < w and 0 <= click.y < h, (click, size)
            assert click.x % 1 == 0.5 and click.y % 1 == 0.5, click  # a pixel's centre
            assert isinstance(click.target, str) and click.target.strip() == click.target != ""
    return "ok"


def test_generated_outputs_parse_or_raise_action_parse_error():
    """100,000 seeded outputs (50,000 per dialect): clicks inside the image or ActionParseError, nothing else."""
    outcomes: Counter[str] = Counter()
    failures = []
    t0 = time.perf_counter()
    for seed, dialect in enumerate(DIALECTS):
        grammar, gen = Grammar(dialect), _Generator(seed, dialect)
        for _ in range(N_GENERATED // len(DIALECTS)):
            text, size = gen.output(), gen.size()
            try:
                outcomes[_check(grammar, text, size)] += 1
            except Exception as exc:  # noqa: BLE001 - collect the inputs that break it, then report them
                failures.append(f"{dialect} {size} {text!r}: {type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - t0
    assert not failures, f"{len(failures)} outputs escaped:\n" + "\n".join(failures[:10])
    assert sum(outcomes.values()) == N_GENERATED
    # the mix reaches every outcome: enough valid turns, and every kind of error
    assert outcomes["ok"] >= N_GENERATED // 8 and set(outcomes) == KINDS | {"ok"}, outcomes
    print(f"{N_GENERATED} outputs in {elapsed:.1f} s: {dict(outcomes.most_common())}")


def test_long_lines_parse_in_linear_time():
    """A degenerate line (long runs of spaces between words, as a looping model writes) must not take quadratic
    time: 200,000 characters would take minutes with a backtracking blow-up."""
    for body in ("x" + " " * 200_000 + "y", "a:" + " \t" * 100_000 + "(", "t" + "  :" * 60_000):
        t0 = time.perf_counter()
        for dialect in DIALECTS:
            try:
                Grammar(dialect).parse(f"<action>{body}</action>", (64, 64))
            except ActionParseError:
                pass
        assert time.perf_counter() - t0 < 5.0, repr(body[:20])


# -- hypothesis: structured near-valid outputs -----------------------------------------------------------------
sizes = st.tuples(st.integers(1, 4096), st.integers(1, 4096))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 1).map(lambda v: f"{v:.4f}"),
    st.floats(-1e300, 1e300).map(lambda v: f"{v:e}"),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(GOOD_NUMBERS + BAD_NUMBERS),
    st.text(max_size=6),
)
pieces = st.one_of(
    st.sampled_from(["<think>", "</think>", "<action>", "</action>", "<answer>", "</answer>", *BAD_TAGS]),
    st.sampled_from(COMMANDS + BAD_COMMANDS + ATTRIBUTES + BAD_ATTRIBUTES + TARGETS + JOINERS),
    st.sampled_from(["Point", "point", "(", ")", ",", ":", " ", "\n", ";"]),
    numbers,
    st.text(max_size=8),
)
click_lines = st.builds(
    lambda target, attr, x, y, sp: f"{target}{sp}:{sp}{attr}{sp}({x},{sp}{y})",
    st.sampled_from(TARGETS) | st.text(max_size=6),
    st.sampled_from(ATTRIBUTES + BAD_ATTRIBUTES),
    numbers,
    numbers,
    st.sampled_from(SPACES),
) | st.builds(
    lambda attr, x, y: f"{attr} Point ({x}, {y})", st.sampled_from(ATTRIBUTES + BAD_ATTRIBUTES), numbers, numbers
)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(DIALECTS), st.lists(pieces, max_size=30).map("".join), sizes)
def test_concatenated_grammar_pieces(dialect, text, size):
    _check(Grammar(dialect), text, size)


@settings(max_examples=4000, deadline=None)
@given(
    st.sampled_from(DIALECTS),
    st.lists(click_lines | st.sampled_from(COMMANDS + BAD_COMMANDS), min_size=0, max_size=5),
    st.sampled_from(JOINERS),
    st.text(max_size=30),
    st.none() | st.text(max_size=20),
    sizes,
)
def test_action_sections_of_generated_lines(dialect, lines, joiner, think, answer, size):
    text = f"<think>{think}</think>\n<action>\n{joiner.join(lines)}\n</action>"
    if answer is not None:
        text += f"\n<answer>{answer}</answer>"
    _check(Grammar(dialect), text, size)


# -- hypothesis: format -> parse round trips ---------------------------------------------------------------------
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n;<"), min_size=1, max_size=20)
names = names.map(str.strip).filter(lambda s: s and s.lower().rstrip(".") not in ("terminate", "termination", "undo"))
plain = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=40)


@st.composite
def valid_turns(draw, dialect: str):
    """(grammar, action, image size, think, answer) for a valid action on an image smaller than MAX_SIDE."""
    h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    grammar = Grammar(dialect)
    kind = draw(st.sampled_from(["clicks", "clicks", "clicks", "terminate", "undo"]))
    if kind == "terminate":
        return grammar, Action(terminate=True), (h, w), draw(plain), draw(st.none() | plain)
    if kind == "undo":
        return grammar, Action(undo=True), (h, w), draw(plain), None
    target = st.just("target") if dialect == "released" else names
    click = st.builds(
        lambda col, row, positive, t: Click(col + 0.5, row + 0.5, positive, t),
        st.integers(0, w - 1),
        st.integers(0, h - 1),
        st.booleans(),
        target,
    )
    return grammar, Action(tuple(draw(st.lists(click, min_size=1, max_size=6)))), (h, w), draw(plain), None


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(DIALECTS).flatmap(valid_turns))
def test_format_then_parse_round_trips(turn):
    grammar, action, size, think, answer = turn
    text = grammar.format(action, size, think=think, answer=answer)
    parsed = grammar.parse(text, size)
    assert parsed.action == action, text
    assert parsed.think == think.strip() and parsed.answer == (None if answer is None else answer.strip())
    assert _check(grammar, text, size) == "ok"


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(DIALECTS), st.floats(0, 1), st.floats(0, 1), st.integers(1, MAX_SIDE), st.integers(1, MAX_SIDE))
def test_parse_then_format_round_trips(dialect, x, y, h, w):
    """Any in-range text coordinate lands on one pixel; formatting that click and parsing again gives it back."""
    grammar = Grammar(dialect)
    line = f"t: positive ({x!r}, {y!r})" if dialect == "ibis" else f"Positive Point ({x!r}, {y!r})"
    (click,) = grammar.parse(f"<action>{line}</action>", (h, w)).action.clicks
    assert (click.x - 0.5, click.y - 0.5) == (min(math.floor(x * w), w - 1), min(math.floor(y * h), h - 1))
    again = grammar.parse_action(grammar.format_action(Action((click,)), (h, w)), (h, w), click.target)
    assert again == Action((click,))
