"""An interactive session: a user and the agent take turns on one image (or volume slice).

The user clicks (one step per batch of clicks), removes clicks, or goes back to an earlier step; the agent continues
from whatever is shown, for a bounded number of actions. All of it is one Episode and one Trajectory, and every step
(the agent's or the user's) is recorded by `ibisagent.loop.record_step`. The MONAI Label task maps requests onto this
class; where the agent works alone (the CLI, evaluation, training) `ibisagent.loop.run_episode` is all there is.

Changes come in two phases so that a refused request changes nothing: `plan` checks an edit against the session and
returns it, `apply` carries it out. `add_clicks`, `remove_clicks` and `undo_to` do both at once.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ibisagent.episode import Episode, EpisodeState
from ibisagent.loop import record_step, run_episode, start_trajectory
from ibisagent.policies.base import Policy
from ibisagent.tools.base import SegmentationTool
from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click


class EditError(ValueError):
    """An edit that does not fit the session: a step it does not have, a click it does not hold. The message starts
    with the argument it is about (`undo_to=...`, `remove_clicks[i]...`)."""


@dataclass(frozen=True)
class Edit:
    """A checked change: keep the first `keep_steps` trajectory steps (`keep_actions` episode actions), then apply
    `clicks` (the kept clicks a removal must re-apply, then the new ones) as one user step."""

    keep_steps: int
    keep_actions: int
    clicks: tuple[Click, ...]
    rewind: bool

    @property
    def changes(self) -> bool:
        return self.rewind or bool(self.clicks)


class InteractiveSession:
    """One image, one instruction and one target that a user and the agent segment in turns.

    tool:           the segmentation tool; `set_image` is called here unless `image_is_set` (see `use_tool`).
    image:          HxWx3 uint8.
    initial_masks:  optional {target: HxW bool} to refine (they also start the trajectory).
    meta:           entries for `trajectory.meta` (where the image came from, the tool's name).

    Read `episode` and `trajectory`; change them only through the methods. `trajectory.meta["user_steps"]` lists the
    steps that are the user's clicks.
    """

    def __init__(
        self,
        tool: SegmentationTool,
        image: np.ndarray,
        instruction: str,
        target: str,
        dialect: str = "ibis",
        initial_masks: dict[str, np.ndarray] | None = None,
        image_is_set: bool = False,
        meta: dict | None = None,
    ):
        self.instruction = instruction
        self.target = target
        self.episode = Episode(tool, image, [target], initial_masks, max_steps=None, image_is_set=image_is_set)
        self.trajectory: Trajectory = start_trajectory(self.episode, instruction, dialect)
        self.trajectory.meta.update(meta or {})
        self.trajectory.meta["user_steps"] = []

    def use_tool(self, tool: SegmentationTool) -> None:
        """Segment with `tool` from now on. It must already hold this session's image (a server hands each request
        a tool from its pool, with the image's embedding kept)."""
        self.episode.tool = tool

    # -- edits -----------------------------------------------------------------------------------------------------
    def plan(
        self,
        undo_to: int | None = None,
        remove: Sequence[tuple[float, float]] = (),
        clicks: Sequence[Click] = (),
    ) -> Edit:
        """Check an edit and return it; nothing changes (raises EditError).

        undo_to k keeps the first k trajectory steps (0: back to the initial state). Removing clicks (given as
        (x, y) pixels) goes back to the state before the earliest removed click appeared and re-applies the later
        clicks that are kept, together with `clicks`, as one user step."""
        steps = self.trajectory.steps
        actions = self._actions_after_steps()
        keep_steps, keep_actions = len(steps), self.episode.step
        if undo_to is not None:
            if not 0 <= undo_to <= len(steps):
                raise EditError(f"undo_to={undo_to} is out of range; the session has steps 0..{len(steps)}")
            keep_steps, keep_actions = undo_to, actions[undo_to - 1] if undo_to else 0
        reapply: list[Click] = []
        if remove:
            keep_actions, reapply = self._plan_removal(remove, keep_actions)
            keep_steps = bisect.bisect_right(actions, keep_actions)
        return Edit(keep_steps, keep_actions, tuple(reapply) + tuple(clicks), keep_steps < len(steps))

    def apply(self, edit: Edit) -> None:
        """Carry out an edit from `plan` (made on this session as it is now)."""
        if edit.rewind:
            self.episode.undo_to(edit.keep_actions)
            del self.trajectory.steps[edit.keep_steps :]
            meta = self.trajectory.meta
            meta["user_steps"] = [i for i in meta["user_steps"] if i < edit.keep_steps]
        if edit.clicks:
            action = Action(clicks=edit.clicks)
            t0 = time.perf_counter()
            self.episode.apply(action)
            step = Step(index=0, text="", action=action, timings={"tool": time.perf_counter() - t0})
            record_step(self.trajectory, step, self.episode)
            self.trajectory.meta["user_steps"].append(step.index)
        if edit.changes:  # what the agent answered was about a mask that is no longer shown
            self.trajectory.answer, self.trajectory.stop_reason = None, None

    def add_clicks(self, clicks: Sequence[Click]) -> None:
        """The user's clicks, as one step."""
        self.apply(self.plan(clicks=clicks))

    def remove_clicks(self, points: Sequence[tuple[float, float]]) -> None:
        self.apply(self.plan(remove=points))

    def undo_to(self, step: int) -> None:
        self.apply(self.plan(undo_to=step))

    # -- the agent -------------------------------------------------------------------------------------------------
    def run_agent(self, policy: Policy, max_actions: int, max_invalid: int = 1) -> Trajectory:
        """Let `policy` continue for at most `max_actions` more actions. It starts a new conversation from the
        current state: after the user's clicks or an undo, earlier turns would describe masks no longer shown."""
        policy.start(self.instruction, self.episode.targets)
        self.trajectory.answer = None
        return run_episode(
            policy,
            self.episode,
            self.instruction,
            trajectory=self.trajectory,
            max_invalid=max_invalid,
            max_actions=max_actions,
        )

    # -- internals -------------------------------------------------------------------------------------------------
    def _actions_after_steps(self) -> list[int]:
        """For each trajectory step, the episode's action count after it: a step applied one action if it carries
        one (a user's clicks, a parsed click, undo or terminate), none otherwise (unparsable text, an answer)."""
        out, n = [], 0
        for step in self.trajectory.steps:
            n += step.action is not None
            out.append(n)
        return out

    def _plan_removal(self, remove: Sequence[tuple[float, float]], keep_actions: int) -> tuple[int, list[Click]]:
        """(actions to keep, kept clicks to re-apply) for removing the clicks at `remove` from the state after
        `keep_actions` actions."""
        history = self.episode.history[: keep_actions + 1]
        current = history[-1].clicks
        removed: set[tuple[str, int, int]] = set()
        first_needed = len(history) - 1
        for i, point in enumerate(remove):
            px = (int(point[0]), int(point[1]))
            hits = [(t, *px) for t, cs in current.items() if any(_pixel(c) == px for c in cs)]
            if not hits:
                shown = ", ".join(f"({x}, {y})" for cs in current.values() for x, y in map(_pixel, cs)) or "none"
                raise EditError(f"remove_clicks[{i}]: no click at pixel {px}; current clicks: {shown}")
            for hit in hits:
                removed.add(hit)
                first_needed = min(first_needed, _appeared_at(history, hit) - 1)
        kept = {t: [c for c in cs if (t, *_pixel(c)) not in removed] for t, cs in current.items()}
        base = history[first_needed].clicks
        if any(list(base.get(t, ())) != kept[t][: len(base.get(t, ()))] for t in kept):
            first_needed, base = 0, history[0].clicks  # undone and redone in between: rebuild from the start
        return first_needed, [c for t, cs in kept.items() for c in cs[len(base.get(t, ())) :]]


def _pixel(click: Click) -> tuple[int, int]:
    return int(click.x), int(click.y)


def _appeared_at(history: list[EpisodeState], hit: tuple[str, int, int]) -> int:
    """The index of the first state from which on the click (target, x, y) is present in every later state."""
    target, *px = hit
    index = len(history) - 1
    while index > 0 and any(list(_pixel(c)) == px for c in history[index - 1].clicks.get(target, ())):
        index -= 1
    return index
