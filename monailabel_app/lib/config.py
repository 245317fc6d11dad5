"""The app's settings: MONAI Label's `--conf key value` pairs parsed into a dataclass and checked, so that a bad
value stops the server at start-up with a message naming the key."""

from __future__ import annotations

import json
import os
import re
import typing
from dataclasses import dataclass, field, fields

from ibisagent.specs import PolicySpec, SpecError, ToolSpec

from .errors import ConfigError

_MONAILABEL_CONF = ("server_mode",)  # keys MONAI Label itself reads from --conf


@dataclass
class AppConfig(ToolSpec, PolicySpec):
    """The app's --conf settings (`--conf key value`, values as strings on the command line): the tool's and the
    policy's specs (`ibisagent.specs`: tool, checkpoint, tool_config; model, dialect, history, dtype, sampling ...)
    plus the server's own settings below. `model` unset: only tool requests (run_agent false) are served."""

    device: str = field(default="cpu", metadata={"help": "torch device for the tool and the model: cpu, cuda, cuda:1"})
    max_steps: int = field(default=20, metadata={"help": "step limit: default and maximum of a request's max_steps"})
    session_ttl: float = field(default=600.0, metadata={"help": "seconds a session lives after its last request"})
    max_sessions: int = field(default=32, metadata={"help": "sessions kept; the least recently used goes first"})
    embedding_cache: int = field(
        default=1,
        metadata={"help": "tool instances, each holding one slice's embedding (each > 1 loads the tool again)"},
    )
    labels: str = field(default="target", metadata={"help": "comma-separated label names listed in /info/"})
    instructions: str = field(
        default="",
        metadata={
            "help": 'instructions for label names, as a JSON object, e.g. {"tumor": "segment the liver tumor"}: '
            "what a request that names only a segment (Slicer's stock module) asks the agent"
        },
    )
    instruction_template: str = field(
        default="segment the {label}",
        metadata={"help": "the instruction for a label name that `instructions` does not list ({label}: the name)"},
    )
    max_clicks: int = field(default=64, metadata={"help": "foreground + background points of one request at most"})
    max_session_steps: int = field(
        default=200, metadata={"help": "steps of one session at most (a longer one must start a new session)"}
    )
    max_upload_mb: int = field(
        default=1024, metadata={"help": "megabytes of one request body at most (image, label and form fields)"}
    )
    max_image_megapixels: int = field(
        default=16,
        metadata={"help": "pixels of a study image, slice or label at most, in millions (checked from the header)"},
    )
    max_volume_megavoxels: int = field(
        default=512, metadata={"help": "voxels of a study volume at most, in millions (checked from the header)"}
    )
    max_volume_jobs: int = field(
        default=2, metadata={"help": "volume requests (ibisagent_volume) running at once; one more is answered 503"}
    )
    max_volume_sessions: int = field(
        default=8,
        metadata={"help": "volume sessions kept (each holds its volume in memory); the least recently used goes first"},
    )
    repair_budget: int = field(
        default=8, metadata={"help": "slices a volume session may repair when the request gives no repair_budget"}
    )

    def __post_init__(self) -> None:  # both bases' checks (the dataclass __init__ calls only the first in the MRO)
        ToolSpec.__post_init__(self)
        PolicySpec.__post_init__(self)

    @property
    def tool_spec(self) -> ToolSpec:
        return ToolSpec(**{f.name: getattr(self, f.name) for f in fields(ToolSpec)})

    @property
    def policy_spec(self) -> PolicySpec:
        return PolicySpec(**{f.name: getattr(self, f.name) for f in fields(PolicySpec)})

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppConfig:
        """Parse and check MONAI Label's --conf dictionary; raises ConfigError naming the key and value."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        values = {}
        for key, raw in conf.items():
            if key in _MONAILABEL_CONF:
                continue
            if key not in known:
                raise ConfigError(f"unknown --conf key {key!r}; the ibisagent app knows: {', '.join(sorted(known))}")
            values[key] = _convert(key, raw, hints[key])
        try:
            config = cls(**values)
        except SpecError as exc:
            raise ConfigError(f"--conf {exc}") from None
        config._check()
        return config

    def _check(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"--conf {key} {getattr(self, key)!r} is invalid: expected {expected}")

        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise bad("device", "cpu, cuda, cuda:<index> or mps")
        for key in (
            "max_steps",
            "max_sessions",
            "embedding_cache",
            "max_clicks",
            "max_session_steps",
            "max_upload_mb",
            "max_image_megapixels",
            "max_volume_megavoxels",
            "max_volume_jobs",
            "max_volume_sessions",
        ):
            if getattr(self, key) < 1:
                raise bad(key, "an integer of at least 1")
        if self.repair_budget < 0:
            raise bad("repair_budget", "an integer of at least 0")
        if not self.session_ttl > 0:
            raise bad("session_ttl", "a positive number of seconds")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise bad("checkpoint", "the path of an existing weights file")
        if not self.label_names:
            raise bad("labels", "at least one name, e.g. 'liver,tumor'")
        try:
            mapping = json.loads(self.instructions) if self.instructions.strip() else {}
        except ValueError:
            mapping = None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise bad("instructions", 'a JSON object of label name -> instruction, e.g. {"tumor": "segment the tumor"}')
        try:
            self.instruction_template.format(label="x")
        except (KeyError, IndexError, ValueError):
            raise bad("instruction_template", "text with {label} where the label name goes") from None
        if "{label}" not in self.instruction_template:
            raise bad("instruction_template", "text with {label} where the label name goes")

    def instruction_for(self, label: str) -> str:
        """The instruction a request that names only the segment `label` asks the agent."""
        mapping = json.loads(self.instructions) if self.instructions.strip() else {}
        return mapping.get(label) or self.instruction_template.format(label=label)

    @property
    def label_names(self) -> list[str]:
        return [name.strip() for name in self.labels.split(",") if name.strip()]


def _convert(key: str, raw: str, hint: object):
    text = str(raw).strip()
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() in ("", "none", "null"):
        return None
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"--conf {key} {raw!r} is invalid: expected true or false")
        return text.lower() == "true"
    base = next((t for t in (int, float, str) if hint is t or t in typing.get_args(hint)), str)
    try:
        return base(text)
    except ValueError:
        raise ConfigError(
            f"--conf {key} {raw!r} is invalid: expected {'an integer' if base is int else 'a number'}"
        ) from None
