"""User-click benchmark of the classical tool: how it answers clicks the way people place them, per modality.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_user_clicks.py [--limit N] [--clicks 20] [--seeds 3]

On the 71 BiomedParse demo masks and the key slice (largest ground-truth area) of each RECIST CT volume:
(a) oracle clicks at the deepest point of the largest error (IoU@20, NoC@85);
(b) noisy clicks, uniformly random inside the largest error region (IoU@20, NoC@85, mean over `--seeds` seeds);
(c) the first oracle click, then one background click at the image corner farthest from the object (> 50 px from its
    bounding box): the IoU change, the share of drops beyond 0.02 and the masks emptied;
(d) refinement: the ground truth eroded or dilated by 10 px or shifted by 15 px as the initial mask, plus one oracle
    corrective click: the IoU change and the share of rises;
(e) an initial mask (the ground truth and the three of (d)) plus the far background click of (c): the share whose IoU
    stays within 0.02 of the initial mask's.
The last lines check the targets of issue 20 on the demo masks (RECIST is reported, not targeted), and the speed
(p99 seconds per click over all scenarios, encode seconds per 1024x1024 image).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _paths import DEMO, SHARED_DATA  # benchmarks/ is on sys.path when a script runs

from ibisagent.datasets import list_biomedparse
from ibisagent.io import read_image, read_mask
from ibisagent.metrics import iou, iou_at, noc
from ibisagent.simulator import click_with_oracle, far_background_click, next_click, perturbed_masks
from ibisagent.tools.classical import ClassicalTool

RECIST = SHARED_DATA / "medsam2-recist-npz"
RECIST_MODALITY = "CT (RECIST)"
TARGETS = {
    "a_iou20": 0.92,  # >=
    "a_noc85": 7.0,  # <=
    "b_iou20": 0.88,  # >=
    "c_drops": 0.05,  # share of drops > 0.02, <=
    "d_rises": 0.90,  # share of rises, >=
    "e_within": 0.95,  # share within 0.02, >=
    "p99": 0.25,  # seconds per click, <=
    "encode": 0.3,  # seconds per 1024x1024 image, <=
}


def _images(data: Path, recist: Path, limit: int | None):
    """(image id, HxWx3 or HxW uint8 image, [(name, modality, HxW bool gt), ...]) per image, demo first."""
    by_image = defaultdict(list)
    for s in list_biomedparse(data)[:limit]:
        by_image[s.image].append(s)
    for path, samples in by_image.items():
        image = read_image(path)
        yield str(path), image, [(s.name, s.modality, read_mask(s.mask, image.shape[:2])) for s in samples]
    for path in sorted(recist.glob("*.npz"))[:limit]:
        with np.load(path) as volume:
            gts = volume["gts"] > 0
            k = int(np.argmax(gts.sum(axis=(1, 2))))
            yield str(path), volume["imgs"][k], [(path.stem, RECIST_MODALITY, gts[k])]


def _timed(tool, seconds: list[float], clicks, logits):
    t0 = time.perf_counter()
    out = tool.predict(clicks, logits)
    seconds.append(time.perf_counter() - t0)
    return out


def bench_mask(tool: ClassicalTool, gt: np.ndarray, index: int, args: argparse.Namespace) -> dict:
    """All five scenarios on one mask (the tool's image is set). Returns the figures and the seconds per click."""
    row: dict = {"seconds": []}
    run = click_with_oracle(tool, gt, args.clicks)
    row["seconds"] += run.seconds
    row["a_iou20"], row["a_noc85"] = iou_at(run.ious, args.clicks), noc(run.ious, 0.85, args.clicks)
    b_iou, b_noc = [], []
    for seed in range(args.seeds):
        run = click_with_oracle(tool, gt, args.clicks, rng=np.random.default_rng([seed, index]))
        row["seconds"] += run.seconds
        b_iou.append(iou_at(run.ious, args.clicks))
        b_noc.append(noc(run.ious, 0.85, args.clicks))
    row["b_iou20"], row["b_noc85"] = float(np.mean(b_iou)), float(np.mean(b_noc))

    far = far_background_click(gt)
    first = next_click(np.zeros(gt.shape, bool), gt)
    one = _timed(tool, row["seconds"], [first], None)
    if far is not None:
        two = _timed(tool, row["seconds"], [first, far], one.logits)
        row["c_delta"] = [iou(two.mask, gt) - iou(one.mask, gt)]
        row["c_empty"] = [not two.mask.any()]

    initials = perturbed_masks(gt)
    row["d_delta"] = []
    for initial in initials.values():
        click = next_click(initial, gt)
        if click is not None:
            out = _timed(tool, row["seconds"], [click], tool.mask_to_logits(initial))
            row["d_delta"].append(iou(out.mask, gt) - iou(initial, gt))
    if far is not None:
        row["e_delta"] = []
        for initial in [gt, *initials.values()]:
            out = _timed(tool, row["seconds"], [far], tool.mask_to_logits(initial))
            row["e_delta"].append(iou(out.mask, gt) - iou(initial, gt))
    return row


def _figures(rows: list[dict]) -> dict:
    def flat(key):
        return [v for r in rows for v in r.get(key, [])]

    c, d, e = np.array(flat("c_delta")), np.array(flat("d_delta")), np.array(flat("e_delta"))
    return {
        "n": len(rows),
        "a_iou20": np.mean([r["a_iou20"] for r in rows]),
        "a_noc85": np.mean([r["a_noc85"] for r in rows]),
        "b_iou20": np.mean([r["b_iou20"] for r in rows]),
        "b_noc85": np.mean([r["b_noc85"] for r in rows]),
        "c_n": c.size,
        "c_mean": c.mean() if c.size else np.nan,
        "c_drops": (c < -0.02).mean() if c.size else np.nan,
        "c_empty": int(sum(flat("c_empty"))),
        "d_n": d.size,
        "d_mean": d.mean() if d.size else np.nan,
        "d_rises": (d > 0).mean() if d.size else np.nan,
        "e_n": e.size,
        "e_within": (np.abs(e) <= 0.02).mean() if e.size else np.nan,
        "e_mean": e.mean() if e.size else np.nan,
    }


HEADER = (
    f"{'modality':<14}{'n':>4} | {'a IoU20':>7}{'NoC85':>7} | {'b IoU20':>7}{'NoC85':>7} | "
    f"{'c n':>4}{'dIoU':>7}{'drop%':>6}{'empty':>6} | {'d n':>4}{'dIoU':>7}{'rise%':>6} | {'e n':>4}{'dIoU':>7}"
    f"{'within%':>8}"
)


def _line(name: str, f: dict) -> str:
    return (
        f"{name:<14}{f['n']:>4} | {f['a_iou20']:>7.3f}{f['a_noc85']:>7.2f} | {f['b_iou20']:>7.3f}{f['b_noc85']:>7.2f} | "
        f"{f['c_n']:>4}{f['c_mean']:>+7.3f}{100 * f['c_drops']:>6.1f}{f['c_empty']:>6} | "
        f"{f['d_n']:>4}{f['d_mean']:>+7.3f}{100 * f['d_rises']:>6.1f} | {f['e_n']:>4}{f['e_mean']:>+7.3f}"
        f"{100 * f['e_within']:>8.1f}"
    )


def _checks(f: dict, seconds: list[float], encodes: list[float], clicks_n: int, seeds: int) -> list[str]:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    t = TARGETS
    p99 = float(np.percentile(seconds, 99)) if seconds else 0.0
    encode = max(encodes, default=0.0)
    lines = [
        f"targets (demo): (a) IoU@20 {f['a_iou20']:.3f} {mark(f['a_iou20'] >= t['a_iou20'])} (>= {t['a_iou20']}), "
        f"NoC85 {f['a_noc85']:.2f} {mark(f['a_noc85'] <= t['a_noc85'])} (<= {t['a_noc85']:g}); "
        f"(b) IoU@20 {f['b_iou20']:.3f} {mark(f['b_iou20'] >= t['b_iou20'])} (>= {t['b_iou20']}); "
        f"(c) drops > 0.02 {100 * f['c_drops']:.1f} % {mark(f['c_drops'] <= t['c_drops'])} (<= 5 %), "
        f"emptied {f['c_empty']} {mark(f['c_empty'] == 0)} (0); "
        f"(d) rises {100 * f['d_rises']:.1f} % {mark(f['d_rises'] >= t['d_rises'])} (>= 90 %); "
        f"(e) within 0.02 {100 * f['e_within']:.1f} % {mark(f['e_within'] >= t['e_within'])} (>= 95 %)",
        f"speed (1024x1024 demo images): p99 {p99:.3f} s/click {mark(p99 <= t['p99'])} (<= {t['p99']}), "
        f"slowest {max(seconds, default=0.0):.3f} s, {len(seconds)} clicks; encode mean {np.mean(encodes or [0]):.3f} s,"
        f" slowest {encode:.3f} s {mark(encode <= t['encode'])} (<= {t['encode']})",
    ]
    if clicks_n != 20 or seeds != 3:
        lines.append(f"[targets are for 20 clicks and 3 seeds; this run used {clicks_n} clicks, {seeds} seeds]")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEMO, help="BiomedParse split folder (or a folder above one)")
    parser.add_argument("--recist", type=Path, default=RECIST, help="folder of RECIST CT .npz volumes")
    parser.add_argument("--clicks", type=int, default=20, help="clicks per mask in (a) and (b)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the noisy clicks (b)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N demo masks and N RECIST volumes")
    args = parser.parse_args(argv)

    tool = ClassicalTool()
    rows, index = [], 0
    encodes: list[float] = []
    for _, image, masks in _images(args.data, args.recist, args.limit):
        t0 = time.perf_counter()
        tool.set_image(image)
        if image.shape[:2] == (1024, 1024):
            encodes.append(time.perf_counter() - t0)
        for name, modality, gt in masks:
            row = bench_mask(tool, gt, index, args)
            row.update(name=name, modality=modality, demo=modality != RECIST_MODALITY, side=max(gt.shape))
            rows.append(row)
            index += 1
            print(
                f"\r[{index:>3}] {name[:48]:<48} a {row['a_iou20']:.3f} b {row['b_iou20']:.3f}", end="", file=sys.stderr
            )
    print(file=sys.stderr)
    if not rows:
        print(f"no masks under {args.data} or {args.recist}", file=sys.stderr)
        return 1

    print(HEADER)
    by_modality = defaultdict(list)
    for r in rows:
        by_modality[r["modality"]].append(r)
    for modality in sorted(by_modality):
        print(_line(modality, _figures(by_modality[modality])))
    demo = [r for r in rows if r["demo"]]
    recist = [r for r in rows if not r["demo"]]
    for name, group in (("demo", demo), ("RECIST", recist), ("overall", rows)):
        if group:
            print(_line(name, _figures(group)))
    seconds = [s for r in demo if r["side"] == 1024 for s in r["seconds"]]
    for line in _checks(_figures(demo or rows), seconds, encodes, args.clicks, args.seeds):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
