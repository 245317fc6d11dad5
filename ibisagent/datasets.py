"""BiomedParse-format folders, read without MONAI (the MONAI dataset for training lives in the training package).

Layout: `<split>/<image>_<modality>_<site>.png` images and `<split>_mask/<image>_<modality>_<site>_<target>.png`
masks; `+` stands for a space in the target. Image names may themselves contain underscores, so a mask is matched
to the longest image stem it starts with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class BiomedParseSample:
    """One (image, target mask) pair of a BiomedParse-format folder."""

    image: Path
    mask: Path
    target: str  # spaces restored, e.g. "liver tumor"
    modality: str  # e.g. "CT"
    site: str  # e.g. "abdomen"

    @property
    def name(self) -> str:
        return self.mask.stem


def find_split(root: str | Path) -> tuple[Path, Path]:
    """(images folder, masks folder) for a BiomedParse split given as the split folder, its parent dataset folder
    holding exactly one `<split>` + `<split>_mask` pair, or any folder above one such pair."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if root.name.endswith("_mask"):
        root = root.with_name(root.name[: -len("_mask")])
    if (root.parent / f"{root.name}_mask").is_dir():
        return root, root.parent / f"{root.name}_mask"
    pairs = sorted(p for p in root.rglob("*_mask") if p.is_dir() and p.with_name(p.name[:-5]).is_dir())
    if len(pairs) != 1:
        found = ", ".join(str(p.with_name(p.name[:-5])) for p in pairs) or "none"
        raise FileNotFoundError(
            f"{root}: expected one BiomedParse split (<split>/ beside <split>_mask/), found {len(pairs)}: {found}; pass the split folder itself"
        )
    return pairs[0].with_name(pairs[0].name[:-5]), pairs[0]


def pair_split(images_dir: Path, masks_dir: Path, orphans: list[Path] | None = None) -> list[BiomedParseSample]:
    """The (image, mask) pairs of one split's two folders, sorted by mask name. Masks without an image are skipped
    and, when `orphans` is given, appended to it."""
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    stems = sorted(images, key=len, reverse=True)
    samples = []
    for mask in sorted(masks_dir.iterdir()):
        if mask.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = next((s for s in stems if mask.stem.startswith(s + "_")), None)
        if stem is None:
            if orphans is not None:
                orphans.append(mask)
            continue
        modality, site = parse_image_name(stem)
        target = mask.stem[len(stem) + 1 :].replace("+", " ")
        samples.append(BiomedParseSample(images[stem], mask, target, modality, site))
    return samples


def parse_image_name(stem: str) -> tuple[str, str]:
    """(modality, site) of an image named `<image>_<modality>_<site>`; ("unknown", "unknown") otherwise."""
    parts = stem.split("_")
    return (parts[-2], parts[-1]) if len(parts) >= 3 else ("unknown", "unknown")


def list_biomedparse(root: str | Path) -> list[BiomedParseSample]:
    """All (image, mask) pairs of a BiomedParse split, sorted by mask name. Masks without an image are skipped."""
    return pair_split(*find_split(root))
