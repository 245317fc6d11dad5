"""The agent loop: observe -> the policy writes text -> parse -> the tool segments -> record -> stop?"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ibisagent.episode import Episode
from ibisagent.grammar import ActionParseError, Grammar
from ibisagent.metrics import dice, iou
from ibisagent.policies.base import Observation, Policy
from ibisagent.render import overlay
from ibisagent.trajectory import Step, Trajectory


def observe(episode: Episode, instruction: str, feedback: str | None = None) -> Observation:
    """The observation of the episode's current state (overlay of the union of all targets' masks)."""
    union = episode.union_mask()
    return Observation(
        episode.step,
        instruction,
        lambda: overlay(episode.image, union),
        original=episode.image,
        has_mask=bool(union.any()),
        targets=episode.targets,
        masks=dict(episode.state.masks),
        clicks=dict(episode.state.clicks),
        feedback=feedback,
    )


def run_episode(
    policy: Policy,
    episode: Episode,
    instruction: str,
    gt: dict[str, np.ndarray] | None = None,
    trajectory: Trajectory | None = None,
    max_invalid: int = 1,
    on_step: Callable[[Step], None] | None = None,
    max_actions: int | None = None,
) -> Trajectory:
    """Run `policy` in `episode` until it answers, terminates, repeats itself, writes `max_invalid` unusable
    outputs in a row, or reaches the episode's step limit (or applies `max_actions` more actions in this call).

    gt: optional {target: HxW bool}; when given, each step records IoU/Dice per target in `Step.metrics`.
    trajectory: continue this trajectory (a resumed session) instead of starting a new one; the policy is then
    not restarted. Returns the trajectory (also for policy failures, with stop_reason "policy_error").
    """
    grammar = Grammar(policy.dialect)
    default_target = episode.targets[0] if episode.targets else "target"
    if trajectory is None:
        trajectory = start_trajectory(episode, instruction, policy.dialect)
        policy.start(instruction, episode.targets)
    trajectory.stop_reason = None
    limit = episode.max_steps
    if max_actions is not None:
        limit = episode.step + max_actions if limit is None else min(limit, episode.step + max_actions)
    invalid, feedback = 0, None
    while trajectory.stop_reason is None:
        t_render = time.perf_counter()
        obs = observe(episode, instruction, feedback)
        t0 = time.perf_counter()
        try:
            text = policy.act(obs)
        except Exception as exc:  # a policy crash ends the episode, with the trajectory so far intact
            trajectory.stop_reason = "policy_error"
            trajectory.meta["error"] = f"{type(exc).__name__}: {exc}"
            break
        t1 = time.perf_counter()
        step = Step(index=len(trajectory.steps), text=text)
        try:
            parsed = grammar.parse(text, episode.image_size, default_target)
        except ActionParseError as exc:
            invalid += 1
            step.error = str(exc)
            feedback = f"Your previous output could not be used ({exc}). Follow the required format."
            step.timings = {"render": t0 - t_render, "policy": t1 - t0, "parse": time.perf_counter() - t1}
            record_step(trajectory, step)
            if on_step:
                on_step(step)
            if invalid >= max_invalid:
                trajectory.stop_reason = "invalid_action"
            elif limit is not None and episode.step >= limit:
                trajectory.stop_reason = "max_steps"
            continue
        invalid, feedback = 0, None
        step.think, step.action, step.answer = parsed.think, parsed.action, parsed.answer
        t2 = time.perf_counter()
        if parsed.action is not None:
            episode.apply(parsed.action)
        t3 = time.perf_counter()
        step.timings = {"render": t0 - t_render, "policy": t1 - t0, "parse": t2 - t1, "tool": t3 - t2}
        record_step(trajectory, step, episode, gt)
        if on_step:
            on_step(step)
        if parsed.answer is not None:
            trajectory.answer = parsed.answer
            trajectory.stop_reason = "answer"
        else:
            trajectory.stop_reason = episode.stop_reason()
            if trajectory.stop_reason is None and limit is not None and episode.step >= limit:
                trajectory.stop_reason = "max_steps"
    return trajectory


def start_trajectory(episode: Episode, instruction: str, dialect: str) -> Trajectory:
    """The empty trajectory of `episode` (its initial masks included)."""
    initial = {t: m for t, m in episode.state.masks.items() if m.any()}
    return Trajectory(instruction, episode.image_size, episode.targets, dialect, initial_masks=initial)


def record_step(
    trajectory: Trajectory,
    step: Step,
    episode: Episode | None = None,
    gt: dict[str, np.ndarray] | None = None,
) -> Step:
    """Append `step` to the trajectory, with the episode's state after it (clicks, masks, scores per target) and,
    given `gt`, IoU/Dice per target. A step whose text could not be used changed nothing: record it without
    `episode`. The agent's steps and a user's clicks (`ibisagent.session`) are recorded here alike."""
    step.index = len(trajectory.steps)
    if episode is not None:
        state = episode.state
        step.clicks = {t: list(cs) for t, cs in state.clicks.items()}
        step.masks = dict(state.masks)
        step.scores = dict(state.scores)
        for t, g in (gt or {}).items():
            m = state.masks.get(t, np.zeros(episode.image_size, bool))
            step.metrics[f"iou/{t}"], step.metrics[f"dice/{t}"] = iou(m, g), dice(m, g)
    trajectory.steps.append(step)
    return step
