"""The options of a GRPO run (`ibisagent-train grpo --help`): a dataclass that trl's `TrlParser` fills from the
command line and a yaml file, as trl's `GRPOConfig` is kept apart from its trainer.

The segmentation tool's options are the core's `ToolSpec` (inherited: `--tool`, `--checkpoint`, `--tool_config`, as
in the `ibisagent` command and the server's `--conf`; the old `--tool_checkpoint` is still read on the command line).
The options GRPO shares with the inference policy are `PolicySpec` fields (`common.spec_field`): dialect,
template_dir, min_pixels, max_pixels, max_new_tokens, temperature, top_p, seed; `policy_spec()` is the policy the
rollouts run. Where the names meet, GRPO's meaning is:

- model: the spec's `model` is GRPO's `model_name_or_path` (trl's name for the starting checkpoint).
- max_new_tokens: default 256, not 512 (a rollout turn is one short <think>/<action>).
- temperature: the sampling temperature, and also the one the training pass divides its logits by.
- seed: seeds prompt order, sampling (with the process index) and initialisation, not only sampling.
- sample, history: not options: rollouts always sample and keep the whole episode (history "full").
- top_k: GRPO's own (the spec has none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ibisagent.specs import PolicySpec, ToolSpec

from ..common import spec_field, spec_values
from ..rewards import RewardConfig

MODES = ("multi_turn", "step")
LOSS_TYPES = ("dapo", "grpo")
SCALE_REWARDS = ("group", "none")
LR_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class GRPOArguments(ToolSpec):
    """Everything a GRPO run needs (`ibisagent-train grpo --help`); rewards are `RewardConfig` fields prefixed
    `reward_` in yaml under `rewards:` or given as `--rewards '{"click_bonus": 0.5}'`. The tool fields (tool,
    checkpoint, tool_config) are the `ToolSpec` this class extends."""

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
    template_dir: str | None = spec_field(PolicySpec, "template_dir")
    dialect: str = spec_field(PolicySpec, "dialect")
    max_turns: int = field(default=8, metadata={"help": "step limit of a multi-turn episode"})
    max_invalid: int = field(
        default=1, metadata={"help": "unusable outputs in a row that end an episode (before: retried with feedback)"}
    )
    num_generations: int = field(default=8, metadata={"help": "G: episodes per prompt (one group)"})
    prompts_per_step: int = field(
        default=4,
        metadata={"help": "prompts per optimisation step and process (B groups each; a step trains B x processes)"},
    )
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
    temperature: float = spec_field(PolicySpec, "temperature", help="sampling temperature (rollouts and log-probs)")
    top_p: float = spec_field(PolicySpec, "top_p")
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    max_new_tokens: int = spec_field(PolicySpec, "max_new_tokens", default=256)
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward pass"})
    min_pixels: int | None = spec_field(PolicySpec, "min_pixels")
    max_pixels: int | None = spec_field(PolicySpec, "max_pixels")
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
    seed: int = spec_field(PolicySpec, "seed", help="seed of prompt order, sampling and initialisation")
    rewards: str | None = field(
        default=None, metadata={"help": "RewardConfig fields: a mapping in yaml, a JSON object on the command line"}
    )

    def __post_init__(self):
        super().__post_init__()  # the tool
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
        self.policy_spec()  # checks the policy options
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if isinstance(self.rewards, str):
            try:
                self.rewards = json.loads(self.rewards)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--rewards must be a JSON object of RewardConfig fields: {exc}") from None
        self.reward_config()  # validates the reward options

    def policy_spec(self) -> PolicySpec:
        """The policy the rollouts run: this run's checkpoint and chat options, sampling, whole-episode history."""
        shared = spec_values(PolicySpec, self)  # dialect, template_dir, pixel budget, decoding options, seed
        return PolicySpec(model=self.model_name_or_path or None, history="full", sample=True, **shared)

    def reward_config(self) -> RewardConfig:
        options = dict(self.rewards or {})
        options.setdefault("dialect", self.dialect)
        return RewardConfig.from_dict(options)
