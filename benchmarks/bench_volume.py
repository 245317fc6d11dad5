"""Issue #21's numbers for volumes: 3D Dice of propagation alone and with repair, clicks per volume against
slice-by-slice 2D to the same Dice, seconds per propagated slice (classical and SAM2 with random weights), and peak
memory of classical propagation through a 512x512xD volume.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_volume.py                 # all parts (~3 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_volume.py --skip-sam2 --depth 60

Part 1 runs `ibisagent.evaluation.volumes` (the `ibisagent eval --volume` methods) on the 6 RECIST CT volumes with
the classical tool. Goal (issue #21): 3D Dice >= 0.85 with fewer than half the clicks of slice-2d *to the same Dice*:
slice-2d is also run with per-slice Dice targets `--slice-2d-targets`, which gives its clicks as a function of the 3D
Dice it reaches, and each method's clicks are compared with slice-2d's clicks at the method's own 3D Dice (linear
interpolation between the two nearest points of that curve).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc

import numpy as np
from _paths import SHARED_DATA

from ibisagent.evaluation.cases import read_volumes
from ibisagent.evaluation.volumes import VolumeSettings, evaluate_volumes, volume_methods, volume_summary
from ibisagent.tools.classical import ClassicalTool
from ibisagent.volume import Propagator, SliceStack, ToolPropagator

RECIST = SHARED_DATA / "medsam2-recist-npz"


def seconds_per_slice(propagator, volume: np.ndarray, gt: np.ndarray) -> float:
    """Propagate the largest ground-truth slice's mask over the whole volume (both ways); seconds per slice."""
    stack = SliceStack(volume, 2)
    propagator.set_volume(stack)
    key = int(np.argmax(gt.sum((0, 1))))
    propagator.add_anchor(key, gt[:, :, key].T)
    t0, n = time.perf_counter(), 0
    for direction, stop in ((1, len(stack) - 1), (-1, 0)):
        if key != stop:
            n += sum(1 for _ in propagator.propagate(key, direction, stop))
    propagator.close()
    return (time.perf_counter() - t0) / max(n, 1)


def peak_memory(depth: int) -> tuple[float, float]:
    """(seconds per slice, peak memory in MB that propagation allocates beyond the volume and its label) of
    classical propagation through a synthetic 512x512x`depth` uint8 volume holding an ellipsoid."""
    i, j, k = np.ogrid[:512, :512, :depth]
    blob = ((i - 256) / 60.0) ** 2 + ((j - 240) / 45.0) ** 2 + ((k - depth / 2) / (depth / 2.5)) ** 2 <= 1
    rng = np.random.default_rng(0)
    volume = np.clip(60 + 100 * blob + rng.normal(0, 8, blob.shape), 0, 255).astype(np.uint8)
    tracemalloc.start()  # after the test volume is built: its float temporaries are not the session's
    spent = seconds_per_slice(ToolPropagator(ClassicalTool()), volume, blob)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return spent, peak


def slice_2d_curve(cases, tool, propagator: Propagator, targets, settings: VolumeSettings) -> list[tuple]:
    """slice-2d at each per-slice Dice target: [(target, mean 3D Dice, mean clicks per volume)], by 3D Dice."""
    (method,) = volume_methods(["slice-2d"])
    curve = []
    for target in targets:
        with tempfile.TemporaryDirectory() as out:
            s = VolumeSettings(target_dice=target, repair_budget=settings.repair_budget, max_steps=settings.max_steps)
            rows = evaluate_volumes(cases, [method], tool, propagator, out, s, progress=False)
        curve.append((target, float(np.mean([r["dice3d"] for r in rows])), float(np.mean([r["clicks"] for r in rows]))))
    return sorted(curve, key=lambda p: p[1])


def clicks_at(curve: list[tuple], dice3d: float) -> float | None:
    """slice-2d's clicks per volume at 3D Dice `dice3d` (linear between the curve's points); None beyond them."""
    for (_, d0, c0), (_, d1, c1) in zip(curve, curve[1:]):
        if d0 <= dice3d <= d1:
            return c0 + (c1 - c0) * (dice3d - d0) / max(d1 - d0, 1e-9)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=200, help="slices of the synthetic volume (default 200)")
    parser.add_argument("--skip-sam2", action="store_true", help="no SAM2 timing")
    parser.add_argument("--repair-budget", type=int, default=5)
    parser.add_argument(
        "--slice-2d-targets",
        default="0.7,0.75,0.8,0.85,0.9",
        help="per-slice Dice targets of the slice-2d curve (comma-separated; empty: no curve)",
    )
    args = parser.parse_args()
    if not RECIST.is_dir():
        print(f"RECIST volumes not found at {RECIST}", file=sys.stderr)
        return 1
    cases = read_volumes(RECIST)
    tool = ClassicalTool()
    methods = volume_methods(["propagate", "audit-repair", "oracle-repair", "slice-2d"])
    settings = VolumeSettings(repair_budget=args.repair_budget)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        rows = evaluate_volumes(cases, methods, tool, ToolPropagator(tool), out, settings, progress=False)
    print(f"## {len(cases)} RECIST CT volumes, classical tool, repair budget {args.repair_budget}\n")
    print(volume_summary(rows, [m.name for m in methods]))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    targets = [float(t) for t in args.slice_2d_targets.split(",") if t.strip()]
    if targets:
        curve = slice_2d_curve(cases, tool, ToolPropagator(tool), targets, settings)
        print("\nslice-2d per-slice Dice target -> 3D Dice %, clicks / volume:")
        print("  " + "; ".join(f"{t:.2f} -> {100 * d:.2f}, {c:.1f}" for t, d, c in curve))
        for m in methods[:3]:
            rs = [r for r in rows if r["method"] == m.name]
            d, c = float(np.mean([r["dice3d"] for r in rs])), float(np.mean([r["clicks"] for r in rs]))
            ref = clicks_at(curve, d)
            same = f"slice-2d needs {ref:.1f} at that Dice: {c / ref:.2f}x" if ref else "outside the slice-2d curve"
            print(f"  {m.name}: 3D Dice {100 * d:.2f} with {c:.1f} clicks; {same}")
    volume, gt = cases[1].load()
    print(
        f"\nclassical propagation: {seconds_per_slice(ToolPropagator(ClassicalTool()), volume, gt):.3f} s/slice (512x512)"
    )
    if not args.skip_sam2:
        from ibisagent.tools.sam2_video import SAM2VideoPropagator

        sam2 = SAM2VideoPropagator.from_checkpoint(None, medsam2=True)
        print(f"MedSAM2 video propagation, random weights: {seconds_per_slice(sam2, volume, gt):.3f} s/slice (512x512)")
    spent, peak = peak_memory(args.depth)
    print(f"classical propagation through 512x512x{args.depth}: {spent:.3f} s/slice, peak memory {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
