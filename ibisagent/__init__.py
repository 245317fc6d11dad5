"""IBISAgent: a vision-language policy segments biomedical images by clicking, an interactive tool answers.

The core (`ibisagent.loop.run_episode` and what it uses) imports numpy, scipy and pillow only; model adapters
(`ibisagent.tools.sam2_tool`, `ibisagent.policies.hf_vlm`, ...) import torch and friends when they are used.
"""

from ibisagent.episode import Episode
from ibisagent.grammar import ActionParseError, Grammar
from ibisagent.loop import run_episode
from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click, ParsedOutput

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionParseError",
    "Click",
    "Episode",
    "Grammar",
    "ParsedOutput",
    "Step",
    "Trajectory",
    "run_episode",
]
