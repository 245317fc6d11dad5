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

Modules, as trl keeps a trainer's config apart from the trainer: `config` (GRPOArguments), `rows` (the prompts),
`rollout` (batched sampling, the token-keeping policy, scoring), `objective` (advantages, loss, log-probabilities,
learning-rate schedule) and `trainer` (GRPOTrainer, checkpoints, metrics, the command line).

Launch: `accelerate launch -m ibisagent_training.grpo --config grpo.yaml` (or `ibisagent-train grpo ...`); with N
processes `accelerate launch --multi_gpu --num_processes N -m ibisagent_training.grpo ...`, where `prompts_per_step`
counts per process (each group on one process) and the schedule, metrics and checkpoints are the whole run's.
"""

from ..common import IGNORE_INDEX
from .config import GRPOArguments
from .objective import group_advantages, lr_factor, policy_loss, token_logps
from .rollout import BatchSampler, Rollout, RolloutError, RolloutPolicy, rollout
from .rows import Row, SegmentationRows, StepRows, VQARows
from .trainer import GRPOTrainer, main

__all__ = [
    "IGNORE_INDEX",
    "BatchSampler",
    "GRPOArguments",
    "GRPOTrainer",
    "Rollout",
    "RolloutError",
    "RolloutPolicy",
    "Row",
    "SegmentationRows",
    "StepRows",
    "VQARows",
    "group_advantages",
    "lr_factor",
    "main",
    "policy_loss",
    "rollout",
    "token_logps",
]
