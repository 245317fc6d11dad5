"""Trajectory records: what `ibisagent-train trajectories` writes, one JSON line per (sample, variant), and what
SFT, GRPO's step rows and the statistics read.

A record is one simulated episode on one (image, target) with where it came from, how good it is and whether it is
kept. Files: `trajectories-<i>-of-<n>.jsonl` per shard of a run folder, appended and flushed record by record, so
a killed writer leaves at most one partly written last line, which readers ignore and writers cut off.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from ibisagent.trajectory import Trajectory

RECORD_VERSION = "1"
VARIANTS = ("gold", "self_correction", "user_inconsistency")


@dataclass(kw_only=True)
class TrajectoryRecord:
    """One simulated episode and its provenance (JSON keys = field names; version RECORD_VERSION).

    id: "<group>/<mask file stem>", unique per (image, target); with `variant` it names the record.
    image, mask: paths of the image and of the target's mask. target, modality, site, group, sentences: the
    BiomedParse entry's fields. variant: one of VARIANTS. iou, dice: of the final mask against the target's mask;
    length: clicks (a self-correction's wrong click not counted); turns: steps. reject: why the record is not kept
    (None: kept). seconds: time spent per phase (encode, tool, simulator). trajectory: the episode in
    `Trajectory.to_dict()` form (its masks stay run-length encoded until `load_trajectory`).
    """

    version: str = RECORD_VERSION
    id: str
    target: str
    modality: str = ""
    site: str = ""
    group: str = ""
    sentences: list[str] = field(default_factory=list)
    image: str
    mask: str
    variant: str = "gold"
    iou: float = 0.0
    dice: float = 0.0
    length: int = 0
    turns: int = 0
    reject: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    trajectory: dict

    @property
    def kept(self) -> bool:
        return self.reject is None

    @property
    def num_steps(self) -> int:
        return len(self.trajectory["steps"])

    @property
    def masked_steps(self) -> set[int]:
        """Steps whose model turn is shown but never trained on (a self-correction's wrong click)."""
        return set(self.trajectory.get("meta", {}).get("masked_steps", []))

    @property
    def trained_steps(self) -> list[int]:
        return [k for k in range(self.num_steps) if k not in self.masked_steps]

    def load_trajectory(self) -> Trajectory:
        return Trajectory.from_dict(self.trajectory)

    def to_json(self) -> dict:
        """The record as its JSON object. The values are the record's own (not copied): the trajectory holds a
        run-length list per mask, and `dataclasses.asdict` deep-copied millions of numbers per record."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> TrajectoryRecord:
        """A record from its JSON object; a record of another version or without a required key raises ValueError
        naming it."""
        version = str(data.get("version"))
        if version != RECORD_VERSION:
            raise ValueError(
                f"trajectory record {data.get('id')!r} has version {version!r}; this IBISAgent reads version "
                f"{RECORD_VERSION}: regenerate the records with `ibisagent-train trajectories`"
            )
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:  # a required key is missing
            raise ValueError(f"trajectory record {data.get('id')!r} is incomplete: {exc}") from None


# -- JSON lines --------------------------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Complete JSON objects of a JSONL file. A partly written last line (a killed writer) is ignored; a complete
    line that is not a JSON object (a damaged file) is reported with a warning and skipped, and reading goes on."""
    if not path.exists():
        return []
    out = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                value = None
            if isinstance(value, dict):
                out.append(value)
            elif line.strip():
                warnings.warn(f"{path}:{number}: not a JSON object, skipped: {line[:80]!r}", stacklevel=2)
    return out


def _truncate_to_complete(path: Path) -> None:
    """Cut a partly written last line (one without its newline), so appending continues on a line of its own.
    Complete lines stay, damaged or not: later good records must not be lost."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)


class Appender:
    """Appends JSON lines to a file (first cutting a partly written last line) and makes each durable before the
    next sample starts."""

    def __init__(self, path: Path):
        _truncate_to_complete(path)
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def shard_files(out_dir: str | Path) -> list[Path]:
    """The record files of a run folder, one per shard."""
    files = sorted(Path(out_dir).glob("trajectories-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no trajectories-*.jsonl files; run `ibisagent-train trajectories` first")
    return files


def iter_records(out_dir: str | Path) -> Iterator[TrajectoryRecord]:
    """Every record (kept and rejected) of all shards in `out_dir`."""
    for path in shard_files(out_dir):
        for data in read_records(path):
            yield TrajectoryRecord.from_json(data)


def iter_kept(out_dir: str | Path, variants: Iterable[str] = VARIANTS) -> Iterator[TrajectoryRecord]:
    """Every kept (not rejected) record of all shards in `out_dir` whose variant is in `variants`."""
    variants = set(variants)
    return (r for r in iter_records(out_dir) if r.kept and r.variant in variants)
