"""ibisagent.specs: the tool and policy specs, their checks, and the command-line flags made from their fields."""

from __future__ import annotations

import argparse

import pytest

from ibisagent.specs import PolicySpec, SpecError, ToolSpec, add_arguments, from_namespace
from ibisagent.tools.classical import ClassicalTool


def test_flags_round_trip_into_the_specs():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ToolSpec)
    add_arguments(parser, PolicySpec)
    args = parser.parse_args(["--tool", "sam2", "--tool-config", "sam2.1_hiera_s", "--sample", "--max-pixels", "4096"])
    assert from_namespace(ToolSpec, args) == ToolSpec("sam2", None, "sam2.1_hiera_s")
    policy = from_namespace(PolicySpec, args)
    assert (policy.sample, policy.max_pixels, policy.dialect, policy.model) == (True, 4096, "ibis", None)
    assert policy.options()["do_sample"] is True
    with pytest.raises(SystemExit):  # argparse refuses a tool outside the choices, as before
        parser.parse_args(["--tool", "magic"])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: ToolSpec(tool="magic"), "tool 'magic' is invalid: expected one of classical"),
        (lambda: PolicySpec(dialect="klingon"), "dialect 'klingon' is invalid"),
        (lambda: PolicySpec(temperature=0.0), "temperature 0.0 is invalid: expected a positive number"),
        (lambda: PolicySpec(top_p=1.5), "top_p 1.5 is invalid"),
        (lambda: PolicySpec(max_pixels=0), "max_pixels 0 is invalid"),
        (lambda: PolicySpec().build(), "model None is invalid"),
    ],
)
def test_bad_values_name_the_field(make, words):
    with pytest.raises(SpecError, match=words) as info:
        make()
    assert info.value.name in words


def test_the_classical_tool_builds_without_torch():
    assert isinstance(ToolSpec().build("cpu"), ClassicalTool)
