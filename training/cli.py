"""The `ibisagent-train` command line: data (trajectories, stats, coco-json) and training (sft, grpo).

One flag convention for the whole family: options are spelled like their config fields, with underscores
(`--stop_iou`, `--tool_config`, `--model_name_or_path`), as trl's parser spells sft's and grpo's; a dashed spelling
(`--stop-iou`) is accepted everywhere. The tool's options are the core's `ToolSpec` fields (`--tool`, `--checkpoint`,
`--tool_config`) in trajectories and grpo alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from . import grpo, sft
from .data import write_coco_json
from .generate import GenerateConfig, Shard, generate, merge_stats, run_summary, stats_markdown


def add_dataclass_args(parser: argparse.ArgumentParser, cls, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """One `--option` per dataclass field, spelled like the field with underscores (`--stop_iou`), as trl's parser
    spells the sft and grpo options, with the field's help, default and choices. The dashed spelling (`--stop-iou`)
    and any `aliases` of a field (older names) are accepted too, without a line in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        helptext = f.metadata.get("help", "")
        if hint is bool:
            options = {"action": argparse.BooleanOptionalAction, "default": f.default, "help": helptext}
        else:
            base = next((t for t in (int, float, str) if hint is t or t in typing.get_args(hint)), str)
            options = {
                "type": base,
                "default": f.default,
                "choices": f.metadata.get("choices"),
                "help": helptext if "default" in helptext else f"{helptext} (default: {f.default})",
            }
        parser.add_argument(f"--{f.name}", dest=f.name, **options)
        hidden = ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []) + list((aliases or {}).get(f.name, ()))
        for alias in hidden:
            parser.add_argument(
                alias, dest=f.name, **{**options, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            )


def _from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _trajectories(args: argparse.Namespace) -> int:
    config = _from_args(GenerateConfig, args)
    summary = generate(args.root, args.out, config, Shard.parse(args.shard), args.split, args.limit)
    print(json.dumps(summary, indent=1))
    return 0


def _stats(args: argparse.Namespace) -> int:
    for by in args.by:
        stats = merge_stats(args.folder, by)
        print(stats_markdown(stats, by) + "\n")
        if args.json:
            Path(args.json).with_suffix(f".{by}.json").write_text(json.dumps(stats, indent=1))
    summary = run_summary(args.folder)
    print("records:", ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())))
    total = sum(summary["seconds"].values()) or 1.0
    print("seconds:", ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in summary["seconds"].items()))
    return 0


def _coco_json(args: argparse.Namespace) -> int:
    print(f"wrote {write_coco_json(args.split_folder, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the data subcommands (trajectories, stats, coco-json); sft and grpo parse their own options."""
    parser = argparse.ArgumentParser(prog="ibisagent-train", description="IBISAgent training: data, SFT and RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("trajectories", help="simulate click trajectories over BiomedParse data (resumable, shardable)")
    tr.add_argument("root", help="a BiomedParse split folder, dataset folder, or a folder of dataset folders")
    tr.add_argument("--out", required=True, help="output folder (trajectories-<i>-of-<n>.jsonl, problems-*.jsonl)")
    tr.add_argument("--shard", default="0/1", help="i/n: take every n-th image starting at i (default 0/1)")
    tr.add_argument("--split", help="split name (e.g. train); default: the one split found")
    tr.add_argument("--limit", type=int, help="at most this many masks of the shard")
    add_dataclass_args(tr, GenerateConfig, aliases={"tool_config": ("--config",)})  # the tool config's older name
    st = sub.add_parser("stats", help="trajectory statistics per modality and dataset group (paper Tab. 6/11)")
    st.add_argument("folder", help="an output folder of `trajectories`")
    st.add_argument("--by", nargs="+", default=["modality", "group"], choices=["modality", "group"])
    st.add_argument("--json", help="also write the tables as <json>.<by>.json")
    cj = sub.add_parser("coco-json", help="write a split's COCO-style <split>.json from its file names")
    cj.add_argument("split_folder")
    cj.add_argument("--out", help="output path (default: <dataset>/<split>.json)")
    sub.add_parser("sft", help="cold-start SFT with trl (see `ibisagent-train sft --help`)")
    sub.add_parser("grpo", help="agentic RL with GRPO (see `ibisagent-train grpo --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # sft and grpo take their options from trl's parser (dataclasses + yaml), see `ibisagent-train sft --help`
    if argv[:1] == ["sft"]:
        return sft.main(argv[1:])
    if argv[:1] == ["grpo"]:
        return grpo.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"trajectories": _trajectories, "stats": _stats, "coco-json": _coco_json}[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ibisagent-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
