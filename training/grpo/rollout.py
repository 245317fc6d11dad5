"""GRPO rollouts, token in, token out: episodes run through the one agent loop (`ibisagent.loop.run_episode`), one
thread each; `BatchSampler` gathers the threads' requests into one batched `generate` call per turn, and
`RolloutPolicy` keeps each conversation as the exact token ids the model saw and wrote."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibisagent.chat import END_OF_TURN, PromptTemplates, generation_kwargs, pixel_budget, turn_boundaries, turn_messages
from ibisagent.episode import Episode
from ibisagent.loop import run_episode
from ibisagent.policies.base import Observation
from ibisagent.trajectory import Trajectory

from ..common import IGNORE_INDEX
from ..rewards import step_rewards, trajectory_rewards
from .config import GRPOArguments
from .rows import Row


class RolloutError(RuntimeError):
    """An episode of a rollout could not be played (the policy's generation failed): the step must not train."""


class BatchSampler:
    """Samples the next turn of many episodes in one `generate` call.

    Each episode runs in its own thread and calls `request(slot, inputs)`; when every open episode is waiting, the last
    caller left-pads the requests (in slot order, so a seeded run is reproducible), generates, and hands each its new
    token ids (cut after the first end-of-turn token). `close(slot)` marks an episode finished.
    """

    def __init__(self, model, processor, gen_kwargs: dict):
        self.model, self.processor, self.gen_kwargs = model, processor, gen_kwargs
        self.pad_id = gen_kwargs["pad_token_id"]
        eos = gen_kwargs["eos_token_id"] or []
        self.eos = {eos} if isinstance(eos, int) else set(eos)
        self._cond = threading.Condition()
        # Episode threads tokenise through one processor; a fast tokenizer's Rust state must not be entered twice.
        self.processor_lock = threading.Lock()
        self._open: set[int] = set()
        self._pending: dict[int, dict] = {}
        self._results: dict[int, Any] = {}
        self.calls = 0
        self.seconds = 0.0

    def open(self, slots: Sequence[int]) -> None:
        with self._cond:
            self._open = set(slots)
            self._pending.clear()
            self._results.clear()

    def close(self, slot: int) -> None:
        with self._cond:
            self._open.discard(slot)
            self._maybe_flush()

    def request(self, slot: int, inputs: dict) -> tuple[list[int], list[float]]:
        """The sampled ids of the next turn and their log-probabilities (logits / temperature, before filtering)."""
        with self._cond:
            self._pending[slot] = inputs
            self._maybe_flush()
            while slot not in self._results:
                self._cond.wait()
            result = self._results.pop(slot)
        if isinstance(result, BaseException):
            raise result
        return result

    def _maybe_flush(self) -> None:
        if not self._pending or set(self._pending) != self._open:
            return
        slots = sorted(self._pending)
        batch = [self._pending.pop(s) for s in slots]
        try:
            outputs = self._generate(batch)
        except Exception as exc:  # every waiting episode sees the failure
            outputs = [exc] * len(slots)
        self._results.update(zip(slots, outputs))
        self._cond.notify_all()

    def _generate(self, batch: list[dict]) -> list[tuple[list[int], list[float]]]:
        import torch

        t0 = time.perf_counter()
        device = self.model.device
        n = max(int(b["input_ids"].shape[0]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):  # left padding: every row's new tokens start at column n
            length = int(b["input_ids"].shape[0])
            ids[i, n - length :] = b["input_ids"]
            mask[i, n - length :] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if any("pixel_values" in b for b in batch):
            inputs["pixel_values"] = torch.cat([b["pixel_values"] for b in batch if "pixel_values" in b]).to(device)
            inputs["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in batch if "image_grid_thw" in b]).to(
                device
            )
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.gen_kwargs, return_dict_in_generate=True, output_logits=True)
        new = out.sequences[:, n:]
        temperature = self.gen_kwargs.get("temperature", 1.0) if self.gen_kwargs.get("do_sample") else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature  # (B, new, V): before any top-p/top-k filter
        logps = torch.gather(logits.log_softmax(-1), -1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, row_logps in zip(new.tolist(), logps.tolist()):
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos), len(row))
            results.append((row[:cut], row_logps[:cut]))
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return results


@dataclass
class Segment:
    """A run of conversation tokens: written by the model (trained) or by the environment (observation, masked)."""

    ids: list[int]
    model: bool
    logps: list[float] | None = None  # the sampling log-probabilities of a model segment


class RolloutPolicy:
    """A `Policy` that keeps the episode's conversation as token ids (token in, token out).

    The first turn is the chat template's rendering of the system prompt and the first user turn (image + text), as
    `HFVLMPolicy` renders it; every later turn appends the template's text that closes the model's turn and opens the
    next user turn with the new observation image, then the generation prompt. The sampled ids are kept verbatim, so
    nothing is re-tokenised.
    """

    def __init__(self, sampler: BatchSampler, slot: int, templates: PromptTemplates, image_kwargs: dict):
        self.sampler, self.slot, self.templates = sampler, slot, templates
        self.dialect = templates.dialect
        self.processor = sampler.processor
        self.image_kwargs = image_kwargs
        self.segments: list[Segment] = []
        self.pixel_values: list[Any] = []
        self.grids: list[Any] = []
        self.images: list[np.ndarray] = []
        self.error: BaseException | None = None  # why the last sampling request failed
        self._close, self._open = turn_boundaries(self.processor)
        self._end_of_turn = self.processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def start(self, instruction: str, targets: list[str]) -> None:
        self.segments, self.pixel_values, self.grids, self.images = [], [], [], []
        self.error = None

    def act(self, obs: Observation) -> str:
        system, user, image = turn_messages(self.templates, obs)
        with self.sampler.processor_lock:
            if not self.segments:
                text = self.processor.apply_chat_template([system, user], add_generation_prompt=True, tokenize=False)
            else:
                last = self.segments[-1].ids
                closed = bool(last) and last[-1] == self._end_of_turn
                text = (self._close.removeprefix(END_OF_TURN) if closed else self._close) + self._open(user)
            enc = self.processor(text=[text], images=[image], return_tensors="pt", **self.image_kwargs)
        self.segments.append(Segment(enc["input_ids"][0].tolist(), model=False))
        self.pixel_values.append(enc["pixel_values"])
        self.grids.append(enc["image_grid_thw"])
        self.images.append(np.asarray(obs.image))
        try:
            new, logps = self.sampler.request(self.slot, self.inputs())
        except Exception as exc:  # the loop ends the episode as a policy_error; rollout() raises it
            self.error = exc
            raise
        self.segments.append(Segment(new, model=True, logps=logps))
        with self.sampler.processor_lock:
            return self.processor.tokenizer.decode(new, skip_special_tokens=True)

    def inputs(self) -> dict:
        import torch

        ids = [t for s in self.segments for t in s.ids]
        out = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if self.pixel_values:
            out["pixel_values"] = torch.cat(self.pixel_values)
            out["image_grid_thw"] = torch.cat(self.grids)
        return out

    def encoded(self) -> dict:
        """The episode as one training sequence: ids, attention mask, labels (the model's ids, -100 elsewhere) and
        every observation image."""
        import torch

        out = self.inputs()
        labels = [t if s.model else IGNORE_INDEX for s in self.segments for t in s.ids]
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out


class _SharedTool:
    """One tool for the episodes of a group (same image: encoded once); predictions are serialised by a lock."""

    def __init__(self, tool):
        self.tool, self._lock = tool, threading.Lock()

    def set_image(self, image):
        with self._lock:
            self.tool.set_image(image)

    def predict(self, clicks, prev_logits=None):
        with self._lock:
            return self.tool.predict(clicks, prev_logits)

    def mask_to_logits(self, mask):
        with self._lock:
            return self.tool.mask_to_logits(mask)


@dataclass
class Rollout:
    """One episode of a group: its row, trajectory, token segments and images, reward components and advantage."""

    row: Row
    group: int
    trajectory: Trajectory
    policy: RolloutPolicy
    start_mask: np.ndarray | None = None  # the target's mask when the policy took over (after a replayed history)
    rewards: dict = field(default_factory=dict)
    advantage: float = 0.0

    @property
    def num_observations(self) -> int:
        return len(self.policy.images)


def rollout(
    model,
    processor,
    rows: Sequence[Row],
    args: GRPOArguments,
    tools: Sequence[Any],
    templates: PromptTemplates,
    reward_config,
) -> tuple[list[Rollout], dict]:
    """Sample `args.num_generations` episodes per row, all at once (one thread per episode, batched generation), and
    score them. tools: one segmentation tool per row (the row's image is set on it once and its G episodes share
    it). Returns the rollouts (row-major: group g holds rollouts[g*G:(g+1)*G]) and timings. Raises RolloutError
    when an episode ends in policy_error (e.g. a failed `generate`), whose failure is never trained on."""
    if len(tools) < len(rows):
        raise ValueError(f"{len(rows)} rows need as many tools, got {len(tools)}")
    sampler = BatchSampler(
        model,
        processor,
        generation_kwargs(model, processor, args.max_new_tokens, True, args.temperature, args.top_p, args.top_k, 1.0),
    )
    t0 = time.perf_counter()
    tools = [_SharedTool(tool) for tool in tools[: len(rows)]]
    for tool, row in zip(tools, rows):
        tool.set_image(row.image)
    slots = range(len(rows) * args.num_generations)
    sampler.open(slots)
    results: dict[int, Rollout] = {}
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        g = slot // args.num_generations
        row = rows[g]
        policy = RolloutPolicy(sampler, slot, templates, pixel_budget(processor, args.min_pixels, args.max_pixels))
        try:
            episode = Episode(
                tools[g], row.image, [row.target], max_steps=len(row.history) + row.max_steps, image_is_set=True
            )
            for action in row.history:
                episode.apply(action)
            start = episode.state.masks.get(row.target)
            gts = None if row.gt is None else {row.target: row.gt}
            traj = run_episode(policy, episode, row.instruction, gt=gts, max_invalid=args.max_invalid)
            if traj.stop_reason == "policy_error":
                raise RolloutError(
                    f"episode {slot} (row {row.id!r}) ended in policy_error: "
                    f"{traj.meta.get('error') or policy.error!r}; no training step is run on failed episodes"
                ) from policy.error
            results[slot] = Rollout(row, g, traj, policy, start)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            sampler.close(slot)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    t1 = time.perf_counter()
    out = [results[s] for s in slots]
    for r in out:
        r.rewards = _score(r, args.mode, reward_config)
    timings = {
        "rollout_s": t1 - t0,
        "generate_s": sampler.seconds,
        "generate_calls": sampler.calls,
        "reward_s": time.perf_counter() - t1,
    }
    return out, timings


def _score(r: Rollout, mode: str, config) -> dict:
    """Reward components of one rollout: of its whole trajectory (multi_turn) or of its one step (step)."""
    row, traj = r.row, r.trajectory
    if mode == "step":
        step = traj.steps[-1] if traj.steps else None
        acted = step is not None and step.action is not None
        return step_rewards(
            step.text if step else "",
            gt_mask=row.gt,
            prev_mask=r.start_mask,
            pred_mask=step.masks.get(row.target) if acted else None,
            solution=row.solution,
            step_index=len(row.history),
            target=row.target,
            config=config,
        )
    gts = None if row.gt is None else {row.target: row.gt}
    return trajectory_rewards(traj, gts, row.solution, config)
