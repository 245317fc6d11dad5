"""GRPOArguments: its checks, the tool and policy specs it embeds, and its command-line spellings."""

from __future__ import annotations

import pytest

from ibisagent_training.grpo import GRPOArguments
from tests.training.grpo.conftest import make_args


def test_bad_options(setup):
    root, _, _, _ = setup
    with pytest.raises(ValueError, match="beta must be 0"):
        make_args(root, beta=0.04)
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        make_args(root, num_generations=1)
    with pytest.raises(ValueError, match="vqa_fraction > 0 needs --vqa_file"):
        make_args(root, vqa_fraction=0.3)
    with pytest.raises(ValueError, match="unknown reward option"):
        make_args(root, rewards='{"click_bonus": 2, "nope": 1}')
    assert make_args(root, rewards='{"click_bonus": 2}').reward_config().click_bonus == 2


def test_grpo_arguments_embed_the_tool_and_policy_specs():
    """The tool options are ToolSpec's fields, the shared policy options PolicySpec's (same help and checks); the
    old --tool_checkpoint still reads on the command line; policy_spec() is the sampling, full-history policy."""
    from ibisagent.specs import PolicySpec, SpecError, ToolSpec
    from ibisagent_training.grpo.trainer import build_parser

    args = GRPOArguments(tool="sam2", checkpoint="w.pt", tool_config="sam2.1_hiera_t", temperature=0.7, seed=3)
    assert isinstance(args, ToolSpec) and args.max_new_tokens == 256
    spec = args.policy_spec()
    assert isinstance(spec, PolicySpec) and spec.sample and spec.history == "full"
    assert (spec.temperature, spec.seed, spec.max_new_tokens) == (0.7, 3, 256)
    with pytest.raises(SpecError, match="tool 'nope' is invalid"):
        GRPOArguments(tool="nope")
    with pytest.raises(SpecError, match="temperature 0.0 is invalid"):
        GRPOArguments(temperature=0.0)
    with pytest.raises(SpecError, match="dialect 'x' is invalid"):
        GRPOArguments(dialect="x")
    parser = build_parser()
    (parsed,) = parser.parse_args_and_config(args=["--tool_checkpoint", "old.pt", "--tool_config", "t"])
    assert (parsed.checkpoint, parsed.tool_config) == ("old.pt", "t")
    (parsed,) = parser.parse_args_and_config(args=["--checkpoint", "new.pt"])
    assert parsed.checkpoint == "new.pt"
    assert "--tool_checkpoint" not in parser.format_help() and "--checkpoint" in parser.format_help()
