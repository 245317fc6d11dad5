"""GRPO's prompts (rows): a BiomedParse mask for a whole episode (multi_turn), step k of a simulated trajectory whose
first k actions are replayed (step), or a close-ended VQA question."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.io import read_image, read_mask
from ibisagent.types import Action

from ..data import BiomedParseDataset
from ..prompts import InstructionLibrary
from ..records import iter_kept
from .config import GRPOArguments


@dataclass
class Row:
    """One RL prompt. image: HxWx3 uint8; gt: HxW bool (None for VQA); history: actions replayed through the tool
    before the policy acts (step mode); solution: a VQA row's answer; max_steps: the policy's turns."""

    id: str
    image: np.ndarray
    instruction: str
    target: str
    gt: np.ndarray | None = None
    solution: str | None = None
    history: tuple[Action, ...] = ()
    max_steps: int = 1


class SegmentationRows:
    """Multi-turn prompts: every mask of a BiomedParse dataset (loaded with MONAI, `data.BiomedParseDataset`), with an
    instruction from the instruction library seeded by the sample."""

    def __init__(self, root: str, split: str | None, library: InstructionLibrary, max_turns: int, seed: int = 0):
        self.dataset = BiomedParseDataset(root, split)
        if not len(self.dataset):
            raise ValueError(f"{root}: no image/mask pairs found; {self.dataset.report.summary()}")
        self.library, self.max_turns, self.seed = library, max_turns, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Row:
        item = self.dataset[index]
        rid = Path(item["label_path"]).stem
        rng = random.Random(f"{self.seed}:{rid}")
        target = item["target"]
        instruction = self.library.initial(target, item.get("modality", ""), rng).text
        return Row(rid, item["image"], instruction, target, item["label"], max_steps=self.max_turns)


class StepRows:
    """Step-level prompts: step k of each kept trajectory record (not the loss-masked wrong turns of reflective
    variants); the record's first k actions are replayed before the policy acts."""

    def __init__(self, folder: str, library: InstructionLibrary, seed: int = 0, variants: Sequence[str] = ("gold",)):
        self.records = list(iter_kept(folder, variants))
        if not self.records:
            raise ValueError(f"{folder}: no kept trajectory records; run `ibisagent-train trajectories` first")
        self.items = []
        for i, r in enumerate(self.records):
            self.items += [(i, k) for k in r.trained_steps]
        self.library, self.seed = library, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Row:
        i, k = self.items[index]
        record = self.records[i]
        traj = record.load_trajectory()
        image = read_image(record.image)
        gt = read_mask(record.mask, image.shape[:2])
        rng = random.Random(f"{self.seed}:{record.id}")
        instruction = self.library.initial(record.target, record.modality, rng).text
        history = tuple(s.action for s in traj.steps[:k])
        return Row(f"{record.id}@{k}", image, instruction, record.target, gt, history=history, max_steps=1)


class VQARows:
    """Close-ended VQA prompts from a JSON list of {"image": path (relative to the file), "question", "answer"}."""

    def __init__(self, path: str):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such VQA file")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path}: expected a non-empty JSON list of {{image, question, answer}} objects")
        for n, r in enumerate(rows):
            missing = [k for k in ("image", "question", "answer") if not isinstance(r, dict) or not r.get(k)]
            if missing:
                raise ValueError(f"{path}: row {n} lacks {missing}; every row needs image, question and answer")
        self.rows, self.folder = rows, path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        r = self.rows[index]
        image_path = Path(r["image"]) if Path(r["image"]).is_absolute() else self.folder / r["image"]
        return Row(
            f"vqa{index}",
            read_image(image_path),
            r["question"],
            r.get("target", "target"),
            solution=str(r["answer"]),
            max_steps=1,
        )


def instruction_library(path: str | None) -> InstructionLibrary:
    """The instruction library of a file (json/yaml, `InstructionLibrary.from_file`), or the packaged one."""
    return InstructionLibrary.from_file(path) if path else InstructionLibrary()


def build_rows(args: GRPOArguments, library: InstructionLibrary) -> SegmentationRows | StepRows:
    """The prompts of `args.data`: a BiomedParse dataset (multi_turn) or a trajectories folder (step)."""
    if not args.data:
        raise ValueError("give --data: a BiomedParse dataset (mode multi_turn) or a trajectories folder (mode step)")
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if args.mode == "step":
        return StepRows(args.data, library, args.seed)
    return SegmentationRows(args.data, args.split, library, args.max_turns, args.seed)
