"""Trajectory generation speed per tool: samples/s of `ibisagent_training.generate.generate` on the demo data and
where the time goes (encode / tool / simulator / I/O / other).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_datagen.py --limit 6
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_datagen.py --tools sam2 --limit 20 --self-correction 0.5
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_datagen.py --tools sam2 --workers 2

Each tool writes into a fresh temporary folder (no resume), with the model tools on random weights (checkpoint None):
the architecture sets the cost, but random masks rarely reach `--stop-iou`, so their episodes run `--max-steps`
clicks, as the hardest real samples do. A sample is one written trajectory record (one per mask and variant).
The split: encode, tool (predict) and simulator (the oracle's clicks) are summed over the records by `run_summary`;
I/O (reading images and masks) comes from `generate`'s own summary; other = wall - all of them (building the tool,
rendering observations, RLE and JSON writing). With `--workers N` the split sums the workers' seconds, so it can
exceed the wall time; other is then what the split does not explain (negative when the workers overlap).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _paths import DEMO  # benchmarks/ is on sys.path when a script runs

from ibisagent.tools import TOOLS, build_tool

DEFAULT_DATA = DEMO


def bench_tool(name: str, args: argparse.Namespace) -> dict:
    """One generate run with tool `name` into a temporary folder; its counts, wall seconds and time split."""
    # Import MONAI (the dataset) and the tool's libraries, and build the tool once, outside the timed run; generate
    # builds its own.
    import monai.data  # noqa: F401

    from ibisagent_training.generate import GenerateConfig, generate, run_summary

    t0 = time.perf_counter()
    build_tool(name, None, None, args.device)
    build_s = time.perf_counter() - t0
    config = GenerateConfig(
        tool=name,
        device=args.device,
        max_steps=args.max_steps,
        stop_iou=args.stop_iou,
        self_correction=args.self_correction,
        user_inconsistency=args.user_inconsistency,
        workers=args.workers,
    )
    with tempfile.TemporaryDirectory(prefix="bench_datagen_") as out:
        t0 = time.perf_counter()
        result = generate(args.data, out, config, limit=args.limit, progress=False)
        wall = time.perf_counter() - t0
        summary = run_summary(out)
    counts = summary["counts"]
    split = {k: summary["seconds"].get(k, 0.0) for k in ("encode", "tool", "simulator")}
    split["io"] = result["seconds"]["io"]
    split["other"] = wall - sum(split.values())
    return {
        "samples": result["written"],
        "kept": sum(v for k, v in counts.items() if k.endswith("/kept")),
        "wall": wall,
        "build": build_s,
        "split": split,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BiomedParse dataset or split folder")
    parser.add_argument("--tools", default="classical,sam2", help=f"comma-separated subset of {', '.join(TOOLS)}")
    parser.add_argument("--limit", type=int, default=6, help="masks per tool (whole images first, sorted)")
    parser.add_argument("--max-steps", type=int, default=20, help="click steps per episode at most")
    parser.add_argument("--stop-iou", type=float, default=0.9, help="the oracle stops at this IoU")
    parser.add_argument("--self-correction", type=float, default=0.0, help="fraction with a self-correction variant")
    parser.add_argument("--user-inconsistency", type=float, default=0.0, help="fraction with a wrong-initial-mask one")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the run (GenerateConfig.workers)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")

    import torch

    print(
        f"{args.limit} masks of {args.data.name}, max {args.max_steps} steps, stop IoU {args.stop_iou}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, {args.workers} worker process(es), "
        "model tools on random weights\n"
    )
    print("| tool | samples | kept | wall s | samples/s | encode | tool | simulator | I/O | other | build s (apart) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = bench_tool(name, args)
        split = "".join(f" {v:.1f} s ({100 * v / r['wall']:.0f} %) |" for v in r["split"].values())
        print(
            f"| {name} | {r['samples']} | {r['kept']} | {r['wall']:.1f} | {r['samples'] / r['wall']:.3f} |"
            f"{split} {r['build']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
