"""The module's request type: its checks, its JSON, and its field names against the server's request parser."""

from __future__ import annotations

import dataclasses

import pytest
from IBISAgentLib import AgentRequest


def test_field_names_are_the_servers_request_fields():
    pytest.importorskip("monailabel")
    from monailabel_app.lib.request import FIELDS

    names = [f.name for f in dataclasses.fields(AgentRequest)]
    # "label" is where MONAI Label puts the uploaded initial mask: the module sends it as a file, not a param
    assert sorted(names) == sorted(set(FIELDS) - {"label"})


def test_server_parses_what_the_module_sends():
    pytest.importorskip("monailabel")
    from monailabel_app.lib.request import AgentParams

    request = AgentRequest(
        " segment the liver ",
        slice=4,
        axis=1,
        foreground=[[3, 4, 5]],
        remove_clicks=[[1, 2]],
        max_steps=3,
        session_id="ab" * 16,
        undo_to=2,
        run_agent=False,
        target="liver",
    )
    params = AgentParams.parse(request.to_params(), step_limit=10)
    assert (params.instruction, params.slice, params.axis, params.max_steps) == ("segment the liver", 4, 1, 3)
    assert (params.foreground, params.background, params.remove_clicks) == ([[3.0, 4.0, 5.0]], [], [[1.0, 2.0]])
    assert (params.session_id, params.undo_to, params.run_agent, params.target) == ("ab" * 16, 2, False, "liver")


def test_to_params_leaves_unset_fields_out():
    params = AgentRequest("segment the lesion", slice=3, axis=2, foreground=[[1, 2, 3]]).to_params()
    assert params == {
        "instruction": "segment the lesion",
        "slice": 3,
        "axis": 2,
        "foreground": [[1, 2, 3]],
        "max_steps": 10,
        "run_agent": True,
    }


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"instruction": "  "}, "write an instruction"),
        ({"max_steps": 0}, "max steps must be"),
        ({"max_steps": True}, "max steps must be"),
        ({"undo_to": -1, "session_id": "s"}, "undo to step must be 0 or more"),
        ({"foreground": [[1, 2, 3, 4]]}, "foreground point [1, 2, 3, 4]"),
        ({"background": [["a", 2]]}, "background point"),
        ({"undo_to": 0}, "need a session"),
        ({"remove_clicks": [[1, 2]]}, "need a session"),
        ({"run_agent": False}, "place positive or negative points first"),
    ],
)
def test_check_says_what_to_change(fields, words):
    request = AgentRequest(**{"instruction": "segment the liver", **fields})
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        request.to_params()


def test_a_label_or_an_undo_is_something_to_do_without_the_agent():
    AgentRequest("segment the liver", run_agent=False).check(has_label=True)
    AgentRequest("segment the liver", run_agent=False, session_id="s", undo_to=0).check()
