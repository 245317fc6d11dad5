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
    """Weight-free propagation with any `SegmentationTool`: the neighbour slice's mask guides the tool's clicks.

    Per slice, with P the previous slice's mask (r its equivalent radius):

    1. Intensity model and stop rule. The object's grey level on P (median, spread) picks the pixels of P that
       still look like the object here (the *support*); a support below `min_support` of P means the object has
       ended (empty mask).
    2. Seeds from P. The *core* is P's interior (P eroded by `erode` x r, at least 1 pixel) within the support:
       pixels that are the object here unless it moved more than that. The core's share of the interior is the
       object score (a tapering object leaves P's rim first, so the rim does not count against it). The *allowed
       band* is P grown by `growth` x r + 2 pixels (objects change little between slices).
    3. Guided clicks. A positive click at the core's deepest pixel (with P as the tool's initial mask through
       `mask_to_logits` when `use_prior` is set); then, up to `max_clicks` clicks in all, the simulator's next
       click against the guide "the tool's mask within the band, plus the core": a positive click where the mask
       misses the core, a negative one where it spills out of the band, until the deepest remaining error is
       thinner than `min_depth` pixels.
    4. Shape continuity. A tool mask whose share inside the band is below `trust` leaked into the surroundings
       (weak edges): it may then only shrink P, not grow it (mask & P); otherwise it is kept within the band. The
       components touching the core are kept (the largest one if none does) and holes filled. The object score
       is the core's share x the mask's share inside the band x the tool's own score.

    use_prior:   pass the neighbour's mask as the tool's initial mask. Model tools (SAM-family) refine it; the
                 classical tool keeps a mask that agrees with the click unchanged by design (a click that agrees
                 changes nothing), so for it the prior would copy the mask forward: off by default.
    growth:      the band's margin is growth x r + 2 pixels.
    tolerance:   grey levels within max(tolerance x spread, 12) of the median count as the object.
    min_support: the object has ended where less than this share of P still looks like it.
    erode:       the core is P eroded by erode x r pixels (at least 1).
    max_clicks:  clicks per slice (1: the seed click only).
    min_depth:   no guided click on an error thinner than this (pixels from its edge to its deepest pixel).
    trust:       a tool mask with a smaller share inside the band only shrinks P.
    """

    def __init__(
        self,
        tool: SegmentationTool,
        use_prior: bool = False,
        growth: float = 0.1,
        tolerance: float = 3.0,
        min_support: float = 0.2,
        erode: float = 0.35,
        max_clicks: int = 4,
        min_depth: float = 2.0,
        trust: float = 0.97,
    ):
        if max_clicks < 1 or not 0 <= trust <= 1 or min(growth, tolerance, min_support, erode, min_depth) < 0:
            raise ValueError(
                f"ToolPropagator: max_clicks must be >= 1, trust in [0, 1] and growth, tolerance, min_support, "
                f"erode, min_depth >= 0; got max_clicks={max_clicks}, trust={trust}, growth={growth}, "
                f"tolerance={tolerance}, min_support={min_support}, erode={erode}, min_depth={min_depth}"
            )
        self.tool = tool
        self.name = f"{getattr(tool, 'name', type(tool).__name__)}-propagation"
        self.use_prior = use_prior
        self.growth, self.tolerance, self.min_support = growth, tolerance, min_support
        self.erode, self.max_clicks, self.min_depth, self.trust = erode, max_clicks, min_depth, trust
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
        grey = slices.grey(index).astype(np.float32)
        empty = np.zeros(prev.shape, bool)
        if not prev.any():
            return SliceOutput(index, empty, 0.0)
        inside = prev_grey[prev].astype(np.float32)
        median = float(np.median(inside))
        spread = float(np.median(np.abs(inside - median))) * 1.4826
        similar = np.abs(grey - median) <= max(self.tolerance * spread, 12.0)
        support = prev & similar
        score = float(support.sum()) / float(prev.sum())
        if score < self.min_support:
            return SliceOutput(index, empty, score)
        radius = np.sqrt(prev.sum() / np.pi)
        allowed = ndimage.binary_dilation(prev, iterations=int(round(self.growth * radius)) + 2)
        interior = ndimage.binary_erosion(prev, iterations=max(int(round(self.erode * radius)), 1))
        core = interior & similar
        # A tapering object leaves P's rim first: the interior's share that still looks like the object scores it.
        if core.any():
            score = float(core.sum()) / float(interior.sum())
        else:
            core = support
        self.tool.set_image(slices.image(index))
        clicks = [next_click(empty, core)]
        out = self.tool.predict(clicks, self.tool.mask_to_logits(prev) if self.use_prior else None)
        while len(clicks) < self.max_clicks:
            guide = (out.mask & allowed) | core
            click = next_click(out.mask, guide, clicks)
            if click is None:
                break
            error = guide & ~out.mask if click.positive else out.mask & ~guide
            if ndimage.distance_transform_edt(np.pad(error, 1)).max() < self.min_depth:
                break
            clicks.append(click)
            out = self.tool.predict(clicks, out.logits)
        # A mask that spills far beyond the band is the surrounding tissue (weak edges): there the tool's mask only
        # tells where the object shrank. Its share inside the band also scores the slice.
        contained = float((out.mask & allowed).sum()) / max(float(out.mask.sum()), 1.0)
        mask = _components_touching(out.mask & (prev if contained < self.trust else allowed), core)
        mask = ndimage.binary_fill_holes(mask)
        return SliceOutput(index, mask, score * contained * float(np.clip(out.score, 0.0, 1.0)))


def _components_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected components of `mask` (HxW bool) that hold a pixel of `seeds`; the largest if none does."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = np.unique(labels[seeds & mask])
    keep = keep[keep > 0]
    if keep.size == 0:
        keep = [int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1)))) + 1]
    return np.isin(labels, keep)
