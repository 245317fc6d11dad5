"""Episode state: per target the clicks so far, the tool's previous logits and the current mask; a history of
states so that any earlier step can be restored (undo / backtrack); and the stop rules (step limit, repeats).

This is where a click becomes a mask: `Episode.apply` hands all clicks of a target plus its previous logits to the
segmentation tool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ibisagent.tools.base import SegmentationTool
from ibisagent.types import Action, Click


@dataclass(frozen=True)
class EpisodeState:
    """An immutable snapshot. clicks/logits/masks/scores are keyed by target name."""

    clicks: dict[str, tuple[Click, ...]]
    logits: dict[str, np.ndarray | None]
    masks: dict[str, np.ndarray]
    scores: dict[str, float]


class Episode:
    """The environment of one image and one instruction around a segmentation tool.

    image:          HxWx3 uint8; `set_image` is called on the tool here, once, unless `image_is_set` says the
                    caller already did it for this very image (the server reuses embeddings across requests).
    targets:        target names in order; clicks for a new target name add it.
    initial_masks:  optional HxW bool masks per target (refinement mode); they become the previous logits.
    max_steps:      the step limit; None: none (an interactive session limits each run of the agent instead).
    """

    def __init__(
        self,
        tool: SegmentationTool,
        image: np.ndarray,
        targets: list[str],
        initial_masks: dict[str, np.ndarray] | None = None,
        max_steps: int | None = 20,
        repeat_limit: int = 2,
        image_is_set: bool = False,
    ):
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.tool = tool
        self.image = image
        self.max_steps = max_steps
        self.repeat_limit = repeat_limit
        if not image_is_set:
            tool.set_image(image)
        h, w = image.shape[:2]
        initial_masks = dict(initial_masks or {})
        for name, m in initial_masks.items():
            if np.shape(m) != (h, w):
                raise ValueError(f"initial mask for {name!r} has shape {np.shape(m)}, expected the image's {(h, w)}")
        names = list(dict.fromkeys(list(targets) + list(initial_masks)))
        self.history: list[EpisodeState] = [
            EpisodeState(
                clicks={t: () for t in names},
                logits={t: tool.mask_to_logits(initial_masks[t]) if t in initial_masks else None for t in names},
                masks={t: np.asarray(initial_masks.get(t, np.zeros((h, w), bool)), bool) for t in names},
                scores={t: 0.0 for t in names},
            )
        ]
        self.actions: list[Action] = []
        # history indices of the states that undo can return to, oldest first: a click pushes, an undo pops.
        self._undoable: list[int] = [0]

    # -- state -------------------------------------------------------------------------------------------
    @property
    def state(self) -> EpisodeState:
        return self.history[-1]

    @property
    def step(self) -> int:
        """Number of actions applied so far (undo counts as an action)."""
        return len(self.actions)

    @property
    def targets(self) -> list[str]:
        return list(self.state.masks)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def union_mask(self) -> np.ndarray:
        """HxW bool union of all targets' current masks."""
        out = np.zeros(self.image_size, bool)
        for m in self.state.masks.values():
            out |= m
        return out

    def all_clicks(self) -> list[Click]:
        return [c for cs in self.state.clicks.values() for c in cs]

    # -- transitions -------------------------------------------------------------------------------------
    def apply(self, action: Action) -> EpisodeState:
        """Apply clicks (each touched target re-segmented from all its clicks and previous logits), an undo, or a
        terminate (which changes nothing).

        Undo returns to the state before the latest click action still in effect (undo twice: two clicks back).
        With no click left to revert, it discards the initial masks (in refinement mode the user's mask is the
        latest change: the agent rejects a mask of the wrong structure this way); otherwise it changes nothing."""
        if action.undo:
            self.actions.append(action)
            if len(self._undoable) > 1:
                self._undoable.pop()
                self.history.append(self.history[self._undoable[-1]])
            else:
                self.history.append(self._discarded(self.state))
                self._undoable = [len(self.history) - 1]
            return self.state
        if action.terminate:
            self.actions.append(action)
            self.history.append(self.state)
            return self.state
        prev = self.state
        clicks, logits = dict(prev.clicks), dict(prev.logits)
        masks, scores = dict(prev.masks), dict(prev.scores)
        h, w = self.image_size
        for target in action.targets:
            clicks[target] = clicks.get(target, ()) + tuple(c for c in action.clicks if c.target == target)
            out = self.tool.predict(list(clicks[target]), logits.get(target))
            logits[target], masks[target], scores[target] = out.logits, out.mask, float(out.score)
        for target in clicks:
            masks.setdefault(target, np.zeros((h, w), bool))
        self.actions.append(action)  # only now: a tool that fails leaves the episode as it was
        self.history.append(EpisodeState(clicks, logits, masks, scores))
        self._undoable.append(len(self.history) - 1)
        return self.state

    def _discarded(self, state: EpisodeState) -> EpisodeState:
        """`state` without its masks and logits (clicks kept: there are none when nothing is left to undo)."""
        h, w = self.image_size
        names = list(state.masks)
        return EpisodeState(
            clicks=dict(state.clicks),
            logits={t: None for t in names},
            masks={t: np.zeros((h, w), bool) for t in names},
            scores={t: 0.0 for t in names},
        )

    def undo_to(self, step: int) -> EpisodeState:
        """Restore the state after `step` actions (0 = the initial state) and forget later actions: the caller
        (the server, a user) backtracks and the episode continues from there."""
        if not 0 <= step <= self.step:
            raise ValueError(f"cannot undo to step {step}; the episode has steps 0..{self.step}")
        del self.history[step + 1 :]
        del self.actions[step:]
        self._undoable = self._replay_undoable()
        return self.state

    def _replay_undoable(self) -> list[int]:
        undoable = [0]
        for i, action in enumerate(self.actions, start=1):
            if action.clicks:
                undoable.append(i)
            elif action.undo:
                if len(undoable) > 1:
                    undoable.pop()
                else:
                    undoable = [i]
        return undoable

    def stop_reason(self) -> str | None:
        """Why the episode must stop now, or None. Checked after each action."""
        if self.actions and self.actions[-1].terminate:
            return "terminate"
        if self.repeat_limit > 1 and len(self.actions) >= self.repeat_limit:
            last = self.actions[-self.repeat_limit :]
            if last[0].clicks and all(a == last[0] for a in last):
                return "repeated_action"
        if self.max_steps is not None and self.step >= self.max_steps:
            return "max_steps"
        return None
