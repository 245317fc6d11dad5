"""The leak filter of the SFT data: words that name what only the oracle sees ("red", "FP", "ground truth", ...)
and must never appear in a text meant for the agent (its reasoning, the instructions, a teacher's output).

The instruction library (`prompts.py`), the reasoning generator (`reasoning.py`) and the teacher (`teacher.py`) all
check their texts here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FORBIDDEN = (
    "red",
    "blue",
    "cross",
    "crosshair",
    "star",
    "TP",
    "FP",
    "FN",
    "TN",
    "true positive",
    "false positive",
    "false negative",
    "true negative",
    "ground truth",
    "groundtruth",
    "GT",
    "gold standard",
    "oracle",
    "annotation mask",
    "reference mask",
    "label mask",
    "target mask",
    "green outline",
    "green contour",
    "error map",
    "IoU",
    "Dice",
    "privileged",
    "teacher",
    "simulator",
)


def _term_pattern(term: str) -> str:
    # whole words, case-insensitive; spaces and hyphens interchangeable ("ground truth" = "ground-truth");
    # a plural ending still counts ("FPs", "crosses", "reds")
    body = r"[\s\-_]+".join(re.escape(w) for w in re.split(r"[\s\-]+", term))
    return rf"(?<![A-Za-z0-9]){body}(?:s|es)?(?![A-Za-z0-9])"


_LEAK_PATTERNS = [(t, re.compile(_term_pattern(t), re.IGNORECASE)) for t in FORBIDDEN]


class LeakError(ValueError):
    """A text meant for the agent names something only the oracle knows."""


def find_leaks(text: str, allow: Iterable[str] = ()) -> list[str]:
    """The `FORBIDDEN` terms found in `text` (case-insensitive whole words, plural endings included), in
    `FORBIDDEN` order. `allow`: phrases removed before the search, e.g. a target name such as "red blood cell"."""
    for phrase in allow:
        if phrase:
            text = re.sub(re.escape(phrase), " ", text, flags=re.IGNORECASE)
    return [term for term, pattern in _LEAK_PATTERNS if pattern.search(text)]


def assert_no_leak(text: str, allow: Iterable[str] = ()) -> None:
    """Raise `LeakError` (a ValueError) naming the forbidden terms found in `text`."""
    leaks = find_leaks(text, allow)
    if leaks:
        raise LeakError(
            f"text names privileged information {leaks}: {text!r}; rewrite it from the agent's view "
            "(the image and the single green mask), without these words"
        )
