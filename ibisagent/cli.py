"""The `ibisagent` command line: `segment` one image with an instruction, `oracle` a BiomedParse folder."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ibisagent.episode import Episode
from ibisagent.grammar import DIALECTS, ActionParseError, target_from_instruction
from ibisagent.io import ImageReadError, read_image, read_mask, write_image, write_mask
from ibisagent.loop import run_episode
from ibisagent.metrics import dice, iou, noc
from ibisagent.render import overlay
from ibisagent.tools import TOOLS, ToolError, build_tool


class UsageError(ValueError):
    """A command-line argument is wrong; the message says which and what to do."""


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("segmentation tool")
    g.add_argument(
        "--tool", default="classical", choices=TOOLS, help="segmentation tool (default: classical, needs no weights)"
    )
    g.add_argument(
        "--checkpoint",
        help="weights file of a model tool (e.g. MedSAM2_latest.pt); omitted: random weights, tests only",
    )
    g.add_argument(
        "--tool-config", help="model config: a SAM2.1 config name (sam2.1_hiera_t ...) or a SAM type (vit_b ...)"
    )
    g.add_argument("--device", default="cpu", help="torch device for model tools and the VLM (cpu, cuda, cuda:1)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibisagent", description="Agentic interactive biomedical segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment one image following an instruction")
    seg.add_argument("image", help="PNG/JPG image, NIfTI volume (.nii/.nii.gz, one slice) or DICOM file")
    seg.add_argument("--instruction", "-i", required=True, help='what to segment, e.g. "segment the liver tumor"')
    seg.add_argument("--target", help="target name used in click commands (default: taken from the instruction)")
    seg.add_argument("--slice", type=int, help="slice index for a volume (default: the middle slice)")
    seg.add_argument(
        "--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis for a volume (default 2, axial)"
    )
    seg.add_argument("--initial-mask", help="mask to refine (PNG or NIfTI of the image's size)")
    pol = seg.add_argument_group("policy (one of --model, --gt-mask, --replay)")
    pol.add_argument("--model", help="Qwen2.5-VL-compatible checkpoint: local folder or hub id")
    pol.add_argument("--gt-mask", help="ground-truth mask: run the oracle policy (upper bound; also scores each step)")
    pol.add_argument("--replay", help="trajectory JSON to play back")
    pol.add_argument("--dialect", choices=DIALECTS, default="ibis", help="action grammar: ibis (paper) or released")
    pol.add_argument(
        "--history", choices=("full", "current"), default="full", help="VLM context: all turns or the current one"
    )
    pol.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    pol.add_argument("--temperature", type=float, default=1.0)
    pol.add_argument("--seed", type=int, default=0)
    seg.add_argument("--max-steps", type=int, default=20, help="step limit (default 20)")
    seg.add_argument("--out", default="ibisagent-out", help="output folder (mask.png, trajectory.json, step_XX.png)")
    seg.add_argument("--profile", action="store_true", help="print the time per step: policy, parse, tool, render")
    _add_tool_args(seg)

    ora = sub.add_parser("oracle", help="run the oracle clicker with a tool over a BiomedParse-format folder")
    ora.add_argument("folder", help="BiomedParse split folder (images) beside <split>_mask, or a folder above one")
    ora.add_argument("--max-clicks", type=int, default=20)
    ora.add_argument("--stop-iou", type=float, default=0.9, help="the oracle stops once IoU reaches this (default 0.9)")
    ora.add_argument("--limit", type=int, help="only the first N masks")
    ora.add_argument("--markdown", help="write the per-modality table as Markdown here")
    ora.add_argument("--csv", help="write per-mask rows as CSV here")
    _add_tool_args(ora)
    return parser


def _segment(args: argparse.Namespace) -> int:
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; say what to segment, e.g. --instruction 'segment the liver'")
    chosen = [n for n in ("model", "gt_mask", "replay") if getattr(args, n)]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one policy: --model <checkpoint>, --gt-mask <mask> (oracle) or --replay <trajectory.json>"
        )
    image = read_image(args.image, args.slice, args.axis)
    size = image.shape[:2]
    target = args.target or target_from_instruction(args.instruction)
    initial = {target: read_mask(args.initial_mask, size, args.slice, args.axis)} if args.initial_mask else None
    gt = {target: read_mask(args.gt_mask, size, args.slice, args.axis)} if args.gt_mask else None
    if args.model:
        from ibisagent.policies.hf_vlm import HFVLMPolicy

        policy = HFVLMPolicy.from_pretrained(
            args.model,
            dialect=args.dialect,
            history=args.history,
            do_sample=args.sample,
            temperature=args.temperature,
            seed=args.seed,
            device=args.device,
        )
    elif gt is not None:
        from ibisagent.policies import OraclePolicy

        policy = OraclePolicy(gt, dialect=args.dialect)
    else:
        from ibisagent.policies import ReplayPolicy
        from ibisagent.trajectory import Trajectory

        path = Path(args.replay)
        if not path.is_file():
            raise UsageError(f"--replay {path}: no such file")
        policy = ReplayPolicy.from_trajectory(Trajectory.from_json(path))
    tool = build_tool(args.tool, args.checkpoint, args.tool_config, args.device)
    t0 = time.perf_counter()
    episode = Episode(tool, image, [target], initial_masks=initial, max_steps=args.max_steps)
    encode_s = time.perf_counter() - t0

    def report(step):
        what = (
            "error: " + step.error
            if step.error
            else (step.text.split("<action>")[-1].split("</action>")[0].strip().replace("\n", "; ") or "(answer)")
        )
        score = "".join(f"  IoU {v:.3f}" for k, v in step.metrics.items() if k.startswith("iou/"))
        print(f"step {step.index}: {what[:100]}{score}", flush=True)

    trajectory = run_episode(policy, episode, args.instruction, gt=gt, on_step=report)
    trajectory.meta.update({"image": str(args.image), "tool": args.tool, "encode_seconds": encode_s})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_mask(out / "mask.png", trajectory.final_mask)
    trajectory.to_json(out / "trajectory.json")
    for step in trajectory.steps:
        if step.masks:
            clicks = [c for cs in step.clicks.values() for c in cs]
            union = np.logical_or.reduce(list(step.masks.values()))
            write_image(
                out / f"step_{step.index:02d}.png", overlay(image, union, clicks, marker_radius=max(4, min(size) // 80))
            )
    print(f"stopped: {trajectory.stop_reason}; {trajectory.num_clicks} clicks; answer: {trajectory.answer!r}")
    print(
        f"wrote {out / 'mask.png'}, {out / 'trajectory.json'} and {sum(1 for s in trajectory.steps if s.masks)} step overlays"
    )
    if args.profile:
        print(f"\nimage encode: {encode_s * 1000:.1f} ms")
        print(f"{'step':>4} {'policy ms':>10} {'parse ms':>9} {'tool ms':>8} {'render ms':>10}")
        for s in trajectory.steps:
            t = s.timings
            print(
                f"{s.index:>4} {t.get('policy', 0) * 1e3:>10.1f} {t.get('parse', 0) * 1e3:>9.2f} {t.get('tool', 0) * 1e3:>8.1f} {t.get('render', 0) * 1e3:>10.1f}"
            )
    return 0


def _oracle(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ibisagent.datasets import list_biomedparse
    from ibisagent.policies import OraclePolicy

    samples = list_biomedparse(args.folder)[: args.limit]
    if not samples:
        raise UsageError(f"{args.folder}: no image/mask pairs found")
    tool = build_tool(args.tool, args.checkpoint, args.tool_config, args.device)
    rows, encoded = [], None
    for s in tqdm(samples, desc="oracle", unit="mask", file=sys.stderr):
        if encoded != s.image:
            image, encoded, fresh = read_image(s.image), s.image, True
        gt = read_mask(s.mask, image.shape[:2])
        t0 = time.perf_counter()
        episode = Episode(tool, image, [s.target], max_steps=args.max_clicks, image_is_set=not fresh)
        fresh = False
        traj = run_episode(
            OraclePolicy({s.target: gt}, iou_threshold=args.stop_iou),
            episode,
            f"segment the {s.target}",
            gt={s.target: gt},
        )
        curve = [st.metrics[f"iou/{s.target}"] for st in traj.steps if st.action is not None and st.action.clicks]
        final = traj.final_masks[s.target]
        rows.append(
            {
                "mask": s.mask.name,
                "modality": s.modality,
                "target": s.target,
                "iou": iou(final, gt),
                "dice": dice(final, gt),
                "clicks": len(curve),
                "noc85": noc(curve, 0.85, args.max_clicks),
                "noc90": noc(curve, 0.90, args.max_clicks),
                "seconds": time.perf_counter() - t0,
            }
        )
    table = _table(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def _table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[r["modality"]].append(r)
    groups["all"] = rows
    lines = [
        "| modality | masks | IoU | Dice | clicks | NoC@85 | NoC@90 | s/mask |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("iou", "dice", "clicks", "noc85", "noc90", "seconds")}
        lines.append(
            f"| {name} | {len(rs)} | {mean['iou']:.3f} | {mean['dice']:.3f} | {mean['clicks']:.1f} | {mean['noc85']:.1f} | {mean['noc90']:.1f} | {mean['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _segment(args) if args.command == "segment" else _oracle(args)
    except (UsageError, ImageReadError, ToolError, ActionParseError, FileNotFoundError) as exc:
        print(f"ibisagent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
