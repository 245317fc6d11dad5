"""The policy protocol: given an observation, write the model's text for the next step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ibisagent.types import Click


@dataclass
class Observation:
    """What a policy may look at before step `step` (0-based).

    image:       HxWx3 uint8, the original image with the current masks overlaid (`ibisagent.render.overlay`).
                 This is all a vision-language policy sees. It may be given as a function that renders it: it is
                 then rendered when first read (the oracle, which never reads it, renders nothing).
    original:    HxWx3 uint8, the image without overlay.
    has_mask:    whether any mask is shown (False at an initialisation step).
    masks, clicks: the episode state per target ((x, y) pixels), for privileged policies (oracle) and logging.
    feedback:    a message about the previous output when it could not be used (e.g. a parse error), else None.
    """

    step: int
    instruction: str
    _image: np.ndarray | Callable[[], np.ndarray] = field(repr=False)
    original: np.ndarray
    has_mask: bool
    targets: list[str]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    clicks: dict[str, tuple[Click, ...]] = field(default_factory=dict)
    feedback: str | None = None

    @property
    def image(self) -> np.ndarray:
        if callable(self._image):
            self._image = self._image()
        return self._image

    @property
    def image_size(self) -> tuple[int, int]:
        return self.original.shape[0], self.original.shape[1]


@runtime_checkable
class Policy(Protocol):
    """A policy writes text in its `dialect` of the action grammar (see `ibisagent.grammar`)."""

    dialect: str

    def start(self, instruction: str, targets: list[str]) -> None:
        """Begin a new episode (forget any conversation)."""

    def act(self, obs: Observation) -> str:
        """The model's text for this step: <think>…</think><action>…</action>[<answer>…</answer>]."""
