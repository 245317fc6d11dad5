"""The weight-free classical click tool, the default where no checkpoint is configured.

Per image (`_encode`): CIELAB (or grey) features and gradient magnitudes on a 4-level pyramid. Per click
(`_predict`): the first positive click grows a region from geodesic distances on the gradient map; later clicks
re-segment only a zone around the new click with a random walker seeded by all clicks and the previous mask, so a
click corrects locally and leaves earlier corrections alone; a thin band at full resolution refines the boundary.
The returned logits are the mask at low resolution; the tool recognises its own logits and restores the full mask.
"""

import hashlib
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.graph import MCP_Geometric

from ibisagent.tools.base import SegmentationTool, ToolOutput

NLEV = 4


def _down2(a):
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def _random_walk(feat, fixed, fixed_val, beta, prior=None, lam=0.0, pct=None):
    h, w = feat.shape[:2]
    n = h * w
    dh = ((feat[:, 1:] - feat[:, :-1]) ** 2).sum(-1)
    dv = ((feat[1:] - feat[:-1]) ** 2).sum(-1)
    d = np.r_[dh.ravel(), dv.ravel()]
    scale = (d.mean() if pct is None else np.percentile(d, pct)) + 1e-6
    wt = np.exp(-beta * d / scale) + 1e-4
    idx = np.arange(n).reshape(h, w)
    i = np.r_[idx[:, :-1].ravel(), idx[:-1].ravel()]
    j = np.r_[idx[:, 1:].ravel(), idx[1:].ravel()]
    fixed = fixed.ravel()
    fval = fixed_val.ravel().astype(np.float64)
    unk = ~fixed
    nu = int(unk.sum())
    if nu == 0:
        return fval.reshape(h, w)
    pos = np.full(n, -1)
    pos[unk] = np.arange(nu)
    deg = np.bincount(i, wt, n) + np.bincount(j, wt, n)
    diag = deg[unk].copy()
    rhs = np.zeros(nu)
    if prior is not None and lam > 0:
        lamv = lam * wt.mean()
        diag += lamv
        rhs += lamv * prior.ravel()[unk]
    uu = unk[i] & unk[j]
    rows = np.r_[pos[i[uu]], pos[j[uu]], np.arange(nu)]
    cols = np.r_[pos[j[uu]], pos[i[uu]], np.arange(nu)]
    vals = np.r_[-wt[uu], -wt[uu], diag]
    a_fs = unk[i] & fixed[j]
    rhs += np.bincount(pos[i[a_fs]], wt[a_fs] * fval[j[a_fs]], nu)
    b_fs = unk[j] & fixed[i]
    rhs += np.bincount(pos[j[b_fs]], wt[b_fs] * fval[i[b_fs]], nu)
    A = sp.csc_matrix((vals, (rows, cols)), shape=(nu, nu))
    x = spl.spsolve(A, rhs, permc_spec="MMD_AT_PLUS_A")
    out = fval.copy()
    out[unk] = x
    return out.reshape(h, w)


def _resize(a, w, h):
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.BILINEAR))


class ClassicalTool(SegmentationTool):
    """Classical interactive segmentation (no weights). The keyword arguments are tuning constants measured with
    `benchmarks/bench_classical_tool.py`; the defaults are the measured best."""

    name = "classical"

    def __init__(self, *, size=128, beta=8.0, wa=2.0, wb=6, k=8.0, alpha=1.0, gamma=2.0, gs=2.0, wmul=1.2,
                 fa=1.5, fb=4, za=4.0, zb=12, zw=1.0, zwmin=4, zwmax=400, band=3, rwsm=1.0, zsize=128,
                 lam=0.0, mode="zone", firstmode="band", capstar=True, thr=0.5, sd=0.0, ssm=1.5, ks=8.0, vor=1.0, capobj=0.0, core=0.0, colour=0.0, slab=0.0, slabb=2.0, asym=False, a1=2.5, b1=3.0, a2=0.5, b2=3.0, pct=None, fchoices=None, fsel_tol=1.0, lchoices=None):
        self.lchoices = lchoices
        self.fchoices, self.fsel_tol = fchoices, fsel_tol
        self.pct = pct
        self.asym, self.a1, self.b1, self.a2, self.b2 = asym, a1, b1, a2, b2
        self.slab, self.slabb = slab, slabb
        self.vor, self.capobj, self.core, self.colour = vor, capobj, core, colour
        self.ssm, self.ks = ssm, ks
        self.thr, self.sd = thr, sd
        self.capstar = capstar
        self.firstmode = firstmode
        super().__init__()
        self.size, self.beta, self.wa, self.wb, self.k = size, beta, wa, wb, k
        self.alpha, self.gamma, self.gs, self.wmul, self.fa, self.fb = alpha, gamma, gs, wmul, fa, fb
        self.za, self.zb, self.zw, self.zwmin, self.zwmax, self.band, self.rwsm = za, zb, zw, zwmin, zwmax, band, rwsm
        self.zsize, self.lam, self.mode = zsize, lam, mode
        self._memory = OrderedDict()

    # ---------------------------------------------------------------- encode
    def _encode(self, image):
        h, w = image.shape[:2]
        m = 2 ** (NLEV - 1)
        ph, pw = -(-h // m) * m, -(-w // m) * m
        rgb = image.astype(np.float32) / 255
        grey = np.ptp(image.astype(np.int16), axis=2).max() <= 8
        f = (rgb.mean(2, keepdims=True) * 100).astype(np.float32) if grey else rgb2lab(rgb).astype(np.float32)
        f = np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
        sm = np.stack([ndimage.gaussian_filter(f[..., c], self.ssm) for c in range(f.shape[2])], -1)
        self._smooth = sm
        self._noise = float(np.median(np.sqrt(((f - sm) ** 2).sum(-1)))) + 0.5
        self._rwfeat = [np.stack([ndimage.gaussian_filter(f[..., c], self.rwsm) for c in range(f.shape[2])], -1)]
        self._feats = [f]
        for _ in range(1, NLEV):
            self._feats.append(_down2(self._feats[-1]))
            self._rwfeat.append(_down2(self._rwfeat[-1]))
        self._grads = []
        for fl in self._feats:
            g2 = np.zeros(fl.shape[:2], np.float32)
            for ch in range(fl.shape[2]):
                s = ndimage.gaussian_filter(fl[..., ch], 0.7)
                g2 += ndimage.sobel(s, 0) ** 2 + ndimage.sobel(s, 1) ** 2
            self._grads.append(np.sqrt(g2) / 8)
        self._memory.clear()

    # ---------------------------------------------------------------- state
    def _recall(self, logits):
        if logits is None:
            return None
        key = hashlib.blake2b(np.ascontiguousarray(logits).tobytes(), digest_size=16).digest()
        if key in self._memory:
            return self._memory[key].copy()
        h, w = self._image.shape[:2]
        return _resize(np.asarray(logits, np.float32), w, h) > 0

    def _remember(self, mask):
        logits = self.mask_to_logits(mask)
        key = hashlib.blake2b(logits.tobytes(), digest_size=16).digest()
        self._memory[key] = mask.copy()
        while len(self._memory) > 32:
            self._memory.popitem(last=False)
        return logits

    # ---------------------------------------------------------------- pieces
    def _star_radius(self, r, c):
        H, W = self._image.shape[:2]
        f = self._smooth
        sr = 3
        seed = f[max(0, r - sr):r + sr + 1, max(0, c - sr):c + sr + 1].reshape(-1, f.shape[2])
        mu = np.median(seed, 0)
        spread = np.median(np.sqrt(((seed - mu) ** 2).sum(-1)))
        tol = self.k * self._noise + self.ks * spread
        th = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        R = np.arange(1, max(H, W))
        rr = r + np.outer(np.sin(th), R)
        cc = c + np.outer(np.cos(th), R)
        inside = (rr >= 0) & (rr <= H - 1) & (cc >= 0) & (cc <= W - 1)
        ri = np.clip(np.round(rr).astype(int), 0, H - 1)
        ci = np.clip(np.round(cc).astype(int), 0, W - 1)
        d = (np.sqrt(((f[ri, ci] - mu) ** 2).sum(-1)) > tol) | ~inside
        run = d.copy()
        for j in range(1, 3):
            run[:, :-j] &= d[:, j:]
        run[:, -1] = True
        rad = np.maximum(R[np.argmax(run, 1)] - 0.5, 1)
        return float(np.median(rad))

    def _level_for(self, side, size):
        L = 0
        while L < NLEV - 1 and side / 2**L > size:
            L += 1
        return L

    def _claim(self, new, clicks, radius, choices=None, prev=None):
        H, W = self._image.shape[:2]
        r, c = new.pixel(H, W)
        if choices:
            radius = radius * max(choices)
        half = int(radius * self.wmul) + 4
        L = self._level_for(2 * half + 1, self.size)
        s = 2**L
        Hl, Wl = self._feats[L].shape[:2]
        rl, cl = r // s, c // s
        hl = -(-half // s)
        R0, R1, C0, C1 = max(0, rl - hl), min(Hl, rl + hl + 1), max(0, cl - hl), min(Wl, cl + hl + 1)
        g = self._grads[L][R0:R1, C0:C1]
        nb = g[max(0, rl - R0 - 3): rl - R0 + 4, max(0, cl - C0 - 3): cl - C0 + 4]
        scale = max(float(np.median(g)), float(np.median(nb)), 1e-3) * self.gs
        cost = 1.0 + self.alpha * (g / scale) ** self.gamma
        dp, _ = MCP_Geometric(cost, fully_connected=True).find_costs([(rl - R0, cl - C0)])
        if choices:
            best, top = -1.0, max(choices)
            same = None
            if prev is not None:
                sub = np.zeros(((R1 - R0) * s, (C1 - C0) * s), np.float32)
                part = prev[R0 * s:min(R1 * s, H), C0 * s:min(C1 * s, W)]
                sub[: part.shape[0], : part.shape[1]] = part
                same = (sub.reshape(R1 - R0, s, C1 - C0, s).mean((1, 3)) > 0.5) == new.positive
            for m in sorted(choices):
                reg = dp <= radius * m / top / s
                lab, _ = ndimage.label(reg)
                reg = lab == lab[rl - R0, cl - C0]
                if same is not None:
                    full = reg | same
                    edge = reg & ~ndimage.binary_erosion(full, border_value=1)
                else:
                    edge = reg & ~ndimage.binary_erosion(reg, border_value=1)
                if reg.sum() < 4 or not edge.any():
                    continue
                sc = float(g[edge].mean())
                if sc > best * self.fsel_tol:
                    best, pick = max(sc, best), m
            radius = radius * pick / top
        margin = radius / s - dp
        seeds = []
        for ck in clicks:
            if ck.positive != new.positive:
                a, b = ck.pixel(H, W)
                a, b = a // s - R0, b // s - C0
                if 0 <= a < R1 - R0 and 0 <= b < C1 - C0:
                    seeds.append((a, b))
        if seeds:
            do, _ = MCP_Geometric(cost, fully_connected=True).find_costs(seeds)
            margin = np.minimum(margin, self.vor * do - dp)
        if s > 1:
            margin = _resize(margin, (C1 - C0) * s, (R1 - R0) * s)
        box = (R0 * s, min(H, R1 * s), C0 * s, min(W, C1 * s))
        claim = margin[: box[1] - box[0], : box[3] - box[2]] > 0
        lab, _ = ndimage.label(claim)
        k = lab[r - box[0], c - box[2]]
        claim = lab == k if k > 0 else np.zeros_like(claim)
        return box, claim

    def _zone_rw(self, mask, new, clicks, d, prev=None):
        """Re-solve the labels near the click: pixels within `w` of the mask boundary and `rz` of the click."""
        H, W = mask.shape
        r, c = new.pixel(H, W)
        rz = self.za * d + self.zb
        w = float(np.clip(self.zw * d, self.zwmin, self.zwmax))
        half = int(rz) + 1
        L = self._level_for(2 * half + 1, self.zsize)
        s = 2**L
        Hl, Wl = self._feats[L].shape[:2]
        rl, cl = r // s, c // s
        hl = -(-half // s) + 1
        R0, R1, C0, C1 = max(0, rl - hl), min(Hl, rl + hl + 1), max(0, cl - hl), min(Wl, cl + hl + 1)
        h, wd = R1 - R0, C1 - C0
        sub = np.zeros((h * s, wd * s), np.float32)
        part = mask[R0 * s:min(R1 * s, H), C0 * s:min(C1 * s, W)]
        sub[: part.shape[0], : part.shape[1]] = part
        t = sub.reshape(h, s, wd, s).mean((1, 3)) > 0.5 if s > 1 else sub > 0.5
        yy, xx = np.mgrid[R0:R1, C0:C1]
        if self.asym and prev is not None:
            subp = np.zeros((h * s, wd * s), np.float32)
            part = prev[R0 * s:min(R1 * s, H), C0 * s:min(C1 * s, W)]
            subp[: part.shape[0], : part.shape[1]] = part
            tp = subp.reshape(h, s, wd, s).mean((1, 3)) > 0.5 if s > 1 else subp > 0.5
            din = ndimage.distance_transform_edt(tp) * s     # inside prev: distance to prev BG
            dout = ndimage.distance_transform_edt(~tp) * s   # outside prev: distance to prev FG
            near, far = (self.a1 * d + self.b1), (self.a2 * d + self.b2)
            if new.positive:
                zone = np.where(tp, din <= far, dout <= near)
            else:
                zone = np.where(tp, din <= near, dout <= far)
            zone |= (t != tp)
        else:
            dist = np.where(t, ndimage.distance_transform_edt(t), ndimage.distance_transform_edt(~t)) * s
            zone = dist <= w
        zone &= np.hypot((yy + 0.5) * s - r, (xx + 0.5) * s - c) <= rz
        fixed = ~zone
        fixed[0] = fixed[-1] = True
        fixed[:, 0] = fixed[:, -1] = True
        val = t.astype(np.float32)
        for ck in clicks:
            a, b = ck.pixel(H, W)
            a, b = a // s - R0, b // s - C0
            if 0 <= a < h and 0 <= b < wd:
                fixed[a, b] = True
                val[a, b] = float(ck.positive)
        rd = int(self.sd * d / s)
        if rd >= 1:
            a, b = r // s - R0, c // s - C0
            yy2, xx2 = np.ogrid[-a:h - a, -b:wd - b]
            disk = yy2 ** 2 + xx2 ** 2 <= rd * rd
            fixed[disk] = True
            val[disk] = float(new.positive)
        if self.core > 0:
            cbox, claim = self._cur_claim
            cf = np.zeros((h * s, wd * s), np.float32)
            y0, y1 = max(cbox[0], R0 * s), min(cbox[1], R1 * s, H)
            x0, x1 = max(cbox[2], C0 * s), min(cbox[3], C1 * s, W)
            if y1 > y0 and x1 > x0:
                cl_ = claim[y0 - cbox[0]:y1 - cbox[0], x0 - cbox[2]:x1 - cbox[2]]
                cl_ = ndimage.binary_erosion(cl_, iterations=1) if s == 1 else cl_
                cf[y0 - R0 * s:y1 - R0 * s, x0 - C0 * s:x1 - C0 * s] = cl_
                cl = cf.reshape(h, s, wd, s).min((1, 3)) > 0.5 if s > 1 else cf > 0.5
                yy3, xx3 = np.mgrid[R0:R1, C0:C1]
                near = np.hypot((yy3 + 0.5) * s - r, (xx3 + 0.5) * s - c) <= self.core * max(d, 1.0)
                cl &= near
                fixed[cl] = True
                val[cl] = float(new.positive)
        prior = t.astype(np.float32)
        lam = self.lam
        if self.colour > 0:
            prior = self._colour_prior(self._rwfeat[L][R0:R1, C0:C1], t)
            lam = self.colour
        x = _random_walk(self._rwfeat[L][R0:R1, C0:C1], fixed, val, self.beta, prior, lam, self.pct)
        box = (R0 * s, min(H, R1 * s), C0 * s, min(W, C1 * s))
        if s > 1:
            x = _resize(x, wd * s, h * s)
            zone_full = np.repeat(np.repeat(zone, s, 0), s, 1)
        else:
            zone_full = zone
        x = x[: box[1] - box[0], : box[3] - box[2]]
        zone_full = zone_full[: box[1] - box[0], : box[3] - box[2]]
        m = mask[box[0]:box[1], box[2]:box[3]]
        m[zone_full] = x[zone_full] > self.thr
        self._dbg_zone = np.zeros(mask.shape, bool)
        self._dbg_zone[box[0]:box[1], box[2]:box[3]] = zone_full
        if s > 1 and self.band > 0:
            self._band_refine(mask, box, clicks, self.band + s, ndimage.binary_dilation(zone_full, iterations=2))

    def _colour_prior(self, feat, lab):
        f = feat.reshape(-1, feat.shape[2])
        lo, hi = f.min(0), f.max(0)
        nb = 32 if f.shape[1] == 1 else 12
        q = np.clip(((f - lo) / (hi - lo + 1e-6) * nb).astype(int), 0, nb - 1)
        code = q[:, 0]
        for ch in range(1, f.shape[1]):
            code = code * nb + q[:, ch]
        nbin = nb ** f.shape[1]
        fg = np.bincount(code[lab.ravel()], minlength=nbin) + 1.0
        bg = np.bincount(code[~lab.ravel()], minlength=nbin) + 1.0
        fg /= fg.sum()
        bg /= bg.sum()
        p = fg / (fg + bg)
        return p[code].reshape(lab.shape).astype(np.float32)

    def _band_refine(self, mask, box, clicks, wb, allowed=None):
        H, W = mask.shape
        r0, r1, c0, c1 = max(0, box[0] - wb - 1), min(H, box[1] + wb + 1), max(0, box[2] - wb - 1), min(W, box[3] + wb + 1)
        m = mask[r0:r1, c0:c1]
        band = np.where(m, ndimage.distance_transform_edt(m), ndimage.distance_transform_edt(~m)) <= wb
        inner = np.zeros_like(band)
        if allowed is None:
            inner[box[0] - r0: box[1] - r0, box[2] - c0: box[3] - c0] = True
        else:
            inner[box[0] - r0: box[1] - r0, box[2] - c0: box[3] - c0] = allowed
        unknown = band & inner
        unknown[0] = unknown[-1] = False
        unknown[:, 0] = unknown[:, -1] = False
        for ck in clicks:
            a, b = ck.pixel(H, W)
            if r0 <= a < r1 and c0 <= b < c1:
                unknown[a - r0, b - c0] = False
        if not unknown.any():
            return
        x = _random_walk(self._rwfeat[0][r0:r1, c0:c1], ~unknown, m.astype(np.float32), self.beta, pct=self.pct)
        m[unknown] = x[unknown] > self.thr

    def _dist_to(self, target, r, c):
        H, W = target.shape
        half = 16
        while True:
            a, b, c0, c1 = max(0, r - half), min(H, r + half + 1), max(0, c - half), min(W, c + half + 1)
            win = target[a:b, c0:c1]
            if win.any():
                ys, xs = np.nonzero(win)
                dist = float(np.sqrt(((ys + a - r) ** 2 + (xs + c0 - c) ** 2).min()))
                if dist <= half or half >= max(H, W):
                    return dist
            elif half >= max(H, W):
                return float(max(H, W))
            half *= 2

    # ---------------------------------------------------------------- predict
    def _predict(self, clicks, prev_logits):
        H, W = self._image.shape[:2]
        prev = self._recall(prev_logits)
        if prev is None:
            prev = np.zeros((H, W), bool)
            todo = clicks
        else:
            todo = clicks[-1:]
        mask = prev.copy()
        for i, new in enumerate(todo):
            upto = clicks[: len(clicks) - len(todo) + i + 1]
            r, c = new.pixel(H, W)
            first = not mask.any() and new.positive
            if first:
                d = self._star_radius(r, c)
                radius = self.fa * d + self.fb
            else:
                d = self._dist_to(mask != mask[r, c], r, c)
                radius = self.wa * d + self.wb
                if self.capstar and new.positive:
                    cap = self.fa * self._star_radius(r, c) + self.fb
                    if self.capobj > 0:
                        cap = min(cap, max(self.capobj * np.sqrt(mask.sum() / np.pi), 16.0))
                    if cap < radius:
                        radius = cap
                        d = min(d, cap)
            box, claim = self._claim(new, upto, radius, self.fchoices if first else self.lchoices, None if first else mask)
            before = mask.copy() if self.asym else None
            if self.slab > 0 and not first:
                sub = mask[box[0]:box[1], box[2]:box[3]]
                other = sub if new.positive else ~sub   # the label the click disagrees with
                if other.any():
                    claim &= ndimage.distance_transform_edt(~other) <= self.slab * d + self.slabb
            mask[box[0]:box[1], box[2]:box[3]][claim] = new.positive
            self._cur_claim = (box, claim)
            self._dbg_claimed = mask.copy()
            if first and self.firstmode == "band":
                L = self._level_for(box[1] - box[0], self.size)
                self._band_refine(mask, box, upto, 3 + 2**L)
            elif self.mode == "zone":
                self._zone_rw(mask, new, upto, radius if first else d, before)
            elif self.mode == "band":
                L = self._level_for(box[1] - box[0], self.size)
                self._band_refine(mask, box, upto, 3 + 2**L)
        for ck in clicks:
            mask[ck.pixel(H, W)] = ck.positive
        return ToolOutput(mask, self._remember(mask), 1.0)
