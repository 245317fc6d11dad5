"""The `ibisagent` command line: `segment` one image with an instruction, `oracle` a BiomedParse folder, `eval` a
policy and baselines over a benchmark."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ibisagent.episode import Episode
from ibisagent.evaluation.cases import CT_WINDOWS, FORMATS, JSON_SCHEMA, BenchmarkError
from ibisagent.grammar import ActionParseError, target_from_instruction
from ibisagent.io import ImageReadError, read_image, read_mask, write_image, write_mask
from ibisagent.loop import run_episode
from ibisagent.metrics import dice, iou, noc
from ibisagent.render import overlay
from ibisagent.specs import PolicySpec, SpecError, ToolSpec, add_arguments, from_namespace
from ibisagent.tools import ToolError
from ibisagent.trajectory import Trajectory, TrajectoryFormatError
from ibisagent.types import MAX_INSTRUCTION_CHARS


class UsageError(ValueError):
    """A command-line argument is wrong; the message says which and what to do."""


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("segmentation tool")
    add_arguments(g, ToolSpec)
    g.add_argument("--device", default="cpu", help="torch device for model tools and the VLM (cpu, cuda, cuda:1)")


def _add_vlm_args(g: argparse._ArgumentGroup) -> None:
    add_arguments(g, PolicySpec)


def _vlm_policy(args: argparse.Namespace):
    """The Hugging Face VLM policy of the `PolicySpec` flags, on --device."""
    return from_namespace(PolicySpec, args).build(args.device)


def _tool(args: argparse.Namespace):
    """The segmentation tool of the `ToolSpec` flags, on --device."""
    return from_namespace(ToolSpec, args).build(args.device)


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
    pol.add_argument("--gt-mask", help="ground-truth mask: run the oracle policy (upper bound; also scores each step)")
    pol.add_argument("--replay", help="trajectory JSON to play back")
    _add_vlm_args(pol)
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

    ev = sub.add_parser(
        "eval",
        help="evaluate a policy and baselines over a benchmark: tables, plots, an HTML report",
        description="Run the agent (--model) and/or baselines (--baselines) with a segmentation tool over a benchmark; "
        "write results.csv, summary.md/.csv, plots and report.html into --out.",
        epilog="JSON benchmark schema (--format json):\n\n" + JSON_SCHEMA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "benchmark",
        help="a BiomedParse split folder, a JSON/JSONL list (schema below), or volumes: an .npz file/folder "
        "(imgs, gts) or NIfTI volume(s) with labels",
    )
    ev.add_argument("--format", default="auto", choices=FORMATS, help="benchmark kind (default: from the path)")
    ev.add_argument("--out", required=True, help="output folder (results.csv, summary.md, report.html, ...)")
    ev.add_argument(
        "--baselines",
        default="",
        help="comma-separated, any of oracle (oracle clicks, the upper bound), box (the tool with the gt box, given "
        "as its centre + 4 outside-corner clicks), center (the tool with one click at the gt's deepest pixel), "
        "image-center (the tool with one click at the image's centre pixel: a control that does not know the target)",
    )
    ev.add_argument("--max-steps", type=int, default=20, help="step limit of the agent and the oracle (default 20)")
    ev.add_argument("--max-invalid", type=int, default=1, help="end an episode after N unusable outputs in a row")
    ev.add_argument("--oracle-stop-iou", type=float, default=0.9, help="the oracle stops at this IoU (default 0.9)")
    ev.add_argument("--limit", type=int, help="only the first N cases")
    ev.add_argument("--max-side", type=int, help="downscale images (and masks) to this longer side first")
    ev.add_argument("--resume", action="store_true", help="continue the run in --out: only missing cases are run")
    ev.add_argument("--html-cases", type=int, help="per-case sections in report.html at most (default: all)")
    ev.add_argument("--thumb", type=int, default=256, help="thumbnail size in report.html, pixels (default 256)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench = ev.add_argument_group("benchmark options")
    bench.add_argument("--image-root", help="JSON: folder that relative paths start from (default: the JSON's)")
    bench.add_argument("--modality", help="JSON: modality of entries without one (unknown); volumes: (CT)")
    bench.add_argument("--labels", help="NIfTI: the label volume (or folder) of the image volume (or folder)")
    bench.add_argument(
        "--slices", default="largest", help="volumes: largest | largest:N | every:K | all (labelled slices)"
    )
    bench.add_argument(
        "--window",
        default="soft-tissue",
        help=f"volumes: CT window for NIfTI/non-uint8 images: {', '.join(CT_WINDOWS)}, percentile or LO,HI "
        "(write --window=-160,240)",
    )
    bench.add_argument("--target", default="lesion", help="volumes: target name in the question (default lesion)")
    bench.add_argument("--label-value", type=int, help="volumes: the foreground label (default: every label > 0)")
    vol = ev.add_argument_group("volumes in 3D (--volume)")
    vol.add_argument(
        "--volume",
        action="store_true",
        help="segment whole volumes: key slice, propagation, audit, repair; --baselines from propagate, "
        "audit-repair, oracle-repair, slice-2d (see ibisagent.evaluation.volumes)",
    )
    vol.add_argument("--repair-budget", type=int, default=5, help="slices repaired per volume at most (default 5)")
    vol.add_argument(
        "--target-dice",
        type=float,
        default=0.85,
        help="oracle-repair fixes slices below this Dice; slice-2d clicks each slice to it (default 0.85)",
    )
    _add_vlm_args(ev.add_argument_group("agent policy (with --model)"))
    _add_tool_args(ev)
    return parser


def _check_out(out: Path) -> Path:
    """--out as an output folder, created first so that a path that cannot be one fails before any work."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the outputs (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the output folder ({exc.strerror or exc})") from exc
    return out


def _replay_policy(path: Path):
    from ibisagent.policies import ReplayPolicy

    if not path.is_file():
        raise UsageError(f"--replay {path}: no such file")
    try:
        return ReplayPolicy.from_trajectory(Trajectory.from_json(path))
    except TrajectoryFormatError as exc:
        raise UsageError(f"--replay {path}: not a usable trajectory JSON: {str(exc)[:300]}") from exc


def _segment(args: argparse.Namespace) -> int:
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; say what to segment, e.g. --instruction 'segment the liver'")
    if len(args.instruction) > MAX_INSTRUCTION_CHARS:
        raise UsageError(
            f"--instruction is {len(args.instruction)} characters; give at most {MAX_INSTRUCTION_CHARS} "
            "(one sentence that says what to segment)"
        )
    if args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    chosen = [n for n in ("model", "gt_mask", "replay") if getattr(args, n)]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one policy: --model <checkpoint>, --gt-mask <mask> (oracle) or --replay <trajectory.json>"
        )
    out = _check_out(Path(args.out))
    image = read_image(args.image, args.slice, args.axis)
    size = image.shape[:2]
    target = args.target or target_from_instruction(args.instruction)
    initial = {target: read_mask(args.initial_mask, size, args.slice, args.axis)} if args.initial_mask else None
    gt = {target: read_mask(args.gt_mask, size, args.slice, args.axis)} if args.gt_mask else None
    if args.model:
        policy = _vlm_policy(args)
    elif gt is not None:
        from ibisagent.policies import OraclePolicy

        policy = OraclePolicy(gt, dialect=args.dialect)
    else:
        policy = _replay_policy(Path(args.replay))
    tool = _tool(args)
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

    if args.max_clicks < 1:
        raise UsageError(f"--max-clicks must be at least 1, got {args.max_clicks}")
    if not 0 < args.stop_iou <= 1:
        raise UsageError(f"--stop-iou must be in (0, 1], got {args.stop_iou}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    samples = list_biomedparse(args.folder)[: args.limit]
    if not samples:
        raise UsageError(f"{args.folder}: no image/mask pairs found")
    tool = _tool(args)
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


def _eval(args: argparse.Namespace) -> int:
    from ibisagent.evaluation import agent_method, baseline_methods, evaluate, load_benchmark, write_report
    from ibisagent.evaluation.runner import write_run_info

    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not args.model and not baselines:
        examples = "propagate,audit-repair,oracle-repair,slice-2d" if args.volume else "oracle,box,center"
        raise UsageError(f"nothing to evaluate: give the agent (--model <checkpoint>) and/or --baselines {examples}")
    if args.volume:
        return _eval_volumes(args, baselines)
    for name, value, low in (("--max-steps", args.max_steps, 1), ("--max-invalid", args.max_invalid, 1)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if not 0 < args.oracle_stop_iou <= 1:
        raise UsageError(f"--oracle-stop-iou must be in (0, 1], got {args.oracle_stop_iou}")
    if args.thumb < 32:
        raise UsageError(f"--thumb must be at least 32 pixels, got {args.thumb}")
    fmt, cases = load_benchmark(
        args.benchmark,
        args.format,
        limit=args.limit,
        max_side=args.max_side,
        image_root=args.image_root,
        modality=args.modality,
        labels=args.labels,
        slices=args.slices,
        window=args.window,
        target=args.target,
        label_value=args.label_value,
    )
    methods = baseline_methods(baselines, args.max_steps, args.oracle_stop_iou)  # checks the names before loading
    if args.model:
        methods.insert(0, agent_method(_vlm_policy(args), args.max_steps, f"{args.model} ({args.dialect} dialect)"))
    tool = _tool(args)
    settings = {
        k: getattr(args, k)
        for k in ("max_side", "slices", "window", "label_value", "image_root", "labels", "oracle_stop_iou", "model")
    }
    info = write_run_info(
        args.out,
        {
            "benchmark": str(Path(args.benchmark).resolve()),
            "format": fmt,
            "tool": args.tool,
            "checkpoint": args.checkpoint,
            "tool_config": args.tool_config,
            "max_steps": args.max_steps,
            "noc_max": args.max_steps,
            "settings": settings,
            "method_labels": {m.name: m.label for m in methods},
            "cases": len(cases),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "ibisagent " + " ".join(sys.argv[1:]),
        },
        args.resume,
    )
    print(
        f"eval: {len(cases)} cases ({fmt}) x {', '.join(m.name for m in methods)} with the {args.tool} tool -> {args.out}"
    )
    rows = evaluate(
        cases,
        methods,
        tool,
        args.out,
        noc_max=args.max_steps,
        max_invalid=args.max_invalid,
        resume=args.resume,
        progress=not args.no_progress,
    )
    paths = write_report(args.out, cases, rows, [m.name for m in methods], info, args.thumb, args.html_cases)
    print(Path(paths["summary.md"]).read_text().split("## Per modality")[0].split("## Overall")[-1].strip())
    failures = sum(1 for r in rows if r["failure"])
    print(f"{failures} failure(s) in {len(rows)} case x method rows; see results.csv" if failures else "no failures")
    print(f"wrote {', '.join(sorted(paths))}, results.csv, masks/ and trajectories/ in {args.out}")
    return 0


def _eval_volumes(args: argparse.Namespace, baselines: list[str]) -> int:
    """`eval --volume`: whole volumes in 3D (`ibisagent.evaluation.volumes`)."""
    from ibisagent.evaluation.cases import read_volumes
    from ibisagent.evaluation.runner import write_run_info
    from ibisagent.evaluation.volumes import (
        VolumeSettings,
        agent_volume_method,
        evaluate_volumes,
        volume_methods,
        write_volume_summary,
    )
    from ibisagent.tools import build_propagator

    for name, value, low in (("--max-steps", args.max_steps, 1), ("--repair-budget", args.repair_budget, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    for name, value in (("--oracle-stop-iou", args.oracle_stop_iou), ("--target-dice", args.target_dice)):
        if not 0 < value <= 1:
            raise UsageError(f"{name} must be in (0, 1], got {value}")
    if args.format not in ("auto", "volumes"):
        raise UsageError(f"--volume reads volumes (.npz or NIfTI), not --format {args.format}")
    if not args.resume and (Path(args.out) / "results.csv").exists():  # before run.json is rewritten
        raise UsageError(
            f"{Path(args.out) / 'results.csv'} exists; pass --resume to continue that run, or choose another --out"
        )
    cases = read_volumes(args.benchmark, args.labels, args.window, args.modality or "CT", args.target, args.label_value)
    cases = cases[: args.limit] if args.limit else cases
    methods = volume_methods(baselines)
    if args.model:
        methods.insert(0, agent_volume_method(_vlm_policy(args), f"{args.model} ({args.dialect} dialect)"))
    tool = _tool(args)
    propagator = build_propagator(tool, args.checkpoint, args.tool_config, args.device)
    settings = VolumeSettings(args.oracle_stop_iou, args.target_dice, args.repair_budget, args.max_steps)
    write_run_info(
        args.out,
        {
            "benchmark": str(Path(args.benchmark).resolve()),
            "format": "volumes-3d",
            "tool": args.tool,
            "checkpoint": args.checkpoint,
            "tool_config": args.tool_config,
            "max_steps": args.max_steps,
            "settings": {**vars(settings), "window": args.window, "label_value": args.label_value, "model": args.model},
            "method_labels": {m.name: m.label for m in methods},
            "cases": len(cases),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "ibisagent " + " ".join(sys.argv[1:]),
        },
        args.resume,
    )
    print(f"eval: {len(cases)} volumes x {', '.join(m.name for m in methods)} with the {args.tool} tool -> {args.out}")
    rows = evaluate_volumes(
        cases, methods, tool, propagator, args.out, settings, resume=args.resume, progress=not args.no_progress
    )
    summary = write_volume_summary(args.out, rows, methods)
    print(summary.read_text().split("## Overall")[-1].strip())
    failures = sum(1 for r in rows if r["failure"])
    print(f"{failures} failure(s) in {len(rows)} volume x method rows; see results.csv" if failures else "no failures")
    print(f"wrote summary.md, results.csv and records/ in {args.out}")
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
        return {"segment": _segment, "oracle": _oracle, "eval": _eval}[args.command](args)
    except (
        UsageError,
        SpecError,
        BenchmarkError,
        ImageReadError,
        ToolError,
        ActionParseError,
        FileNotFoundError,
    ) as exc:
        print(f"ibisagent: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the outputs failed: a full disk, no permission
        print(f"ibisagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
