"""The interactive session: user steps and agent runs in one trajectory, undo to a step, removing clicks, checked
edits that change nothing when refused, and steps recorded as `run_episode` records them (fake tool)."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.episode import Episode
from ibisagent.loop import run_episode
from ibisagent.policies import ReplayPolicy
from ibisagent.session import EditError, InteractiveSession
from ibisagent.types import Click
from tests.conftest import FakeTool

H, W = 100, 120
IMAGE = np.full((H, W, 3), 90, np.uint8)


def click(x, y, positive=True):
    return Click(float(x), float(y), positive, "t")


def session(**kwargs) -> InteractiveSession:
    return InteractiveSession(FakeTool(), IMAGE, "segment the t", "t", **kwargs)


def agent(*points) -> ReplayPolicy:
    """A policy that clicks at the given normalised points, in order, then terminates."""
    return ReplayPolicy([f"<action>t: positive ({x}, {y})</action>" for x, y in points])


def test_user_and_agent_steps_share_one_trajectory():
    s = session(meta={"image": "img"})
    s.add_clicks([click(20, 20)])
    assert s.trajectory.meta == {"image": "img", "user_steps": [0]}
    step = s.trajectory.steps[0]
    assert step.text == "" and step.clicks == {"t": [click(20, 20)]} and step.masks["t"][20, 20]
    s.run_agent(agent((0.5, 0.5), (0.8, 0.8), (0.2, 0.8)), max_actions=2)
    assert len(s.trajectory.steps) == 3 and s.trajectory.stop_reason == "max_steps"
    assert [len(st.clicks["t"]) for st in s.trajectory.steps] == [1, 2, 3]
    assert s.trajectory.meta["user_steps"] == [0]
    s.run_agent(agent((0.3, 0.3)), max_actions=5)  # a new conversation: its first click, then Terminate
    assert s.trajectory.stop_reason == "terminate" and len(s.trajectory.steps) == 5
    assert s.trajectory.final_mask[30, 36]


def test_agent_steps_are_recorded_as_run_episode_records_them():
    s = session()
    policy_texts = [(0.5, 0.5), (0.2, 0.3)]
    s.run_agent(agent(*policy_texts), max_actions=10)
    alone = run_episode(agent(*policy_texts), Episode(FakeTool(), IMAGE, ["t"]), "segment the t")
    assert [st.to_dict() | {"timings": {}} for st in s.trajectory.steps] == [
        st.to_dict() | {"timings": {}} for st in alone.steps
    ]
    assert s.trajectory.stop_reason == alone.stop_reason == "terminate"


def test_undo_to_counts_unparsable_steps_and_continues_from_there():
    s = session()
    s.add_clicks([click(20, 20)])
    s.run_agent(ReplayPolicy(["no action here", "<action>t: positive (0.5, 0.5)</action>"]), max_actions=5)
    assert [st.error is None for st in s.trajectory.steps] == [True, False]  # one unparsable text ends the run
    s.run_agent(agent((0.5, 0.5)), max_actions=1)
    assert len(s.trajectory.steps) == 3 and s.episode.step == 2
    s.undo_to(2)  # the user step and the unparsable one: one action
    assert len(s.trajectory.steps) == 2 and s.episode.step == 1
    assert s.episode.state.clicks == {"t": (click(20, 20),)}
    s.add_clicks([click(90, 70)])
    assert s.trajectory.meta["user_steps"] == [0, 2] and s.trajectory.steps[2].index == 2
    s.undo_to(0)
    assert s.trajectory.steps == [] and not s.episode.union_mask().any() and s.trajectory.meta["user_steps"] == []


def test_removing_a_click_replays_the_later_ones_as_one_user_step():
    s = session()
    s.add_clicks([click(20, 20)])
    s.add_clicks([click(60, 50)])
    s.add_clicks([click(100, 80, positive=False), click(90, 20)])
    s.remove_clicks([(60.4, 50.9)])  # matched by pixel
    steps = s.trajectory.steps
    assert len(steps) == 2 and s.trajectory.meta["user_steps"] == [0, 1]
    assert steps[1].clicks == {"t": [click(20, 20), click(100, 80, False), click(90, 20)]}
    assert not steps[1].masks["t"][50, 60] and steps[1].masks["t"][20, 90]


def test_refused_edits_change_nothing():
    s = session()
    s.add_clicks([click(20, 20)])
    s.run_agent(agent((0.5, 0.5)), max_actions=1)
    before = (s.trajectory.to_dict(), s.episode.step, len(s.episode.history))
    with pytest.raises(EditError, match=r"^undo_to=3 is out of range; the session has steps 0\.\.2"):
        s.plan(undo_to=3)
    with pytest.raises(EditError, match=r"^remove_clicks\[1\]: no click at pixel \(5, 5\); current clicks: \(20, 20\)"):
        s.plan(remove=[(20, 20), (5, 5)])
    edit = s.plan(undo_to=1, clicks=[click(70, 70)])  # checked, not applied
    assert (s.trajectory.to_dict(), s.episode.step, len(s.episode.history)) == before
    s.apply(edit)
    assert [len(st.clicks["t"]) for st in s.trajectory.steps] == [1, 2]
    assert s.trajectory.steps[1].clicks["t"][1] == click(70, 70)


def test_an_edit_clears_the_answer_and_initial_masks_start_the_trajectory():
    initial = np.zeros((H, W), bool)
    initial[10:30, 10:30] = True
    s = session(initial_masks={"t": initial})
    assert s.trajectory.initial_masks["t"].sum() == 400 and s.episode.union_mask().sum() == 400
    s.run_agent(ReplayPolicy(["<answer>done</answer>"]), max_actions=3)
    assert s.trajectory.stop_reason == "answer" and s.trajectory.answer == "done"
    s.add_clicks([click(80, 80)])
    assert s.trajectory.answer is None and s.trajectory.stop_reason is None


def test_a_failing_tool_leaves_the_episode_as_it_was():
    class Failing(FakeTool):
        def predict(self, clicks, prev_logits=None):
            raise RuntimeError("out of memory")

    s = session()
    s.add_clicks([click(20, 20)])
    s.use_tool(Failing())
    with pytest.raises(RuntimeError):
        s.add_clicks([click(40, 40)])
    assert s.episode.step == 1 and len(s.episode.history) == 2 and len(s.trajectory.steps) == 1
