"""The synthetic shapes generator: deterministic, masks inside the image and disjoint, names unique and true to the
pixels, and the written folder read back by the real BiomedParse loader and its COCO-style json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ibisagent.datasets import list_biomedparse
from ibisagent.grammar import target_from_instruction
from ibisagent.io import read_image, read_mask
from ibisagent_training.synthetic import (
    APPEARANCES,
    MODALITY,
    SHAPES,
    SITE,
    generate_image,
    main,
    write_synthetic_dataset,
)


def _shape_of(mask: np.ndarray) -> str:
    """Classify a mask from its geometry alone, independently of the generator. A hole: ring. Less than 0.62 of its
    minimum-area bounding rectangle filled: triangle. Otherwise a box and an ellipse with the mask's second moments,
    along its principal axis (elongated shapes) or its bounding rectangle's (round ones), are compared with it: the
    better fit says box or ellipse, the moments' aspect says elongated (rectangle, ellipse) or round (square, disc)."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull

    if ndimage.binary_fill_holes(mask).sum() > 1.1 * mask.sum():
        return "ring"
    rows, cols = np.nonzero(mask)
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    hull = corners[ConvexHull(corners).vertices]
    edges = np.roll(hull, -1, axis=0) - hull
    edges /= np.linalg.norm(edges, axis=1, keepdims=True)
    areas = [np.ptp(hull @ e) * np.ptp(hull @ np.array([-e[1], e[0]])) for e in edges]
    if mask.sum() / min(areas) < 0.62:
        return "triangle"
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cx, cy = xx[mask].mean(), yy[mask].mean()
    vals, vecs = np.linalg.eigh(np.cov(np.stack([xx[mask] - cx, yy[mask] - cy])))
    e = vecs[:, 1] if vals[0] < 0.64 * vals[1] else edges[int(np.argmin(areas))]
    u = (xx - cx) * e[0] + (yy - cy) * e[1]
    v = -(xx - cx) * e[1] + (yy - cy) * e[0]
    su, sv = u[mask].std(), v[mask].std()
    ellipse = (u / (2 * su)) ** 2 + (v / (2 * sv)) ** 2 <= 1  # a uniform ellipse has semi-axis 2 sigma
    box = (np.abs(u) <= math.sqrt(3) * su) & (np.abs(v) <= math.sqrt(3) * sv)  # a uniform box: half-side sqrt(3) sigma

    def fit(model):
        return (model & mask).sum() / (model | mask).sum()

    elongated = min(su, sv) / max(su, sv) < 0.8
    if fit(box) > fit(ellipse):
        return "rectangle" if elongated else "square"
    return "ellipse" if elongated else "disc"


def test_generate_image_is_deterministic_and_seed_split_dependent():
    a = generate_image(3, 7, objects=(2, 4))
    b = generate_image(3, 7, objects=(2, 4))
    assert np.array_equal(a.image, b.image)
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, generate_image(4, 7, objects=(2, 4)).image)
    assert not np.array_equal(a.image, generate_image(3, 7, objects=(2, 4), split="test").image)


def test_objects_are_inside_disjoint_uniquely_named_and_true_to_their_names():
    seen_shapes, seen_looks, counts = set(), set(), []
    for index in range(60):
        sample = generate_image(0, index, size=112, objects=(1, 5))
        assert sample.image.shape == (112, 112, 3) and sample.image.dtype == np.uint8
        counts.append(len(sample.objects))
        grey = sample.image[..., 0].astype(float)
        union = np.zeros((112, 112), bool)
        names = [o.name for o in sample.objects]
        assert len(set(names)) == len(names), names
        for obj in sample.objects:
            m = obj.mask
            assert m.shape == (112, 112) and m.dtype == bool and m.sum() > 20
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), "object touches the border"
            assert not (union & m).any(), "objects overlap"
            union |= m
            assert target_from_instruction(obj.instruction) == obj.name
            words = obj.name.split()
            assert words[-1] == obj.shape and set(words[:-1]) <= {obj.appearance, obj.size}
            # the name must single out this object among the image's objects
            matching = [o for o in sample.objects if all(w in (o.shape, o.appearance, o.size) for w in words)]
            assert matching == [obj], (obj.name, [o.name for o in sample.objects])
            # the pixels agree with the description
            assert _shape_of(m) == obj.shape, (index, obj.name, obj.shape)
            inside = grey[m]
            if obj.appearance == "bright":
                assert inside.mean() > 180
            elif obj.appearance == "dark":
                assert inside.mean() < 60
            else:
                assert (inside > 180).mean() > 0.25 and (inside < 60).mean() > 0.25
            seen_shapes.add(obj.shape)
            seen_looks.add(obj.appearance)
        assert 80 < grey[~union].mean() < 145
    assert seen_shapes == set(SHAPES) and seen_looks == set(APPEARANCES)
    assert min(counts) == 1 and max(counts) == 5


def test_names_add_attributes_only_when_needed():
    found = set()
    for index in range(200):
        for obj in generate_image(1, index, objects=(3, 6), shapes=("ring", "disc")).objects:
            found.add(len(obj.name.split()))
    assert found == {1, 2, 3}  # "ring", "bright ring" / "small ring", "small bright ring"


def test_write_read_back_with_the_biomedparse_loader(tmp_path):
    counts = write_synthetic_dataset(tmp_path, n_images=12, seed=5, size=64, objects=(1, 3), split="val")
    samples = list_biomedparse(tmp_path / "val")
    assert len(samples) == counts["masks"] == sum(int(k) * v for k, v in counts["objects_per_image"].items())
    assert counts["images"] == 12 and sum(counts["targets"].values()) == counts["masks"]
    assert {s.modality for s in samples} == {MODALITY} and {s.site for s in samples} == {SITE}
    by_image: dict[str, list[str]] = {}
    for s in samples:
        by_image.setdefault(s.image.name, []).append(s.target)
        index = int(s.image.stem.split("_")[0][len("val") :])
        gen = generate_image(5, index, 64, (1, 3), "val")
        obj = next(o for o in gen.objects if o.name == s.target)  # the loader's target is the generator's name
        image = read_image(s.image)
        assert np.array_equal(image, gen.image)
        assert np.array_equal(read_mask(s.mask, image.shape[:2]), obj.mask)
    assert len(by_image) == 12
    assert all(len(set(t)) == len(t) for t in by_image.values())

    coco = json.loads((tmp_path / "val.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == sorted(by_image)
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(coco["annotations"]) == counts["masks"]
    for ann in coco["annotations"]:
        mask = read_mask(tmp_path / "val_mask" / ann["mask_file"])
        assert mask.sum() == ann["area"]
        x, y, w, h = ann["bbox"]
        assert mask[y : y + h, x : x + w].sum() == ann["area"]
        assert categories[ann["category_id"]] == ann["shape"]
        assert ann["sentences"][0]["sent"] == ann["target"]
        assert ann["mask_file"].endswith("_" + ann["target"].replace(" ", "+") + ".png")
        image = coco["images"][ann["image_id"]]
        assert ann["mask_file"].startswith(image["file_name"][: -len(".png")] + "_")


def test_one_target_per_image_and_determinism_on_disk(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 8, seed=2, size=48, objects=(2, 3), targets="one")
    b = write_synthetic_dataset(tmp_path / "b", 8, seed=2, size=48, objects=(2, 3), targets="one")
    assert a["masks"] == 8 and a == {**b, "json": a["json"], "images_dir": a["images_dir"], "masks_dir": a["masks_dir"]}
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    # a larger dataset extends a smaller one
    c = write_synthetic_dataset(tmp_path / "c", 12, seed=2, size=48, objects=(2, 3), targets="one")
    assert c["masks"] == 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files_a)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_synthetic_dataset(tmp_path, 3, seed=0, size=48)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(tmp_path, 3, seed=0, size=48)
    counts = write_synthetic_dataset(tmp_path, 2, seed=1, size=48, overwrite=True)
    assert len(list_biomedparse(tmp_path / "train")) == counts["masks"] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(objects=(0, 2)), "objects"),
        (dict(objects=(3, 2)), "objects"),
        (dict(size=16), "size"),
        (dict(shapes=("star",)), "shape"),
        (dict(appearances=()), "appearance"),
        (dict(split="a/b"), "split"),
        (dict(targets="some"), "targets"),
        (dict(objects=(3, 3), shapes=("ring",), appearances=("dark",)), "told apart"),
        (dict(objects=(8, 8), size=32), "could not place"),
    ],
)
def test_bad_options_say_what_to_change(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_dataset(tmp_path, 2, seed=0, **{"size": 64, **kwargs})


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--n-images", "4", "--size", "48", "--max-objects", "2", "--split", "test"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["images"] == 4 and len(list_biomedparse(tmp_path / "test")) == counts["masks"]
    assert main([str(tmp_path), "--n-images", "4", "--split", "test"]) == 2
    assert "overwrite" in capsys.readouterr().err
    help_run = subprocess.run(
        [sys.executable, "-m", "ibisagent_training.synthetic", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0 and "--n-images" in help_run.stdout


def test_the_training_loader_reads_the_json(tmp_path):
    """`ibisagent_training.data.list_entries` takes the COCO json path when `<split>.json` exists: same targets,
    the sentences carried over, nothing reported as bad."""
    data = pytest.importorskip("ibisagent_training.data")
    counts = write_synthetic_dataset(tmp_path, 6, seed=9, size=48, objects=(1, 3), split="train")
    report = data.DataReport()
    entries = data.list_entries(tmp_path, "train", report)
    assert report.problems == [] and len(entries) == counts["masks"]
    names = {(Path(s.mask).name, s.target) for s in list_biomedparse(tmp_path / "train")}
    assert {(Path(e["label"]).name, e["target"]) for e in entries} == names
    assert all(e["sentences"] == [e["target"]] and e["modality"] == MODALITY for e in entries)
