"""Benchmark readers: every benchmark becomes a list of `Case`s (one image, one question, one ground-truth mask).

Three sources, one reader each; `load_benchmark` picks the reader from the path.

* BiomedParse-format folders (`read_biomedparse`): `<split>/<image>_<modality>_<site>.png` beside
  `<split>_mask/<image>_<modality>_<site>_<target>.png` (see `ibisagent.datasets`); the question is
  "Segment the <target>.".
* MeCOVQA-G+-style JSON (`read_json_benchmark`), see `JSON_SCHEMA` below.
* Slice sets cut from 3D volumes (`read_volume_slices`): MedSAM2-style `.npz` files (`imgs` D×H×W, `gts` D×H×W) or
  NIfTI volume + label volume pairs; per volume the axial slice(s) with the largest label area, or every k-th
  labelled slice, windowed to uint8 (CT soft-tissue window by default).

All readers check that every file exists before anything runs and raise `BenchmarkError` with one line that names the
file, the entry and what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ibisagent.datasets import list_biomedparse
from ibisagent.grammar import target_from_instruction
from ibisagent.io import NIFTI_SUFFIXES, ImageReadError, read_image, read_mask, read_volume_slice, window
from ibisagent.tools.base import as_rgb_uint8

FORMATS = ("auto", "biomedparse", "json", "volumes")

# CT windows as (lower, upper) Hounsfield units: level ± width / 2.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (-160.0, 240.0),  # W400 L40
    "lung": (-1350.0, 150.0),  # W1500 L-600
    "bone": (-500.0, 1300.0),  # W1800 L400
    "brain": (0.0, 80.0),  # W80 L40
    "liver": (-25.0, 125.0),  # W150 L50
}

JSON_SCHEMA = """\
A JSON file holding a list of entries (or an object with the list under "data", "samples", "annotations" or "items"),
or a JSONL file with one entry per line. One entry is one (image, question, mask) triple:

    {"image": "images/ct_001.png",               # required: the image (PNG/JPG/BMP/TIFF, NIfTI middle slice, DICOM)
     "question": "Where is the liver tumor?",     # required: the instruction the agent gets
     "mask": "masks/ct_001_liver_tumor.png",      # required: the ground truth (foreground = first channel > 0)
     "target": "liver tumor",                     # optional; default: taken from the question, else "target"
     "modality": "CT",                            # optional; default: --modality (default "unknown")
     "id": "mecovqa-0001"}                        # optional; default: <index>_<mask file stem>

Key variants accepted: image | image_path | img | img_path | image_file | file_name;
question | instruction | query | prompt | text | sentence | referring_expression; mask | mask_path | mask_file | gt |
gt_mask | gt_path | seg_path | segmentation; target | category | class_name | object | entity; modality |
imaging_modality; id | case_id | question_id | sample_id | uid.
MeCOVQA's own conversation form is read too: "conversations": [{"from": "human", "value": "<image>\\nquestion"},
{"from": "gpt", "value": "... <mask>masks/x.png</mask>"}] (or "messages" with "role"/"content"): the question is the
first human/user turn without "<image>", the mask the first <mask>...</mask> path of an assistant turn.
Relative paths are relative to the JSON file's folder, or to --image-root when given."""

_IMAGE_KEYS = ("image", "image_path", "img", "img_path", "image_file", "file_name")
_QUESTION_KEYS = ("question", "instruction", "query", "prompt", "text", "sentence", "referring_expression")
_MASK_KEYS = ("mask", "mask_path", "mask_file", "gt", "gt_mask", "gt_path", "seg_path", "segmentation")
_TARGET_KEYS = ("target", "category", "class_name", "object", "entity")
_MODALITY_KEYS = ("modality", "imaging_modality")
_ID_KEYS = ("id", "case_id", "question_id", "sample_id", "uid")
_LIST_KEYS = ("data", "samples", "annotations", "items")
_LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt", "-seg", "-label")


class BenchmarkError(ValueError):
    """A benchmark could not be read; the message names the file or entry and says what to do."""


@dataclass(frozen=True)
class Case:
    """One evaluation case: an image, the question the agent gets, and the ground-truth mask of one target.

    source:      "biomedparse" | "json" | "npz" | "nifti" (how `load` reads the files).
    image, mask: files; for volumes the image volume and the label volume (the same .npz file for "npz").
    slice_index: the axial slice of a volume (npz: index along axis 0; NIfTI: along voxel axis 2), else None.
    label_value: for volumes, the label that is foreground (None: every label > 0).
    window:      (lower, upper) intensities mapped to 0..255 for NIfTI volumes and non-uint8 npz images;
                 None: the 0.5 and 99.5 percentiles of the slice.
    max_side:    when set, `load` downscales image and mask so that the longer side is at most this many pixels.
    """

    case_id: str
    question: str
    target: str
    modality: str
    image: Path
    mask: Path
    source: str
    slice_index: int | None = None
    label_value: int | None = None
    window: tuple[float, float] | None = None
    max_side: int | None = None

    @property
    def image_key(self) -> str:
        """Identifies the pixels `load` returns: cases with equal keys share one tool embedding."""
        return f"{self.image}#{self.slice_index}#{self.window}#{self.max_side}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"], d["mask"] = str(self.image), str(self.mask)
        d["window"] = None if self.window is None else list(self.window)
        return d

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWx3 uint8 RGB, ground truth HxW bool), both in the frame of the displayed image (row = y)."""
        if self.source in ("biomedparse", "json"):
            image = read_image(self.image)
            gt = read_mask(self.mask, image.shape[:2])
        elif self.source == "npz":
            with np.load(self.image) as data:
                raw, labels = data["imgs"][self.slice_index], data["gts"][self.slice_index]
            image = as_rgb_uint8(raw if raw.dtype == np.uint8 else _window(raw, self.window))
            gt = labels > 0 if self.label_value is None else labels == self.label_value
        elif self.source == "nifti":
            image = as_rgb_uint8(_window(read_volume_slice(self.image, self.slice_index, 2), self.window))
            labels = np.rint(read_volume_slice(self.mask, self.slice_index, 2))
            gt = labels > 0 if self.label_value is None else labels == self.label_value
            if gt.shape != image.shape[:2]:
                raise ImageReadError(
                    f"{self.mask}: label slice is {gt.shape[1]}x{gt.shape[0]} but the image slice is "
                    f"{image.shape[1]}x{image.shape[0]}; give a label volume of the image volume's grid"
                )
        else:
            raise BenchmarkError(f"case {self.case_id}: unknown source {self.source!r}")
        return _downscale(image, np.asarray(gt, bool), self.max_side)


def _window(array: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    return window(array) if bounds is None else window(array, bounds[0], bounds[1])


def _downscale(image: np.ndarray, mask: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale so that the longer side is at most max_side (image bilinear, mask nearest); smaller images stay."""
    h, w = mask.shape
    if max_side is None or max(h, w) <= max_side:
        return image, mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    return image, mask


def parse_window(spec: str) -> tuple[float, float] | None:
    """A window name (soft-tissue, lung, bone, brain, liver), "percentile" (-> None) or "LO,HI" in the volume's units."""
    name = spec.strip().lower()
    if name in CT_WINDOWS:
        return CT_WINDOWS[name]
    if name == "percentile":
        return None
    parts = name.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise BenchmarkError(
            f"window {spec!r} is not understood; use one of {', '.join(CT_WINDOWS)}, percentile, or LO,HI (e.g. -160,240)"
        ) from None
    if hi <= lo:
        raise BenchmarkError(f"window {spec!r}: the upper bound must exceed the lower bound")
    return lo, hi


def _safe_id(text: str) -> str:
    """Case ids become file names and HTML ids: keep letters, digits, '.', '_', '+', '-'."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "case"


def _unique(cases: list[Case]) -> list[Case]:
    seen: dict[str, int] = {}
    out = []
    for c in cases:
        n = seen.get(c.case_id, 0)
        seen[c.case_id] = n + 1
        out.append(c if n == 0 else replace(c, case_id=f"{c.case_id}-{n + 1}"))
    return out


# -- BiomedParse -----------------------------------------------------------------------------------------------------
def read_biomedparse(root: str | Path, max_side: int | None = None) -> list[Case]:
    """All (image, mask) pairs of a BiomedParse split (`ibisagent.datasets.list_biomedparse`), sorted by mask name."""
    try:
        samples = list_biomedparse(root)
    except FileNotFoundError as exc:
        raise BenchmarkError(str(exc)) from None
    if not samples:
        raise BenchmarkError(f"{root}: the BiomedParse split holds no image/mask pairs (<image>_<target>.png masks)")
    return [
        Case(
            case_id=_safe_id(s.name),
            question=f"Segment the {s.target}.",
            target=s.target,
            modality=s.modality,
            image=s.image,
            mask=s.mask,
            source="biomedparse",
            max_side=max_side,
        )
        for s in samples
    ]


# -- MeCOVQA-G+-style JSON -------------------------------------------------------------------------------------------
def _first(entry: dict, keys: Sequence[str]):
    return next((entry[k] for k in keys if entry.get(k) not in (None, "")), None)


def _from_conversation(entry: dict) -> tuple[str | None, str | None]:
    """(question, mask path) of MeCOVQA's conversation form, or Nones."""
    turns = entry.get("conversations") or entry.get("messages")
    if not isinstance(turns, list):
        return None, None
    question = mask = None
    for t in turns:
        if not isinstance(t, dict):
            continue
        who = str(t.get("from", t.get("role", ""))).lower()
        text = t.get("value", t.get("content"))
        if not isinstance(text, str):
            continue
        if who in ("human", "user") and question is None:
            question = text.replace("<image>", "").strip()
        elif who in ("gpt", "assistant") and mask is None:
            m = re.search(r"<mask>(.*?)</mask>", text, re.DOTALL)
            mask = m.group(1).strip() if m else None
    return question, mask


def _load_entries(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); see the schema in --help"
        ) from None
    if isinstance(data, dict):
        key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise BenchmarkError(
                f"{path}: expected a list of entries, or an object with the list under one of {', '.join(_LIST_KEYS)}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a list of entries, got {type(data).__name__}")
    return data


def read_json_benchmark(
    path: str | Path, image_root: str | Path | None = None, modality: str = "unknown", max_side: int | None = None
) -> list[Case]:
    """Cases of a MeCOVQA-G+-style JSON/JSONL benchmark; the schema and accepted key variants are in `JSON_SCHEMA`.

    image_root: the folder relative paths are resolved against (default: the JSON file's folder).
    modality:   the modality of entries that do not name one.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such JSON file")
    base = Path(image_root) if image_root is not None else path.parent
    if not base.is_dir():
        raise BenchmarkError(f"--image-root {base}: no such folder")
    cases, missing = [], []
    for i, entry in enumerate(_load_entries(path)):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{where} is a {type(entry).__name__}, expected an object with image, question, mask")
        conv_question, conv_mask = _from_conversation(entry)
        image = _first(entry, _IMAGE_KEYS)
        question = _first(entry, _QUESTION_KEYS) or conv_question
        mask = _first(entry, _MASK_KEYS) or conv_mask
        for name, value, keys in (("image", image, _IMAGE_KEYS), ("question", question, _QUESTION_KEYS)):
            if value is None:
                raise BenchmarkError(
                    f"{where} has no {name} (keys found: {', '.join(map(str, entry)) or 'none'}); "
                    f"name it with one of {', '.join(keys)}"
                )
        if mask is None:
            raise BenchmarkError(
                f"{where} has no mask (keys found: {', '.join(map(str, entry))}); name it with one of "
                f"{', '.join(_MASK_KEYS)}, or give MeCOVQA conversations with <mask>path</mask>"
            )
        for name, value in (("image", image), ("question", question), ("mask", mask)):
            if not isinstance(value, str):
                hint = "; split multi-mask entries into one entry per mask" if isinstance(value, list) else ""
                raise BenchmarkError(f"{where}: {name} must be a string, got {type(value).__name__}{hint}")
        image_path, mask_path = base / image, base / mask
        for p in (image_path, mask_path):
            if not p.is_file():
                missing.append(f"entry {i}: {p}")
        target = _first(entry, _TARGET_KEYS)
        target = str(target) if target is not None else target_from_instruction(question)
        entry_id = _first(entry, _ID_KEYS)
        cases.append(
            Case(
                case_id=_safe_id(entry_id) if entry_id is not None else f"{i:05d}_{_safe_id(Path(mask).stem)}",
                question=question.strip(),
                target=target,
                modality=str(_first(entry, _MODALITY_KEYS) or modality),
                image=image_path,
                mask=mask_path,
                source="json",
                max_side=max_side,
            )
        )
    if missing:
        raise BenchmarkError(
            f"{path}: {len(missing)} file(s) not found, first {missing[0]}; relative paths are resolved against "
            f"{base} (the JSON file's folder unless --image-root is given)"
        )
    if not cases:
        raise BenchmarkError(f"{path}: the benchmark holds no entries")
    return _unique(cases)


# -- slices of 3D volumes --------------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_pairs(source: Path, labels: Path | None) -> list[tuple[Path, Path]]:
    """(image volume, label volume) pairs: an explicit label file or folder, an nnU-Net/MSD layout
    (imagesTr/ + labelsTr/, image names may end in _0000), or label files beside the images (<name>_seg.nii.gz ...)."""
    if source.is_file():
        if labels is None or not labels.is_file():
            raise BenchmarkError(f"{source}: a NIfTI volume needs its label volume; pass --labels <label file>")
        return [(source, labels)]
    if labels is not None:
        if not labels.is_dir():
            raise BenchmarkError(f"--labels {labels}: no such folder (the images are a folder: give the label folder)")
        image_dir, label_dirs = source, [labels]
    else:
        layouts = [(source / f"images{s}", source / f"labels{s}") for s in ("Tr", "Ts", "Va", "")]
        if source.name.startswith("images"):
            layouts.insert(0, (source, source.with_name("labels" + source.name[len("images") :])))
        image_dir, label_dirs = next(((i, [lab]) for i, lab in layouts if i.is_dir() and lab.is_dir()), (source, []))
    pairs = []
    for image in sorted(p for p in image_dir.iterdir() if _is_nifti(p)):
        stem = _stem(image)
        if not label_dirs and stem.lower().endswith(_LABEL_SUFFIXES):
            continue
        plain = re.sub(r"_\d{4}$", "", stem)
        candidates = [d / (s + sfx) for d in label_dirs for s in (stem, plain) for sfx in NIFTI_SUFFIXES]
        candidates += [
            image_dir / (s + lab + sfx) for s in (stem, plain) for lab in _LABEL_SUFFIXES for sfx in NIFTI_SUFFIXES
        ]
        label = next((c for c in candidates if c.is_file()), None)
        if label is not None:
            pairs.append((image, label))
    return pairs


def _pick_slices(areas: np.ndarray, spec: str) -> list[int]:
    """Slice indices by label area: "largest" (1), "largest:N", "every:K" (every k-th labelled slice) or "all"."""
    labelled = np.flatnonzero(areas > 0)
    if labelled.size == 0:
        return []
    kind, _, arg = spec.strip().lower().partition(":")
    try:
        n = int(arg) if arg else 1
    except ValueError:
        n = 0
    if kind not in ("largest", "every", "all") or n < 1 or (kind == "all" and arg):
        raise BenchmarkError(f"--slices {spec!r} is not understood; use largest, largest:N, every:K or all (N, K >= 1)")
    if kind == "largest":
        order = sorted(labelled, key=lambda i: (-areas[i], i))
        return sorted(int(i) for i in order[:n])
    return [int(i) for i in labelled[:: 1 if kind == "all" else n]]


def read_volume_slices(
    source: str | Path,
    labels: str | Path | None = None,
    slices: str = "largest",
    window: str | tuple[float, float] | None = "soft-tissue",
    modality: str = "CT",
    target: str = "lesion",
    label_value: int | None = None,
    max_side: int | None = None,
) -> list[Case]:
    """2D cases cut from 3D volumes along the axial axis.

    source:  an .npz file or a folder of them (MedSAM2 layout: `imgs` D×H×W, `gts` D×H×W; axial = axis 0, rows = y),
             or NIfTI: a volume file with `labels` a label file, or a folder (see `_nifti_pairs`); axial = voxel
             axis 2, displayed as in `ibisagent.io.read_volume_slice`.
    slices:  "largest" (the slice with the largest label area), "largest:N", "every:K" (every k-th labelled slice,
             from the first) or "all".
    window:  for NIfTI and non-uint8 npz images: a `CT_WINDOWS` name, "percentile", "LO,HI" or a (lo, hi) tuple.
             uint8 npz images are used as stored (MedSAM2's files are windowed already).
    label_value: the foreground label (None: every label > 0).
    """
    bounds = parse_window(window) if isinstance(window, str) else window
    cases = []
    for image, label, kind, fg in _labelled_volumes(source, labels, label_value):
        areas = fg.reshape(len(fg), -1).sum(1) if kind == "npz" else fg.sum((0, 1))
        for index in _pick_slices(areas, slices):
            cases.append(
                Case(
                    case_id=_safe_id(f"{_stem(image)}_z{index:03d}"),
                    question=f"Segment the {target}.",
                    target=target,
                    modality=modality,
                    image=image,
                    mask=label,
                    source=kind,
                    slice_index=index,
                    label_value=label_value,
                    window=bounds,
                    max_side=max_side,
                )
            )
    if not cases:
        raise BenchmarkError(f"{source}: no slice of any volume holds {_which(label_value)}; check --label-value")
    return _unique(cases)


def _which(label_value: int | None) -> str:
    return "any label > 0" if label_value is None else f"label {label_value}"


def _volume_files(source: Path, labels: Path | None) -> list[tuple[Path, Path, str]]:
    """(image, label, "npz" | "nifti") of every volume at `source` (see `read_volume_slices`)."""
    if not source.exists():
        raise BenchmarkError(f"{source}: no such file or folder")
    if source.is_file() and source.suffix.lower() == ".npz" or source.is_dir() and any(source.glob("*.npz")):
        files = [source] if source.is_file() else sorted(source.glob("*.npz"))
        volumes = [(f, f, "npz") for f in files]
    else:
        volumes = [(i, lab, "nifti") for i, lab in _nifti_pairs(source, labels)]
    if not volumes:
        raise BenchmarkError(
            f"{source}: no volumes found; give .npz files (imgs, gts) or NIfTI volumes with labels "
            "(--labels, imagesTr/ + labelsTr/, or <name>_seg.nii.gz beside <name>.nii.gz)"
        )
    return volumes


def _labelled_volumes(source, labels, label_value: int | None):
    """(image, label, kind, foreground) per volume at `source`, checked: npz foreground is D×H×W (as stored), NIfTI
    foreground is (I, J, K)."""
    source = Path(source)
    labels = Path(labels) if labels is not None else None
    for image, label, kind in _volume_files(source, labels):
        if kind == "npz":
            try:
                with np.load(image) as data:
                    missing = [k for k in ("imgs", "gts") if k not in data.files]
                    if missing:
                        raise BenchmarkError(f"{image}: no {' or '.join(missing)} array; expected imgs and gts (D×H×W)")
                    gts = data["gts"]
                    if gts.ndim != 3 or data["imgs"].shape[:3] != gts.shape:
                        raise BenchmarkError(
                            f"{image}: imgs {data['imgs'].shape} and gts {gts.shape} must both be D×H×W of one size"
                        )
            except (OSError, ValueError) as exc:
                if isinstance(exc, BenchmarkError):
                    raise
                raise BenchmarkError(f"{image}: not a readable .npz file ({exc})") from None
            fg = gts > 0 if label_value is None else gts == label_value
        else:
            import nibabel as nib

            try:
                vol = np.asanyarray(nib.load(str(label)).dataobj)
                shape = nib.load(str(image)).shape
            except Exception as exc:  # nibabel raises many types for corrupt files
                raise BenchmarkError(f"{label}: not a readable NIfTI label volume ({exc})") from None
            if vol.ndim == 4 and vol.shape[3] == 1:
                vol = vol[..., 0]
            if vol.ndim != 3 or tuple(shape[:3]) != vol.shape:
                raise BenchmarkError(
                    f"{label}: label volume shape {vol.shape} does not match the image volume {image} ({shape})"
                )
            vol = np.rint(vol)
            fg = vol > 0 if label_value is None else vol == label_value
        yield image, label, kind, fg


@dataclass(frozen=True)
class VolumeCase:
    """One volume to segment in 3D: the image volume, its label volume and the target.

    source: "npz" (MedSAM2 layout, `imgs`/`gts` D×H×W: loaded as (I, J, K) = (W, H, D), so that axis-2 slices
            are the stored D slices, rows = y) or "nifti" (voxel order as stored; axial = axis 2).
    window: as `Case.window`; None: percentiles of the whole volume (uint8 npz images are used as stored).
    """

    case_id: str
    question: str
    target: str
    modality: str
    image: Path
    mask: Path
    source: str
    label_value: int | None = None
    window: tuple[float, float] | None = None
    axis: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"], d["mask"] = str(self.image), str(self.mask)
        d["window"] = None if self.window is None else list(self.window)
        return d

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image volume (I, J, K), ground truth (I, J, K) bool)."""
        if self.source == "npz":
            with np.load(self.image) as data:
                image, labels = data["imgs"].transpose(2, 1, 0), data["gts"].transpose(2, 1, 0)
            if image.dtype != np.uint8:
                image = _window(image, self.window)
        elif self.source == "nifti":
            import nibabel as nib

            image = np.asarray(nib.load(str(self.image)).dataobj, np.float32)  # scl_slope/scl_inter applied
            labels = np.rint(np.asanyarray(nib.load(str(self.mask)).dataobj))
            image, labels = (a[..., 0] if a.ndim == 4 and a.shape[3] == 1 else a for a in (image, labels))
            image = _window(image, self.window)
        else:
            raise BenchmarkError(f"case {self.case_id}: unknown source {self.source!r}")
        gt = labels > 0 if self.label_value is None else labels == self.label_value
        return np.ascontiguousarray(image), np.ascontiguousarray(gt)


def read_volumes(
    source: str | Path,
    labels: str | Path | None = None,
    window: str | tuple[float, float] | None = "soft-tissue",
    modality: str = "CT",
    target: str = "lesion",
    label_value: int | None = None,
) -> list[VolumeCase]:
    """3D cases: every volume at `source` (as `read_volume_slices` finds them) whose label holds the target."""
    bounds = parse_window(window) if isinstance(window, str) else window
    cases = [
        VolumeCase(
            case_id=_safe_id(_stem(image)),
            question=f"Segment the {target}.",
            target=target,
            modality=modality,
            image=image,
            mask=label,
            source=kind,
            label_value=label_value,
            window=bounds,
        )
        for image, label, kind, fg in _labelled_volumes(source, labels, label_value)
        if fg.any()
    ]
    if not cases:
        raise BenchmarkError(f"{source}: no volume holds {_which(label_value)}; check --label-value")
    return _unique(cases)


# -- dispatch --------------------------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """ "json" for .json/.jsonl files, "volumes" for .npz/NIfTI files or folders holding them (or imagesTr/), else
    "biomedparse"."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file or folder")
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".json", ".jsonl")):
            return "json"
        if name.endswith((".npz", *NIFTI_SUFFIXES)):
            return "volumes"
        raise BenchmarkError(
            f"{path}: cannot tell the benchmark format from this file; give a JSON/JSONL list, an .npz or NIfTI volume, "
            "or a BiomedParse folder"
        )
    if any(path.glob("*.npz")) or any(_is_nifti(p) for p in path.iterdir()):
        return "volumes"
    if any((path / f"images{s}").is_dir() for s in ("Tr", "Ts", "Va")):
        return "volumes"
    return "biomedparse"


def load_benchmark(
    path: str | Path,
    fmt: str = "auto",
    *,
    limit: int | None = None,
    max_side: int | None = None,
    image_root: str | Path | None = None,
    modality: str | None = None,
    labels: str | Path | None = None,
    slices: str = "largest",
    window: str = "soft-tissue",
    target: str = "lesion",
    label_value: int | None = None,
) -> tuple[str, list[Case]]:
    """(format, cases) of a benchmark; `fmt` "auto" detects it (`detect_format`). `limit` keeps the first N cases."""
    if fmt not in FORMATS:
        raise BenchmarkError(f"unknown benchmark format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise BenchmarkError(f"--limit must be at least 1, got {limit}")
    if max_side is not None and max_side < 16:
        raise BenchmarkError(f"--max-side must be at least 16 pixels, got {max_side}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "biomedparse":
        cases = read_biomedparse(path, max_side)
    elif fmt == "json":
        cases = read_json_benchmark(path, image_root, modality or "unknown", max_side)
    else:
        cases = read_volume_slices(path, labels, slices, window, modality or "CT", target, label_value, max_side)
    return fmt, cases[:limit]
