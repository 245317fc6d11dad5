"""The click simulator (paper Appendix B.1, after Xu et al. 2016): the next click goes to the centre of the largest
error region. Deterministic; used to build training trajectories, as the oracle policy and in benchmarks.

Beside the oracle, models of how people click, for the user-click benchmark and tests: a noisy click (uniformly
random inside the largest error region), a far background click, and perturbed initial masks to refine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ibisagent.metrics import iou
from ibisagent.types import DEFAULT_TARGET, Click

_BLOCK = 2  # block side of the coarse pass of `_deepest` (2 keeps the bounds tight on ragged regions)
_COARSE_FROM = 128 * 128  # crops with at least this many pixels take the coarse pass
_MAX_BLOCKS = 8192  # more candidate blocks than this: the full distance transform is cheaper
_CHUNK = 256  # candidate blocks measured together


def _deepest(region: np.ndarray, excluded: np.ndarray) -> tuple[float, int, int]:
    """(depth, row, col) of the region pixel farthest (Euclidean) from any non-region pixel, the image border counting
    as outside (so a region touching the border is not favoured) and already-clicked pixels counting as outside.
    Depth 0 when the region is empty. Ties go to the first pixel in row-major order.

    Exact, and cheap on large regions: the work is confined to the region's bounding box plus a one-pixel margin
    (every pixel outside the box is outside the region, and the margin lies between it and any such pixel), and on
    a large box `_deepest_in_blocks` bounds the depth per block and measures only the few pixels that can win.
    """
    region = region & ~excluded
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return 0.0, 0, 0
    r0, c0 = rows[0], cols[0]
    crop = np.pad(region[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1, constant_values=False)
    found = _deepest_in_blocks(crop) if crop.size >= _COARSE_FROM else None
    if found is None:
        depth = ndimage.distance_transform_edt(crop)
        r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        found = float(depth[r, c]), int(r), int(c)
    depth, r, c = found
    return depth, int(r0 + r - 1), int(c0 + c - 1)


def _deepest_in_blocks(crop: np.ndarray) -> tuple[float, int, int] | None:
    """`_deepest` on a crop (HxW bool, False on its border) through blocks of `_BLOCK` pixels; None where the
    bounds do not narrow the search enough (thin regions, many blocks of nearly equal depth).

    A pixel of a block lying wholly inside the region is at least s*d - (s-1)*sqrt(2) and at most s*d + (s-1)*sqrt(2)
    from the outside, where d is the block's distance to a block holding an outside pixel and s the block side.
    Blocks are measured exactly, `_CHUNK` at a time in order of their upper bound, until the bound falls below the
    deepest pixel found (`_depth2_within`, squared integers, so ties stay exact).
    """
    s = _BLOCK
    h, w = crop.shape
    hb, wb = -(-h // s), -(-w // s)
    padded = np.zeros((hb * s, wb * s), bool)
    padded[:h, :w] = crop  # beyond the crop lies only outside
    full = padded[::s, ::s].copy()  # blocks wholly inside the region (numpy's short-axis `all` is slow)
    for i in range(s):
        for j in range(s):
            full &= padded[i::s, j::s]
    blocks = ndimage.distance_transform_edt(full)
    slack = (s - 1) * np.sqrt(2)
    top = float(blocks.max())
    if s * top - slack <= slack:  # a thin region: pixels of mixed blocks could be deepest
        return None
    bound = blocks * s + slack
    br, bc = np.nonzero(bound >= s * top - slack)
    if br.size > _MAX_BLOCKS:
        return None
    order = np.argsort(-bound[br, bc], kind="stable")
    br, bc, reach = br[order], bc[order], bound[br[order], bc[order]]
    outside = np.flatnonzero(~crop)
    within_r, within_c = np.divmod(np.arange(s * s), s)  # the pixels of a block
    best = (-1, 0, 0)  # (squared depth, -row, -col): the largest wins, ties to the first pixel in row-major order
    for start in range(0, br.size, _CHUNK):
        if reach[start] ** 2 < best[0]:
            break
        chunk = slice(start, start + _CHUNK)
        keep = reach[chunk] ** 2 >= best[0]
        rows = (br[chunk][keep, None] * s + within_r).ravel()
        cols = (bc[chunk][keep, None] * s + within_c).ravel()
        rows, cols = rows[(rows < h) & (cols < w)], cols[(rows < h) & (cols < w)]
        rows, cols = rows[crop[rows, cols]], cols[crop[rows, cols]]
        d2 = _depth2_within(outside, crop.shape, rows, cols, int(np.ceil(reach[start])))
        deepest = np.flatnonzero(d2 == d2.max())
        i = deepest[np.lexsort((cols[deepest], rows[deepest]))[0]]
        best = max(best, (int(d2[i]), -int(rows[i]), -int(cols[i])))
    return float(np.sqrt(best[0])), -best[1], -best[2]


def _depth2_within(
    outside: np.ndarray, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, radius: int
) -> np.ndarray:
    """Squared distance from each pixel (rows, cols) of a crop of `shape` to its nearest outside pixel, which lies
    within `radius`; `outside` holds the row-major flat indices of the outside pixels, sorted, and the crop's border
    is outside. The separable form of the distance transform, for these pixels only: the minimum
    over the rows r+k, |k| <= radius, of k^2 plus the squared distance along row r+k to its nearest outside pixel
    (found by bisection in `outside`)."""
    h, w = shape
    k = np.arange(-radius, radius + 1)
    rows_k = np.clip(rows[:, None] + k, 0, h - 1)  # rows beyond the crop are outside, as its first and last rows
    flat = rows_k * w + cols[:, None]
    i = np.searchsorted(outside, flat)
    after = outside[np.minimum(i, outside.size - 1)]
    before = outside[np.maximum(i - 1, 0)]
    along = np.minimum(after - flat, flat - before)
    return (along * along + k * k).min(axis=1)


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


def noisy_click(
    pred: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    clicked: Sequence[Click] = (),
    target: str = DEFAULT_TARGET,
) -> Click | None:
    """A user's next click: uniformly random inside the largest error region instead of at its deepest point.

    pred, gt: HxW bool. The largest error region is the largest 8-connected component of the false negatives or the
    false positives (positive click for a false-negative one; ties go to positive). Clicked pixels are not chosen
    again. Returns a Click at a pixel centre ((x, y) pixels), or None when no unclicked error pixel is left.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    excluded = np.zeros(gt.shape, bool)
    for c in clicked:
        excluded[c.pixel(*gt.shape)] = True
    best, size = None, 0
    for positive, error in ((True, gt & ~pred), (False, pred & ~gt)):
        labels, n = ndimage.label(error & ~excluded, np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            k = int(np.argmax(sizes))
            if sizes[k] > size:
                best, size = (positive, labels == k + 1), int(sizes[k])
    if best is None:
        return None
    rows, cols = np.nonzero(best[1])
    i = int(rng.integers(rows.size))
    return Click(cols[i] + 0.5, rows[i] + 0.5, best[0], target)


def far_background_click(
    gt: np.ndarray, margin: int = 50, inset: int = 16, target: str = DEFAULT_TARGET
) -> Click | None:
    """A background click far from the object: at the image corner (`inset` pixels in) farthest from the centre of
    the ground truth's bounding box, if it lies more than `margin` pixels from that box and outside the object;
    else None. gt: HxW bool; the click is negative, (x, y) pixels."""
    gt = np.asarray(gt, bool)
    h, w = gt.shape
    rows, cols = np.flatnonzero(gt.any(axis=1)), np.flatnonzero(gt.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    corners = [(r, c) for r in (inset, h - 1 - inset) for c in (inset, w - 1 - inset)]
    r, c = max(corners, key=lambda rc: (rc[0] - (r0 + r1) / 2) ** 2 + (rc[1] - (c0 + c1) / 2) ** 2)
    gap = np.hypot(max(r0 - r, 0, r - r1), max(c0 - c, 0, c - c1))
    if gap <= margin or gt[r, c]:
        return None
    return Click(c + 0.5, r + 0.5, False, target)


def perturbed_masks(gt: np.ndarray, grow: float = 10, shift: int = 15) -> dict[str, np.ndarray]:
    """Initial masks a user might bring: the ground truth (HxW bool) eroded and dilated by `grow` pixels (Euclidean)
    and shifted by `shift` pixels to the right (x). Returns {"eroded", "dilated", "shifted"}: HxW bool each."""
    gt = np.asarray(gt, bool)
    shifted = np.zeros_like(gt)
    shifted[:, shift:] = gt[:, : gt.shape[1] - shift]
    return {
        "eroded": ndimage.distance_transform_edt(gt) > grow,
        "dilated": ndimage.distance_transform_edt(~gt) <= grow,
        "shifted": shifted,
    }


@dataclass
class OracleRun:
    """What `click_with_oracle` did: the final HxW bool mask, the clicks ((x, y) pixels), the IoU after each click
    and the seconds of each `tool.predict` call."""

    mask: np.ndarray
    clicks: list[Click]
    ious: list[float]
    seconds: list[float]


def click_with_oracle(
    tool,
    gt: np.ndarray,
    n_clicks: int,
    target: str = DEFAULT_TARGET,
    rng: np.random.Generator | None = None,
    initial: np.ndarray | None = None,
) -> OracleRun:
    """The interactive-segmentation benchmark protocol on a tool whose image is set: up to `n_clicks` oracle clicks,
    each followed by a prediction from all clicks so far and the previous logits; stops early when no error is left.

    rng: click like a user instead (`noisy_click` with this generator). initial: an HxW bool initial mask to refine,
    given to the tool as `tool.mask_to_logits(initial)`.
    """
    gt = np.asarray(gt, bool)
    pred, logits = np.zeros(gt.shape, bool), None
    if initial is not None:
        pred, logits = np.asarray(initial, bool), tool.mask_to_logits(initial)
    run = OracleRun(pred, [], [], [])
    for _ in range(n_clicks):
        if rng is None:
            click = next_click(pred, gt, run.clicks, target)
        else:
            click = noisy_click(pred, gt, rng, run.clicks, target)
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
