"""Oracle-click benchmark of the classical tool: mean IoU@k, NoC@85/90 and seconds per click on BiomedParse masks.
Run: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_classical_tool.py [--data DIR] [--clicks 20] [--limit N]
[--size PX]`. NoC counts a mask that never reaches the threshold as clicks + 1. The last line checks the targets of
issue #2 (all 71 demo masks, 20 clicks, 1024x1024 images, 2 cores): IoU@20 >= 0.88, NoC@85 <= 9, <= 0.25 s/click."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _paths import DEMO  # benchmarks/ is on sys.path when a script runs
from PIL import Image

from ibisagent.datasets import list_biomedparse
from ibisagent.io import read_image, read_mask
from ibisagent.metrics import iou_at, noc
from ibisagent.simulator import click_with_oracle
from ibisagent.tools.classical import ClassicalTool

DEFAULT_DATA = DEMO
AT = (1, 5, 10, 20)
TARGET_IOU20, TARGET_NOC85, TARGET_SECONDS = 0.88, 9.0, 0.25


def _resize(image: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale the longer side to `size` pixels (image bilinear, mask nearest); None keeps the native size."""
    if size is None:
        return image, mask
    h, w = mask.shape
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new, Image.NEAREST)) > 0
    return image, mask


def _row(name: str, rows: list[dict], clicks_n: int) -> str:
    ious = [np.mean([iou_at(r["curve"], k) for r in rows]) for k in AT if k <= clicks_n]
    noc85 = np.mean([noc(r["curve"], 0.85, clicks_n) for r in rows])
    noc90 = np.mean([noc(r["curve"], 0.90, clicks_n) for r in rows])
    per_click = np.sum([np.sum(r["seconds"]) for r in rows]) / max(1, sum(len(r["seconds"]) for r in rows))
    encode = np.mean([r["encode"] for r in rows if r["encode"] is not None] or [0.0])
    return (
        f"{name:<14}{len(rows):>4}"
        + "".join(f"{v:>8.3f}" for v in ious)
        + f"{noc85:>8.2f}{noc90:>8.2f}{per_click:>9.3f}{encode:>9.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="BiomedParse split folder (or a folder above one)"
    )
    parser.add_argument("--clicks", type=int, default=20, help="oracle clicks per mask")
    parser.add_argument("--limit", type=int, default=None, help="only the first N masks")
    parser.add_argument("--size", type=int, default=None, help="resize so the longer side has this many pixels")
    args = parser.parse_args(argv)

    samples = list_biomedparse(args.data)[: args.limit]
    if not samples:
        print(f"no image/mask pairs under {args.data}", file=sys.stderr)
        return 1
    tool = ClassicalTool()
    results, current = [], None
    for i, sample in enumerate(samples, 1):
        encode = None
        if sample.image != current:  # masks of one image share its encoding, as an interactive session would
            image = read_image(sample.image)
            gt_native = read_mask(sample.mask, image.shape[:2])
            image_sized, _ = _resize(image, gt_native, args.size)
            t0 = time.perf_counter()
            tool.set_image(image_sized)
            encode = time.perf_counter() - t0
            current = sample.image
        gt = read_mask(sample.mask, image.shape[:2])
        _, gt = _resize(image, gt, args.size)
        run = click_with_oracle(tool, gt, args.clicks)
        curve, seconds = run.ious, run.seconds
        results.append({"sample": sample, "curve": curve, "seconds": seconds, "encode": encode})
        print(
            f"\r[{i:>3}/{len(samples)}] {sample.name[:48]:<48} IoU@{args.clicks}={iou_at(curve, args.clicks):.3f} "
            f"NoC85={noc(curve, 0.85, args.clicks):>2}",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)

    header = f"{'modality':<14}{'n':>4}" + "".join(f"{'IoU@' + str(k):>8}" for k in AT if k <= args.clicks)
    print(header + f"{'NoC85':>8}{'NoC90':>8}{'s/click':>9}{'encode':>9}")
    by_modality = defaultdict(list)
    for r in results:
        by_modality[r["sample"].modality].append(r)
    for modality in sorted(by_modality):
        print(_row(modality, by_modality[modality], args.clicks))
    print(_row("overall", results, args.clicks))
    print(_targets(results, args.clicks))
    return 0


def _targets(rows: list[dict], clicks_n: int) -> str:
    """One line: the overall figures against the issue #2 targets, and the slowest single click."""
    iou20 = np.mean([iou_at(r["curve"], 20) for r in rows])
    noc85 = np.mean([noc(r["curve"], 0.85, clicks_n) for r in rows])
    seconds = [s for r in rows for s in r["seconds"]]
    per_click = float(np.mean(seconds)) if seconds else 0.0
    checks = [
        f"IoU@20 {iou20:.3f} {'ok' if iou20 >= TARGET_IOU20 else 'MISSED'} (>= {TARGET_IOU20})",
        f"NoC85 {noc85:.2f} {'ok' if noc85 <= TARGET_NOC85 else 'MISSED'} (<= {TARGET_NOC85:g})",
        f"s/click {per_click:.3f} {'ok' if per_click <= TARGET_SECONDS else 'MISSED'} (<= {TARGET_SECONDS})",
    ]
    note = "" if clicks_n == 20 else f" [targets are for 20 clicks, this run used {clicks_n}]"
    slowest = max(seconds, default=0.0)
    return f"targets: {'; '.join(checks)}; slowest click {slowest:.3f} s{note}"


if __name__ == "__main__":
    sys.exit(main())
