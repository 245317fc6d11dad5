"""Value types shared by every part of IBISAgent: clicks, actions and the model's parsed output.

Coordinate convention (the only one in the project): a `Click` holds (x, y) in pixels of the original image,
x = column, y = row, as floats whose integer part indexes the pixel (`mask[int(y), int(x)]`). Text grammars use
normalised coordinates and convert at the parser; MONAI Label requests and Slicer's RAS convert at their own edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TARGET = "target"


# The longest instruction a user may give (CLI, server): text beyond it only keeps the model busy.
MAX_INSTRUCTION_CHARS = 2000


@dataclass(frozen=True)
class Click:
    """One click: (x, y) in pixels of the original image (x = column, y = row); positive adds, negative removes."""

    x: float
    y: float
    positive: bool
    target: str = DEFAULT_TARGET

    def pixel(self, height: int, width: int) -> tuple[int, int]:
        """The (row, col) index of the clicked pixel in an HxW image, clipped into the image."""
        return min(max(int(self.y), 0), height - 1), min(max(int(self.x), 0), width - 1)

    def to_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "positive": self.positive, "target": self.target}

    @classmethod
    def from_dict(cls, d: dict) -> Click:
        return cls(float(d["x"]), float(d["y"]), bool(d["positive"]), str(d.get("target", DEFAULT_TARGET)))


@dataclass(frozen=True)
class Action:
    """What the policy decided at one step: clicks (possibly for several targets), or the end of the episode."""

    clicks: tuple[Click, ...] = ()
    terminate: bool = False
    undo: bool = False  # revert the previous step (the agent noticed a wrong click)

    def __post_init__(self):
        if self.terminate + self.undo + bool(self.clicks) != 1:
            raise ValueError("an Action does exactly one thing: clicks, terminate or undo")

    @property
    def targets(self) -> list[str]:
        """Target names in first-appearance order."""
        return list(dict.fromkeys(c.target for c in self.clicks))

    def to_dict(self) -> dict:
        return {"terminate": self.terminate, "undo": self.undo, "clicks": [c.to_dict() for c in self.clicks]}

    @classmethod
    def from_dict(cls, d: dict) -> Action:
        clicks = tuple(Click.from_dict(c) for c in d.get("clicks", []))
        return cls(clicks, bool(d.get("terminate", False)), bool(d.get("undo", False)))


@dataclass(frozen=True)
class ParsedOutput:
    """A model turn split into its sections. `action` is None only when the turn carries an answer alone."""

    think: str = ""
    action: Action | None = None
    answer: str | None = None
    raw: str = ""
    extra: dict = field(default_factory=dict)
