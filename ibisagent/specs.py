"""One spec per tool and per policy: the options that say which segmentation tool and which VLM policy to build.

The `ibisagent` command (flags with dashes, `--tool-config`) and the MONAI Label app (`--conf tool_config ...`)
embed these dataclasses instead of re-declaring their fields; trajectory generation and GRPO build their tool
through `ToolSpec`. The device is not part of a spec: a run has one device (the command's `--device`, the server's
`--conf device`, the accelerator's device in training) and passes it to `build`.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ibisagent.grammar import DIALECTS
from ibisagent.tools import TOOLS, SegmentationTool, build_tool

HISTORY_MODES = ("full", "current")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class SpecError(ValueError):
    """A spec field holds a bad value; the message names the field, the value and what is expected (also kept as
    attributes, so that a command can name its own flag or key)."""

    def __init__(self, name: str, value: Any, expected: str):
        super().__init__(f"{name} {value!r} is invalid: expected {expected}")
        self.name, self.value, self.expected = name, value, expected


@dataclass
class ToolSpec:
    """Which segmentation tool: its name, weights and model config."""

    tool: str = field(
        default="classical",
        metadata={"help": "segmentation tool (default: classical, needs no weights)", "choices": TOOLS},
    )
    checkpoint: str | None = field(
        default=None,
        metadata={"help": "weights file of a model tool (e.g. MedSAM2_latest.pt); unset: random weights, tests only"},
    )
    tool_config: str | None = field(
        default=None, metadata={"help": "model config: a SAM2.1 config name (sam2.1_hiera_t ...) or a SAM type (vit_b)"}
    )

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise SpecError("tool", self.tool, f"one of {', '.join(TOOLS)}")

    def build(self, device: str = "cpu") -> SegmentationTool:
        """The tool on `device` (a torch device string; ignored by the classical tool). Raises ToolError."""
        return build_tool(self.tool, self.checkpoint, self.tool_config, device)


@dataclass
class PolicySpec:
    """Which VLM policy and how it talks and decodes: checkpoint, grammar, context, precision, sampling."""

    model: str | None = field(
        default=None, metadata={"help": "Qwen2.5-VL-compatible checkpoint: a local folder or a Hub id"}
    )
    dialect: str = field(
        default="ibis", metadata={"help": "action grammar: ibis (paper) or released", "choices": DIALECTS}
    )
    history: str = field(
        default="full", metadata={"help": "model context: full (all turns) or current", "choices": HISTORY_MODES}
    )
    dtype: str = field(default="auto", metadata={"help": "model dtype (auto: the checkpoint's)", "choices": DTYPES})
    template_dir: str | None = field(default=None, metadata={"help": "prompt templates folder (default: packaged)"})
    min_pixels: int | None = field(default=None, metadata={"help": "image processor pixel budget, lower bound"})
    max_pixels: int | None = field(default=None, metadata={"help": "image processor pixel budget, upper bound"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens the model may write per step"})
    sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep this probability mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def __post_init__(self) -> None:
        for name, allowed in (("dialect", DIALECTS), ("history", HISTORY_MODES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise SpecError(name, getattr(self, name), f"one of {', '.join(allowed)}")
        if self.max_new_tokens < 1:
            raise SpecError("max_new_tokens", self.max_new_tokens, "an integer of at least 1")
        if not self.temperature > 0:
            raise SpecError("temperature", self.temperature, "a positive number")
        if not 0 < self.top_p <= 1:
            raise SpecError("top_p", self.top_p, "a number in (0, 1]")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SpecError(name, value, "a positive number of pixels, or unset")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `HFVLMPolicy` (constructor and `from_pretrained`) other than model and device."""
        return {
            "dialect": self.dialect,
            "history": self.history,
            "template_dir": self.template_dir,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def build(self, device: str = "cpu"):
        """Load `model` as an `HFVLMPolicy` on `device` (imports torch and transformers)."""
        if not self.model:
            raise SpecError("model", self.model, "a Qwen2.5-VL-compatible checkpoint folder or Hub id")
        from ibisagent.policies.hf_vlm import HFVLMPolicy

        return HFVLMPolicy.from_pretrained(self.model, device=device, dtype=self.dtype, **self.options())


# -- command lines ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser | Any, spec: type) -> None:
    """Add one flag per field of the dataclass `spec` to an argparse parser (or group), dashes in names
    (`tool_config` -> `--tool-config`), defaults, help and choices from the fields; booleans become store_true flags."""
    hints = typing.get_type_hints(spec)
    for f in fields(spec):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_text)
            continue
        base = next((t for t in (int, float, str) if hints[f.name] is t or t in typing.get_args(hints[f.name])), str)
        parser.add_argument(
            flag, dest=f.name, type=base, default=default, choices=f.metadata.get("choices"), help=help_text
        )


def from_namespace(spec: type, namespace: argparse.Namespace):
    """The dataclass `spec` from the parsed flags of `add_arguments` (other attributes are ignored)."""
    return spec(**{f.name: getattr(namespace, f.name) for f in fields(spec)})
