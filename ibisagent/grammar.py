"""The action grammar: formatting and parsing the model's `<think>`, `<action>` and `<answer>` sections.

Two dialects share one parser:

* ``ibis`` (the paper's): one click per line, ``<target>: <positive|negative> (x, y)``; several targets may appear
  in one action; ``Terminate`` ends the episode; ``Undo`` reverts the previous step. Example::

      <think>
      The lesion sits in the right lobe; nothing is segmented yet.
      </think>
      <action>
      liver tumor: positive (0.4120, 0.5533)
      </action>

* ``released`` (the authors' released checkpoint): ``Positive Point (x, y)``, ``Negative Point (x, y)`` or
  ``Terminate`` (``Termination``, used by their RL reward, is accepted too); the target is the episode's.

Coordinates in text are normalised to [0, scale] (scale 1.0 by default, 4 decimals). A normalised x maps to pixel
column ``min(floor(x * W), W - 1)`` and the click lies at that pixel's centre, so formatting a click and parsing it
back returns the same pixel (on sides shorter than scale * 10**decimals pixels, 10,000 by default: beyond that the
rounded text no longer pins down one pixel). The parser raises only `ActionParseError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ibisagent.types import DEFAULT_TARGET, Action, Click, ParsedOutput

DIALECTS = ("ibis", "released")
_TERMINATE = re.compile(r"^(terminate|termination)\.?$", re.IGNORECASE)
_UNDO = re.compile(r"^undo\.?$", re.IGNORECASE)
_NUMBER = r"[^,()\s]+"
# The target ends on a non-space: `.+?` followed by `\s*` re-scanned every run of spaces from each of its
# positions, quadratic on a long degenerate line (200,000 characters took over a minute). Same language, same groups
# after the strip the parser applies.
_IBIS_LINE = re.compile(
    rf"^(?P<target>.*?\S)\s*:\s*(?P<attr>[A-Za-z_-]+)(?:\s+point)?\s*\(\s*(?P<x>{_NUMBER})\s*,\s*(?P<y>{_NUMBER})\s*\)$",
    re.IGNORECASE,
)
_RELEASED_LINE = re.compile(
    rf"^(?P<attr>[A-Za-z_-]+)\s+point\s*\(\s*(?P<x>{_NUMBER})\s*,\s*(?P<y>{_NUMBER})\s*\)$", re.IGNORECASE
)
_ATTRIBUTES = {"positive": True, "pos": True, "negative": False, "neg": False}


class ActionParseError(ValueError):
    """The model's text does not follow the grammar.

    kind:     missing_tag | unclosed_tag | empty_action | bad_syntax | bad_number | out_of_range |
              unknown_attribute | mixed_action
    position: character offset in the text where the problem was found (-1 if not applicable).
    """

    def __init__(self, kind: str, message: str, position: int = -1):
        super().__init__(f"{kind}: {message}" + (f" (at character {position})" if position >= 0 else ""))
        self.kind = kind
        self.position = position


def _section(text: str, tag: str) -> tuple[str | None, int]:
    """Content of the first <tag>...</tag> and its offset; (None, -1) when the tag is absent."""
    start = text.find(f"<{tag}>")
    if start < 0:
        if f"</{tag}>" in text:
            raise ActionParseError("missing_tag", f"found </{tag}> without an opening <{tag}>", text.find(f"</{tag}>"))
        return None, -1
    body = start + len(tag) + 2
    end = text.find(f"</{tag}>", body)
    if end < 0:
        raise ActionParseError("unclosed_tag", f"<{tag}> is never closed with </{tag}>", start)
    return text[body:end], body


@dataclass(frozen=True)
class Grammar:
    """Format and parse one dialect. `scale` is the top of the normalised coordinate range."""

    dialect: str = "ibis"
    scale: float = 1.0
    decimals: int = 4

    def __post_init__(self):
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect!r}; choose one of {', '.join(DIALECTS)}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    # -- formatting ---------------------------------------------------------------------------------------
    def format_click(self, click: Click, image_size: tuple[int, int]) -> str:
        """One click as an action line. image_size: (H, W) of the image the click's pixels refer to."""
        h, w = image_size
        x = round(click.x / w * self.scale, self.decimals)
        y = round(click.y / h * self.scale, self.decimals)
        coords = f"({x:.{self.decimals}f}, {y:.{self.decimals}f})"
        sign = "positive" if click.positive else "negative"
        if self.dialect == "released":
            return f"{sign.capitalize()} Point {coords}"
        return f"{click.target}: {sign} {coords}"

    def format_action(self, action: Action, image_size: tuple[int, int]) -> str:
        """The body of an <action> section."""
        if action.terminate:
            return "Terminate"
        if action.undo:
            return "Undo"
        if not action.clicks:
            raise ValueError("cannot format an empty action: give clicks or terminate")
        return "\n".join(self.format_click(c, image_size) for c in action.clicks)

    def format(self, action: Action, image_size: tuple[int, int], think: str = "", answer: str | None = None) -> str:
        """A whole model turn: <think>, <action> and, when terminating, <answer>."""
        text = f"<think>\n{think.strip()}\n</think>\n<action>\n{self.format_action(action, image_size)}\n</action>"
        if answer is not None:
            text += f"\n<answer>\n{answer.strip()}\n</answer>"
        return text

    # -- parsing ------------------------------------------------------------------------------------------
    def _coordinate(self, token: str, size: int, offset: int, axis: str) -> float:
        try:
            value = float(token)
        except ValueError:
            raise ActionParseError("bad_number", f"{axis} coordinate {token!r} is not a number", offset) from None
        if not math.isfinite(value):
            raise ActionParseError("bad_number", f"{axis} coordinate {token!r} is not finite", offset)
        if not 0 <= value <= self.scale:
            raise ActionParseError("out_of_range", f"{axis} = {token} is outside [0, {self.scale:g}]", offset)
        return min(math.floor(value / self.scale * size), size - 1) + 0.5

    def parse_action(
        self, body: str, image_size: tuple[int, int], default_target: str = DEFAULT_TARGET, offset: int = 0
    ) -> Action:
        """Parse the body of an <action> section. image_size: (H, W) of the image to map coordinates onto."""
        h, w = image_size
        lines = [(m.start() + offset, m.group().strip()) for m in re.finditer(r"[^\n;]+", body) if m.group().strip()]
        if not lines:
            raise ActionParseError("empty_action", "the <action> section is empty; write clicks or Terminate", offset)
        if any(_TERMINATE.match(line) for _, line in lines):
            if len(lines) > 1:
                raise ActionParseError("mixed_action", "Terminate must be the only command in its action", offset)
            return Action(terminate=True)
        if any(_UNDO.match(line) for _, line in lines):
            if len(lines) > 1:
                raise ActionParseError("mixed_action", "Undo must be the only command in its action", offset)
            return Action(undo=True)
        clicks = []
        for pos, line in lines:
            m = (_RELEASED_LINE if self.dialect == "released" else _IBIS_LINE).match(line)
            if m is None and self.dialect == "ibis":
                m = _RELEASED_LINE.match(line)  # accept the released form inside the paper dialect too
            if m is None:
                expected = "Positive Point (x, y)" if self.dialect == "released" else "<target>: positive (x, y)"
                raise ActionParseError(
                    "bad_syntax", f"cannot read {line[:80]!r}; expected {expected} or Terminate", pos
                )
            attr = m.group("attr").lower()
            if attr not in _ATTRIBUTES:
                raise ActionParseError(
                    "unknown_attribute",
                    f"attribute {m.group('attr')!r} is neither positive nor negative",
                    pos + m.start("attr"),
                )
            x = self._coordinate(m.group("x"), w, pos + m.start("x"), "x")
            y = self._coordinate(m.group("y"), h, pos + m.start("y"), "y")
            target = m.groupdict().get("target") or default_target
            clicks.append(Click(x, y, _ATTRIBUTES[attr], target.strip()))
        return Action(tuple(clicks))

    def parse(self, text: str, image_size: tuple[int, int], default_target: str = DEFAULT_TARGET) -> ParsedOutput:
        """Split a model turn into think / action / answer. A turn must hold an <action> or an <answer>."""
        if not isinstance(text, str):
            raise ActionParseError("bad_syntax", f"expected text, got {type(text).__name__}")
        think, _ = _section(text, "think")
        body, offset = _section(text, "action")
        answer, _ = _section(text, "answer")
        if body is None and answer is None:
            raise ActionParseError("missing_tag", "no <action> or <answer> section found; write <action>...</action>")
        action = None if body is None else self.parse_action(body, image_size, default_target, offset)
        if action is not None and answer is not None and not action.terminate:
            raise ActionParseError(
                "mixed_action", "an <answer> may only follow a Terminate action", text.find("<answer>")
            )
        return ParsedOutput(
            think=(think or "").strip(), action=action, answer=None if answer is None else answer.strip(), raw=text
        )


def target_from_instruction(instruction: str) -> str:
    """The target name of a plain instruction ("Segment the liver tumor." -> "liver tumor"); "target" otherwise."""
    text = instruction.strip().rstrip(".?!")
    for lead in ("please segment the ", "segment the ", "please segment ", "segment ", "find the ", "outline the "):
        if text.lower().startswith(lead):
            return text[len(lead) :].strip() or "target"
    return "target"
