"""The click simulator (paper Appendix B.1, after Xu et al. 2016): the next click goes to the centre of the largest
error region. Deterministic; used to build training trajectories, as the oracle policy and in benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ibisagent.types import DEFAULT_TARGET, Click


def _inner_distance(region: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel, the image border counting as
    outside (so a region touching the border is not favoured) and already-clicked pixels counting as outside."""
    region = region & ~excluded
    padded = np.pad(region, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def next_click(
    pred: np.ndarray, gt: np.ndarray, clicked: Sequence[Click] = (), target: str = DEFAULT_TARGET
) -> Click | None:
    """The oracle's next click for one target, or None when the prediction already equals the ground truth.

    pred, gt: HxW bool masks (current prediction, ground truth). clicked: clicks already made (their pixels are
    never chosen again). Returns a Click at the pixel centre, (x, y) = (col + 0.5, row + 0.5): positive when the
    false-negative region holds the deepest error pixel, negative when the false-positive region does (ties go
    to positive). Among equal depths the first pixel in row-major order wins.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    excluded = np.zeros(gt.shape, bool)
    for c in clicked:
        excluded[c.pixel(*gt.shape)] = True
    fn = _inner_distance(gt & ~pred, excluded)
    fp = _inner_distance(pred & ~gt, excluded)
    fn_max, fp_max = float(fn.max(initial=0.0)), float(fp.max(initial=0.0))
    if max(fn_max, fp_max) <= 0:
        return None
    positive = fn_max >= fp_max
    row, col = np.unravel_index(int(np.argmax(fn if positive else fp)), gt.shape)
    return Click(col + 0.5, row + 0.5, positive, target)


def next_clicks_multi(
    preds: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray], clicked: Sequence[Click] = ()
) -> list[Click]:
    """Multi-target variant: one oracle click per target that still has an error, in the order of `gts`.

    preds may miss a target (treated as empty); clicks in `clicked` are excluded per target.
    """
    out = []
    for name, gt in gts.items():
        pred = preds.get(name)
        pred = np.zeros(np.shape(gt), bool) if pred is None else pred
        click = next_click(pred, gt, [c for c in clicked if c.target == name], name)
        if click is not None:
            out.append(click)
    return out
