"""Segmentation metrics as the paper and the interactive-segmentation literature report them.

All masks are HxW bool arrays of equal shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P ∩ G| / |P ∪ G|; 1.0 when both masks are empty (nothing to find, nothing found)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P ∩ G| / (|P| + |G|); 1.0 when both masks are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if total == 0 else 2 * np.count_nonzero(pred & gt) / total


def entity_f1(pairs: Iterable[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> float:
    """Mask-to-entity correspondence F1 over a set of (prediction, ground truth) pairs.

    Each pair is one referred entity. A non-empty prediction with IoU >= `iou_threshold` is a true positive; a
    non-empty prediction below it counts as one false positive and one false negative (wrong entity found);
    an empty prediction for a present entity is a false negative; a non-empty prediction for an absent entity
    is a false positive; both empty is a true negative. F1 = 2TP / (2TP + FP + FN); 1.0 if there is nothing to count.
    Example: pairs with IoUs 0.9, 0.3 and one missed entity -> TP=1, FP=1, FN=2 -> F1 = 2/5 = 0.4.
    """
    tp = fp = fn = 0
    for pred, gt in pairs:
        has_p, has_g = bool(np.any(pred)), bool(np.any(gt))
        if has_p and has_g:
            if iou(pred, gt) >= iou_threshold:
                tp += 1
            else:
                fp += 1
                fn += 1
        elif has_p:
            fp += 1
        elif has_g:
            fn += 1
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def noc(iou_curve: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach IoU >= threshold. iou_curve[k] is the IoU after k+1 clicks.

    Returns max_clicks + 1 when the threshold is never reached within max_clicks (the failure convention used in
    our benchmarks). Example: noc([0.5, 0.86, 0.9], 0.85) == 2.
    """
    for k, value in enumerate(iou_curve[:max_clicks]):
        if value >= threshold:
            return k + 1
    return max_clicks + 1


def iou_at(iou_curve: Sequence[float], k: int) -> float:
    """IoU after k clicks; a curve that stopped early (target reached) carries its last value forward."""
    if not iou_curve:
        return 0.0
    return float(iou_curve[min(k, len(iou_curve)) - 1])


def click_in_target(click, gt: np.ndarray) -> bool:
    """True when `click` (a `Click`, (x, y) pixels) lies on a foreground pixel of `gt` (HxW bool)."""
    r, c = click.pixel(*gt.shape)
    return bool(gt[r, c])
