"""The weight-free classical click tool: the default tool where no checkpoint is configured.

Per image (`set_image`): colour features (CIELAB, or grey x 100 for grey images), a smoothed copy for colour
comparisons, a lightly smoothed copy for the random walker and gradient magnitudes, each on a 4-level pyramid
(full resolution and three halvings), plus the image's noise level. The full-resolution level and the gradients
of the coarser ones are computed in row strips on the available cores (threads; each strip with the rows of context
its filters need): the same numbers as one pass.

Per click (`predict`), the previous mask is kept except where the new click contradicts it: a click that agrees
with the mask at its pixel (a positive click inside it, a negative one outside) changes nothing, and stays a seed
of later solves. A contradicting click decides a region it may claim, and the labels nearby are then re-solved:

1. Reach. Every click has a seed colour (median of a 7x7 patch holding it: the centred one, or, where that one
   straddles an edge (`seed_edge`), the most uniform of the four with the click at a corner, so a click near an
   edge does not read the edge as spread) and a colour tolerance that adapts to the image (its noise level) and to
   the seed (its spread). The first positive click measures the object's radius by casting rays until the colour
   leaves that tolerance; rays that mostly escape far across the image mean the tolerance was too loose, and they
   are cast again with half of it (the halved tolerance is then the click's: its claim uses it too). A later
   click's reach grows with its depth, the distance to the current mask's boundary (how deep the click lies in the
   error). The depth overestimates the error when a positive click lands on a separate part of the object, or a
   negative one on an inclusion deep inside the mask (a hole an initial mask covers): the reach and the depth are
   capped by the click's own ray radius (measured as for the first click), so a click never re-solves more than
   its colour region suggests.
2. Claim. Geodesic distances from the click on an edge-cost map (1 + (gradient / local scale)^2), computed on the
   pyramid level where the window fits in `window` pixels, give the pixels within reach. Clicks of the opposite
   label compete for pixels (each pixel goes to the geodesically nearer click), a claim keeps only pixels whose
   colour lies within a few seed tolerances of the click's, and a correction may not spread further than a slab
   around the label it corrects. A later positive click whose claim would be many times the object so far and a
   good part of the image (a flood through weak edges from a separate part) claims again with half its tolerance.
   The claimed pixels (the part connected to the click) take the click's label.
3. Re-solve. The first click refines its boundary in a thin band at full resolution with a random walker. A later
   click re-solves only a zone around itself (near the mask boundary and within a radius that grows with the
   depth) with a random walker seeded by all clicks and by the labels outside the zone, so a click corrects
   locally and leaves earlier corrections alone; a band at full resolution then refines the zone's boundary.

The logits returned are the mask at 256x256 (+-10); the tool remembers its recent masks by their logits and
restores the full-resolution mask when such logits come back as `prev_logits` (others are upsampled). An initial
mask given through `mask_to_logits` is remembered the same way, so refining it starts from the mask itself.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from PIL import Image
from scipy import ndimage
from scipy.linalg import cho_solve_banded, cholesky_banded
from scipy.sparse.csgraph import reverse_cuthill_mckee
from skimage.graph import MCP_Geometric
from threadpoolctl import threadpool_limits

from ibisagent.tools.base import SegmentationTool, ToolOutput
from ibisagent.types import Click

_LEVELS = 4  # pyramid levels: full resolution and three halvings
_MEMORY = 32  # how many recent masks are remembered by their logits
_RAYS = 64  # rays cast to measure the first click's object radius
_STRIP = 128  # at least this many rows per thread when the full-resolution level is computed in strips


@dataclass(frozen=True)
class ClassicalParams:
    """Tuned constants of the classical tool (measured with `benchmarks/bench_classical_tool.py`).

    Lengths are pixels of the full-resolution image; colour distances are in CIELAB units (grey: intensity x 100).
    """

    window: int = 128  # claim and zone solvers run on the pyramid level where their window is at most this wide
    seed_sigma: float = 1.5  # Gaussian sigma of the features compared with the click's seed colour
    seed_tol_noise: float = 8.0  # seed colour tolerance: this many times the image's noise level ...
    seed_tol_spread: float = 8.0  # ... plus this many times the colour spread around the click
    seed_edge: float = 2.0  # the centred seed patch straddles an edge (corner patch used) beyond this x corner spread
    ray_escape: float = 0.3  # rays whose median runs beyond this fraction of the image side: halve the tolerance
    first_scale: float = 1.5  # first click's reach = first_scale * ray radius + first_offset
    first_offset: float = 4.0
    reach_scale: float = 2.0  # later click's reach = reach_scale * depth in the error + reach_offset ...
    reach_offset: float = 6.0
    cap_scale: float = 4.0  # ... capped at cap_scale (positive click) or cap_negative (negative click)
    cap_negative: float = 1.5  # times the click's ray radius, + first_offset
    edge_scale: float = 1.5  # geodesic cost 1 + (gradient / (edge_scale * local median gradient))^2
    claim_tol: float = 1.5  # a claim keeps pixels within claim_tol * the seed tolerance of the click's colour
    flood_ratio: float = 4.0  # a later positive claim beyond flood_ratio x the mask's area and flood_share of the
    flood_share: float = 0.05  # image is made again with half the tolerance (at most twice)
    window_margin: float = 1.2  # claim window half-width = window_margin * reach + 4
    slab_scale: float = 2.5  # a correction claims only within slab_scale * depth + slab_offset of the label it fixes
    slab_offset: float = 2.0
    zone_scale: float = 6.0  # zone radius around a later click = zone_scale * depth + zone_offset
    zone_offset: float = 24.0
    zone_band_min: float = 4.0  # zone pixels lie within clip(depth, min, max) of the mask boundary
    zone_band_max: float = 400.0
    rw_beta: float = 4.0  # random-walker edge weight exp(-rw_beta * |df|^2 / mean |df|^2)
    rw_sigma: float = 1.0  # Gaussian sigma of the random walker's features
    band: int = 3  # full-resolution boundary band half-width (plus the coarse level's pixel size)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"ClassicalParams.{f.name} = {value!r}: expected a finite number >= 0")
        if self.window < 16:
            raise ValueError(f"ClassicalParams.window = {self.window}: expected at least 16 pixels")


DEFAULT_PARAMS = ClassicalParams()


class ClassicalTool(SegmentationTool):
    """Classical interactive segmentation without weights (geodesic claims + local random walker).

    params: the tuned constants; the defaults are the measured best. threads: threads of the per-image encoding
    (default: the cores this process may use, at most 4 and at most OMP_NUM_THREADS where set). Deterministic: the
    same image and clicks give the same mask, whatever the threads.
    """

    name = "classical"

    def __init__(self, params: ClassicalParams | None = None, threads: int | None = None) -> None:
        super().__init__()
        self.params = params or DEFAULT_PARAMS
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads = {threads!r}: expected a whole number >= 1 (or None for the cores available)")
        self.threads = threads or _available_cores()
        self._memory: OrderedDict[bytes, np.ndarray] = OrderedDict()

    # -- per image -------------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> None:
        p = self.params
        h, w = image.shape[:2]
        m = 2 ** (_LEVELS - 1)
        ph, pw = -(-h // m) * m, -(-w // m) * m  # padded so every level halves exactly
        grey = _is_grey(image)

        def colour(rows: np.ndarray) -> np.ndarray:
            return (rows.astype(np.float32) / 255).mean(2, keepdims=True) * 100 if grey else _lab(rows)

        # Gaussian blurs add up in variance: the seed copy is the light copy blurred further, with shorter kernels.
        extra = float(np.sqrt(max(p.seed_sigma**2 - p.rw_sigma**2, 0.0)))

        def level0(rows: np.ndarray) -> tuple[np.ndarray, ...]:
            light = _gauss(rows, p.rw_sigma)
            smooth = _gauss(light, extra)
            return light, smooth, _gradient(rows), np.sqrt(_channel_sum(np.square(rows - smooth)))

        f = np.pad(_by_rows(colour, image, 0, self.threads)[0], ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        gradient_context = _radius(_GRADIENT_SIGMA) + 1
        context = max(_radius(p.rw_sigma) + _radius(extra), gradient_context)
        light, smooth, grad, residual = _by_rows(level0, f, context, self.threads)
        self._noise = float(np.median(residual)) + 0.5
        self._feats, self._smooth, self._rwfeat = [f], [smooth], [light]
        for _ in range(1, _LEVELS):
            for pyramid in (self._feats, self._smooth, self._rwfeat):
                pyramid.append(_down2(pyramid[-1]))
        self._grads = [grad] + [
            _by_rows(_gradient, level, gradient_context, self.threads)[0] for level in self._feats[1:]
        ]
        self._memory.clear()

    # -- per click ---------------------------------------------------------------------------------------
    def _predict(self, clicks: list[Click], prev_logits: np.ndarray | None) -> ToolOutput:
        h, w = self._image.shape[:2]
        prev = self._recall(prev_logits)
        if prev is None:  # no history: replay every click in order
            mask, start = np.zeros((h, w), bool), 0
        else:
            mask, start = prev, len(clicks) - 1
        for i in range(start, len(clicks)):
            self._apply(mask, clicks[i], clicks[: i + 1])
            for ck in clicks[: i + 1]:  # every click keeps its label, whatever the solvers decided
                mask[ck.pixel(h, w)] = ck.positive
        return ToolOutput(mask, self._remember(mask), 1.0)

    def _apply(self, mask: np.ndarray, new: Click, clicks: list[Click]) -> None:
        """Update `mask` (HxW bool, in place) for the click `new`, the last of `clicks` (all clicks so far)."""
        p = self.params
        h, w = mask.shape
        r, c = new.pixel(h, w)
        first = new.positive and not mask.any()
        if mask[r, c] == new.positive and not first:
            return  # the click agrees with the mask: nothing to correct here (later solves keep it as a seed)
        if first:
            depth, tol = self._ray_radius(r, c)
            reach = p.first_scale * depth + p.first_offset
        else:
            depth = _distance_to(mask != mask[r, c], r, c)
            reach = p.reach_scale * depth + p.reach_offset
            # The depth overestimates the error when the click lies on a separate part of the object (positive) or
            # in a wide leak (negative): the reach is capped by the extent of the click's own colour region.
            radius, tol = self._ray_radius(r, c)
            cap = (p.cap_scale if new.positive else p.cap_negative) * radius + p.first_offset
            if cap < reach:
                reach, depth = cap, min(depth, cap)
        # A later positive click that would add many times the object so far and a good part of the image has a
        # colour tolerance that lets it flood (a textured or edge-straddling seed on a separate part).
        flood = max(p.flood_ratio * mask.sum(), p.flood_share * h * w) if new.positive and not first else None
        box, claim = self._claim(new, clicks, reach, tol, flood)
        sub = mask[box[0] : box[1], box[2] : box[3]]
        if not first:
            fixed = sub if new.positive else ~sub  # the label next to the error this click corrects
            if fixed.any():
                claim &= ndimage.distance_transform_edt(~fixed) <= p.slab_scale * depth + p.slab_offset
        sub[claim] = new.positive
        if first:
            level = self._level_for(box[1] - box[0])
            self._refine_band(mask, box, clicks, p.band + 2**level)
        else:
            self._resolve_zone(mask, new, clicks, depth)

    def _seed(self, r: int, c: int) -> tuple[np.ndarray, float]:
        """The seed colour at (r, c) (C values) and its colour tolerance.

        The seed is the median of a smoothed 7x7 patch holding the click: the centred one, unless it straddles an
        edge, i.e. its spread exceeds `seed_edge` times that of the most uniform of the four patches with the click
        at a corner (Kuwahara's quadrants) plus the image's noise level; that corner patch is then used. A click near
        an edge takes its colour and spread from its own side rather than from both, while in a textured region
        (all patches alike) the centred patch is kept.
        """
        p = self.params
        f = self._smooth[0]
        h, w = f.shape[:2]

        def patch(a: int, b: int) -> tuple[np.ndarray, float]:
            seed = f[max(0, a - 3) : a + 4, max(0, b - 3) : b + 4].reshape(-1, f.shape[2])
            mu = np.median(seed, 0)
            return mu, float(np.median(np.sqrt(((seed - mu) ** 2).sum(-1))))

        mu, spread = patch(r, c)
        if spread > self._noise:  # else no corner patch can be more uniform by the noise level: keep this one
            corners = [
                patch(min(max(r + dr, 0), h - 1), min(max(c + dc, 0), w - 1)) for dr in (-3, 3) for dc in (-3, 3)
            ]
            uniform = min(corners, key=lambda ms: ms[1])
            if spread - p.seed_edge * uniform[1] > self._noise:
                mu, spread = uniform
        return mu, p.seed_tol_noise * self._noise + p.seed_tol_spread * spread

    def _ray_radius(self, r: int, c: int) -> tuple[float, float]:
        """Median over `_RAYS` rays of the distance from (r, c) to where the colour leaves the seed's tolerance.

        A median beyond `ray_escape` of the image side means the tolerance let the rays escape the object
        (textured seeds, weak contrast): the rays are measured again with half the tolerance. Returns the radius and
        the tolerance that measured it, which is also the one the click's claim uses.
        """
        h, w = self._image.shape[:2]
        f = self._smooth[0]
        mu, tol = self._seed(r, c)
        theta = np.linspace(0, 2 * np.pi, _RAYS, endpoint=False)
        steps = np.arange(1, max(h, w))
        rr, cc = r + np.outer(np.sin(theta), steps), c + np.outer(np.cos(theta), steps)
        inside = (rr >= 0) & (rr <= h - 1) & (cc >= 0) & (cc <= w - 1)
        ri, ci = np.clip(np.round(rr).astype(int), 0, h - 1), np.clip(np.round(cc).astype(int), 0, w - 1)
        colour = np.sqrt(_channel_sum(np.square(f[ri, ci] - mu)))
        for attempt in range(2):
            if attempt:
                tol *= 0.5
            out = (colour > tol) | ~inside
            stop = out.copy()  # a ray stops at the first of three consecutive outside samples
            for j in (1, 2):
                stop[:, :-j] &= out[:, j:]
            stop[:, -1] = True
            radius = float(np.median(np.maximum(steps[np.argmax(stop, 1)] - 0.5, 1)))
            if radius < self.params.ray_escape * max(h, w):
                break
        return radius, tol

    def _level_for(self, side: int) -> int:
        """The coarsest-needed pyramid level: the first where a window of `side` full-res pixels fits `window`."""
        level = 0
        while level < _LEVELS - 1 and side / 2**level > self.params.window:
            level += 1
        return level

    def _window(self, r: int, c: int, half: int, pad: int = 0) -> tuple[int, int, int, int, int]:
        """A window of half-width `half` full-res pixels (+ `pad` level pixels) around (r, c), on the level where it
        fits `window`: (level, r0, r1, c0, c1), the bounds in that level's pixels."""
        level = self._level_for(2 * half + 1)
        s = 2**level
        hl, wl = self._feats[level].shape[:2]
        rl, cl, k = r // s, c // s, -(-half // s) + pad
        return level, max(0, rl - k), min(hl, rl + k + 1), max(0, cl - k), min(wl, cl + k + 1)

    def _claim(
        self, new: Click, clicks: list[Click], reach: float, tol: float, flood: float | None = None
    ) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """Pixels geodesically within `reach` of the new click, nearer to it than to any opposite click and
        within `claim_tol` x `tol` (the click's colour tolerance, as its rays settled it) of its colour (the
        connected part holding the click). A claim of more than `flood` pixels is made again with half the
        tolerance, as for escaping rays, at most twice (the geodesic distances are computed once).

        Returns (box, claim): box = (r0, r1, c0, c1) full-res pixels, claim a bool array of the box's shape.
        """
        p = self.params
        h, w = self._image.shape[:2]
        r, c = new.pixel(h, w)
        level, r0, r1, c0, c1 = self._window(r, c, int(reach * p.window_margin) + 4)
        s = 2**level
        g = self._grads[level][r0:r1, c0:c1]
        rl, cl = r // s - r0, c // s - c0
        near = g[max(0, rl - 3) : rl + 4, max(0, cl - 3) : cl + 4]
        scale = max(float(np.median(g)), float(np.median(near)), 1e-3) * p.edge_scale
        cost = 1.0 + (g / scale) ** 2
        dist, _ = MCP_Geometric(cost, fully_connected=True).find_costs([(rl, cl)])
        margin = reach / s - dist
        rivals = []
        for ck in clicks:
            if ck.positive != new.positive:
                a, b = ck.pixel(h, w)
                a, b = a // s - r0, b // s - c0
                if 0 <= a < r1 - r0 and 0 <= b < c1 - c0:
                    rivals.append((a, b))
        if rivals:
            other, _ = MCP_Geometric(cost, fully_connected=True).find_costs(rivals)
            margin = np.minimum(margin, other - dist)
        smooth = self._smooth[level]
        colour = np.sqrt(_channel_sum(np.square(smooth[r0:r1, c0:c1] - smooth[r // s, c // s])))
        box = (r0 * s, min(h, r1 * s), c0 * s, min(w, c1 * s))

        def within(tol: float) -> np.ndarray:
            m = np.minimum(margin, p.claim_tol * tol - colour)
            if s > 1:
                m = _resize(m, (c1 - c0) * s, (r1 - r0) * s)
            return _component_at(m[: box[1] - box[0], : box[3] - box[2]] > 0, r - box[0], c - box[2])

        claim = within(tol)
        for _ in range(2 if flood is not None else 0):
            if claim.sum() <= flood:
                break
            tol *= 0.5
            claim = within(tol)
        return box, claim

    def _resolve_zone(self, mask: np.ndarray, new: Click, clicks: list[Click], depth: float) -> None:
        """Re-solve `mask` (HxW bool, edited in place) near the new click with a random walker.

        The zone holds the pixels within clip(depth, zone_band_min, zone_band_max) of the mask boundary and within
        zone_scale * depth + zone_offset of the click; everything else and every click is a fixed seed.
        """
        p = self.params
        h, w = mask.shape
        r, c = new.pixel(h, w)
        radius = p.zone_scale * depth + p.zone_offset
        level, r0, r1, c0, c1 = self._window(r, c, int(radius) + 1, pad=1)
        s = 2**level
        hz, wz = r1 - r0, c1 - c0
        labels = _pool(mask, r0, r1, c0, c1, s) > 0.5
        band = float(np.clip(depth, p.zone_band_min, p.zone_band_max))
        edge = np.where(labels, ndimage.distance_transform_edt(labels), ndimage.distance_transform_edt(~labels)) * s
        yy, xx = np.mgrid[r0:r1, c0:c1]
        zone = (edge <= band) & (np.hypot((yy + 0.5) * s - r, (xx + 0.5) * s - c) <= radius)
        fixed = ~zone
        fixed[0] = fixed[-1] = True
        fixed[:, 0] = fixed[:, -1] = True
        value = labels.astype(np.float32)
        for ck in clicks:
            a, b = ck.pixel(h, w)
            a, b = a // s - r0, b // s - c0
            if 0 <= a < hz and 0 <= b < wz:
                fixed[a, b], value[a, b] = True, float(ck.positive)
        x = _random_walk(self._rwfeat[level][r0:r1, c0:c1], fixed, value, p.rw_beta)
        box = (r0 * s, min(h, r1 * s), c0 * s, min(w, c1 * s))
        if s > 1:
            x = _resize(x, wz * s, hz * s)
            zone = np.repeat(np.repeat(zone, s, 0), s, 1)
        x, zone = x[: box[1] - box[0], : box[3] - box[2]], zone[: box[1] - box[0], : box[3] - box[2]]
        sub = mask[box[0] : box[1], box[2] : box[3]]
        sub[zone] = x[zone] > 0.5
        if s > 1 and p.band > 0:
            self._refine_band(mask, box, clicks, p.band + s, ndimage.binary_dilation(zone, iterations=2))

    def _refine_band(
        self,
        mask: np.ndarray,
        box: tuple[int, int, int, int],
        clicks: list[Click],
        width: int,
        allowed: np.ndarray | None = None,
    ) -> None:
        """Re-solve, at full resolution, the pixels of `box` within `width` of the mask boundary (and `allowed`)."""
        h, w = mask.shape
        r0, r1 = max(0, box[0] - width - 1), min(h, box[1] + width + 1)
        c0, c1 = max(0, box[2] - width - 1), min(w, box[3] + width + 1)
        m = mask[r0:r1, c0:c1]
        inner = np.zeros(m.shape, bool)
        inner[box[0] - r0 : box[1] - r0, box[2] - c0 : box[3] - c0] = True if allowed is None else allowed
        # Pixels within `width` of the other label, looked for only around the allowed pixels (a zone is often a
        # small part of its window): the same pixels as a distance transform of the whole window, several times
        # cheaper (the transforms were the slowest part of a click on 1024^2 images).
        rows, cols = np.flatnonzero(inner.any(1)), np.flatnonzero(inner.any(0))
        if rows.size == 0:
            return
        a0, a1 = max(0, rows[0] - width - 1), min(m.shape[0], rows[-1] + width + 2)
        b0, b1 = max(0, cols[0] - width - 1), min(m.shape[1], cols[-1] + width + 2)
        sub = m[a0:a1, b0:b1]
        unknown = np.zeros_like(inner)
        unknown[a0:a1, b0:b1] = np.where(sub, _within(~sub, width), _within(sub, width))
        unknown &= inner
        unknown[0] = unknown[-1] = False
        unknown[:, 0] = unknown[:, -1] = False
        for ck in clicks:
            a, b = ck.pixel(h, w)
            if r0 <= a < r1 and c0 <= b < c1:
                unknown[a - r0, b - c0] = False
        if not unknown.any():
            return
        x = _random_walk(self._rwfeat[0][r0:r1, c0:c1], ~unknown, m.astype(np.float32), self.params.rw_beta)
        m[unknown] = x[unknown] > 0.5

    # -- logits <-> masks ----------------------------------------------------------------------------------
    def _recall(self, logits: np.ndarray | None) -> np.ndarray | None:
        """The full-resolution mask behind logits this tool returned, else the logits upsampled (> 0)."""
        if logits is None:
            return None
        key = hashlib.blake2b(np.ascontiguousarray(logits).tobytes(), digest_size=16).digest()
        h, w = self._image.shape[:2]
        if key in self._memory and self._memory[key].shape == (h, w):
            return self._memory[key].copy()
        return _resize(np.asarray(logits, np.float32), w, h) > 0

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """An HxW bool mask (a user's initial mask) as 256x256 logits; the full-resolution mask is remembered, so
        `predict` refines the mask itself rather than its low-resolution copy."""
        return self._remember(np.asarray(mask, bool))

    def _remember(self, mask: np.ndarray) -> np.ndarray:
        logits = super().mask_to_logits(mask)
        self._memory[hashlib.blake2b(logits.tobytes(), digest_size=16).digest()] = mask.copy()
        while len(self._memory) > _MEMORY:
            self._memory.popitem(last=False)
        return logits


# -- helpers ---------------------------------------------------------------------------------------------------
_GRADIENT_SIGMA = 0.7  # the Gaussian before the Sobel of `_gradient`


def _available_cores() -> int:
    """Cores this process may use, at most 4, and at most OMP_NUM_THREADS where it is set to a number."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) >= 1:
        cores = min(cores, int(limit))
    return max(1, min(cores, 4))


def _by_rows(fn, a: np.ndarray, context: int, threads: int) -> tuple:
    """`fn(a)` computed on strips of rows in `threads` threads, as a tuple of arrays (one, or `fn`'s tuple).

    `fn` must return arrays of `a`'s rows whose row r depends only on rows r - context .. r + context of `a` (and
    on the array's first and last rows as they are): each strip is given `context` rows more on each side and
    cropped back, so the result equals `fn(a)` exactly."""

    def run(rows: np.ndarray) -> tuple:
        out = fn(rows)
        return out if isinstance(out, tuple) else (out,)

    n = a.shape[0]
    strips = max(1, min(threads, n // _STRIP))
    if strips == 1:
        return run(a)
    bounds = np.linspace(0, n, strips + 1).astype(int)
    spans = [
        (int(lo), int(hi), max(0, int(lo) - context), min(n, int(hi) + context)) for lo, hi in zip(bounds, bounds[1:])
    ]
    with ThreadPoolExecutor(strips, thread_name_prefix="classical-encode") as pool:
        parts = list(pool.map(lambda span: run(a[span[2] : span[3]]), spans))
    return tuple(
        np.concatenate([part[k][lo - start : hi - start] for part, (lo, hi, start, _) in zip(parts, spans)])
        for k in range(len(parts[0]))
    )


def _radius(sigma: float) -> int:
    """Rows either side that `_gauss(..., sigma)` reads: its kernel is truncated at 4 sigma."""
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def _gauss(f: np.ndarray, sigma: float) -> np.ndarray:
    """HxWxC float32 features, each channel Gaussian-smoothed (kernel truncated at 4 sigma, edges mirrored as
    ndimage's "reflect"). A separable filter written as sums of shifted slices, all channels at once: faster than
    ndimage.gaussian_filter, which copies every line through a float64 buffer."""
    radius = _radius(sigma)
    if radius == 0:
        return f.astype(np.float32)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    return _filter_axis(_filter_axis(f, kernel, 0), kernel, 1)


def _filter_axis(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """`a` correlated along `axis` with a symmetric odd-length kernel, edges mirrored (one product per tap pair)."""
    radius, n = len(kernel) // 2, a.shape[axis]
    padded = np.pad(a, [(radius, radius) if k == axis else (0, 0) for k in range(a.ndim)], mode="symmetric")

    def tap(k: int) -> np.ndarray:  # the input shifted by k - radius along the axis
        return padded[(slice(None),) * axis + (slice(k, k + n),)]

    out = tap(radius) * kernel[radius]
    for j in range(1, radius + 1):
        pair = tap(radius - j) + tap(radius + j)
        pair *= kernel[radius + j]
        out += pair
    return out


def _down2(a: np.ndarray) -> np.ndarray:
    """Halve the resolution by 2x2 averaging (even sides)."""
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def _channel_sum(a: np.ndarray) -> np.ndarray:
    """HxWxC -> HxW: the channels added in order (numpy's sum over a short last axis is several times slower)."""
    out = a[..., 0].copy()
    for k in range(1, a.shape[2]):
        out += a[..., k]
    return out


def _gradient(f: np.ndarray) -> np.ndarray:
    """HxW gradient magnitude of HxWxC features: Sobel after a small Gaussian, the squares summed over channels.
    The Sobel is written with array slices (edges replicated, as ndimage's reflection does for 3 taps): several
    times faster than ndimage.sobel."""
    p = np.pad(_gauss(f, _GRADIENT_SIGMA), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]  # [1, 2, 1] down the rows
    cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [1, 2, 1] along the columns
    gx = rows[:, 2:] - rows[:, :-2]
    gy = cols[2:] - cols[:-2]
    gx *= gx
    gy *= gy
    gx += gy
    return np.sqrt(_channel_sum(gx)) / 8


def _is_grey(image: np.ndarray) -> bool:
    """Whether every pixel's channels (HxWxC uint8) lie within 8 levels of each other."""
    channels = [image[..., k] for k in range(image.shape[2])]
    hi, lo = channels[0], channels[0]
    for ch in channels[1:]:
        hi, lo = np.maximum(hi, ch), np.minimum(lo, ch)
    return int((hi - lo).max()) <= 8


# sRGB -> CIELAB (D65, 2 degrees), the steps and float32 constants of skimage.color.rgb2lab (the same numbers), with
# the gamma expansion of the 256 byte values looked up in a table rather than computed per pixel.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], np.float32
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)
_BYTES = np.arange(256, dtype=np.float32) / 255
_LINEAR = np.where(
    _BYTES > 0.04045, np.power((_BYTES + np.float32(0.055)) / np.float32(1.055), np.float32(2.4)), _BYTES / 12.92
).astype(np.float32)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 sRGB -> HxWx3 float32 CIELAB."""
    xyz = _LINEAR[rgb] @ _XYZ_FROM_RGB.T
    xyz /= _WHITE_D65
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    x, y, z = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], -1)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of a 2-D array to h x w (float32)."""
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.BILINEAR))


def _pool(mask: np.ndarray, r0: int, r1: int, c0: int, c1: int, s: int) -> np.ndarray:
    """The fraction of foreground in each s x s cell of the level-pixel window [r0:r1, c0:c1] (zero beyond the image)."""
    h, w = mask.shape
    sub = np.zeros(((r1 - r0) * s, (c1 - c0) * s), np.float32)
    part = mask[r0 * s : min(r1 * s, h), c0 * s : min(c1 * s, w)]
    sub[: part.shape[0], : part.shape[1]] = part
    return sub.reshape(r1 - r0, s, c1 - c0, s).mean((1, 3)) if s > 1 else sub


def _component_at(region: np.ndarray, r: int, c: int) -> np.ndarray:
    """The connected component of `region` (bool) holding (r, c); empty when (r, c) is outside it."""
    lab, _ = ndimage.label(region)
    k = lab[r, c]
    return lab == k if k > 0 else np.zeros_like(region)


def _within(target: np.ndarray, radius: int) -> np.ndarray:
    """HxW bool: the pixels at Euclidean distance <= `radius` (an int) from a True pixel of `target` (HxW bool).

    The disk is dilated row by row: for each row offset dy, a run of +-floor(sqrt(radius^2 - dy^2)) columns, from
    a cumulative count along the rows (a few full-array passes per row offset instead of a distance transform).
    """
    h, w = target.shape
    out = np.zeros((h, w), bool)
    if radius < 0 or not target.any():
        return out
    pad = radius + 1
    count = np.zeros((h, w + 1 + 2 * pad), np.int32)  # count[:, pad + j] = True pixels left of column j
    np.cumsum(target, axis=1, out=count[:, pad + 1 : pad + 1 + w])
    count[:, pad + 1 + w :] = count[:, pad + w : pad + w + 1]
    runs: dict[int, np.ndarray] = {}
    for dy in range(-min(radius, h - 1), min(radius, h - 1) + 1):
        k = math.isqrt(radius * radius - dy * dy)
        if k not in runs:  # True where a True pixel lies within k columns on the same row
            runs[k] = count[:, pad + k + 1 : pad + k + 1 + w] > count[:, pad - k : pad - k + w]
        if dy >= 0:
            out[: h - dy] |= runs[k][dy:]
        else:
            out[-dy:] |= runs[k][: h + dy]
    return out


def _distance_to(target: np.ndarray, r: int, c: int) -> float:
    """Euclidean distance from (r, c) to the nearest True pixel of `target` (HxW bool); the image side if none."""
    h, w = target.shape
    half = 16
    while True:  # grow a window until the nearest pixel provably lies inside it
        a, b, c0, c1 = max(0, r - half), min(h, r + half + 1), max(0, c - half), min(w, c + half + 1)
        ys, xs = np.nonzero(target[a:b, c0:c1])
        if ys.size:
            dist = float(np.sqrt(((ys + a - r) ** 2 + (xs + c0 - c) ** 2).min()))
            if dist <= half or half >= max(h, w):
                return dist
        elif half >= max(h, w):
            return float(max(h, w))
        half *= 2


def _random_walk(feat: np.ndarray, fixed: np.ndarray, value: np.ndarray, beta: float) -> np.ndarray:
    """Random-walker probabilities on a 4-connected grid.

    feat: HxWxC features; fixed: HxW bool seeds; value: HxW seed values (0/1, read where fixed). Edge weights are
    exp(-beta * |df|^2 / mean |df|^2) + 1e-4, the mean over all edges of the grid. Returns HxW float: the seeds'
    values and, elsewhere, the harmonic interpolation (the probability of reaching a foreground seed first).
    Only the edges touching unknown pixels enter the linear system, so a thin band in a large window stays cheap.
    """
    unknown = ~fixed
    n = int(unknown.sum())
    out = value.astype(np.float64)
    if n == 0:
        return out
    dh = _channel_sum(np.square(feat[:, 1:] - feat[:, :-1]))
    dv = _channel_sum(np.square(feat[1:] - feat[:-1]))
    scale = (float(dh.sum(dtype=np.float64)) + float(dv.sum(dtype=np.float64))) / (dh.size + dv.size) + 1e-6
    index = np.full(fixed.shape, -1, np.int64)
    index[unknown] = np.arange(n)
    diag, rhs = np.zeros(n), np.zeros(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for d, (a, b) in ((dh, (np.s_[:, :-1], np.s_[:, 1:])), (dv, (np.s_[:-1], np.s_[1:]))):
        ua, ub = unknown[a], unknown[b]
        touch = ua | ub
        wt = np.exp(-beta * d[touch] / scale) + 1e-4
        ia, ib, ua, ub = index[a][touch], index[b][touch], ua[touch], ub[touch]
        diag += np.bincount(ia[ua], wt[ua], n) + np.bincount(ib[ub], wt[ub], n)
        both = ua & ub
        rows += [ia[both], ib[both]]
        cols += [ib[both], ia[both]]
        vals += [-wt[both], -wt[both]]
        to_b, to_a = ua & ~ub, ub & ~ua  # an unknown pixel next to a seed: the seed's value goes to the right side
        rhs += np.bincount(ia[to_b], wt[to_b] * out[b][touch][to_b], n)
        rhs += np.bincount(ib[to_a], wt[to_a] * out[a][touch][to_a], n)
    lap = sp.csr_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    out[unknown] = _solve_laplacian(lap, rhs)
    return out


class _OneBlasThread:
    """A context in which BLAS runs on one thread (restored when the last thread inside leaves).

    The banded Cholesky of a thin band is a long chain of tiny blocks: threaded BLAS makes it many times slower,
    and on a busy machine (another process on the other cores) a 10 ms solve took seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._limiter = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._limiter = threadpool_limits(limits=1, user_api="blas")
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()
_BAND_RATIO = 100.0  # banded Cholesky where bandwidth^2 < this x sqrt(unknowns); wider bands (square zones): SuperLU
_BAND_ENTRIES = 8_000_000  # ... and its band storage holds at most this many float64 (64 MB)


def _solve_laplacian(lap: sp.csr_matrix, rhs: np.ndarray) -> np.ndarray:
    """x with lap @ x = rhs, for a random walker's Laplacian: symmetric, and positive definite because every
    unknown pixel is connected to a seed.

    The usual system is a thin band of pixels along a boundary: reordered by reverse Cuthill-McKee its matrix has a
    narrow band, which LAPACK's banded Cholesky solves faster than SuperLU (whose factorisation was the slowest part
    of a click on long boundaries). Systems whose band stays wide (a square zone) go to SuperLU: LU without pivoting on a
    symmetric ordering, exact for this diagonally dominant matrix."""
    n = lap.shape[0]
    order = reverse_cuthill_mckee(lap, symmetric_mode=True)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    coo = lap.tocoo()
    i, j = rank[coo.row], rank[coo.col]
    upper = i <= j
    width = int((j - i)[upper].max())
    if width * width < _BAND_RATIO * math.sqrt(n) and (width + 1) * n <= _BAND_ENTRIES:
        band = np.zeros((width + 1, n))
        band[width + i[upper] - j[upper], j[upper]] = coo.data[upper]
        try:
            with _ONE_BLAS_THREAD:
                factor = cholesky_banded(band, lower=False, check_finite=False)
                x = np.empty(n)
                x[order] = cho_solve_banded((factor, False), rhs[order], check_finite=False)
            return x
        except np.linalg.LinAlgError:
            pass  # not positive definite (a pixel cut off from every seed): SuperLU's answer below
    solver = spl.splu(lap.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    return solver.solve(rhs)
