"""The GRPO trainer: rollouts, rewards, advantages and updates with accelerate, checkpoints that resume to the same
run, per-step metrics, and the `ibisagent-train grpo` entry point.

With several processes (`accelerate launch --multi_gpu --num_processes N`) each step draws `prompts_per_step` prompts
per process and gives each process its own share (a group never spans processes); the gradient is that of the whole
step's loss, and every process runs the same number of forward/backward passes (DDP's passes are collectives), so none
waits at a barrier the others never reach. Metrics cover every process's rollouts and are written by the main one."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.chat import PromptTemplates
from ibisagent.metrics import click_in_target, dice
from ibisagent.policies.hf_vlm import ModelLoadError, load_pretrained
from ibisagent.tools import ToolError

from ..common import collate, freeze_vision, pad_token_id
from ..rewards import COMPONENTS, answer_match
from .config import GRPOArguments
from .objective import group_advantages, lr_factor, policy_loss, token_logps
from .rollout import Rollout, RolloutError, rollout
from .rows import Row, VQARows, build_rows, instruction_library


class GRPOTrainer:
    """Rollouts, rewards, advantages and updates, with checkpoints and per-step metrics (`output_dir/metrics.jsonl`).

    rows: the prompts (`SegmentationRows`, `StepRows`, or any sequence of `Row`); vqa_rows: VQA prompts mixed in at
    `args.vqa_fraction`; every process holds the same rows (`prompts` splits each step's draw between them). model/processor default to `args.model_name_or_path`; tool_factory to the `ToolSpec` of
    `args.tool`, built on this process's device. `on_step(step, metrics)` is called after each step.
    """

    def __init__(
        self,
        args: GRPOArguments,
        rows=None,
        vqa_rows=None,
        model=None,
        processor=None,
        tool_factory=None,
        on_step: Callable[[int, dict], None] | None = None,
    ):
        ensure_torchvision()
        import torch
        from accelerate import Accelerator

        self.args = args
        self.reward_config = args.reward_config()
        self.output_dir = Path(args.output_dir)
        self.on_step = on_step
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
        self.resume = self._find_resume()
        if rows is None:
            rows = build_rows(args, instruction_library(args.instructions))
        if vqa_rows is None and args.vqa_file:
            vqa_rows = VQARows(args.vqa_file)
        if not len(rows):
            raise ValueError("no prompts to train on")
        self.rows, self.vqa_rows = rows, vqa_rows
        if model is None or processor is None or self.resume:
            source = self.resume or args.model_name_or_path
            if not source:
                raise ValueError("give --model_name_or_path: the SFT checkpoint folder (or a Hub id) to start from")
            model, processor = load_pretrained(source, "auto")
        self.processor = processor
        if args.freeze_vision_tower:
            freeze_vision(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.templates = PromptTemplates.load(args.dialect, args.template_dir)
        factory = tool_factory or _tool_factory(args, str(self.accelerator.device))
        self.tools = [factory() for _ in range(args.prompts_per_step)]  # built once, one per prompt of a step
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        schedule = partial(
            lr_factor,
            kind=args.lr_scheduler_type,
            warmup=max(args.warmup_steps, 0) * args.num_iterations,
            total=args.max_steps * args.num_iterations,
        )
        # Not passed to accelerate.prepare: its scheduler wrapper steps once per process on each step() call.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step = 0
        if self.resume:
            self._load_state(self.resume)

    # -- loop ---------------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to `args.max_steps`; returns the metrics of the steps run here."""
        history = []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        while self.step < self.args.max_steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.accelerator.is_main_process:
                with (self.output_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if self.args.logging_steps and self.step % self.args.logging_steps == 0:
                    print(_format_metrics(metrics), flush=True)
            if self.on_step:
                self.on_step(self.step, metrics)
            if self.args.save_steps and self.step % self.args.save_steps == 0 and self.step < self.args.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        self.save_model(self.output_dir)
        return history

    def prompts(self, step: int) -> list[Row]:
        """This process's prompts of `step`: the step draws `prompts_per_step` per process, without repeats while the
        rows suffice, as a function of (seed, step) so that a resumed run sees the same ones; process r takes the r-th
        share of the segmentation draw and of the VQA draw."""
        rng = np.random.default_rng([self.args.seed, step])
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        b = self.args.prompts_per_step
        n_vqa = int(round(b * self.args.vqa_fraction)) if self.vqa_rows is not None else 0
        pick = _choose(rng, len(self.rows), (b - n_vqa) * n)[rank * (b - n_vqa) : (rank + 1) * (b - n_vqa)]
        out = [self.rows[i] for i in pick]
        if n_vqa:
            vqa = _choose(rng, len(self.vqa_rows), n_vqa * n)[rank * n_vqa : (rank + 1) * n_vqa]
            out += [self.vqa_rows[i] for i in vqa]
        return out

    def train_step(self) -> dict:
        """One step: this process's rollouts, then one optimiser update per iteration (`num_iterations`) over every
        process's sequences with a non-zero advantage, then the metrics of the whole step (the same on every process)."""
        import torch
        from accelerate.utils import gather_object

        args, acc = self.args, self.accelerator
        t0 = time.perf_counter()
        rows = self.prompts(self.step)
        model = acc.unwrap_model(self.model)
        model.eval()
        torch.manual_seed(
            int(np.random.SeedSequence([args.seed, self.step, 7, acc.process_index]).generate_state(1)[0])
        )
        rollouts, timings, failure = [], {}, None
        try:
            rollouts, timings = rollout(
                model, self.processor, rows, args, self.tools, self.templates, self.reward_config
            )
        except Exception as exc:  # noqa: BLE001 - raised in _agree, once every process knows (the others would wait)
            failure = exc
        advantages = group_advantages([r.rewards["total"] for r in rollouts], args.num_generations, args.scale_rewards)
        for r, a in zip(rollouts, advantages):
            r.advantage = a
        t1 = time.perf_counter()

        active = [i for i, a in enumerate(advantages) if a != 0.0]  # zero advantage: zero gradient (mu = 1 or not)
        chunks = [active[i : i + args.micro_batch_size] for i in range(0, len(active), args.micro_batch_size)]
        n_tokens = sum(len(seg.ids) for r in rollouts for seg in r.policy.segments if seg.model)
        passes, total_tokens, total_sequences = self._agree(failure, len(chunks), n_tokens, len(rollouts))
        # DDP averages the processes' gradients: dividing by norm / processes gives the gradient of the step's loss.
        norm = float(max(total_tokens, 1) if args.loss_type == "dapo" else total_sequences) / acc.num_processes
        # A process with fewer passes than another pads with zero-weight passes over one of its own sequences.
        plan = [(chunk, 1.0) for chunk in chunks] + [([0], 0.0)] * (passes - len(chunks))
        loss_total, grad_norm, clipped = self._update(rollouts, plan, norm)
        self.step += 1
        t2 = time.perf_counter()
        share = {
            "rollouts": [_rollout_stats(r) for r in rollouts],
            "loss": loss_total,
            "clipped": clipped,
            "trained": len(active),
            "seconds": {"rollout_seconds": t1 - t0, "train_seconds": t2 - t1, "step_seconds": t2 - t0}
            | {k: v for k, v in timings.items() if k != "rollout_s"},
        }
        shares = gather_object([share])  # every process's, in process order (groups stay contiguous)
        metrics = _step_metrics([s for sh in shares for s in sh["rollouts"]], args.num_generations)
        seconds = {k: max(sh["seconds"][k] for sh in shares) for k in share["seconds"]}  # the slowest process's
        metrics.update(
            step=self.step,
            loss=sum(sh["loss"] for sh in shares) / acc.num_processes / args.num_iterations,
            grad_norm=grad_norm,
            learning_rate=self.scheduler.get_last_lr()[0],
            clip_fraction=sum(sh["clipped"] for sh in shares) / max(total_tokens * args.num_iterations, 1),
            model_tokens=total_tokens,
            sequences_trained=sum(sh["trained"] for sh in shares),
            episodes=total_sequences,
            steps_per_second=1.0 / max(seconds["step_seconds"], 1e-9),
            **seconds,
        )
        return metrics

    def _agree(self, failure: BaseException | None, passes: int, tokens: int, sequences: int) -> tuple[int, int, int]:
        """What every process must know before the first DDP pass, in one collective: whether a rollout failed (then
        every process raises), the most passes any process runs, and the step's model tokens and sequences."""
        import torch

        local = [[failure is not None, passes, tokens, sequences]]
        local = torch.tensor(local, dtype=torch.long, device=self.accelerator.device)
        table = self.accelerator.gather(local).view(-1, 4).tolist()  # one row per process
        if failure is not None:
            raise failure
        failed = [str(rank) for rank, row in enumerate(table) if row[0]]
        if failed:
            raise RolloutError(f"the rollout on process {', '.join(failed)} failed (see its error); no process trains")
        return max(row[1] for row in table), sum(row[2] for row in table), sum(row[3] for row in table)

    def _update(self, rollouts: list[Rollout], plan: list[tuple[list[int], float]], norm: float):
        """`num_iterations` optimiser updates, each one forward/backward pass per (chunk of rollout indices, weight)
        of `plan`, the same number on every process, gradients reduced once per update. Returns this process's
        summed loss, the gradient norm before clipping and the number of clipped tokens."""
        import torch

        args, acc = self.args, self.accelerator
        model = acc.unwrap_model(self.model)
        model.train()
        pad, device = pad_token_id(self.processor), acc.device
        encoded = {i: rollouts[i].policy.encoded() for chunk, _ in plan for i in chunk}

        def batch_of(chunk: list[int]) -> dict:
            return {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad).items()}

        old = {}
        if args.num_iterations > 1:
            with torch.no_grad():  # the unwrapped model: no collective, so only this process's own chunks
                for chunk in (chunk for chunk, weight in plan if weight):
                    logps, _ = token_logps(model, batch_of(chunk), args.temperature)
                    old.update({i: logps[j].detach() for j, i in enumerate(chunk)})
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        loss_total, grad_norm, clipped = 0.0, 0.0, 0.0
        for _ in range(args.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for k, (chunk, weight) in enumerate(plan):
                # Gradients are accumulated locally and reduced once, in the last pass of the update.
                with contextlib.nullcontext() if k == len(plan) - 1 else acc.no_sync(self.model):
                    batch = batch_of(chunk)
                    with acc.autocast():
                        logps, mask = token_logps(self.model, batch, args.temperature)
                    old_logps = torch.stack([old[i] for i in chunk]) if old and weight else logps.detach()
                    adv = torch.tensor([rollouts[i].advantage for i in chunk], dtype=logps.dtype, device=device)
                    loss = policy_loss(logps, old_logps, adv, mask, args.epsilon, eps_high, args.loss_type, norm)
                    acc.backward(loss * weight)
                if weight:
                    loss_total += float(loss.detach())
                    ratio = torch.exp(logps.detach() - old_logps)
                    clipped += float((((ratio < 1 - args.epsilon) | (ratio > 1 + eps_high)) & mask).sum())
            if plan:  # the same on every process: the number of passes is agreed
                if args.max_grad_norm:
                    grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm))
                self.optimizer.step()
            self.scheduler.step()  # once per update, trained or not, whatever the number of processes
        return loss_total, grad_norm, clipped

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def save_model(self, folder: str | Path) -> None:
        if not self.accelerator.is_main_process:
            return
        folder = Path(folder)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    def save_checkpoint(self) -> Path:
        """`output_dir/checkpoint-<step>`: weights and processor (loadable as a model), optimizer, scheduler, RNG
        and trainer state. Older checkpoints beyond `save_total_limit` are removed."""
        import torch

        folder = self.output_dir / f"checkpoint-{self.step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save_model(folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            state = {"step": self.step, "args": asdict(self.args)}
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            if self.args.save_total_limit:
                for old in _checkpoints(self.output_dir)[: -self.args.save_total_limit]:
                    _remove_tree(old)
        return folder

    def _find_resume(self) -> Path | None:
        spec = self.args.resume_from_checkpoint
        if not spec:
            return None
        if spec == "last":
            found = _checkpoints(Path(self.args.output_dir))
            if not found:
                raise ValueError(f"--resume_from_checkpoint last: no checkpoint-* folder in {self.args.output_dir}")
            return found[-1]
        path = Path(spec)
        if not (path / "trainer_state.json").is_file():
            raise ValueError(
                f"{path} is not a GRPO checkpoint (no trainer_state.json); pass a checkpoint-<step> folder"
            )
        return path

    def _load_state(self, folder: Path) -> None:
        import torch

        state = json.loads((folder / "trainer_state.json").read_text())
        self.step = int(state["step"])
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        # The rate follows this run's schedule: resumed with a larger max_steps, a decay stretches to the new end.
        scheduler = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)


def _choose(rng: np.random.Generator, n: int, k: int) -> list[int]:
    if k <= 0:
        return []
    return rng.choice(n, size=k, replace=k > n).tolist()


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _tool_factory(args: GRPOArguments, device: str) -> Callable[[], Any]:
    """Builds the rollout tool (`args` is a ToolSpec) on this process's device (a model tool on CPU would serialise
    GPU training)."""
    return lambda: args.build(device)


def _rollout_stats(r: Rollout) -> dict:
    """What the step's metrics need of one rollout, as plain values (gathered from every process)."""
    steps = r.trajectory.steps
    out = {
        "rewards": dict(r.rewards),
        "length": len(steps),
        "valid": [s.error is None for s in steps],
        "observations": r.num_observations,
    }
    if r.row.gt is not None:
        final = r.trajectory.final_masks.get(r.row.target, np.zeros(r.row.gt.shape, bool))
        out["dice"] = dice(final, r.row.gt)
        clicks = [c for s in steps if s.action for c in s.action.clicks if c.positive]
        out["hits"] = [click_in_target(c, r.row.gt) for c in clicks]
    if r.row.solution is not None:
        out["vqa"] = answer_match(r.trajectory.answer, r.row.solution)
    return out


def _step_metrics(stats: list[dict], group_size: int) -> dict:
    """Per-step means over the rollouts' `_rollout_stats`: each reward component (over the rollouts where it
    applies), total reward and its spread within groups, IoU and Dice of segmentation rollouts, episode length,
    click-in-target rate, VQA accuracy, images seen."""
    out: dict[str, float] = {}
    for name in (*COMPONENTS, "total"):
        values = [s["rewards"][name] for s in stats if s["rewards"].get(name) is not None]
        out[f"reward/{name}"] = float(np.mean(values)) if values else float("nan")
    totals = np.array([s["rewards"]["total"] for s in stats]).reshape(-1, group_size)
    out["reward/total_std_within_group"] = float(totals.std(axis=1).mean())
    seg = [s for s in stats if "dice" in s]
    if seg:
        out["iou"] = float(np.mean([s["rewards"]["iou"] for s in seg]))
        out["dice"] = float(np.mean([s["dice"] for s in seg]))
        hits = [h for s in seg for h in s["hits"]]
        out["click_in_target"] = float(np.mean(hits)) if hits else 0.0
    vqa = [s["vqa"] for s in stats if "vqa" in s]
    if vqa:
        out["vqa_accuracy"] = float(np.mean(vqa))
    out["episode_length"] = float(np.mean([s["length"] for s in stats]))
    out["format_valid"] = float(np.mean([v for s in stats for v in s["valid"]] or [0.0]))
    out["observations"] = float(sum(s["observations"] for s in stats))
    return out


def _format_metrics(m: dict) -> str:
    keys = (
        "step",
        "reward/total",
        "reward/format",
        "reward/answer",
        "reward/click",
        "iou",
        "click_in_target",
        "episode_length",
        "loss",
        "step_seconds",
    )
    return " ".join(f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys if k in m)


def build_parser():
    """trl's `TrlParser` for `GRPOArguments` (command line and `--config <yaml>`)."""
    ensure_torchvision()
    from trl import TrlParser

    parser = TrlParser((GRPOArguments,), prog="ibisagent-train grpo")
    # The tool's weights were --tool_checkpoint before GRPOArguments took ToolSpec's fields; still read, not shown.
    parser.add_argument("--tool_checkpoint", dest="checkpoint", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        (args,) = parser.parse_args_and_config(args=argv)
        trainer = GRPOTrainer(args)
    except (OSError, ValueError, ToolError, ModelLoadError) as exc:  # bad data, options, model or tool checkpoint
        print(f"ibisagent-train grpo: error: {exc}", file=sys.stderr)
        return 2
    trainer.train()
    return 0
