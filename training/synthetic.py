"""Synthetic referring-segmentation data for the learning proof: shapes of several kinds on a noisy background, one
instruction and mask per object, written as a BiomedParse split so the real loaders and trajectory generator run.

Each object has a shape (disc, ellipse, square, rectangle, triangle, ring), an appearance (bright, dark, striped) and
a size class (small, large), and is named by the shortest description that no other object of its image shares:
"ring" when it is the only ring, "bright ring" when another ring is dark, "small bright ring" when only the size tells
two bright rings apart. The instruction is "segment the <name>". Objects never overlap and lie inside the image.

Layout (see `ibisagent.datasets`): `<out>/<split>/<image>_Synthetic_shapes.png` (HxWx3 uint8, grey),
`<out>/<split>_mask/<image>_Synthetic_shapes_<name with + for spaces>.png` (0/255) and a COCO-style `<out>/<split>.json`.
Every image depends only on (seed, split, index), so a held-out split with the same seed holds different images and
a larger dataset extends a smaller one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("disc", "ellipse", "square", "rectangle", "triangle", "ring")
APPEARANCES = ("bright", "dark", "striped")
SIZES = ("small", "large")
MODALITY = "Synthetic"
SITE = "shapes"
MAX_OBJECTS = 8

# Bounding radius of an object as a fraction of the image side, per size class; the gap between the classes keeps
# "small" and "large" visibly different.
_RADIUS = {"small": (0.085, 0.125), "large": (0.17, 0.23)}
_MARGIN = 2  # pixels between an object and the border, and between objects


@dataclass(frozen=True)
class SyntheticObject:
    """One object of a synthetic image. mask: HxW bool; centre: (x, y) in pixels (x = column, y = row)."""

    shape: str
    appearance: str
    size: str
    name: str
    mask: np.ndarray
    centre: tuple[float, float]
    radius: float

    @property
    def instruction(self) -> str:
        return f"segment the {self.name}"


@dataclass(frozen=True)
class SyntheticImage:
    """An image (HxWx3 uint8) and its objects, whose masks are disjoint and whose names are unique."""

    image: np.ndarray
    objects: tuple[SyntheticObject, ...]
    index: int


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def _shape_mask(shape: str, cx: float, cy: float, radius: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """The shape's HxW bool mask, centred at (cx, cy) in pixels, inside the circle of `radius` around the centre."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    theta = rng.uniform(0, math.pi)
    cos, sin = math.cos(theta), math.sin(theta)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # rotated frame
    if shape == "disc":
        return dx**2 + dy**2 <= radius**2
    if shape == "ring":
        inner = radius * rng.uniform(0.5, 0.62)
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= inner**2)
    if shape == "ellipse":
        b = radius * rng.uniform(0.45, 0.62)
        return (u / radius) ** 2 + (v / b) ** 2 <= 1
    if shape in ("square", "rectangle"):
        if shape == "square":
            theta = rng.uniform(-math.pi / 9, math.pi / 9)  # near axis-aligned: a 45-degree square reads as a diamond
            cos, sin = math.cos(theta), math.sin(theta)
            u, v = dx * cos + dy * sin, -dx * sin + dy * cos
            a = b = radius / math.sqrt(2)
        else:
            ratio = rng.uniform(0.4, 0.55)
            a = radius / math.sqrt(1 + ratio**2)
            b = a * ratio
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if shape == "triangle":
        inside = np.ones((n, n), bool)
        for k in range(3):  # an equilateral triangle: three half-planes at distance radius / 2 from the centre
            phi = theta + 2 * math.pi * k / 3
            inside &= dx * math.cos(phi) + dy * math.sin(phi) <= radius / 2
        return inside
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mid-grey with a smooth low-frequency field and pixel noise, float32 HxW."""
    coarse = rng.normal(0, 12, (6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.BILINEAR))
    return rng.uniform(95, 125) + smooth + rng.normal(0, 9, (n, n)).astype(np.float32)


def _paint(canvas: np.ndarray, mask: np.ndarray, appearance: str, rng: np.random.Generator) -> None:
    """Fill the mask's pixels of the float32 canvas with the appearance's intensities (in place)."""
    noise = rng.normal(0, 7, mask.sum()).astype(np.float32)
    if appearance == "bright":
        canvas[mask] = rng.uniform(195, 230) + noise
    elif appearance == "dark":
        canvas[mask] = rng.uniform(20, 45) + noise
    elif appearance == "striped":
        period, phi = rng.uniform(4.5, 7.0), rng.uniform(0, math.pi)
        yy, xx = np.nonzero(mask)
        phase = (xx * math.cos(phi) + yy * math.sin(phi)) * 2 * math.pi / period
        canvas[mask] = np.where(np.sin(phase) >= 0, 215.0, 30.0) + noise
    else:
        raise ValueError(f"unknown appearance {appearance!r}; choose from {', '.join(APPEARANCES)}")


def _name(obj: tuple[str, str, str], others: list[tuple[str, str, str]]) -> str:
    """Shortest unique description of obj = (shape, appearance, size) among `others`: the shape, then appearance +
    shape, then size + shape, then size + appearance + shape."""
    shape, appearance, size = obj
    for use_size, use_look in ((False, False), (False, True), (True, False), (True, True)):
        clash = [
            o
            for o in others
            if o[0] == shape and (not use_look or o[1] == appearance) and (not use_size or o[2] == size)
        ]
        if not clash:
            return " ".join([size] * use_size + [appearance] * use_look + [shape])
    raise ValueError(f"two objects share every attribute {obj}; they cannot be told apart")


def _check_options(size: int, objects: tuple[int, int], shapes, appearances) -> None:
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    lo, hi = objects
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= {MAX_OBJECTS}, got {objects}")
    for value, allowed, what in ((shapes, SHAPES, "shape"), (appearances, APPEARANCES, "appearance")):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise ValueError(f"unknown or no {what}(s) {bad or list(value)}; choose from {', '.join(allowed)}")
    kinds = len(set(shapes)) * len(set(appearances)) * len(SIZES)
    if lo > kinds:
        raise ValueError(
            f"{lo} objects per image cannot all be told apart with {kinds} distinct (shape, appearance, size) kinds; "
            "allow more shapes or appearances, or lower the minimum number of objects"
        )


def generate_image(
    seed: int,
    index: int,
    size: int = 112,
    objects: tuple[int, int] = (1, 1),
    split: str = "train",
    shapes: tuple[str, ...] = SHAPES,
    appearances: tuple[str, ...] = APPEARANCES,
) -> SyntheticImage:
    """One synthetic image of `size` x `size` pixels with between objects[0] and objects[1] objects.

    Deterministic in (seed, split, index). Objects are placed one by one at random positions, at least 2 pixels from
    the border and from each other (bounding circles); no two objects share shape, appearance and size.
    """
    _check_options(size, objects, shapes, appearances)
    rng = _rng(seed, split, index)
    count = int(rng.integers(objects[0], objects[1] + 1))
    canvas = _background(rng, size)
    placed: list[tuple[str, str, str, float, float, float]] = []  # shape, appearance, size, cx, cy, radius
    for _ in range(200 * count):
        if len(placed) == count:
            break
        desc = (str(rng.choice(shapes)), str(rng.choice(appearances)), str(rng.choice(SIZES)))
        if any(p[:3] == desc for p in placed):
            continue
        lo, hi = _RADIUS[desc[2]]
        radius = float(rng.uniform(lo, hi) * size)
        for _ in range(50):
            cx, cy = rng.uniform(radius + _MARGIN, size - radius - _MARGIN, 2)
            if all(math.hypot(cx - p[3], cy - p[4]) > radius + p[5] + _MARGIN for p in placed):
                placed.append((*desc, float(cx), float(cy), radius))
                break
    if len(placed) < objects[0]:
        raise ValueError(
            f"could not place {objects[0]} objects in a {size}x{size} image; lower the minimum number of objects "
            "or raise the image size"
        )
    out = []
    descs = [p[:3] for p in placed]
    for i, (shape, appearance, size_class, cx, cy, radius) in enumerate(placed):
        mask = _shape_mask(shape, cx, cy, radius, rng, size)
        _paint(canvas, mask, appearance, rng)
        name = _name((shape, appearance, size_class), descs[:i] + descs[i + 1 :])
        out.append(SyntheticObject(shape, appearance, size_class, name, mask, (cx, cy), radius))
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return SyntheticImage(np.repeat(grey[..., None], 3, axis=2), tuple(out), index)


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def write_synthetic_dataset(
    out: str | Path,
    n_images: int,
    seed: int,
    size: int = 112,
    objects: tuple[int, int] = (1, 1),
    split: str = "train",
    targets: str = "all",
    shapes: tuple[str, ...] = SHAPES,
    appearances: tuple[str, ...] = APPEARANCES,
    overwrite: bool = False,
) -> dict:
    """Write `n_images` synthetic images as the BiomedParse split `<out>/<split>` and return counts.

    targets:   "all" writes one mask (one instruction) per object; "one" writes one randomly chosen object's mask
               per image, the others staying as distractors.
    overwrite: replace the synthetic files of an existing split; without it a non-empty split folder is an error.
    Returns {"split", "images", "masks", "objects_per_image": {k: images}, "shapes": {shape: masks},
    "appearances": {appearance: masks}, "targets": {name: masks}, "json": path, "images_dir", "masks_dir"}.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if targets not in ("all", "one"):
        raise ValueError(f"targets must be 'all' or 'one', got {targets!r}")
    if not split or any(c in split for c in "/\\") or split.endswith("_mask") or split.startswith("."):
        raise ValueError(f"split must be a plain folder name (no path separators, not ending in _mask), got {split!r}")
    _check_options(size, tuple(objects), shapes, appearances)
    out = Path(out)
    images_dir, masks_dir, json_path = out / split, out / f"{split}_mask", out / f"{split}.json"
    existing = [p for d in (images_dir, masks_dir) if d.is_dir() for p in d.iterdir()]
    if existing and not overwrite:
        raise FileExistsError(f"{images_dir} already holds files; choose another folder or split, or pass overwrite")
    for p in existing:
        if p.is_file() and f"_{MODALITY}_" in p.name and p.suffix == ".png":
            p.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)

    category_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    coco = {
        "info": {
            "description": "IBISAgent synthetic shapes",
            "seed": seed,
            "size": size,
            "objects": list(objects),
            "split": split,
            "targets": targets,
        },
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": s, "supercategory": "shape"} for s, i in category_ids.items()],
    }
    per_image, shape_count, look_count, name_count = Counter(), Counter(), Counter(), Counter()
    for index in range(n_images):
        sample = generate_image(seed, index, size, tuple(objects), split, tuple(shapes), tuple(appearances))
        stem = f"{split}{index:06d}_{MODALITY}_{SITE}"
        _png(images_dir / f"{stem}.png", sample.image)
        coco["images"].append({"id": index, "file_name": f"{stem}.png", "height": size, "width": size})
        per_image[len(sample.objects)] += 1
        chosen = sample.objects
        if targets == "one":
            pick = int(_rng(seed, split + "-target", index).integers(len(sample.objects)))
            chosen = (sample.objects[pick],)
        for obj in chosen:
            mask_file = f"{stem}_{obj.name.replace(' ', '+')}.png"
            _png(masks_dir / mask_file, obj.mask.astype(np.uint8) * 255)
            rows, cols = np.nonzero(obj.mask)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": index,
                    "category_id": category_ids[obj.shape],
                    "mask_file": mask_file,
                    "sentences": [{"idx": 0, "sent": obj.name, "raw": obj.name}],
                    "instruction": obj.instruction,
                    "target": obj.name,
                    "shape": obj.shape,
                    "appearance": obj.appearance,
                    "size": obj.size,
                    "area": int(obj.mask.sum()),
                    "bbox": [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1],
                    "iscrowd": 0,
                }
            )
            shape_count[obj.shape] += 1
            look_count[obj.appearance] += 1
            name_count[obj.name] += 1
    json_path.write_text(json.dumps(coco))
    return {
        "split": split,
        "images": n_images,
        "masks": len(coco["annotations"]),
        "objects_per_image": {str(k): v for k, v in sorted(per_image.items())},
        "shapes": dict(sorted(shape_count.items())),
        "appearances": dict(sorted(look_count.items())),
        "targets": dict(sorted(name_count.items())),
        "json": str(json_path),
        "images_dir": str(images_dir),
        "masks_dir": str(masks_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ibisagent_training.synthetic",
        description="Write a synthetic shapes dataset (BiomedParse layout + COCO-style json) for the RL learning proof.",
    )
    parser.add_argument("out", help="dataset folder; the split is written to <out>/<split> and <out>/<split>_mask")
    parser.add_argument("--n-images", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; images depend on (seed, split, index)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image (default 1)")
    parser.add_argument("--max-objects", type=int, default=1, help="most objects per image (default 1)")
    parser.add_argument("--split", default="train", help="split name (default train)")
    parser.add_argument(
        "--targets", choices=("all", "one"), default="all", help="a mask per object (all) or per image (one)"
    )
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES), help="shapes to draw")
    parser.add_argument(
        "--appearances", nargs="+", choices=APPEARANCES, default=list(APPEARANCES), help="appearances to draw"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the synthetic files of an existing split")
    args = parser.parse_args(argv)
    try:
        counts = write_synthetic_dataset(
            args.out,
            args.n_images,
            args.seed,
            size=args.size,
            objects=(args.min_objects, args.max_objects),
            split=args.split,
            targets=args.targets,
            shapes=tuple(args.shapes),
            appearances=tuple(args.appearances),
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
