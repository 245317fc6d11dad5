"""The click simulator beyond the loop tests: the deepest-error search against the plain distance transform, and the
user-click models (noisy clicks, the far background click, perturbed initial masks)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ibisagent.simulator import _deepest, far_background_click, noisy_click, perturbed_masks
from ibisagent.types import Click


def _reference(region: np.ndarray, excluded: np.ndarray) -> tuple[float, int, int]:
    region = region & ~excluded
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(depth[r, c]), int(r), int(c)


def _shapes(rng: np.random.Generator):
    n = 300
    yy, xx = np.mgrid[:n, :n]
    yield (yy - 140) ** 2 + (xx - 170) ** 2 < 90**2  # a disk
    yield ~((yy - 150) ** 2 + (xx - 100) ** 2 < 60**2)  # the image minus a disk, touching the border
    square = np.zeros((n, n), bool)
    square[40:240, 50:250] = True  # an even square: four pixels tie, the first in row-major order wins
    yield square
    band = np.zeros((n, n), bool)
    band[100:112] = True  # thin: the blocks cannot bound it
    yield band
    for sigma in (6, 15, 30):
        yield ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma) > 0
    yield rng.random((n, n)) > 0.3
    # ragged and mostly connected, a few pixels deep (a random-weight model's false positives): 2-pixel blocks bound it
    yield ndimage.gaussian_filter(rng.normal(size=(n, n)), 2) > -0.1
    # a lattice of holes: hundreds of blocks tie at the top bound, measured in several chunks; the first pixel wins
    lattice = np.ones((n, n), bool)
    lattice[::17, ::17] = False
    yield lattice


def test_deepest_equals_the_distance_transform():
    rng = np.random.default_rng(0)
    for region in _shapes(rng):
        excluded = np.zeros_like(region)
        excluded[tuple(rng.integers(0, region.shape[0], (2, 4)))] = True
        assert _deepest(region, excluded) == _reference(region, excluded)


def test_noisy_click_lies_in_the_largest_error_region():
    gt = np.zeros((60, 80), bool)
    gt[10:40, 10:40] = True
    pred = np.zeros_like(gt)
    pred[10:40, 10:30] = True  # false negatives: 30 x 10
    pred[50:52, 60:62] = True  # false positives: 4 pixels
    rng = np.random.default_rng(1)
    clicks = [noisy_click(pred, gt, rng) for _ in range(20)]
    assert all(c.positive and 10 <= c.y < 40 and 30 <= c.x < 40 for c in clicks)
    assert len({(c.x, c.y) for c in clicks}) > 5  # not always the same pixel
    only = np.zeros_like(gt)
    only[20, 35] = True
    assert noisy_click(gt & ~only, gt, rng) == Click(35.5, 20.5, True)
    assert noisy_click(gt & ~only, gt, rng, [Click(35.5, 20.5, True)]) is None
    assert noisy_click(gt, gt, rng) is None


def test_far_background_click_and_perturbed_masks():
    gt = np.zeros((400, 400), bool)
    gt[50:120, 60:140] = True
    far = far_background_click(gt)
    assert far == Click(383.5, 383.5, False)  # the corner farthest from the object, 16 px in
    assert far_background_click(np.ones((400, 400), bool)) is None
    masks = perturbed_masks(gt)
    assert masks["eroded"].sum() == 50 * 60 and masks["dilated"].sum() > gt.sum()
    assert masks["shifted"][50:120, 75:155].all() and masks["shifted"].sum() == gt.sum()


@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
def test_deepest_on_non_square_regions(shape):
    rng = np.random.default_rng(2)
    region = ndimage.gaussian_filter(rng.normal(size=shape), 20) > -0.05
    excluded = np.zeros(shape, bool)
    assert _deepest(region, excluded) == _reference(region, excluded)
