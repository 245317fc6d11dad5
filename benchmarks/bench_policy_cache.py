"""Tokens prefilled per trajectory against the final context length, with and without KV-cache reuse, in the
full-history mode of the Hugging Face VLM policy; the step count is forced to N.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_policy_cache.py --steps 9 --episodes 2
    .venv/bin/python benchmarks/bench_policy_cache.py --model /models/ibisagent-7b --device cuda --dtype bfloat16 \
        --tool medsam2 --checkpoint /models/MedSAM2_latest.pt --steps 9

Policy: `HFVLMPolicy(history="full")` around the tiny random Qwen2.5-VL (`build_tiny_qwen2_5_vl`, sizes changeable
with `--tiny '{"hidden_size": 128}'`) or a checkpoint folder (`--model`). Each episode runs through
`ibisagent.loop.run_episode` on a demo image with a real tool, `max_steps` = N and `max_invalid` = N. A random model
seldom writes a usable action, so a wrapper calls the policy's `act` at every step (the model's own text stays in its
conversation and KV cache, as in a real episode) and hands the loop an oracle click instead: every episode lasts
exactly N steps and every observation shows a new mask.

Per trajectory: prefilled = the sum of `prefill_tokens` over its steps; final context = the last step's
`prompt_tokens` + `new_tokens`. Target (issue #5): prefilled <= 1.2x the final context with reuse. Seconds per step
are the policy's own (`episode_stats` seconds) and the whole step (render, policy, parse, tool), minus the oracle
stand-in's time; seconds per case is the episode's wall time minus the stand-in. Paper reference for the GPU case
(7B policy + MedSAM2, 9 steps): target <= 6 s per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _paths import DEMO  # benchmarks/ is on sys.path when a script runs

from ibisagent.datasets import list_biomedparse
from ibisagent.episode import Episode
from ibisagent.grammar import Grammar
from ibisagent.io import read_image, read_mask
from ibisagent.loop import run_episode
from ibisagent.policies.base import Observation
from ibisagent.simulator import next_click
from ibisagent.types import Action, Click

DEFAULT_DATA = DEMO
TARGET_RATIO = 1.2
TARGET_CASE_SECONDS_GPU = 6.0


class _ForcedSteps:
    """Runs the VLM at every step, then answers the loop with an oracle click (text in the VLM's dialect), so that
    the episode never ends early whatever the model writes. `texts` keeps what the model wrote; `oracle_s` the time
    spent choosing clicks (not the agent's cost)."""

    def __init__(self, vlm, gt: np.ndarray, target: str):
        self.vlm = vlm
        self.dialect = vlm.dialect
        self.grammar = Grammar(vlm.dialect)
        self.gt, self.target = gt, target
        self.texts: list[str] = []
        self.oracle_s = 0.0

    def start(self, instruction: str, targets: list[str]) -> None:
        self.vlm.start(instruction, targets)
        self.texts, self.oracle_s = [], 0.0

    def act(self, obs: Observation) -> str:
        self.texts.append(self.vlm.act(obs))
        t0 = time.perf_counter()
        clicked = list(obs.clicks.get(self.target, ()))
        pred = obs.masks.get(self.target, np.zeros(self.gt.shape, bool))
        click = next_click(pred, self.gt, clicked, self.target)
        if click is None:  # the mask is perfect: any new click keeps the episode going
            h, w = self.gt.shape
            click = Click(w / 2 + len(clicked) + 0.5, h / 2 + 0.5, True, self.target)
        text = self.grammar.format(Action((click,)), obs.image_size, think="stand-in click")
        self.oracle_s += time.perf_counter() - t0
        return text


def _load_policy(args):
    """(HFVLMPolicy constructor, description): one model shared by the runs with and without reuse."""
    from ibisagent.policies.hf_vlm import HFVLMPolicy

    options = {"history": "full", "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels}
    if args.model:
        base = HFVLMPolicy.from_pretrained(args.model, device=args.device, dtype=args.dtype, **options)
        model, processor, what = base.model, base.processor, args.model
    else:
        import torch

        from ibisagent.testing import build_tiny_qwen2_5_vl

        sizes = json.loads(args.tiny) if args.tiny else {}
        model, processor = build_tiny_qwen2_5_vl(**sizes)
        if args.dtype not in ("auto", "float32"):
            model = model.to(getattr(torch, args.dtype))
        model = model.to(args.device)
        params = sum(p.numel() for p in model.parameters())
        what = f"tiny random Qwen2.5-VL ({params / 1e6:.2f}M parameters{', ' + args.tiny if args.tiny else ''})"

    if args.min_new_tokens:
        # generate() merges the model's generation_config under the policy's explicit arguments, which leave this
        # one alone: the end-of-turn token is suppressed until the turn has this many tokens.
        model.generation_config.min_new_tokens = args.min_new_tokens

    def make(reuse: bool):
        return HFVLMPolicy(model, processor, reuse_cache=reuse, **options)

    return make, what


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_case(make_policy, tool, image: np.ndarray, gt: np.ndarray, target: str, steps: int, reuse: bool, device: str):
    """One forced-length episode; returns the figures of one table row and the model's texts."""
    policy = _ForcedSteps(make_policy(reuse), gt, target)
    _sync(device)
    t0 = time.perf_counter()
    episode = Episode(tool, image, [target], max_steps=steps, repeat_limit=0)
    traj = run_episode(policy, episode, f"segment the {target}", max_invalid=steps)
    _sync(device)
    wall = time.perf_counter() - t0
    stats = policy.vlm.episode_stats
    assert len(stats) == steps and traj.stop_reason == "max_steps", (len(stats), traj.stop_reason)
    prefilled = sum(s["prefill_tokens"] for s in stats)
    final = stats[-1]["prompt_tokens"] + stats[-1]["new_tokens"]
    step_s = [sum(s.timings.values()) for s in traj.steps]
    return {
        "prefilled": prefilled,
        "final": final,
        "ratio": prefilled / final,
        "new_tokens": sum(s["new_tokens"] for s in stats),
        "policy_s": float(np.mean([s["seconds"] for s in stats])),
        "step_s": (sum(step_s) - policy.oracle_s) / steps,
        "case_s": wall - policy.oracle_s,
    }, policy.texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BiomedParse split folder (or one above)")
    parser.add_argument("--model", help="a Qwen2.5-VL-compatible checkpoint folder; default: the tiny random model")
    parser.add_argument("--tiny", help="JSON keyword arguments for build_tiny_qwen2_5_vl (sizes), e.g. '{\"seed\": 1}'")
    parser.add_argument("--steps", type=int, default=9, help="steps per episode (forced)")
    parser.add_argument("--episodes", type=int, default=2, help="demo images, one episode each")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per turn (a random model rarely stops)")
    parser.add_argument(
        "--min-new-tokens",
        type=int,
        default=None,
        help="per turn at least (default: 96 for the tiny model, whose random weights end turns at once; "
        "none for --model); an IBISAgent turn of <think> and <action> is about 100 tokens",
    )
    parser.add_argument("--max-pixels", type=int, default=None, help="image budget per observation (pixels)")
    parser.add_argument("--tool", default="classical", help="segmentation tool (random weights for model tools)")
    parser.add_argument("--checkpoint", help="weights of a model tool (default: random weights)")
    parser.add_argument("--device", default="cpu", help="device of the policy and the tool (cpu, cuda)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one turn has nothing to reuse)")
    if args.min_new_tokens is None and not args.model:
        args.min_new_tokens = 96
    if args.min_new_tokens and args.min_new_tokens > args.max_new_tokens:
        parser.error(f"--min-new-tokens {args.min_new_tokens} exceeds --max-new-tokens {args.max_new_tokens}")

    from ibisagent.tools import build_tool

    samples = list_biomedparse(args.data)
    first_mask = {}
    for s in samples:
        first_mask.setdefault(s.image, s)
    images = sorted(first_mask)
    picks = [first_mask[images[int(i)]] for i in np.linspace(0, len(images) - 1, min(args.episodes, len(images)))]
    make_policy, what = _load_policy(args)
    tool = build_tool(args.tool, args.checkpoint, None, args.device)
    print(
        f"policy: {what}, history full, {args.steps} steps forced, new tokens per turn "
        f"{args.min_new_tokens or 1}..{args.max_new_tokens}, "
        f"tool {args.tool}, device {args.device}\n"
    )
    print("| image | reuse | prefilled | final context | ratio | new tokens | policy s/step | step s | case s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows, same = {True: [], False: []}, []
    for sample in picks:
        image = read_image(sample.image)
        gt = read_mask(sample.mask, image.shape[:2])
        texts = {}
        for reuse in (True, False):
            r, texts[reuse] = run_case(make_policy, tool, image, gt, sample.target, args.steps, reuse, args.device)
            rows[reuse].append(r)
            print(
                f"| {sample.image.stem} | {'yes' if reuse else 'no'} | {r['prefilled']} | {r['final']} | "
                f"{r['ratio']:.2f}x | {r['new_tokens']} | {r['policy_s']:.3f} | {r['step_s']:.3f} | {r['case_s']:.2f} |"
            )
        same.append(texts[True] == texts[False])

    print()
    for reuse in (True, False):
        rs = rows[reuse]
        ratio = max(r["ratio"] for r in rs)
        print(
            f"{'with' if reuse else 'without'} reuse: prefilled / final context {ratio:.2f}x (worst), "
            f"{np.mean([r['policy_s'] for r in rs]):.3f} s/step policy, {np.mean([r['step_s'] for r in rs]):.3f} "
            f"s/step whole step, {np.mean([r['case_s'] for r in rs]):.2f} s/case"
        )
    print(f"same model text with and without reuse: {sum(same)}/{len(same)} episodes")
    worst = max(r["ratio"] for r in rows[True])
    print(
        f"target prefilled <= {TARGET_RATIO}x final context with reuse: {'PASS' if worst <= TARGET_RATIO else 'FAIL'}"
    )
    if args.device.startswith("cuda"):
        case = float(np.mean([r["case_s"] for r in rows[True]]))
        verdict = "PASS" if case <= TARGET_CASE_SECONDS_GPU else "FAIL"
        print(
            f"target <= {TARGET_CASE_SECONDS_GPU:g} s per {args.steps}-step case on the GPU: {verdict} ({case:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
