"""The `ibisagent-train` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _trajectories(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ibisagent.datasets import list_biomedparse
    from ibisagent.episode import Episode
    from ibisagent.io import read_image, read_mask
    from ibisagent.loop import run_episode
    from ibisagent.policies import OraclePolicy
    from ibisagent.tools import build_tool

    samples = list_biomedparse(args.folder)[: args.limit]
    tool = build_tool(args.tool, args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for s in tqdm(samples, desc="trajectories", unit="mask", file=sys.stderr):
            image = read_image(s.image)
            gt = {s.target: read_mask(s.mask, image.shape[:2])}
            episode = Episode(tool, image, [s.target], max_steps=args.max_steps)
            traj = run_episode(OraclePolicy(gt, iou_threshold=args.stop_iou), episode, f"segment the {s.target}", gt=gt)
            traj.meta.update({"image": str(s.image), "mask": str(s.mask), "modality": s.modality, "site": s.site})
            f.write(json.dumps(traj.to_dict()) + "\n")
    print(f"wrote {len(samples)} trajectories to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ibisagent-train", description="IBISAgent training: data, SFT and RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("trajectories", help="simulate oracle click trajectories over a BiomedParse folder (JSONL)")
    tr.add_argument("folder", help="BiomedParse split folder")
    tr.add_argument("--out", required=True, help="output JSONL file, one trajectory per line")
    tr.add_argument("--tool", default="classical")
    tr.add_argument("--checkpoint")
    tr.add_argument("--max-steps", type=int, default=20)
    tr.add_argument("--stop-iou", type=float, default=0.9)
    tr.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    try:
        return _trajectories(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ibisagent-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
