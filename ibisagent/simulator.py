"""The click simulator (paper Appendix B.1, after Xu et al. 2016): the next click goes to the centre of the largest
error region. Deterministic; used to build training trajectories, as the oracle policy and in benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ibisagent.types import DEFAULT_TARGET, Click


def _deepest(region: np.ndarray, excluded: np.ndarray) -> tuple[float, int, int]:
    """(depth, row, col) of the region pixel farthest (Euclidean) from any non-region pixel, the image border counting
    as outside (so a region touching the border is not favoured) and already-clicked pixels counting as outside.
    Depth 0 when the region is empty. Ties go to the first pixel in row-major order.

    The distance transform runs on the region's bounding box plus a one-pixel margin, which is exact: every pixel
    outside the box is outside the region, and the margin lies between it and any such pixel.
    """
    region = region & ~excluded
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return 0.0, 0, 0
    r0, c0 = rows[0], cols[0]
    crop = np.pad(region[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1, constant_values=False)
    depth = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(depth[r, c]), int(r0 + r), int(c0 + c)


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
    fn_max, fn_row, fn_col = _deepest(gt & ~pred, excluded)
    fp_max, fp_row, fp_col = _deepest(pred & ~gt, excluded)
    if max(fn_max, fp_max) <= 0:
        return None
    positive = fn_max >= fp_max
    row, col = (fn_row, fn_col) if positive else (fp_row, fp_col)
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


@dataclass
class OracleRun:
    """What `click_with_oracle` did: the final HxW bool mask, the clicks ((x, y) pixels), the IoU after each click
    and the seconds of each `tool.predict` call."""

    mask: np.ndarray
    clicks: list[Click]
    ious: list[float]
    seconds: list[float]


def click_with_oracle(tool, gt: np.ndarray, n_clicks: int, target: str = DEFAULT_TARGET) -> OracleRun:
    """The interactive-segmentation benchmark protocol on a tool whose image is set: up to `n_clicks` oracle clicks,
    each followed by a prediction from all clicks so far and the previous logits; stops early when no error is left."""
    from ibisagent.metrics import iou

    gt = np.asarray(gt, bool)
    pred, logits = np.zeros(gt.shape, bool), None
    run = OracleRun(pred, [], [], [])
    for _ in range(n_clicks):
        click = next_click(pred, gt, run.clicks, target)
        if click is None:
            break
        run.clicks.append(click)
        t0 = time.perf_counter()
        out = tool.predict(run.clicks, logits)
        run.seconds.append(time.perf_counter() - t0)
        logits, pred = out.logits, out.mask
        run.ious.append(iou(pred, gt))
    run.mask = pred
    return run
