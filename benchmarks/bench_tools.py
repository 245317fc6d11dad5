"""Per-click cost of every segmentation tool relative to one image encode, with the image embedding reused.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tools.py --tools classical,sam2,medsam2 --images 3 --clicks 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tools.py --images 2 --targets 2 --clicks 4   # all (~8 min)
    .venv/bin/python benchmarks/bench_tools.py --device cuda --images 6 --clicks 10

(On one CPU thread a SAM ViT-B encode takes about a minute, so sam/medsam dominate the run; a tool whose library is
not installed is listed as skipped.)

Each tool is built through `ibisagent.tools.build_tool` (the model tools with random weights from their configs,
as checkpoint None builds them: the architecture, not the quality, sets the cost). Per demo image: one `set_image`
(timed), then for each of its first `--targets` masks up to `--clicks` oracle clicks (`click_with_oracle`: each
`predict` gets all clicks so far and the previous logits). The tool's `encode_count` must rise by exactly one per
image, i.e. no click re-encodes. Target (issue #5): a click costs <= 5 % of one encode for the SAM2 family.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _paths import DEMO  # benchmarks/ is on sys.path when a script runs

from ibisagent.datasets import list_biomedparse
from ibisagent.io import read_image, read_mask
from ibisagent.simulator import click_with_oracle
from ibisagent.tools import TOOLS, build_tool

DEFAULT_DATA = DEMO
# SAM2 / MedSAM2 re-run only the prompt encoder and mask decoder per click.
TARGET_PERCENT = {"sam2": 5.0, "medsam2": 5.0}
# The library each tool needs beyond torch; a missing one is reported as skipped, not as a failure.
NEEDS = {"sam2": "sam2", "medsam2": "sam2", "sam": "segment_anything", "medsam": "segment_anything"}


def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer read after it covers the work (set_image returns early on CUDA)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _pick_images(data: Path, n_images: int, n_targets: int) -> list[tuple[Path, list]]:
    """`n_images` demo images spread evenly over the sorted list (so several modalities), each with its first
    `n_targets` masks."""
    by_image: dict[Path, list] = defaultdict(list)
    for sample in list_biomedparse(data):
        by_image[sample.image].append(sample)
    images = sorted(by_image)
    if not images:
        sys.exit(f"no image/mask pairs under {data}")
    picks = sorted({int(i) for i in np.linspace(0, len(images) - 1, min(n_images, len(images)))})
    return [(images[i], by_image[images[i]][:n_targets]) for i in picks]


def bench_tool(
    name: str, picks: list[tuple[Path, list]], clicks: int, device: str, config: str | None, warmup: bool = True
) -> dict:
    """Time one tool: encode seconds per image, predict seconds per click, and the encode-count check."""
    t0 = time.perf_counter()
    tool = build_tool(name, None, config, device)
    build_s = time.perf_counter() - t0
    if warmup:  # lazy initialisation, allocator, kernel selection: outside the figures
        first_image = read_image(picks[0][0])
        tool.set_image(first_image)
        click_with_oracle(tool, read_mask(picks[0][1][0].mask, first_image.shape[:2]), 1)
        _sync(device)

    encodes, predicts, reencoded = [], [], []
    for image_path, samples in picks:
        image = read_image(image_path)
        before = tool.encode_count
        t0 = time.perf_counter()
        tool.set_image(image)
        _sync(device)
        encodes.append(time.perf_counter() - t0)
        for sample in samples:
            run = click_with_oracle(tool, read_mask(sample.mask, image.shape[:2]), clicks)
            predicts += run.seconds  # predict returns numpy masks, so each call has synchronised already
        if tool.encode_count - before != 1:
            reencoded.append(f"{image_path.name}: {tool.encode_count - before} encodes")
    assert not reencoded, f"{name}: the embedding was not reused across clicks ({'; '.join(reencoded)})"
    return {"build": build_s, "encodes": encodes, "predicts": predicts, "images": len(picks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BiomedParse split folder (or one above)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)}")
    parser.add_argument("--images", type=int, default=3, help="demo images, spread over the sorted list")
    parser.add_argument("--targets", type=int, default=2, help="masks per image, all on one encoding")
    parser.add_argument("--clicks", type=int, default=5, help="oracle clicks per mask")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sam-config", default="vit_b", help="model type of the sam/medsam tools")
    parser.add_argument(
        "--no-warmup", action="store_true", help="time the very first encode and click too (saves one encode)"
    )
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    picks = _pick_images(args.data, args.images, args.targets)
    n_masks = sum(len(s) for _, s in picks)
    print(
        f"{len(picks)} images ({', '.join(p.stem for p, _ in picks)}), {n_masks} masks, up to {args.clicks} "
        f"oracle clicks each, device {args.device}, random weights"
        f"{'' if args.no_warmup else '; one warm-up encode and click per tool, not timed'}\n"
    )
    print("| tool | build s | encode s (mean) | click s (mean) | click s (p95) | clicks | click / encode | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    verdicts = []
    for name in names:
        module = NEEDS.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"| {name} | skipped: not installed (`{module}`) | | | | | | |")
            continue
        config = args.sam_config if name in ("sam", "medsam") else None
        r = bench_tool(name, picks, args.clicks, args.device, config, warmup=not args.no_warmup)
        encode, clicks = float(np.mean(r["encodes"])), np.asarray(r["predicts"])
        mean, p95 = float(clicks.mean()), float(np.percentile(clicks, 95))
        percent = 100.0 * mean / encode if encode > 0 else float("inf")
        target = TARGET_PERCENT.get(name)
        if target is None:
            verdict = "-"
        else:
            ok = percent <= target
            verdict = f"{'PASS' if ok else 'FAIL'} (<= {target:g} %)"
            verdicts.append(ok)
        print(
            f"| {name} | {r['build']:.2f} | {encode:.4f} | {mean:.4f} | {p95:.4f} | {clicks.size} | "
            f"{percent:.1f} % | {verdict} |"
        )
    print("\nencode_count rose by exactly 1 per image for every tool run (embedding reused across clicks and masks)")
    if verdicts:
        print(f"SAM2-family target (click <= 5 % of one encode): {'PASS' if all(verdicts) else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
