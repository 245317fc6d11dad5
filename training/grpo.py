"""Agentic RL (paper Sec. 3.3): GRPO with group-relative advantages and no KL term, the five rule-based rewards
(`rewards.py`), and the segmentation tool in the loop.

Two modes, one machinery:

* ``multi_turn`` (the paper's formulation): each prompt is an image, an instruction and a ground-truth mask; the policy
  acts in a fresh `Episode` until it answers or reaches `max_turns`, every tool result's overlay image is appended as
  the next observation, and the reward is `rewards.trajectory_rewards` of the whole trajectory.
* ``step`` (the authors' released recipe): each prompt is one step of a simulated trajectory (the output of
  `ibisagent-train trajectories`); its earlier actions are replayed through the tool, so the policy sees the same
  overlay and clicks as in the trajectory, and acts once; the reward is `rewards.step_rewards`.

Optionally close-ended VQA rows (image, question, answer) are mixed in (`vqa_file`, `vqa_fraction`): the policy gets one
turn and earns the match reward by answering, and the click penalty by clicking, so it learns when to click.

Rollouts are token-in, token-out: `RolloutPolicy` keeps the exact token ids of the conversation, appends the
observation tokens (chat-template text and image placeholders of each new user turn) itself and the sampled ids
verbatim, so the training forward pass sees exactly the tokens and images the policy saw, and the loss covers exactly
the model-written tokens. Episodes run through the one agent loop (`ibisagent.loop.run_episode`), one thread each;
`BatchSampler` collects the threads' requests and samples them in one batched `generate` call per turn.

Why not trl's GRPOTrainer: its multi-turn paths (`rollout_func`, `environment_factory`, `tools=`) either reject
Qwen2.5-VL's chat template or do not guarantee that the observation images reach the training forward pass. This
trainer keeps trl's reward-function shape (`rewards.reward_functions` plug into trl for single-turn work), its
`TrlParser` for yaml/CLI configuration, its loss conventions (`loss_type` "dapo" / "grpo", clipped ratio with
`epsilon`, `beta` = 0) and accelerate for devices and mixed precision.

Launch: `accelerate launch -m ibisagent_training.grpo --config grpo.yaml` (or `ibisagent-train grpo ...`).
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.chat import END_OF_TURN, PromptTemplates, generation_kwargs, pixel_budget, turn_boundaries, turn_messages
from ibisagent.episode import Episode
from ibisagent.loop import run_episode
from ibisagent.policies.base import Observation
from ibisagent.specs import ToolSpec
from ibisagent.trajectory import Trajectory
from ibisagent.types import Action

IGNORE_INDEX = -100
MODES = ("multi_turn", "step")
LOSS_TYPES = ("dapo", "grpo")
SCALE_REWARDS = ("group", "none")
LR_SCHEDULERS = ("constant", "linear", "cosine")


# -- configuration -----------------------------------------------------------------------------------------------------
@dataclass
class GRPOArguments:
    """Everything a GRPO run needs (`ibisagent-train grpo --help`); rewards are `RewardConfig` fields prefixed
    `reward_` in yaml under `rewards:` or given as `--rewards '{"click_bonus": 0.5}'`."""

    model_name_or_path: str = field(default="", metadata={"help": "policy checkpoint: a local folder or a Hub id"})
    output_dir: str = field(default="grpo-out", metadata={"help": "checkpoints, metrics.jsonl and the final model"})
    mode: str = field(default="multi_turn", metadata={"help": "multi_turn (whole episodes) or step (one step per row)"})
    data: str = field(
        default="",
        metadata={
            "help": "multi_turn: a BiomedParse dataset folder; step: an output folder of `ibisagent-train trajectories`"
        },
    )
    split: str | None = field(default=None, metadata={"help": "BiomedParse split (multi_turn), e.g. train"})
    vqa_file: str | None = field(
        default=None, metadata={"help": "JSON list of close-ended VQA rows {image, question, answer}"}
    )
    vqa_fraction: float = field(default=0.0, metadata={"help": "share of prompts per step taken from vqa_file"})
    instructions: str | None = field(
        default=None, metadata={"help": "instruction library file (json/yaml, prompts.InstructionLibrary.from_file)"}
    )
    template_dir: str | None = field(default=None, metadata={"help": "prompt templates folder (default: packaged)"})
    dialect: str = field(default="ibis", metadata={"help": "action grammar: ibis or released"})
    tool: str = field(
        default="classical", metadata={"help": "segmentation tool: classical, sam2, medsam2, sam, medsam"}
    )
    tool_checkpoint: str | None = field(default=None, metadata={"help": "the tool's weights (model tools)"})
    tool_config: str | None = field(default=None, metadata={"help": "the tool's config name (model tools)"})
    max_turns: int = field(default=8, metadata={"help": "step limit of a multi-turn episode"})
    max_invalid: int = field(
        default=1, metadata={"help": "unusable outputs in a row that end an episode (before: retried with feedback)"}
    )
    num_generations: int = field(default=8, metadata={"help": "G: episodes per prompt (one group)"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per optimisation step (B groups)"})
    max_steps: int = field(default=100, metadata={"help": "optimisation steps"})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up, in optimisation steps"})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "after warm-up: constant (the paper's RL), or linear / cosine decay to 0 at max_steps"},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    num_iterations: int = field(default=1, metadata={"help": "optimisation passes over each rollout batch (mu)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip of the probability ratio"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip (default: epsilon)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; only 0 is supported (no reference model)"})
    loss_type: str = field(default="dapo", metadata={"help": "dapo: token mean over the batch; grpo: per sequence"})
    scale_rewards: str = field(default="group", metadata={"help": "group: divide advantages by the group std; none"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (rollouts and log-probs)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per model turn"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward pass"})
    min_pixels: int | None = field(default=None, metadata={"help": "image processor pixel budget, lower bound"})
    max_pixels: int | None = field(default=None, metadata={"help": "image processor pixel budget, upper bound"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "train the language model (and merger) only"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, bf16, fp16"})
    save_steps: int = field(
        default=50, metadata={"help": "save a checkpoint every this many steps (0: only at the end)"}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    logging_steps: int = field(default=1, metadata={"help": "print metrics every this many steps"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder, or 'last' for the newest in output_dir"}
    )
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and initialisation"})
    rewards: str | None = field(
        default=None, metadata={"help": "RewardConfig fields: a mapping in yaml, a JSON object on the command line"}
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler_type!r}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}")
        if self.beta != 0.0:
            raise ValueError(
                "beta must be 0: this trainer follows the paper's GRPO without a KL term and loads no reference model"
            )
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be at least 2 (advantages are relative to a group), got {self.num_generations}"
            )
        for name in (
            "prompts_per_step",
            "max_steps",
            "max_turns",
            "num_iterations",
            "micro_batch_size",
            "max_new_tokens",
            "max_invalid",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.vqa_fraction <= 1.0:
            raise ValueError(f"vqa_fraction must be in [0, 1], got {self.vqa_fraction}")
        if self.vqa_fraction > 0 and not self.vqa_file:
            raise ValueError("vqa_fraction > 0 needs --vqa_file (a JSON list of {image, question, answer} rows)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if isinstance(self.rewards, str):
            try:
                self.rewards = json.loads(self.rewards)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--rewards must be a JSON object of RewardConfig fields: {exc}") from None
        self.reward_config()  # validates the reward options

    def reward_config(self):
        from ibisagent_training.rewards import RewardConfig

        options = dict(self.rewards or {})
        options.setdefault("dialect", self.dialect)
        return RewardConfig.from_dict(options)


# -- prompts (rows) ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One RL prompt. image: HxWx3 uint8; gt: HxW bool (None for VQA); history: actions replayed through the tool
    before the policy acts (step mode); solution: a VQA row's answer; max_steps: the policy's turns."""

    id: str
    image: np.ndarray
    instruction: str
    target: str
    gt: np.ndarray | None = None
    solution: str | None = None
    history: tuple[Action, ...] = ()
    max_steps: int = 1


class SegmentationRows:
    """Multi-turn prompts: every mask of a BiomedParse dataset (loaded with MONAI, `data.BiomedParseDataset`), with an
    instruction from the instruction library seeded by the sample."""

    def __init__(self, root: str, split: str | None, library, max_turns: int, seed: int = 0):
        from ibisagent_training.data import BiomedParseDataset

        self.dataset = BiomedParseDataset(root, split)
        if not len(self.dataset):
            raise ValueError(f"{root}: no image/mask pairs found; {self.dataset.report.summary()}")
        self.library, self.max_turns, self.seed = library, max_turns, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Row:
        item = self.dataset[index]
        rid = Path(item["label_path"]).stem
        rng = random.Random(f"{self.seed}:{rid}")
        target = item["target"]
        instruction = self.library.initial(target, item.get("modality", ""), rng).text
        return Row(rid, item["image"], instruction, target, item["label"], max_steps=self.max_turns)


class StepRows:
    """Step-level prompts: step k of each kept trajectory record (not the loss-masked wrong turns of reflective
    variants); the record's first k actions are replayed before the policy acts."""

    def __init__(self, folder: str, library, seed: int = 0, variants: Sequence[str] = ("gold",)):
        from ibisagent_training.generate import iter_kept

        self.records = list(iter_kept(folder, variants))
        if not self.records:
            raise ValueError(f"{folder}: no kept trajectory records; run `ibisagent-train trajectories` first")
        self.items = []
        for i, r in enumerate(self.records):
            masked = set(r["trajectory"].get("meta", {}).get("masked_steps", []))
            self.items += [(i, k) for k in range(len(r["trajectory"]["steps"])) if k not in masked]
        self.library, self.seed = library, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Row:
        from ibisagent.io import read_image, read_mask

        i, k = self.items[index]
        record = self.records[i]
        traj = Trajectory.from_dict(record["trajectory"])
        image = read_image(record["image"])
        gt = read_mask(record["mask"], image.shape[:2])
        rng = random.Random(f"{self.seed}:{record['id']}")
        instruction = self.library.initial(record["target"], record.get("modality", ""), rng).text
        history = tuple(s.action for s in traj.steps[:k])
        return Row(f"{record['id']}@{k}", image, instruction, record["target"], gt, history=history, max_steps=1)


class VQARows:
    """Close-ended VQA prompts from a JSON list of {"image": path (relative to the file), "question", "answer"}."""

    def __init__(self, path: str):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such VQA file")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path}: expected a non-empty JSON list of {{image, question, answer}} objects")
        for n, r in enumerate(rows):
            missing = [k for k in ("image", "question", "answer") if not isinstance(r, dict) or not r.get(k)]
            if missing:
                raise ValueError(f"{path}: row {n} lacks {missing}; every row needs image, question and answer")
        self.rows, self.folder = rows, path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        from ibisagent.io import read_image

        r = self.rows[index]
        image_path = Path(r["image"]) if Path(r["image"]).is_absolute() else self.folder / r["image"]
        return Row(
            f"vqa{index}",
            read_image(image_path),
            r["question"],
            r.get("target", "target"),
            solution=str(r["answer"]),
            max_steps=1,
        )


# -- rollouts ----------------------------------------------------------------------------------------------------------
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
        self._close, self._open = turn_boundaries(self.processor)
        self._end_of_turn = self.processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def start(self, instruction: str, targets: list[str]) -> None:
        self.segments, self.pixel_values, self.grids, self.images = [], [], [], []

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
        new, logps = self.sampler.request(self.slot, self.inputs())
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
    it). Returns the rollouts (row-major: group g holds rollouts[g*G:(g+1)*G]) and timings."""
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
    from ibisagent_training.rewards import step_rewards, trajectory_rewards

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


def group_advantages(totals: Sequence[float], group_size: int, scale: str = "group") -> list[float]:
    """A_i = (r_i - mean of its group) [/ (std of its group + 1e-4) when scale == "group"], groups of `group_size`
    consecutive rewards (GRPO, paper eq. 6). A group whose rewards are all equal gets zero advantages."""
    r = np.asarray(totals, dtype=np.float64)
    if len(r) % group_size:
        raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (g.std(axis=1, keepdims=True) + 1e-4)
    return adv.reshape(-1).tolist()


def lr_factor(update: int, kind: str, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimiser update `update` (0-based): (update + 1) / (warmup + 1) during warm-up,
    then 1 (constant), or decayed to 0 at `total` updates, linearly (1 - p) or on a half cosine (1 + cos(pi p)) / 2,
    p being the share of the post-warm-up updates already done."""
    if update < warmup:
        return (update + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    p = min(1.0, (update - warmup) / max(total - warmup, 1))
    return 1.0 - p if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


# -- loss ----------------------------------------------------------------------------------------------------------------
def token_logps(model, batch: dict, temperature: float = 1.0):
    """Log-probabilities of each next token under `model` (logits divided by the sampling temperature) and the mask
    of the positions that are trained: both (B, L-1), aligned with labels[:, 1:]."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # The softmax over the vocabulary only where a token is trained: observation tokens are most of an episode.
    trained = logits[mask].float() / temperature
    logps = torch.zeros(mask.shape, dtype=trained.dtype, device=trained.device)
    logps[mask] = torch.gather(trained.log_softmax(-1), -1, labels[mask].unsqueeze(-1)).squeeze(-1)
    return logps, mask


def policy_loss(logps, old_logps, advantages, mask, epsilon: float, epsilon_high: float, loss_type: str, norm: float):
    """The clipped GRPO surrogate, negated: -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) per model token,
    rho = exp(logp - old logp), summed with `loss_type` weighting and divided by `norm`:

    - "dapo": every token weighs the same; norm = the number of trained tokens in the whole rollout batch.
    - "grpo": each sequence's tokens are averaged first; norm = the number of sequences in the batch.
    No KL term (beta = 0). advantages: (B,), one per sequence."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / norm
    return (per_token * mask).sum() / norm


# -- the trainer ---------------------------------------------------------------------------------------------------------
class GRPOTrainer:
    """Rollouts, rewards, advantages and updates, with checkpoints and per-step metrics (`output_dir/metrics.jsonl`).

    rows: the prompts (`SegmentationRows`, `StepRows`, or any sequence of `Row`); vqa_rows: VQA prompts mixed in at
    `args.vqa_fraction`. model/processor default to `args.model_name_or_path`; tool_factory to the `ToolSpec` of
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
        from ibisagent._compat import ensure_torchvision

        ensure_torchvision()
        import torch
        from accelerate import Accelerator

        self.args = args
        self.reward_config = args.reward_config()
        self.output_dir = Path(args.output_dir)
        self.on_step = on_step
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
        self.resume = self._find_resume()
        library = _library(args.instructions)
        if rows is None:
            rows = _rows(args, library)
        if vqa_rows is None and args.vqa_file:
            vqa_rows = VQARows(args.vqa_file)
        if not len(rows):
            raise ValueError("no prompts to train on")
        self.rows, self.vqa_rows = rows, vqa_rows
        if model is None or processor is None or self.resume:
            model, processor = _load(self.resume or args.model_name_or_path)
        self.processor = processor
        if args.freeze_vision_tower:
            from ibisagent_training.sft import freeze_vision

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step = 0
        if self.resume:
            self._load_state(self.resume)

    # -- loop ---------------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to `args.max_steps`; returns the metrics of the steps run here."""
        history = []
        self.output_dir.mkdir(parents=True, exist_ok=True)
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
        """The prompts of `step`: a function of (seed, step, process), so a resumed run sees the same ones."""
        rng = np.random.default_rng([self.args.seed, step, self.accelerator.process_index])
        b = self.args.prompts_per_step
        n_vqa = int(round(b * self.args.vqa_fraction)) if self.vqa_rows is not None else 0
        pick = _choose(rng, len(self.rows), b - n_vqa)
        out = [self.rows[i] for i in pick]
        if n_vqa:
            out += [self.vqa_rows[i] for i in _choose(rng, len(self.vqa_rows), n_vqa)]
        return out

    def train_step(self) -> dict:
        import torch

        from ibisagent_training.sft import collate

        args = self.args
        t0 = time.perf_counter()
        rows = self.prompts(self.step)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        torch.manual_seed(int(np.random.SeedSequence([args.seed, self.step, 7]).generate_state(1)[0]))
        rollouts, timings = rollout(model, self.processor, rows, args, self.tools, self.templates, self.reward_config)
        advantages = group_advantages([r.rewards["total"] for r in rollouts], args.num_generations, args.scale_rewards)
        for r, a in zip(rollouts, advantages):
            r.advantage = a
        t1 = time.perf_counter()

        model.train()
        active = [i for i, a in enumerate(advantages) if a != 0.0]  # zero advantage: zero gradient (mu = 1 or not)
        encoded = {i: rollouts[i].policy.encoded() for i in active}
        n_tokens = sum(len(seg.ids) for r in rollouts for seg in r.policy.segments if seg.model)
        norm = float(max(n_tokens, 1) if args.loss_type == "dapo" else len(rollouts))
        pad = self.processor.tokenizer.pad_token_id
        pad = pad if pad is not None else self.processor.tokenizer.eos_token_id
        chunks = [active[i : i + args.micro_batch_size] for i in range(0, len(active), args.micro_batch_size)]
        device = self.accelerator.device
        old = {}
        if args.num_iterations > 1 and chunks:
            with torch.no_grad():
                for chunk in chunks:
                    batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad).items()}
                    logps, _ = token_logps(self.model, batch, args.temperature)
                    old.update({i: logps[j].detach() for j, i in enumerate(chunk)})
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        loss_total, grad_norm, clipped = 0.0, 0.0, 0.0
        for _ in range(args.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for chunk in chunks:
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad).items()}
                with self.accelerator.autocast():
                    logps, mask = token_logps(self.model, batch, args.temperature)
                old_logps = torch.stack([old[i] for i in chunk]) if old else logps.detach()
                adv = torch.tensor([advantages[i] for i in chunk], dtype=logps.dtype, device=device)
                loss = policy_loss(logps, old_logps, adv, mask, args.epsilon, eps_high, args.loss_type, norm)
                self.accelerator.backward(loss)
                loss_total += float(loss.detach())
                ratio = torch.exp(logps.detach() - old_logps)
                clipped += float((((ratio < 1 - args.epsilon) | (ratio > 1 + eps_high)) & mask).sum())
            if chunks:
                if args.max_grad_norm:
                    grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm))
                self.optimizer.step()
                self.scheduler.step()
        self.step += 1
        t2 = time.perf_counter()
        metrics = _step_metrics(rollouts, args)
        metrics.update(
            step=self.step,
            loss=loss_total / args.num_iterations,
            grad_norm=grad_norm,
            learning_rate=self.scheduler.get_last_lr()[0],
            clip_fraction=clipped / max(n_tokens * args.num_iterations, 1),
            model_tokens=n_tokens,
            sequences_trained=len(active),
            rollout_seconds=t1 - t0,
            train_seconds=t2 - t1,
            step_seconds=t2 - t0,
            steps_per_second=1.0 / max(t2 - t0, 1e-9),
            **{k: v for k, v in timings.items() if k != "rollout_s"},
        )
        return metrics

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
        inner = getattr(self.scheduler, "scheduler", self.scheduler)
        for group, base, factor in zip(self.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
            group["lr"] = base * factor(inner.last_epoch)


def _choose(rng: np.random.Generator, n: int, k: int) -> list[int]:
    if k <= 0:
        return []
    return rng.choice(n, size=k, replace=k > n).tolist()


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _library(path: str | None):
    from ibisagent_training.prompts import InstructionLibrary

    return InstructionLibrary.from_file(path) if path else InstructionLibrary()


def _rows(args: GRPOArguments, library):
    if not args.data:
        raise ValueError("give --data: a BiomedParse dataset (mode multi_turn) or a trajectories folder (mode step)")
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if args.mode == "step":
        return StepRows(args.data, library, args.seed)
    return SegmentationRows(args.data, args.split, library, args.max_turns, args.seed)


def _load(source: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ibisagent.policies.hf_vlm import resolve_model_source

    if not source:
        raise ValueError("give --model_name_or_path: the SFT checkpoint folder (or a Hub id) to start from")
    source = resolve_model_source(source)  # a local folder with config.json, or something that can only be a Hub id
    model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto")
    return model, AutoProcessor.from_pretrained(source)


def _tool_factory(args: GRPOArguments, device: str) -> Callable[[], Any]:
    """Builds the rollout tool on this process's device (a model tool on CPU would serialise GPU training)."""
    spec = ToolSpec(args.tool, args.tool_checkpoint, args.tool_config)
    return lambda: spec.build(device)


def _step_metrics(rollouts: list[Rollout], args: GRPOArguments) -> dict:
    """Per-step means: each reward component (over the rollouts where it applies), total reward and its spread,
    IoU and Dice of segmentation rollouts, episode length, click-in-target rate, VQA accuracy, images seen."""
    from ibisagent.metrics import click_in_target, dice
    from ibisagent_training.rewards import COMPONENTS

    out: dict[str, float] = {}
    for name in (*COMPONENTS, "total"):
        values = [r.rewards[name] for r in rollouts if r.rewards.get(name) is not None]
        out[f"reward/{name}"] = float(np.mean(values)) if values else float("nan")
    totals = np.array([r.rewards["total"] for r in rollouts]).reshape(-1, args.num_generations)
    out["reward/total_std_within_group"] = float(totals.std(axis=1).mean())
    seg = [r for r in rollouts if r.row.gt is not None]
    if seg:
        out["iou"] = float(np.mean([r.rewards["iou"] for r in seg]))
        finals = [r.trajectory.final_masks.get(r.row.target, np.zeros(r.row.gt.shape, bool)) for r in seg]
        out["dice"] = float(np.mean([dice(m, r.row.gt) for m, r in zip(finals, seg)]))
        hits = [
            click_in_target(c, r.row.gt)
            for r in seg
            for s in r.trajectory.steps
            if s.action
            for c in s.action.clicks
            if c.positive
        ]
        out["click_in_target"] = float(np.mean(hits)) if hits else 0.0
    vqa = [r for r in rollouts if r.row.solution is not None]
    if vqa:
        from ibisagent_training.rewards import answer_match

        out["vqa_accuracy"] = float(np.mean([answer_match(r.trajectory.answer, r.row.solution) for r in vqa]))
    out["episode_length"] = float(np.mean([len(r.trajectory.steps) for r in rollouts]))
    out["format_valid"] = float(np.mean([s.error is None for r in rollouts for s in r.trajectory.steps] or [0.0]))
    out["observations"] = float(sum(r.num_observations for r in rollouts))
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


def main(argv: list[str] | None = None) -> int:
    from ibisagent._compat import ensure_torchvision
    from ibisagent.tools import ToolError

    ensure_torchvision()
    from trl import TrlParser

    parser = TrlParser((GRPOArguments,), prog="ibisagent-train grpo")
    try:
        (args,) = parser.parse_args_and_config(args=argv)
        trainer = GRPOTrainer(args)
    except (OSError, ValueError, ToolError) as exc:  # bad data, options, model folder or tool checkpoint
        print(f"ibisagent-train grpo: error: {exc}", file=sys.stderr)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
