"""Tests of the weight-free classical tool: a quality floor under the oracle clicker on real demo masks, and the
SegmentationTool protocol (errors, empty input, logits round trip, replay, determinism, grey and non-square images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from scipy import ndimage
from skimage.color import rgb2lab
from threadpoolctl import threadpool_info

from ibisagent.datasets import list_biomedparse
from ibisagent.io import read_image, read_mask
from ibisagent.metrics import iou, noc
from ibisagent.simulator import click_with_oracle, far_background_click, next_click, perturbed_masks
from ibisagent.tools import build_tool
from ibisagent.tools.base import ToolError
from ibisagent.tools.classical import (
    _ONE_BLAS_THREAD,
    ClassicalParams,
    ClassicalTool,
    _gauss,
    _is_grey,
    _lab,
    _random_walk,
    _solve_laplacian,
)
from ibisagent.types import Click

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEMO = DATA / "biomedparse-demo" / "biomedparse_datasets" / "BiomedParseData-Demo"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"demo data not found at {DEMO}")

# One mask per modality family, plus two hard ones: the optic cup (fundus, weak edges) and a small polyp whose
# textured first click used to leak over the whole image (the ray re-cast stops it). Measured with the defaults
# (10 oracle clicks): mean IoU 0.926 (lowest 0.876), mean NoC@85 4.1 (failures counted as 11).
QUALITY_MASKS = (
    "06_CT_abdomen_spleen",
    "08_MRI_heart_left+heart+ventricle",
    "15_X-Ray_chest_left+lung",
    "20_ultrasound_breast_tumor",
    "24_endoscope_colon_neoplastic+polyp",
    "25_dermoscopy_skin_melanoma",
    "23_fundus_retinal_optic+cup",
    "24_endoscope_colon_non-neoplastic+polyp",
)
FLOOR_MEASURED = 0.926
FLOOR_MARGIN = 0.02
LOWEST_FLOOR = 0.84
NOC_MEASURED = 4.125
NOC_MARGIN = 0.75
CLICKS = 10
NOISY_MEASURED = 0.916  # mean IoU after 8 noisy clicks on USER_MASKS (seed 0; lowest 0.873)


@pytest.fixture(scope="module")
def demo_image() -> np.ndarray:
    if not DEMO.is_dir():
        pytest.skip(f"demo data not found at {DEMO}")
    return read_image(DEMO / "demo" / "06_CT_abdomen.png")


@needs_demo
def test_quality_floor_and_clicks_honoured():
    samples = {s.name: s for s in list_biomedparse(DEMO)}
    tool = ClassicalTool()
    scores, nocs = [], []
    for name in QUALITY_MASKS:
        sample = samples[name]
        image = read_image(sample.image)
        gt = read_mask(sample.mask, image.shape[:2])
        tool.set_image(image)
        run = click_with_oracle(tool, gt, CLICKS)
        pred, clicks, curve = run.mask, run.clicks, run.ious
        h, w = gt.shape
        for c in clicks:
            assert pred[c.pixel(h, w)] == c.positive, f"{name}: click {c} not honoured by the final mask"
        scores.append(iou(pred, gt))
        nocs.append(noc(curve, 0.85, CLICKS))
    report = f"IoU@{CLICKS} {np.round(scores, 3)}, NoC@85 {nocs}"
    assert np.mean(scores) >= FLOOR_MEASURED - FLOOR_MARGIN, f"mean IoU@{CLICKS} {np.mean(scores):.3f}: {report}"
    assert min(scores) >= LOWEST_FLOOR, f"lowest IoU@{CLICKS} {min(scores):.3f} < {LOWEST_FLOOR}: {report}"
    assert np.mean(nocs) <= NOC_MEASURED + NOC_MARGIN, f"mean NoC@85 {np.mean(nocs):.2f}: {report}"


def test_predict_before_set_image_raises():
    with pytest.raises(ToolError, match="set_image"):
        ClassicalTool().predict([Click(1, 1, True)])


def test_click_outside_image_raises():
    tool = ClassicalTool()
    tool.set_image(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ToolError, match="outside"):
        tool.predict([Click(48, 5, True)])
    with pytest.raises(ToolError, match="outside"):
        tool.predict([Click(5, -1, True)])


def test_no_clicks_gives_empty_mask():
    tool = ClassicalTool()
    tool.set_image(np.full((40, 30, 3), 128, np.uint8))
    out = tool.predict([])
    assert out.mask.shape == (40, 30) and out.mask.dtype == bool and not out.mask.any()


def test_build_tool_gives_classical():
    tool = build_tool("classical")
    assert isinstance(tool, ClassicalTool) and tool.params == ClassicalParams()
    with pytest.raises(ToolError, match="checkpoint"):
        build_tool("classical", checkpoint="weights.pt")


def test_params_are_validated_and_frozen():
    with pytest.raises(ValueError, match="claim_tol"):
        ClassicalParams(claim_tol=-1.0)
    with pytest.raises(ValueError, match="window"):
        ClassicalParams(window=4)
    params = ClassicalParams()
    with pytest.raises(AttributeError):
        params.rw_beta = 1.0  # type: ignore[misc]


def test_negative_click_on_empty_mask_is_cheap_and_empty():
    image, _ = _disk_image(200, 260, 90, 140, 40)
    tool = ClassicalTool()
    tool.set_image(image)
    out = tool.predict([Click(20.5, 20.5, False)])
    assert not out.mask.any()
    out = tool.predict([Click(20.5, 20.5, False), Click(140.5, 90.5, True)], out.logits)
    assert out.mask[90, 140] and not out.mask[20, 20]


def _disk_image(h: int, w: int, cy: int, cx: int, r: int, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    gt = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rng = np.random.default_rng(0)
    img = np.where(gt, 170.0, 70.0) + rng.normal(0, 6, (h, w))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img if grey else np.stack([img, img // 2 + 40, img], -1)), gt


def test_synthetic_disk_and_logits_round_trip():
    image, gt = _disk_image(200, 260, 90, 140, 40)
    tool = ClassicalTool()
    tool.set_image(image)
    pred, logits, shapes = np.zeros(gt.shape, bool), None, set()
    clicks = []
    for _ in range(4):
        c = next_click(pred, gt, clicks)
        if c is None:
            break
        clicks.append(c)
        out = tool.predict(clicks, logits)
        assert out.mask.shape == gt.shape and out.mask.dtype == bool
        assert out.logits.dtype == np.float32 and out.logits.ndim == 2
        assert ((out.logits > 0).mean() > 0) == out.mask.any()
        shapes.add(out.logits.shape)
        logits, pred = out.logits, out.mask
    assert len(shapes) == 1
    assert iou(pred, gt) > 0.9
    # A fresh tool that never saw these logits must still accept them (upsampled, not recalled).
    other = ClassicalTool()
    other.set_image(image)
    extra = Click(clicks[0].x, clicks[0].y, True)
    out = other.predict([*clicks, extra], logits)
    assert iou(out.mask, gt) > 0.8


def test_replay_and_determinism():
    """Replaying all clicks without logits gives the incremental result; two tools give identical masks."""
    image, gt = _disk_image(200, 260, 90, 140, 40)
    image[80:100, 125:150] = 60  # a dark hole the oracle has to remove with a negative click
    gt[80:100, 125:150] = False
    tool = ClassicalTool()
    tool.set_image(image)
    run = click_with_oracle(tool, gt, 6)
    pred, clicks, curve = run.mask, run.clicks, run.ious
    assert any(not c.positive for c in clicks) and curve[-1] > 0.9
    other = ClassicalTool()
    other.set_image(image)
    np.testing.assert_array_equal(other.predict(clicks).mask, pred)
    np.testing.assert_array_equal(tool.predict(clicks).mask, pred)


def test_grey_input():
    image, gt = _disk_image(120, 120, 60, 60, 25, grey=True)
    tool = ClassicalTool()
    tool.set_image(image)
    out = tool.predict([Click(60.5, 60.5, True)])
    assert out.mask.shape == (120, 120) and out.mask[60, 60]
    assert iou(out.mask, gt) > 0.7


@pytest.mark.parametrize("shape", [(517, 389, 3), (300, 260, 3)])
def test_encoding_in_row_strips_equals_one_pass(shape):
    """The full-resolution level is encoded in row strips on several threads: features, pyramids, gradients, noise
    and the masks are exactly those of one thread, for colour and grey images of odd sizes."""
    rng = np.random.default_rng(1)
    image, gt = _disk_image(shape[0], shape[1], shape[0] // 2, shape[1] // 3, 60)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    for picture in (noisy, np.repeat(noisy[..., :1], 3, 2)):
        one = ClassicalTool(threads=1)
        one.set_image(picture)
        clicks = click_with_oracle(one, gt, 4).clicks
        for threads in (2, 3):
            many = ClassicalTool(threads=threads)
            many.set_image(picture)
            assert many._noise == one._noise
            for name in ("_feats", "_smooth", "_rwfeat", "_grads"):
                for a, b in zip(getattr(one, name), getattr(many, name), strict=True):
                    np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(many.predict(clicks).mask, one.predict(clicks).mask)
    with pytest.raises(ValueError, match="threads"):
        ClassicalTool(threads=0)


def test_encoding_filters_give_the_numbers_of_the_libraries_they_replace():
    """The encoding's own CIELAB conversion gives skimage's rgb2lab numbers exactly (every byte value on each
    channel), and its Gaussian gives ndimage.gaussian_filter's (mirrored edges) to float32 rounding, on sizes down
    to a pixel; the grey test is numpy's channel range."""
    i, j = np.mgrid[0:256, 0:256]
    rgb = np.stack([i, j, (7 * i + 13 * j) % 256], -1).astype(np.uint8)
    np.testing.assert_array_equal(_lab(rgb), rgb2lab(rgb.astype(np.float32) / 255))
    rng = np.random.default_rng(2)
    for shape in ((37, 29, 3), (5, 4, 1), (1, 1, 3), (2, 9, 3)):
        f = (rng.random(shape) * 100).astype(np.float32)
        for sigma in (0.7, 1.0, 1.5):
            np.testing.assert_allclose(_gauss(f, sigma), ndimage.gaussian_filter(f, (sigma, sigma, 0)), atol=1e-4)
    for spread in (0, 8, 9, 200):
        image = np.full((4, 5, 3), 100, np.uint8)
        image[2, 3, 1] += spread // 2
        image[2, 3, 2] -= spread - spread // 2
        assert _is_grey(image) == (np.ptp(image.astype(int), axis=2).max() <= 8)


def test_the_random_walker_solves_thin_bands_and_square_zones_as_superlu_does(monkeypatch):
    """Thin bands go to the banded Cholesky, square zones and indefinite systems to SuperLU: all give SuperLU's x."""
    superlu, real = [], spl.splu
    monkeypatch.setattr(spl, "splu", lambda *a, **k: superlu.append(1) or real(*a, **k))
    rng = np.random.default_rng(3)
    feat = (rng.random((160, 400, 3)) * 50).astype(np.float32)
    band = np.zeros((160, 400), bool)
    band[40:52, 5:395] = True  # a 12-pixel band along a boundary
    square = np.zeros((160, 400), bool)
    square[5:155, 100:250] = True  # 150 x 150: its band after reordering is too wide
    value = (np.arange(160)[:, None] < 45).astype(np.float32).repeat(400, 1)
    for unknown, by_superlu in ((band, 0), (square, 1)):
        x = _random_walk(feat, ~unknown, value, 4.0)
        assert np.all((x >= 0) & (x <= 1)) and np.all(x[~unknown] == value[~unknown])
        # the reference: the whole grid's Laplacian L, and L_uu x_u = -L_uf v_f solved by SuperLU
        grid = np.arange(unknown.size).reshape(unknown.shape)
        pairs = [(grid[:, :-1].ravel(), grid[:, 1:].ravel()), (grid[:-1].ravel(), grid[1:].ravel())]
        a, b = np.concatenate([p for p, _ in pairs]), np.concatenate([q for _, q in pairs])
        f = feat.reshape(-1, 3).astype(np.float64)
        d = ((f[a] - f[b]) ** 2).sum(-1)
        w = sp.coo_matrix((np.exp(-4.0 * d / (d.mean() + 1e-6)) + 1e-4, (a, b)), shape=(grid.size,) * 2).tocsr()
        w = w + w.T
        lap = (sp.diags(np.asarray(w.sum(1)).ravel()) - w).tocsr()
        u = unknown.ravel()
        rhs = -(lap[u][:, ~u] @ value.ravel()[~u])
        np.testing.assert_allclose(x[unknown], spl.spsolve(lap[u][:, u].tocsc(), rhs), atol=1e-6)
        assert len(superlu) == by_superlu
    indefinite = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]))
    np.testing.assert_allclose(_solve_laplacian(indefinite, np.array([3.0, 3.0, 3.0])), [1.0, 1.0, 1.0])
    assert len(superlu) == 2


def test_band_solves_run_blas_on_one_thread_and_restore_it():
    """Threaded BLAS made the banded Cholesky seconds slow on a busy machine: inside the solver's context (entered
    from several threads at once, nested here) BLAS has one thread, and the setting comes back when the last leaves."""

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    assert before, "no BLAS library found loaded (numpy's and scipy's are expected)"
    with _ONE_BLAS_THREAD:
        with _ONE_BLAS_THREAD:
            assert set(blas_threads()) <= {1}
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before


@needs_demo
def test_non_square_crop(demo_image):
    crop = demo_image[200:800]  # 600 x 1024
    tool = ClassicalTool()
    tool.set_image(crop)
    clicks = [Click(300.5, 400.5, True), Click(700.5, 100.5, False)]
    out = tool.predict(clicks[:1])
    assert out.mask.shape == crop.shape[:2] and out.mask[400, 300]
    out = tool.predict(clicks, out.logits)
    assert out.mask.shape == crop.shape[:2] and out.mask[400, 300] and not out.mask[100, 700]


# -- answers local to what a click says (issue 20) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def liver() -> tuple[ClassicalTool, np.ndarray]:
    """The 04_CT_liver image set on a tool, and its tumour mask (2,568 px)."""
    if not DEMO.is_dir():
        pytest.skip(f"demo data not found at {DEMO}")
    samples = {s.name: s for s in list_biomedparse(DEMO)}
    sample = samples["04_CT_liver_tumor"]
    image = read_image(sample.image)
    tool = ClassicalTool()
    tool.set_image(image)
    return tool, read_mask(sample.mask, image.shape[:2])


def test_far_background_click_leaves_the_mask_alone(liver):
    """A foreground click, then a background click in the air at (100, 100): the mask used to grow 18-fold."""
    tool, gt = liver
    first = next_click(np.zeros(gt.shape, bool), gt)
    one = tool.predict([first])
    two = tool.predict([first, Click(100.5, 100.5, False)], one.logits)
    assert two.mask.sum() <= one.mask.sum() and iou(two.mask, one.mask) >= 0.98, (one.mask.sum(), two.mask.sum())
    assert iou(two.mask, gt) >= iou(one.mask, gt) - 0.02


def test_initial_mask_survives_a_far_background_click(liver):
    tool, gt = liver
    out = tool.predict([Click(900.5, 900.5, False)], tool.mask_to_logits(gt))
    assert out.mask.any(), "the initial mask was emptied"
    assert iou(out.mask, gt) >= 0.98


def test_foreground_click_inside_the_initial_mask_does_not_shrink_it(liver):
    tool, gt = liver
    rows, cols = np.nonzero(ndimage.distance_transform_edt(gt) == ndimage.distance_transform_edt(gt).max())
    inside = Click(cols[0] + 0.5, rows[0] + 0.5, True)
    out = tool.predict([inside], tool.mask_to_logits(gt))
    assert out.mask.sum() >= gt.sum() and iou(out.mask, gt) >= 0.98, (gt.sum(), out.mask.sum())


@needs_demo
@pytest.mark.parametrize(
    "name", ["07_CT_abdomen_kidney+cyst", "14_MRI_prostate_prostate", "25_dermoscopy_skin_melanoma"]
)
def test_the_worst_far_click_drops_of_issue_20_stay_fixed(name):
    """The oracle's first click, then a background click at the image corner farthest from the object: these three
    lost 0.83, 0.72 and 0.70 IoU when the correction zone grew with the click's distance from the mask."""
    sample = {s.name: s for s in list_biomedparse(DEMO)}[name]
    image = read_image(sample.image)
    gt = read_mask(sample.mask, image.shape[:2])
    tool = ClassicalTool()
    tool.set_image(image)
    first = next_click(np.zeros(gt.shape, bool), gt)
    one = tool.predict([first])
    far = far_background_click(gt)
    two = tool.predict([first, far], one.logits)
    assert two.mask.any(), f"{name}: the far click {far} emptied the mask"
    assert iou(two.mask, gt) >= iou(one.mask, gt) - 0.02, (name, iou(one.mask, gt), iou(two.mask, gt))
    assert iou(two.mask, one.mask) >= 0.98, f"{name}: a click far from the object changed the mask"


@needs_demo
def test_a_positive_click_on_a_separate_part_does_not_flood_the_image():
    """Seven noisy positive clicks on one kidney of 13_MRI_abdomen (IoU 0.52), then one on the other kidney, whose
    seed patch is textured: that click's claim took 161,565 px (the kidneys are 21,828) and the IoU fell to 0.14."""
    sample = {s.name: s for s in list_biomedparse(DEMO)}["13_MRI_abdomen_kidney"]
    image = read_image(sample.image)
    gt = read_mask(sample.mask, image.shape[:2])
    tool = ClassicalTool()
    tool.set_image(image)
    clicks, out = [], None
    for r, c in [(368, 360), (389, 444), (377, 456), (400, 414), (371, 362), (385, 358), (326, 454), (607, 447)]:
        clicks.append(Click(c + 0.5, r + 0.5, True))
        before = out
        out = tool.predict(clicks, None if before is None else before.logits)
    assert out.mask.sum() < 2 * gt.sum(), (out.mask.sum(), gt.sum())
    assert iou(out.mask, gt) >= iou(before.mask, gt), (iou(before.mask, gt), iou(out.mask, gt))


# The user-click scenarios of benchmarks/bench_user_clicks.py on a few masks; the full figures come from the benchmark.
USER_MASKS = (
    "06_CT_abdomen_spleen",
    "13_MRI_abdomen_left+kidney",
    "20_ultrasound_breast_tumor",
    "24_endoscope_colon_neoplastic+polyp",
)


@pytest.fixture(scope="module")
def user_masks() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, gt) of USER_MASKS."""
    if not DEMO.is_dir():
        pytest.skip(f"demo data not found at {DEMO}")
    samples = {s.name: s for s in list_biomedparse(DEMO)}
    out = []
    for name in USER_MASKS:
        image = read_image(samples[name].image)
        out.append((name, image, read_mask(samples[name].mask, image.shape[:2])))
    return out


def test_noisy_clicks_reach_the_oracle_quality(user_masks):
    """(b) Clicks uniformly random inside the largest error region, 8 clicks, one seed."""
    tool = ClassicalTool()
    scores = []
    for k, (_, image, gt) in enumerate(user_masks):
        tool.set_image(image)
        run = click_with_oracle(tool, gt, 8, rng=np.random.default_rng([0, k]))
        scores.append(run.ious[-1])
    assert np.mean(scores) >= NOISY_MEASURED - 0.02 and min(scores) >= 0.8, np.round(scores, 3)


def test_a_far_background_click_after_the_first_changes_little(user_masks):
    """(c) The first oracle click, then a background click at the far corner: never emptied, IoU not lowered."""
    tool = ClassicalTool()
    for name, image, gt in user_masks:
        tool.set_image(image)
        first = next_click(np.zeros(gt.shape, bool), gt)
        one = tool.predict([first])
        two = tool.predict([first, far_background_click(gt)], one.logits)
        assert two.mask.any() and iou(two.mask, gt) >= iou(one.mask, gt) - 0.02, name


def test_refinement_of_a_perturbed_mask_improves_it(user_masks):
    """(d) The ground truth eroded, dilated or shifted as the initial mask, one oracle corrective click: IoU rises;
    (e) the same initial masks and the ground truth with a far background click: IoU stays within 0.02."""
    tool = ClassicalTool()
    for name, image, gt in user_masks:
        tool.set_image(image)
        initials = perturbed_masks(gt)
        for kind, initial in initials.items():
            out = tool.predict([next_click(initial, gt)], tool.mask_to_logits(initial))
            assert iou(out.mask, gt) > iou(initial, gt), f"{name} {kind}"
        far = far_background_click(gt)
        for kind, initial in {"gt": gt, **initials}.items():
            out = tool.predict([far], tool.mask_to_logits(initial))
            assert abs(iou(out.mask, gt) - iou(initial, gt)) <= 0.02, f"{name} {kind}"
