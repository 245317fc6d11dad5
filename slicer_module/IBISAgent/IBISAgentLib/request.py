"""The IBISAgent request: the params of POST /infer/ibisagent, built and checked before anything is sent.

The server reads the same names (`monailabel_app/lib/request.py`, `FIELDS`; a test checks that both lists agree)
and checks everything again: these checks only spare a round trip and give the module's own wording. An initial mask
is not a param: it travels as the request's label file (`IBISAgentClient.infer(label_path=...)`).

Points are integer voxel indices [i, j, k] of the session's slice (or [x, y] pixels of a 2D image); `remove_clicks`
are [x, y] pixels of clicks the trajectory shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class AgentRequest:
    """One request: a new session when `session_id` is None, else a continuation of that session.

    undo_to:     keep the first k trajectory steps (0: back to the initial state) before anything else.
    run_agent:   let the agent go on for at most `max_steps` actions; False applies only the points.
    target:      the target name of the clicks (default: derived from the instruction by the server).
    """

    instruction: str
    slice: int | None = None
    axis: int | None = None
    foreground: list[list[float]] = field(default_factory=list)
    background: list[list[float]] = field(default_factory=list)
    remove_clicks: list[list[float]] = field(default_factory=list)
    max_steps: int = 10
    session_id: str | None = None
    undo_to: int | None = None
    run_agent: bool = True
    target: str | None = None

    def check(self, has_label: bool = False) -> None:
        """Raise ValueError, saying what to change, for a request the server would refuse. `has_label`: an initial
        mask is sent with it."""
        if not (self.instruction or "").strip():
            raise ValueError("write an instruction, e.g. 'segment the liver tumor'")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max steps must be a whole number of at least 1, got {self.max_steps!r}")
        if self.undo_to is not None and (not isinstance(self.undo_to, int) or self.undo_to < 0):
            raise ValueError(f"undo to step must be 0 or more, got {self.undo_to!r}")
        for name in ("foreground", "background", "remove_clicks"):
            for point in getattr(self, name):
                if len(point) not in (2, 3) or not all(isinstance(v, (int, float)) for v in point):
                    raise ValueError(f"{name} point {point!r} must be [i, j, k] voxel indices or [x, y] pixels")
        if self.session_id is None and (self.undo_to is not None or self.remove_clicks):
            raise ValueError("undo and removing clicks need a session; run the agent first")
        edits = self.foreground or self.background or self.remove_clicks or self.undo_to is not None or has_label
        if not self.run_agent and not edits:
            raise ValueError("place positive or negative points first (or let the agent continue)")

    def to_params(self, has_label: bool = False) -> dict:
        """The checked request as the JSON params object (unset optional fields left out)."""
        self.check(has_label)
        params = asdict(self)
        params["instruction"] = self.instruction.strip()
        return {k: v for k, v in params.items() if v is not None and v != []}
