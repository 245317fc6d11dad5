"""The oracle policy: the click simulator with access to the ground truth, writing grammar text.

It gives upper bounds, builds training trajectories and drives tool benchmarks.
"""

from __future__ import annotations

import numpy as np

from ibisagent.grammar import Grammar
from ibisagent.metrics import iou
from ibisagent.policies.base import Observation
from ibisagent.simulator import next_clicks_multi
from ibisagent.types import Action


def _where(click, size: tuple[int, int]) -> str:
    h, w = size
    vert = "upper" if click.y < h / 3 else "lower" if click.y > 2 * h / 3 else "middle"
    horiz = "left" if click.x < w / 3 else "right" if click.x > 2 * w / 3 else "central"
    return f"{vert} {horiz} part of the image"


class OraclePolicy:
    """Clicks at the centre of the largest error region of each target until every target's IoU reaches
    `iou_threshold`, then terminates.

    gt: {target name: HxW bool}. The text it writes is a plain description of the step; issue-specific reasoning
    generators for SFT data build on the same simulator.
    """

    def __init__(self, gt: dict[str, np.ndarray], dialect: str = "ibis", iou_threshold: float = 0.9):
        self.gt = {t: np.asarray(m, bool) for t, m in gt.items()}
        self.dialect = dialect
        self.grammar = Grammar(dialect)
        self.iou_threshold = iou_threshold

    def start(self, instruction: str, targets: list[str]) -> None:
        missing = [t for t in targets if t not in self.gt]
        if missing:
            raise ValueError(f"the oracle has no ground truth for target(s) {missing}; it knows {list(self.gt)}")

    def act(self, obs: Observation) -> str:
        size = obs.image_size
        scores = {t: iou(obs.masks.get(t, np.zeros(size, bool)), g) for t, g in self.gt.items()}
        if all(s >= self.iou_threshold for s in scores.values()):
            names = ", ".join(self.gt)
            return self.grammar.format(
                Action(terminate=True),
                size,
                think=f"The mask covers the {names} well; no further correction is needed.",
                answer=f"The {names} {'is' if len(self.gt) == 1 else 'are'} segmented.",
            )
        clicked = [c for cs in obs.clicks.values() for c in cs]
        clicks = [c for c in next_clicks_multi(obs.masks, self.gt, clicked) if scores[c.target] < self.iou_threshold]
        if not clicks:  # every remaining error pixel was clicked already: nothing more a click can do
            return self.grammar.format(
                Action(terminate=True), size, think="No further click can improve the mask.", answer="Done."
            )
        parts = [
            f"{'Part of the ' + c.target + ' is missed' if c.positive else 'The mask spills beyond the ' + c.target} "
            f"in the {_where(c, size)}; {'add' if c.positive else 'remove'} it."
            for c in clicks
        ]
        return self.grammar.format(Action(tuple(clicks)), size, think=" ".join(parts))
