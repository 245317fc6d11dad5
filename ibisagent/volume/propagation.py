"""Propagation: how a mask on one slice is carried to the next. One small protocol in sam2's video-predictor shape
(set the volume once, anchor slices with fixed masks, propagate from an anchor in one direction, free the state),
with one adapter per heavy dependency: `ToolPropagator` here (any `SegmentationTool`, no weights needed) and
`ibisagent.tools.sam2_video.SAM2VideoPropagator` (sam2's video predictor).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from ibisagent.simulator import next_click
from ibisagent.tools.base import SegmentationTool
from ibisagent.volume.slices import SliceStack


@dataclass
class SliceOutput:
    """One propagated slice: its HxW bool mask (slice pixels, `ibisagent.geometry`) and the propagator's object score
    in [0, 1] (how sure it is the object is on this slice at all; 1.0 for an anchor)."""

    index: int
    mask: np.ndarray
    score: float


class Propagator(Protocol):
    """What `ibisagent.volume.VolumeSession` needs from a propagation backend.

    Stateful like sam2's video predictor: `set_volume` once (frames are read lazily from the stack), anchors are
    slices whose mask is fixed (the key slice, repaired slices; a model backend conditions on all of them),
    `propagate` carries the mask outward from an anchor one slice at a time, and `close` frees the state.
    """

    name: str

    def set_volume(self, slices: SliceStack) -> None: ...

    def add_anchor(self, index: int, mask: np.ndarray) -> None:
        """Fix slice `index`'s mask (HxW bool); propagation may start from it and conditions on it."""

    def remove_anchor(self, index: int) -> None:
        """Undo `add_anchor` (the slice's mask is no longer fixed)."""

    def propagate(self, start: int, direction: int, stop: int) -> Iterator[SliceOutput]:
        """From the anchor at `start`, yield slices start+direction, ... up to `stop` (inclusive) in order, each
        predicted from what came before. direction is +1 or -1. The caller stops iterating where the object ends."""

    def close(self) -> None:
        """Free the volume's state (features, memories); the propagator needs `set_volume` again after it."""


def check_direction(start: int, direction: int, stop: int) -> None:
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if (stop - start) * direction < 0:
        raise ValueError(f"stop {stop} lies behind start {start} for direction {direction:+d}")


class ToolPropagator:
    """Weight-free propagation with any `SegmentationTool`: the neighbour slice's mask seeds the next slice.

    Per slice: the object's grey level on the previous mask (median, spread) picks the pixels of the previous mask
    that still look like the object here (the *support*); its share of the previous mask is the object score, and
    a support below `min_support` means the object has ended. The support's deepest pixel becomes a positive click
    for the tool (with the previous mask as `prev_logits` through `mask_to_logits` when `use_prior` is set), and the
    tool's mask is kept within the previous mask grown by a margin (objects change little between slices): the
    component holding the click.

    use_prior: pass the neighbour's mask as the tool's initial mask. Model tools (SAM-family) refine it; the
               classical tool keeps a mask that agrees with the click unchanged by design (a click that agrees
               changes nothing), so for it the prior would copy the mask forward: off by default.
    growth:    the margin is growth x the previous mask's equivalent radius + 2 pixels.
    tolerance: grey levels within max(tolerance x spread, 12) of the median count as the object.
    """

    def __init__(
        self,
        tool: SegmentationTool,
        use_prior: bool = False,
        growth: float = 0.15,
        tolerance: float = 3.0,
        min_support: float = 0.2,
    ):
        self.tool = tool
        self.name = f"{getattr(tool, 'name', type(tool).__name__)}-propagation"
        self.use_prior = use_prior
        self.growth, self.tolerance, self.min_support = growth, tolerance, min_support
        self._slices: SliceStack | None = None
        self._anchors: dict[int, np.ndarray] = {}

    @property
    def encode_count(self) -> int:
        return getattr(self.tool, "encode_count", 0)

    def set_volume(self, slices: SliceStack) -> None:
        self._slices, self._anchors = slices, {}

    def add_anchor(self, index: int, mask: np.ndarray) -> None:
        self._stack().check_index(index)
        self._anchors[int(index)] = np.asarray(mask, bool).copy()

    def remove_anchor(self, index: int) -> None:
        self._anchors.pop(int(index), None)

    def propagate(self, start: int, direction: int, stop: int) -> Iterator[SliceOutput]:
        slices = self._stack()
        check_direction(start, direction, stop)
        if start not in self._anchors:
            raise ValueError(f"no anchor at slice {start}: add_anchor(start, mask) before propagating from it")
        prev, prev_grey = self._anchors[start], slices.grey(start)
        for index in range(start + direction, stop + direction, direction):
            if index in self._anchors:
                out = SliceOutput(index, self._anchors[index].copy(), 1.0)
            else:
                out = self._step(index, prev, prev_grey)
            if out.mask.any():
                prev, prev_grey = out.mask, slices.grey(index)
            yield out

    def close(self) -> None:
        self._slices, self._anchors = None, {}
        self.tool.reset()

    def _stack(self) -> SliceStack:
        if self._slices is None:
            raise RuntimeError(f"{self.name}: set_volume() first")
        return self._slices

    def _step(self, index: int, prev: np.ndarray, prev_grey: np.ndarray) -> SliceOutput:
        slices = self._stack()
        grey = slices.grey(index)
        empty = np.zeros(prev.shape, bool)
        if not prev.any():
            return SliceOutput(index, empty, 0.0)
        inside = prev_grey[prev].astype(np.float32)
        median = float(np.median(inside))
        spread = float(np.median(np.abs(inside - median))) * 1.4826
        similar = np.abs(grey.astype(np.float32) - median) <= max(self.tolerance * spread, 12.0)
        support = prev & similar
        score = float(support.sum()) / float(prev.sum())
        if score < self.min_support:
            return SliceOutput(index, empty, score)
        seed = next_click(empty, support)
        radius = np.sqrt(prev.sum() / np.pi)
        allowed = ndimage.binary_dilation(prev, iterations=int(round(self.growth * radius)) + 2)
        self.tool.set_image(slices.image(index))
        prior = self.tool.mask_to_logits(prev) if self.use_prior else None
        out = self.tool.predict([seed], prior)
        # A fresh segmentation that spills far beyond the grown neighbour is the surrounding tissue: the object
        # has ended here (or the tool leaked); its share inside the allowed region scores that.
        contained = float((out.mask & allowed).sum()) / max(float(out.mask.sum()), 1.0)
        mask = out.mask & allowed
        labels, _ = ndimage.label(mask)
        row, col = seed.pixel(*mask.shape)
        mask = labels == labels[row, col] if labels[row, col] else support
        return SliceOutput(index, mask, score * contained * float(np.clip(out.score, 0.0, 1.0)))
