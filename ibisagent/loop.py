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
        step=episode.step,
        instruction=instruction,
        image=overlay(episode.image, union),
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
) -> Trajectory:
    """Run `policy` in `episode` until it answers, terminates, repeats itself, writes `max_invalid` unusable
    outputs in a row, or reaches the episode's step limit.

    gt: optional {target: HxW bool}; when given, each step records IoU/Dice per target in `Step.metrics`.
    trajectory: continue this trajectory (a resumed session) instead of starting a new one; the policy is then
    not restarted. Returns the trajectory (also for policy failures, with stop_reason "policy_error").
    """
    grammar = Grammar(policy.dialect)
    default_target = episode.targets[0] if episode.targets else "target"
    if trajectory is None:
        trajectory = Trajectory(
            instruction,
            episode.image_size,
            episode.targets,
            policy.dialect,
            initial_masks={t: m for t, m in episode.state.masks.items() if m.any()},
        )
        policy.start(instruction, episode.targets)
    trajectory.stop_reason = None
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
            trajectory.steps.append(step)
            if on_step:
                on_step(step)
            if invalid >= max_invalid:
                trajectory.stop_reason = "invalid_action"
            elif episode.step >= episode.max_steps:
                trajectory.stop_reason = "max_steps"
            continue
        invalid, feedback = 0, None
        step.think, step.action, step.answer = parsed.think, parsed.action, parsed.answer
        t2 = time.perf_counter()
        if parsed.action is not None:
            episode.apply(parsed.action)
        t3 = time.perf_counter()
        state = episode.state
        step.clicks = {t: list(cs) for t, cs in state.clicks.items()}
        step.masks = dict(state.masks)
        step.scores = dict(state.scores)
        if gt:
            for t, g in gt.items():
                m = state.masks.get(t, np.zeros(episode.image_size, bool))
                step.metrics[f"iou/{t}"], step.metrics[f"dice/{t}"] = iou(m, g), dice(m, g)
        step.timings = {"render": t0 - t_render, "policy": t1 - t0, "parse": t2 - t1, "tool": t3 - t2}
        trajectory.steps.append(step)
        if on_step:
            on_step(step)
        if parsed.answer is not None:
            trajectory.answer = parsed.answer
            trajectory.stop_reason = "answer"
        else:
            trajectory.stop_reason = episode.stop_reason()
    return trajectory
