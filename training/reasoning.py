"""Step reasoning for the SFT data (paper Appendix B.3): the `<think>` text of one agent step, written from the
agent's view (the image and one green mask) while the facts come from the oracle (the target mask, the error
region the simulator's click lies in, whether to add or remove).

The default generator needs no model: it analyses the error region (size relative to the target, where it lies
relative to the current mask, e.g. beyond the lower-left edge, a gap inside, a stray patch) and picks one of
several phrasings per situation with the caller's `random.Random`. Every text passes the leak filter (`leaks.py`):
words such as "red", "FP" or "ground truth" name what only the oracle sees and must never appear in the agent's
reasoning.

Directions ("upper", "lower-left", "right") are in the image frame (rows down, columns right), as the agent sees it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ibisagent.types import Click

from .leaks import assert_no_leak
from .prompts import fill_fields, modality_words

# -- the step context ---------------------------------------------------------------------------------------------
KINDS = ("initial", "add", "remove", "terminate", "undo", "discard", "absent")
RELATIONS = ("nomask", "outside", "inside", "separate", "around", "wrong", "none")


@dataclass(eq=False)
class StepContext:
    """What one step's reasoning may draw on.

    image_size:    (H, W) of the image.
    mask:          HxW bool, the mask the agent sees before acting (the green overlay; empty at the first step).
    gt:            HxW bool, the target's true extent (oracle only; empty for an absent target).
    clicks:        the step's clicks, `Click` in (x, y) pixels (x = column, y = row); none for terminate/absent.
                   For "undo", optionally the click(s) being reverted.
    target, modality: the target name ("liver tumor") and the BiomedParse modality ("CT", "MRI-FLAIR", ...).
    step:          0-based step index.
    kind:          initial | add | remove | terminate | undo | discard (drop a given mask of the wrong
                   structure) | absent (the target is not in the image).
    previous_iou:  optional IoU before the previous action (kept for teacher prompts and logs).
    previous_mask: for "undo", HxW bool, the mask before the reverted step (what undo restores).
    """

    image_size: tuple[int, int]
    mask: np.ndarray
    gt: np.ndarray
    clicks: tuple[Click, ...] = ()
    target: str = "target"
    modality: str = ""
    step: int = 0
    kind: str = "add"
    previous_iou: float | None = None
    previous_mask: np.ndarray | None = None
    plural: bool | None = field(default=None)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.mask = np.asarray(self.mask, bool)
        self.gt = np.asarray(self.gt, bool)
        self.clicks = tuple(self.clicks)
        arrays = [("mask", self.mask), ("gt", self.gt)]
        if self.previous_mask is not None:
            self.previous_mask = np.asarray(self.previous_mask, bool)
            arrays.append(("previous_mask", self.previous_mask))
        for name, arr in arrays:
            if arr.shape != self.image_size:
                raise ValueError(f"{name} has shape {arr.shape}, expected image_size {self.image_size} (HxW)")
        if self.kind in ("initial", "add", "remove") and not self.clicks:
            raise ValueError(f"a {self.kind!r} step needs the click(s) it makes; clicks is empty")
        if self.kind == "initial" and not all(c.positive for c in self.clicks):
            raise ValueError("an 'initial' step places positive clicks only")
        if self.kind == "add" and not self.clicks[0].positive:
            raise ValueError("an 'add' step starts with a positive click; use kind 'remove' for a negative one")
        if self.kind == "remove" and self.clicks[0].positive:
            raise ValueError("a 'remove' step starts with a negative click; use kind 'add' for a positive one")
        if self.kind == "remove" and not self.mask.any():
            raise ValueError("a 'remove' step needs a non-empty mask to remove from; the mask is empty")


def step_context(
    mask: np.ndarray,
    gt: np.ndarray,
    clicks: Sequence[Click],
    target: str,
    modality: str = "",
    step: int = 0,
    previous_iou: float | None = None,
    plural: bool | None = None,
) -> StepContext:
    """The context of one oracle step from (mask before the step, gt, the simulator's next clicks), all HxW bool
    and (x, y) pixel clicks. The kind follows: no clicks -> terminate, empty mask -> initial, else add or remove
    by the sign of the first click."""
    mask = np.asarray(mask, bool)
    if not clicks:
        kind = "terminate"
    elif not mask.any() and all(c.positive for c in clicks):
        kind = "initial"
    else:
        kind = "add" if clicks[0].positive else "remove"
    return StepContext(mask.shape, mask, gt, tuple(clicks), target, modality, step, kind, previous_iou, None, plural)


def undo_context(
    mask: np.ndarray,
    previous_mask: np.ndarray,
    gt: np.ndarray,
    target: str,
    modality: str = "",
    step: int = 0,
    reverted_clicks: Sequence[Click] = (),
    plural: bool | None = None,
) -> StepContext:
    """The context of an undo step: `mask` is the worse mask the agent sees now, `previous_mask` the one before
    the reverted click(s) (both HxW bool)."""
    mask = np.asarray(mask, bool)
    return StepContext(
        mask.shape, mask, gt, tuple(reverted_clicks), target, modality, step, "undo", None, previous_mask, plural
    )


# -- error-region analysis ----------------------------------------------------------------------------------------
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ErrorRegion:
    """The connected error region a click lies in, as the oracle sees it.

    missing:       True: part of the target that the mask misses (a positive click adds it); False: mask outside
                   the target (a negative click removes it).
    area:          pixels of the region; relative_size: area / target area (area / mask area if the target is empty).
    relation:      nomask (nothing is masked yet) | outside (beyond the mask's / target's edge) | inside (a gap
                   in the mask, or masked area enclosed by the target) | separate (touches neither the mask
                   nor the target) | around (on several sides at once) | wrong (the mask misses the target
                   entirely) | none (no error at the click).
    direction:     side of the reference (the mask for missing parts, the target for excess) where the click
                   lies: "upper", "lower-left", ... or "" when it is not clearly on one side.
    where:         where the click lies in the image, e.g. "the upper-left part of the image".
    """

    missing: bool
    area: int
    relative_size: float
    relation: str
    direction: str
    where: str


def image_where(x: float, y: float, image_size: tuple[int, int]) -> str:
    """A phrase for where (x, y) pixels lie in an (H, W) image, by thirds: "the upper-left part of the image",
    "the centre of the image", "the right part of the image"."""
    h, w = image_size
    vert = "upper" if y < h / 3 else "lower" if y >= 2 * h / 3 else ""
    horiz = "left" if x < w / 3 else "right" if x >= 2 * w / 3 else ""
    if vert and horiz:
        return f"the {vert}-{horiz} part of the image"
    if vert:
        return f"the {vert} part of the image"
    if horiz:
        return f"the {horiz} part of the image"
    return "the centre of the image"


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _ring(m: np.ndarray) -> np.ndarray:
    """The 8-connected outer boundary of a non-empty mask (pixels next to it, outside it), clipped to the image."""
    h, w = m.shape
    r0, r1, c0, c1 = _bbox(m)
    r0, r1, c0, c1 = max(r0 - 1, 0), min(r1 + 1, h), max(c0 - 1, 0), min(c1 + 1, w)
    sub = m[r0:r1, c0:c1]
    out = np.zeros_like(m)
    out[r0:r1, c0:c1] = ndimage.binary_dilation(sub, _EIGHT) & ~sub
    return out


def _fraction(part: np.ndarray, whole: np.ndarray) -> float:
    n = int(np.count_nonzero(whole))
    return 0.0 if n == 0 else int(np.count_nonzero(part & whole)) / n


def _components(m: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of an HxW bool mask, computed on its bounding box (masks are often small in large
    images) and placed back into a full-size int32 array."""
    labels = np.zeros(m.shape, np.int32)
    if not m.any():
        return labels, 0
    r0, r1, c0, c1 = _bbox(m)
    sub, n = ndimage.label(m[r0:r1, c0:c1], structure=_EIGHT)
    labels[r0:r1, c0:c1] = sub
    return labels, int(n)


def _component_at(region: np.ndarray, row: int, col: int) -> np.ndarray | None:
    """The 8-connected component of `region` holding (row, col); the largest one if that pixel is not in it."""
    labels, n = _components(region)
    if n == 0:
        return None
    label = int(labels[row, col])
    if label == 0:
        label = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:]))
    return labels == label


def _largest(m: np.ndarray) -> np.ndarray:
    labels, n = _components(m)
    if n <= 1:
        return m
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:]))


def _direction(y: float, x: float, reference: np.ndarray, threshold: float = 0.3) -> str:
    """Side of `reference` (HxW bool, non-empty) where the pixel (y, x) lies, relative to its centroid and scaled
    by its half extents: "upper", "lower-right", ... or ""."""
    rows, cols = np.nonzero(reference)
    cy, cx = rows.mean(), cols.mean()
    r0, r1, c0, c1 = _bbox(reference)
    dy, dx = (y - cy) / max((r1 - r0) / 2, 1.0), (x - cx) / max((c1 - c0) / 2, 1.0)
    vert = "upper" if dy < -threshold else "lower" if dy > threshold else ""
    horiz = "left" if dx < -threshold else "right" if dx > threshold else ""
    return "-".join(p for p in (vert, horiz) if p)


def error_region(mask: np.ndarray, gt: np.ndarray, click: Click) -> ErrorRegion:
    """Analyse the error region that `click` ((x, y) pixels) corrects: the missed part of the target for a
    positive click, the excess of the mask for a negative one. mask, gt: HxW bool."""
    mask, gt = np.asarray(mask, bool), np.asarray(gt, bool)
    h, w = gt.shape
    row, col = click.pixel(h, w)
    where = image_where(col + 0.5, row + 0.5, (h, w))
    missing = click.positive
    region = gt & ~mask if missing else mask & ~gt
    comp = _component_at(region, row, col)
    target_area = int(np.count_nonzero(gt)) or int(np.count_nonzero(mask)) or 1
    if comp is None:
        return ErrorRegion(missing, 0, 0.0, "nomask" if missing and not mask.any() else "none", "", where)
    area = int(np.count_nonzero(comp))
    rel = area / target_area
    ring = _ring(comp)
    if missing:
        if not mask.any():
            relation, ref = "nomask", gt
        elif _fraction(mask, ring) >= 0.85:
            relation, ref = "inside", mask
        elif not (ring & mask).any():
            relation, ref = "separate", mask
        elif _fraction(comp, _ring(mask)) >= 0.6:
            relation, ref = "around", mask
        else:
            relation, ref = "outside", mask
    else:
        tp = mask & gt
        if not tp.any():
            relation, ref = "wrong", mask
        elif _fraction(tp, ring) >= 0.85:
            relation, ref = "inside", gt
        elif not (ring & gt).any():
            relation, ref = "separate", gt
        elif _fraction(comp, _ring(gt)) >= 0.6:
            relation, ref = "around", gt
        else:
            relation, ref = "outside", gt
    direction = _direction(row, col, ref) if relation in ("outside", "around") else ""
    return ErrorRegion(missing, area, rel, relation, direction, where)


def size_word(relative_size: float) -> str:
    """A size word for a region's area relative to the target's: tiny < 3% <= small < 10% <= moderate < 30% <=
    sizeable < 60% <= large."""
    for limit, word in ((0.03, "tiny"), (0.10, "small"), (0.30, "moderate"), (0.60, "sizeable")):
        if relative_size < limit:
            return word
    return "large"


def _extent_word(fraction_of_image: float) -> str:
    return "small" if fraction_of_image < 0.01 else "medium-sized" if fraction_of_image < 0.1 else "large"


_NUMBERS = {2: "two", 3: "three", 4: "four"}

# -- phrasings ----------------------------------------------------------------------------------------------------
# Each entry is a str.format template over the fields built in `_fields`; one is drawn per step. Templates whose
# fields are None for a step (e.g. {dir} when the side is unclear) are skipped, so every bank keeps at least one
# template without {dir}.
OPENERS_FIRST = (
    "No mask is shown yet, so this is the first step.",
    "Nothing has been segmented so far.",
    "There is no overlay on the image yet.",
    "No green mask is present, so this is an initialisation step.",
)
OPENERS_LATER = ("The image shows no mask at the moment.", "No mask remains on the image now.")
INITIAL = (
    "{The_target} {appears} as a {extent} region in {where} whose {texture} sets {it} apart from the {neighbour}; "
    "I will place a positive point on {its} centre.",
    "In this {image}, {the_target} {is} visible in {where} as a {extent} structure, so I start with a positive "
    "point in the middle of {it}.",
    "Looking at {where}, I can make out {the_target} by {its} {texture} against the {neighbour}; a positive point "
    "at {its} most central part should start the mask well.",
    "{The_target} {lies} in {where}; I place a positive point well inside {it}, away from {its} edges.",
)
INITIAL_MULTI = (
    "{The_target} {seems} to occupy {n} separate areas of this {image}; I begin with the one in {where} and "
    "place a positive point at its centre.",
    "I can see {the_target} in {n} separate parts, and my first positive point goes in the middle of the broadest "
    "one, in {where}.",
)
ADD = {
    "outside": (
        "The green mask stops short of {the_target_s} {dir} edge; a {size} part beyond it still has the {texture} "
        "of {the_target}, so I add a positive point there.",
        "The {dir} part of {the_target} is not covered yet: the mask ends before {the_target_s} boundary on that "
        "side. I place a positive point in the uncovered area.",
        "Compared with the visible extent of {the_target}, the mask falls short on the {dir} side, leaving a {size} "
        "uncovered portion; a positive point there should extend it.",
        "The mask does not yet reach {the_target_s} edge everywhere: a {size} stretch of {the_target} next to it "
        "is still uncovered, so I add a positive point there.",
    ),
    "inside": (
        "There is a {size} gap inside the mask where {the_target} clearly continues; a positive point there should "
        "fill it.",
        "The mask has a hole: a {size} area enclosed by it shares the {texture} of the surrounding {target} but is "
        "not covered. I add a positive point in that gap.",
    ),
    "separate": (
        "The mask covers only part of {the_target}: a {size} separate portion in {where} is not covered yet, so I "
        "add a positive point on it.",
        "Apart from the masked area, I can see more of {the_target} in {where} that the mask does not reach; I place "
        "a positive point on that part.",
    ),
    "around": (
        "The mask is clearly smaller than {the_target}, which {extends} past it on several sides; I add a positive "
        "point where the uncovered band is widest{dir_side}.",
        "{The_target} {is} larger than the current mask on almost every side, so the mask needs to grow; a positive "
        "point in the uncovered {dir} part should help.",
        "Much of {the_target_s} rim is still outside the mask, so I add a positive point where the uncovered margin "
        "is widest.",
    ),
}
REMOVE = {
    "outside": (
        "The mask spreads past {the_target_s} {dir} boundary into the {neighbour}; a negative point there should "
        "trim it.",
        "On the {dir} side, the green area runs beyond {the_target} into the {neighbour}, whose {texture} differs; "
        "I place a negative point on that excess.",
        "A {size} part of the mask along the {dir} edge does not belong to {the_target}; a negative point there "
        "should pull the boundary back.",
        "The mask reaches beyond {the_target_s} boundary into the {neighbour}; a negative point on that excess "
        "should trim it.",
    ),
    "inside": (
        "The mask also fills a {size} area inside {the_target} that does not share {its} {texture}; a negative "
        "point there should clear it.",
        "Within the masked region there is a {size} area that is not part of {the_target}; I put a negative point in "
        "it to open it up.",
    ),
    "separate": (
        "A {size} stray patch of the mask in {where} lies away from {the_target}; I place a negative point on it to "
        "remove it.",
        "The mask includes an isolated area in {where} that does not look like {the_target}; a negative point there "
        "should remove it.",
    ),
    "around": (
        "The mask is larger than {the_target} and spills over {its} boundary on several sides; a negative point "
        "where the excess is widest{dir_side} should pull it back.",
        "The green area overshoots {the_target} all around, taking in the {neighbour}; I place a negative point on "
        "the widest part of the overshoot.",
    ),
    "wrong": (
        "The green mask does not sit on {the_target} at all; the area it covers in {where} looks like a different "
        "structure, so I place a negative point on it.",
        "The masked area in {where} does not match the appearance of {the_target}; a negative point there should "
        "remove this wrong region.",
    ),
}
# short phrases for further clicks of the same step: "I also place a <sign> point on <phrase>."
EXTRA = {
    (True, "outside"): "the uncovered {dir} part",
    (True, "inside"): "the gap inside the mask",
    (True, "separate"): "the uncovered part in {where}",
    (True, "around"): "another uncovered stretch of the rim",
    (True, "nomask"): "another part of {the_target} in {where}",
    (True, "none"): "another part of {the_target}",
    (False, "outside"): "the excess on the {dir} side",
    (False, "inside"): "the enclosed area that does not belong",
    (False, "separate"): "the stray patch in {where}",
    (False, "around"): "another stretch of the overshoot",
    (False, "wrong"): "another part of the wrong region",
    (False, "none"): "another part of the excess",
}
TERMINATE_CLOSE = (
    "The mask follows {the_target_s} boundary closely now; no further clicks are needed.",
    "The green mask now covers {the_target} without spilling into the {neighbour}, and I see no uncovered part of "
    "{it}; the segmentation is complete.",
    "The mask matches the visible extent of {the_target} well on every side, so I stop here.",
)
TERMINATE_LOOSE = (
    "The mask covers most of {the_target}; the remaining differences along {its} edge are small and further points "
    "are unlikely to improve it, so I stop here.",
    "Only minor boundary discrepancies remain between the mask and {the_target}; another point would not help much, "
    "so I finish.",
)
UNDO_LEAK = (
    "My last point made the mask worse: it now leaks{dir_side} into the {neighbour}. I revert it.",
    "After my last point the mask grew beyond {the_target}{dir_side} and took in the {neighbour}; that step was a "
    "mistake, so I undo it.",
    "The previous point did not help: the mask now spills over {the_target_s} boundary{dir_side}. I will revert to "
    "the earlier mask.",
)
UNDO_LOST = (
    "My last point made the mask worse: it cut away a {size} part of {the_target} that was covered before. I revert "
    "it.",
    "After the previous point, part of {the_target}{dir_side} dropped out of the mask; that step was wrong, so I "
    "undo it.",
)
UNDO_GENERIC = (
    "My last point did not improve the mask; it fits {the_target} less well than before, so I revert it.",
    "The mask looks worse after my previous point, so I undo that step and reconsider.",
)
DISCARD = (
    "The green mask that came with the request lies in {mask_where} and outlines a structure that does not look "
    "like {the_target}, which I see in {where}. I discard it and segment {the_target} instead.",
    "The existing mask does not match {the_target}: it covers a region in {mask_where} with a different "
    "{texture}. I will discard it and start over on {the_target}.",
    "This mask does not follow {the_target}; the region it covers has a different {texture}. I discard it before "
    "segmenting {the_target} as requested.",
)
ABSENT = (
    "I look through this {image} for {the_target} but find no structure with {its} appearance; there is nothing to "
    "segment.",
    "Nothing in this {image} looks like {the_target}, so I cannot place a meaningful point; I end here without a mask.",
    "I checked the {image} carefully and cannot find {the_target} anywhere in it, so no point is placed.",
)


def _fields(ctx: StepContext) -> dict[str, str]:
    fields = fill_fields(ctx.target, ctx.modality, ctx.plural)
    plural = fields["is"] == "are"
    words = modality_words(ctx.modality)
    verb = {
        "appears": "appear",
        "lies": "lie",
        "seems": "seem",
        "extends": "extend",
        "looks": "look",
    }
    for singular, plural_form in verb.items():
        fields[singular] = plural_form if plural else singular
        fields[_cap(singular)] = _cap(fields[singular])
    fields["the_target_s"] = f"the {fields['target']}'" if plural else f"the {fields['target']}'s"
    fields["The_target_s"] = _cap(fields["the_target_s"])
    fields.update(texture=words.texture, neighbour=words.neighbour, image=words.image)
    return fields


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _choose(bank: Sequence[str], fields: dict[str, str], rng: random.Random) -> str:
    usable = [t for t in bank if all(fields.get(f) is not None for _, f, _, _ in string.Formatter().parse(t) if f)]
    if not usable:
        raise ValueError(
            f"no phrasing fits the available facts {sorted(k for k, v in fields.items() if v is not None)}"
        )
    return _cap(rng.choice(usable).format(**fields))


def _region_fields(fields: dict[str, str], region: ErrorRegion) -> dict[str, str]:
    return {
        **fields,
        "size": size_word(region.relative_size),
        "dir": region.direction or None,
        "dir_side": f" on the {region.direction} side" if region.direction else "",
        "where": region.where,
    }


def _describe_initial(ctx: StepContext, fields: dict[str, str], rng: random.Random) -> str:
    opener = rng.choice(OPENERS_FIRST if ctx.step == 0 else OPENERS_LATER)
    click = ctx.clicks[0]
    h, w = ctx.image_size
    row, col = click.pixel(h, w)
    gt = ctx.gt
    labels, n = _components(gt)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    n_parts = int(np.count_nonzero(sizes >= max(20, 0.05 * sizes.max()))) if n else 0
    label = int(labels[row, col]) or (1 + int(np.argmax(sizes)) if n else 0)
    extent = (int(sizes[label - 1]) if label else 0) / (h * w)  # the clicked part's share of the image
    f = {**fields, "where": image_where(click.x, click.y, ctx.image_size), "extent": _extent_word(extent)}
    f["n"] = _NUMBERS.get(n_parts, "several")
    body = _choose(INITIAL_MULTI if n_parts > 1 else INITIAL, f, rng)
    return f"{opener} {body}"


def _describe_clicks(ctx: StepContext, fields: dict[str, str], rng: random.Random) -> str:
    first = error_region(ctx.mask, ctx.gt, ctx.clicks[0])
    bank = ADD if ctx.clicks[0].positive else REMOVE
    relation = first.relation if first.relation in bank else "outside"  # "none": the click is off any error
    text = _choose(bank[relation], _region_fields(fields, first), rng)
    extras = []
    for click in ctx.clicks[1:]:
        region = error_region(ctx.mask, ctx.gt, click)
        phrase = EXTRA.get((click.positive, region.relation), EXTRA[(click.positive, "none")])
        f = _region_fields(fields, region)
        if "{dir}" in phrase and not region.direction:
            phrase = EXTRA[(click.positive, "none")]
        extras.append(f"a {'positive' if click.positive else 'negative'} point on {phrase.format(**f)}")
    if extras:
        joined = extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
        text += f" I also place {joined}."
    return text


def _describe_terminate(ctx: StepContext, fields: dict[str, str], rng: random.Random) -> str:
    target_area = max(int(np.count_nonzero(ctx.gt)), 1)
    residual = int(np.count_nonzero(ctx.mask ^ ctx.gt)) / target_area
    return _choose(TERMINATE_CLOSE if residual < 0.15 else TERMINATE_LOOSE, fields, rng)


def _describe_undo(ctx: StepContext, fields: dict[str, str], rng: random.Random) -> str:
    prev, now, gt = ctx.previous_mask, ctx.mask, ctx.gt
    if prev is None:
        return _choose(UNDO_GENERIC, fields, rng)
    leak, lost = now & ~prev & ~gt, prev & ~now & gt
    n_leak, n_lost = int(np.count_nonzero(leak)), int(np.count_nonzero(lost))
    target_area = max(int(np.count_nonzero(gt)), 1)
    if n_leak and n_leak >= n_lost:
        comp = _largest(leak)
        ref = gt if gt.any() else prev
        bank, rel = UNDO_LEAK, n_leak / target_area
    elif n_lost:
        comp = _largest(lost)
        ref = prev
        bank, rel = UNDO_LOST, n_lost / target_area
    else:
        return _choose(UNDO_GENERIC, fields, rng)
    rows, cols = np.nonzero(comp)
    direction = _direction(rows.mean(), cols.mean(), ref) if ref.any() else ""
    f = {
        **fields,
        "size": size_word(rel),
        "dir_side": f" on the {direction} side" if direction else "",
    }
    return _choose(bank, f, rng)


def _describe_discard(ctx: StepContext, fields: dict[str, str], rng: random.Random) -> str:
    f = dict(fields)
    if ctx.mask.any():
        rows, cols = np.nonzero(ctx.mask)
        f["mask_where"] = image_where(cols.mean(), rows.mean(), ctx.image_size)
    if ctx.gt.any():
        rows, cols = np.nonzero(ctx.gt)
        f["where"] = image_where(cols.mean(), rows.mean(), ctx.image_size)
    return _choose(DISCARD, f, rng)


def describe_step(ctx: StepContext, rng: random.Random) -> str:
    """1-3 sentences of reasoning for one step, from the agent's view; deterministic given `rng`.

    Raises LeakError if the text would name privileged information (it never should; the check is a guard).
    """
    fields = _fields(ctx)
    if ctx.kind == "initial" or (ctx.kind == "add" and not ctx.mask.any()):
        text = _describe_initial(ctx, fields, rng)
    elif ctx.kind in ("add", "remove"):
        text = _describe_clicks(ctx, fields, rng)
    elif ctx.kind == "terminate":
        text = _describe_terminate(ctx, fields, rng)
    elif ctx.kind == "undo":
        text = _describe_undo(ctx, fields, rng)
    elif ctx.kind == "discard":
        text = _describe_discard(ctx, fields, rng)
    else:
        text = _choose(ABSENT, fields, rng)
    assert_no_leak(text, allow=(ctx.target,))
    return text


def oracle_facts(ctx: StepContext) -> dict:
    """The privileged facts of a step as plain data (for a teacher prompt or a log): the kind, each click in
    normalised (x, y) in [0, 1] with its sign and error region, and how much of the target the mask covers."""
    h, w = ctx.image_size
    gt_area, mask_area = int(np.count_nonzero(ctx.gt)), int(np.count_nonzero(ctx.mask))
    tp = int(np.count_nonzero(ctx.mask & ctx.gt))
    facts: dict = {
        "target": ctx.target,
        "modality": modality_words(ctx.modality).display or ctx.modality,
        "step": ctx.step,
        "kind": ctx.kind,
        "mask_empty": mask_area == 0,
        "target_fraction_of_image": round(gt_area / (h * w), 4),
        "target_fraction_covered": round(tp / gt_area, 3) if gt_area else 0.0,
        "mask_fraction_outside_target": round((mask_area - tp) / mask_area, 3) if mask_area else 0.0,
        "clicks": [],
    }
    for click in ctx.clicks:
        region = error_region(ctx.mask, ctx.gt, click)
        facts["clicks"].append(
            {
                "sign": "positive" if click.positive else "negative",
                "x": round(click.x / w, 4),
                "y": round(click.y / h, 4),
                "where": image_where(click.x, click.y, ctx.image_size),
                "region": "part of the target the mask misses" if region.missing else "mask area outside the target",
                "region_size": size_word(region.relative_size),
                "region_fraction_of_target": round(region.relative_size, 3),
                "region_relation": region.relation,
                "region_side": region.direction,
            }
        )
    if ctx.previous_mask is not None:
        facts["previous_target_fraction_covered"] = (
            round(int(np.count_nonzero(ctx.previous_mask & ctx.gt)) / gt_area, 3) if gt_area else 0.0
        )
    if ctx.previous_iou is not None:
        facts["previous_iou"] = round(float(ctx.previous_iou), 4)
    return facts
