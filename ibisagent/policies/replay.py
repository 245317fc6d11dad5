"""The replay policy: plays back the texts of a saved trajectory (for reports, tests and re-running a tool)."""

from __future__ import annotations

from ibisagent.policies.base import Observation
from ibisagent.trajectory import Trajectory


class ReplayPolicy:
    """Returns the recorded step texts in order, then Terminate once they run out."""

    def __init__(self, texts: list[str], dialect: str = "ibis"):
        self.texts = list(texts)
        self.dialect = dialect
        self._next = 0

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> ReplayPolicy:
        return cls([s.text for s in trajectory.steps], trajectory.dialect)

    def start(self, instruction: str, targets: list[str]) -> None:
        self._next = 0

    def act(self, obs: Observation) -> str:
        if self._next >= len(self.texts):
            return "<think>\nThe recorded trajectory has ended.\n</think>\n<action>\nTerminate\n</action>"
        text = self.texts[self._next]
        self._next += 1
        return text
