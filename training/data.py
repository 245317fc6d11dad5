"""BiomedParse-format data for training, loaded with MONAI dictionary transforms.

A BiomedParse dataset folder holds `<split>/` images named `<image>_<modality>_<site>.png`, `<split>_mask/` masks named
`<image>_<modality>_<site>_<target>.png` (`+` for spaces in the target) and, optionally, a COCO-style `<split>.json`
(`images`, `annotations` with `mask_file`, `sentences`, `category_id`, and `categories`). The full BiomedParseData is a
folder of such dataset folders (one per source dataset: ACDC, amos22, ...); the source dataset is the sample's
`group`, which the trajectory statistics report on.

Listing never reads pixels; loading (`BiomedParseDataset[i]`) reads one image and its mask. Bad entries (a mask
without its image, an unreadable file, a mask of another size than its image, an empty mask) are reported with the
file name and skipped by `iter_valid`, never fatal.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ibisagent.datasets import find_split, pair_split, parse_image_name
from ibisagent.tools.base import as_rgb_uint8


class SampleError(ValueError):
    """One sample cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Problem:
    """A skipped entry: which file, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class DataReport:
    """What listing and loading found: counts and every problem, in order."""

    listed: int = 0
    loaded: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def add(self, file: str | Path, reason: str) -> None:
        self.problems.append(Problem(str(file), reason))

    def by_reason(self) -> dict[str, int]:
        """Problem counts keyed by the reason's kind (the text before the first colon)."""
        return dict(Counter(p.reason.split(":")[0] for p in self.problems))

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.by_reason().items()))
        return f"{self.listed} listed, {self.loaded} loaded, {self.skipped} skipped" + (f" ({kinds})" if kinds else "")


# -- listing -----------------------------------------------------------------------------------------------------------
def _sentences(raw) -> list[str]:
    out = []
    for s in raw or []:
        text = s if isinstance(s, str) else (s.get("sent") or s.get("raw") or "") if isinstance(s, dict) else ""
        if text.strip():
            out.append(text.strip())
    return out


def _entries_from_names(images_dir: Path, masks_dir: Path, group: str, report: DataReport) -> list[dict]:
    orphans: list[Path] = []
    samples = pair_split(images_dir, masks_dir, orphans)
    for mask in orphans:
        report.add(mask, f"missing image: no {images_dir.name}/<image>.png whose name starts this mask's name")
    return [_entry(s.image, s.mask, s.target, s.modality, s.site, group, []) for s in samples]


def _entries_from_coco(path: Path, images_dir: Path, masks_dir: Path, group: str, report: DataReport) -> list[dict]:
    try:
        coco = json.loads(path.read_text())
        images = {img["id"]: img for img in coco["images"]}
        categories = {c["id"]: c.get("name", "") for c in coco.get("categories", [])}
        annotations = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SampleError(
            f"{path}: not a BiomedParse COCO file ({type(exc).__name__}: {exc}); it needs 'images' (id, file_name) and "
            f"'annotations' (image_id, mask_file); delete it to list the split from file names instead"
        ) from None
    entries = []
    for ann in annotations:
        mask_file = ann.get("mask_file")
        img = images.get(ann.get("image_id"))
        if not mask_file or img is None:
            report.add(path, f"bad annotation: id {ann.get('id')} lacks mask_file or a known image_id")
            continue
        mask, image = masks_dir / mask_file, images_dir / img["file_name"]
        if not mask.is_file():
            report.add(mask, "missing mask: listed in the JSON but not on disk")
            continue
        if not image.is_file():
            report.add(mask, f"missing image: {image.name} is not on disk")
            continue
        stem = image.stem
        modality, site = parse_image_name(stem)
        target = (
            mask.stem[len(stem) + 1 :].replace("+", " ")
            if mask.stem.startswith(stem + "_")
            else categories.get(ann.get("category_id"), "target")
        )
        entries.append(_entry(image, mask, target, modality, site, group, _sentences(ann.get("sentences"))))
    return entries


def _entry(image: Path, mask: Path, target: str, modality: str, site: str, group: str, sentences: list[str]) -> dict:
    return {
        "id": f"{group}/{mask.stem}",
        "image": str(image),
        "label": str(mask),
        "target": target,
        "modality": modality,
        "site": site,
        "group": group,
        "sentences": sentences,
    }


def split_folders(root: str | Path, split: str | None = None) -> list[tuple[Path, Path]]:
    """(images folder, masks folder) of every dataset under `root` that has `split` (any split name if None).

    root may be a split folder, a dataset folder, or a folder of dataset folders (BiomedParseData itself).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if split is None:
        try:
            return [find_split(root)]
        except FileNotFoundError:
            pass
        pairs = sorted(p for p in root.rglob("*_mask") if p.is_dir() and p.with_name(p.name[:-5]).is_dir())
    else:
        pairs = sorted(p for p in [root / f"{split}_mask", *root.rglob(f"{split}_mask")] if p.is_dir())
        pairs = [p for p in dict.fromkeys(pairs) if p.with_name(split).is_dir()]
    if not pairs:
        which = f"'{split}'" if split else "any"
        raise FileNotFoundError(f"{root}: found no BiomedParse split ({which} <split>/ beside <split>_mask/)")
    return [(p.with_name(p.name[:-5]), p) for p in pairs]


def list_entries(root: str | Path, split: str | None = None, report: DataReport | None = None) -> list[dict]:
    """Entry dicts (id, image, label, target, modality, site, group, sentences) of every split found under `root`,
    from `<split>.json` where present, else from file names. Problems go to `report`."""
    report = report if report is not None else DataReport()
    entries = []
    for images_dir, masks_dir in split_folders(root, split):
        group = images_dir.parent.name
        coco = images_dir.parent / f"{images_dir.name}.json"
        if coco.is_file():
            entries += _entries_from_coco(coco, images_dir, masks_dir, group, report)
        else:
            entries += _entries_from_names(images_dir, masks_dir, group, report)
    report.listed = len(entries) + len(report.problems)
    return entries


def write_coco_json(split_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the COCO-style `<split>.json` of a split from its file names (image sizes from file headers only).

    Sentences are "<target> in <modality> <site>" as a minimal description; categories are the target names.
    Returns the written path (default: `<dataset>/<split>.json`, beside the split folder).
    """
    images_dir, masks_dir = find_split(split_dir)
    report = DataReport()
    entries = _entries_from_names(images_dir, masks_dir, images_dir.parent.name, report)
    images, annotations, categories = {}, [], {}
    for e in entries:
        image = Path(e["image"])
        if image.name not in images:
            with Image.open(image) as im:
                width, height = im.size
            images[image.name] = {"id": len(images), "file_name": image.name, "width": width, "height": height}
        cat = categories.setdefault(e["target"], {"id": len(categories) + 1, "name": e["target"]})
        annotations.append(
            {
                "id": len(annotations),
                "image_id": images[image.name]["id"],
                "category_id": cat["id"],
                "mask_file": Path(e["label"]).name,
                "sentences": [{"sent": f"{e['target']} in {e['modality']} {e['site']}"}],
            }
        )
    out = Path(out) if out is not None else images_dir.parent / f"{images_dir.name}.json"
    doc = {"images": list(images.values()), "annotations": annotations, "categories": list(categories.values())}
    out.write_text(json.dumps(doc, indent=1))
    return out


# -- loading (MONAI) ---------------------------------------------------------------------------------------------------
def _to_agent_arrays(d: dict) -> dict:
    """MONAI-loaded arrays -> the agent's frame: image HxWx3 uint8, label HxW bool (first channel > 0)."""
    image = np.asarray(d["image"])
    label = np.asarray(d["label"])
    label = (label[..., 0] if label.ndim == 3 else label) > 0
    if image.shape[:2] != label.shape:
        raise SampleError(
            f"{d['label_path']}: size mismatch: mask is {label.shape[1]}x{label.shape[0]}, image is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)"
        )
    if not label.any():
        raise SampleError(f"{d['label_path']}: empty mask: no foreground pixel")
    out = dict(d)
    out["image"], out["label"] = as_rgb_uint8(image), label
    return out


def load_transforms():
    """The MONAI dictionary transforms that turn an entry into arrays: image (RGB-converted by PIL) and label read
    with `LoadImaged` in (row, column) order, then converted to the agent's frame (see `_to_agent_arrays`)."""
    from monai.data import PILReader
    from monai.transforms import Compose, LoadImaged

    rgb = PILReader(reverse_indexing=False, converter=_to_rgb)
    return Compose(
        [
            _keep_paths,
            LoadImaged("image", reader=rgb, image_only=True, dtype=None),
            LoadImaged("label", reader=PILReader(reverse_indexing=False), image_only=True, dtype=None),
            _to_agent_arrays,
        ]
    )


def _to_rgb(im):
    return im.convert("RGB")


def _keep_paths(d: dict) -> dict:
    return {**d, "image_path": d["image"], "label_path": d["label"]}


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


class BiomedParseDataset:
    """A MONAI `Dataset` over BiomedParse-format folders.

    Each item is the entry dict plus `image` (HxWx3 uint8), `label` (HxW bool), `image_path` and `label_path`.
    `self[i]` raises `SampleError` for a bad sample; `iter_valid` skips and reports them in `self.report`.
    """

    def __init__(self, root: str | Path, split: str | None = None, entries: Sequence[dict] | None = None):
        from monai.data import Dataset

        self.report = DataReport()
        self.entries = list(entries) if entries is not None else list_entries(root, split, self.report)
        if entries is not None:
            self.report.listed = len(self.entries)
        self._dataset = Dataset(data=self.entries, transform=load_transforms())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._dataset[index]
        except Exception as exc:  # MONAI wraps transform errors in RuntimeError; report the real cause
            cause = _root_cause(exc)
            if isinstance(cause, SampleError):
                raise cause from None
            raise SampleError(f"{self.entries[index]['image']}: unreadable: {type(cause).__name__}: {cause}") from None

    def iter_valid(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, dict]]:
        """(index, item) for every loadable sample among `indices` (all by default); others go to `self.report`."""
        for i in range(len(self)) if indices is None else indices:
            try:
                item = self[i]
            except SampleError as exc:
                file, _, reason = str(exc).partition(": ")
                self.report.add(file, reason)
                continue
            self.report.loaded += 1
            yield i, item
