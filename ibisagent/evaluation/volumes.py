"""Volumes in 3D: the agent and its baselines over `VolumeCase`s, one row per volume x method, written with the
runner's results.csv writer, reader and resume (`ibisagent.evaluation.runner`), summarised in summary.md.

Methods (every one gets the same key slice: the slice with the largest ground-truth area, as a user would pick):

* ``propagate``:     oracle clicks on the key slice, then propagation alone (MedSAM2-style, no repair).
* ``audit-repair``:  + the audit's flagged slices repaired with oracle clicks (the audit chooses, the oracle clicks).
* ``oracle-repair``: + slices whose Dice is below `target_dice` repaired with oracle clicks, nearest the key first
  (the oracle chooses and clicks: the upper bound of repair).
* ``agent``:         the policy segments the key slice and repairs the flagged slices (`ibisagent.volume.run_volume`).
* ``slice-2d``:      no propagation: oracle clicks on every labelled slice until its Dice reaches `target_dice`,
  the clicks slice-by-slice 2D segmentation spends to the same quality.

Oracle clicking stops at Dice `target_dice` on the key slice, on repaired slices and on every slice of slice-2d (one
quality standard for every clicked slice; `oracle_iou` sets another for the key slice). Repairs are bounded by
`repair_budget` per volume. Clicks per volume are the clicks of the key slice's and the repaired slices' 2D
trajectories (a slice the oracle finds good enough is reviewed without a click) against slice-2d's clicks on every
labelled slice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.episode import Episode
from ibisagent.evaluation.cases import BenchmarkError, VolumeCase
from ibisagent.evaluation.runner import ResultSchema, _write_rows, open_results, ordered_rows, running_mean
from ibisagent.geometry import take_slice
from ibisagent.loop import run_episode
from ibisagent.metrics import dice, iou
from ibisagent.policies import OraclePolicy
from ibisagent.policies.base import Policy
from ibisagent.tools.base import SegmentationTool
from ibisagent.volume import Propagator, VolumeSession, run_volume
from ibisagent.volume.record import SliceRecord

VOLUME_BASELINES = ("propagate", "audit-repair", "oracle-repair", "slice-2d")
VOLUME_RESULTS = ResultSchema(
    fields=(
        "case_id",
        "method",
        "modality",
        "target",
        "dice3d",
        "iou3d",
        "slice_dice_mean",
        "slices",
        "slices_labelled",
        "slices_flagged",
        "slices_repaired",
        "key_slice",
        "clicks",
        "seconds",
        "seconds_per_slice",
        "failure",
        "error",
        "slice_dice",
        "record",
    ),
    floats=("dice3d", "iou3d", "slice_dice_mean", "seconds", "seconds_per_slice"),
    ints=("slices", "slices_labelled", "slices_flagged", "slices_repaired", "key_slice", "clicks"),
    lists=("slice_dice",),
)


@dataclass(frozen=True)
class VolumeSettings:
    """What every volume method shares: the quality every clicked slice is clicked to (`target_dice`; the key slice's
    IoU `oracle_iou` instead where set), repair budget, click limit per slice."""

    oracle_iou: float | None = None
    target_dice: float = 0.85
    repair_budget: int = 5
    max_steps: int = 20


@dataclass
class VolumeMethod:
    """One column of the 3D comparison. `run(session, gts, key, settings)` segments the session's volume
    (gts: the HxW ground truth of every slice) and returns the clicks spent when no record holds them (slice-2d)."""

    name: str
    label: str
    run: Callable[[VolumeSession, list[np.ndarray], int, VolumeSettings], int | None]


def _oracle(gt: np.ndarray, target: str, settings: VolumeSettings, repair: bool = False) -> OraclePolicy:
    """Oracle clicks until Dice `target_dice` (IoU t / (2 - t), the quality slice-2d clicks each slice to); on the
    key slice until IoU `oracle_iou` where that is set."""
    t = settings.target_dice
    key_iou = settings.oracle_iou
    return OraclePolicy({target: gt}, iou_threshold=t / (2 - t) if repair or key_iou is None else key_iou)


def _propagate(session, gts, key, s) -> None:
    run_volume(session, key, _oracle(gts[key], session.target, s), None, max_actions=s.max_steps)


def _audit_repair(session, gts, key, s) -> None:
    def oracle(i):
        return _oracle(gts[i], session.target, s, repair=True)

    run_volume(session, key, _oracle(gts[key], session.target, s), oracle, max_actions=s.max_steps)


def _oracle_repair(session, gts, key, s) -> None:
    tried: set[int] = set()

    def select(vs: VolumeSession) -> list[int]:
        empty = np.zeros(vs.slices.shape, bool)
        masks = [vs.records[i].mask if i in vs.records else empty for i in range(len(gts))]
        bad = [
            i
            for i, gt in enumerate(gts)
            if i not in tried and dice(masks[i], gt) < s.target_dice and (gt.any() or i in vs.records)
        ]
        bad.sort(key=lambda i: (abs(i - key), i))
        tried.update(bad[:1])
        return bad

    def oracle(i):
        return _oracle(gts[i], session.target, s, repair=True)

    run_volume(session, key, _oracle(gts[key], session.target, s), oracle, max_actions=s.max_steps, select=select)


def _slice_2d(session, gts, key, s) -> int:
    """Each labelled slice on its own, oracle clicks to Dice `target_dice` (IoU t / (2 - t)); returns the clicks."""
    clicks = 0
    threshold = s.target_dice / (2 - s.target_dice)
    for i, gt in enumerate(gts):
        if not gt.any():
            continue
        episode = Episode(session.tool, session.slices.image(i), [session.target], max_steps=s.max_steps)
        policy = OraclePolicy({session.target: gt}, iou_threshold=threshold)
        trajectory = run_episode(policy, episode, session.instruction)
        clicks += trajectory.num_clicks
        session.records[i] = SliceRecord(i, "key", "agent", trajectory.final_mask, 1.0, trajectory=trajectory)
    return clicks


def agent_volume_method(policy: Policy, label: str = "agent") -> VolumeMethod:
    """The agent: `policy` segments the key slice and repairs the audit's flagged slices."""

    def run(session, gts, key, s) -> None:
        run_volume(session, key, policy, lambda i: policy, max_actions=s.max_steps)

    return VolumeMethod("agent", label, run)


def volume_methods(names: Sequence[str]) -> list[VolumeMethod]:
    """Baselines by name (see the module docstring): any of VOLUME_BASELINES, in the order given."""
    unknown = [n for n in names if n not in VOLUME_BASELINES]
    if unknown:
        raise BenchmarkError(
            f"unknown volume baseline(s) {', '.join(unknown)}; choose from {', '.join(VOLUME_BASELINES)}"
        )
    table = {
        "propagate": ("oracle key slice + propagation (no repair)", _propagate),
        "audit-repair": ("+ audit-flagged slices repaired by oracle clicks", _audit_repair),
        "oracle-repair": ("+ slices below the target Dice repaired by oracle clicks", _oracle_repair),
        "slice-2d": ("slice-by-slice 2D oracle clicks to the target Dice", _slice_2d),
    }
    return [VolumeMethod(n, *table[n]) for n in dict.fromkeys(names)]


def run_volume_case(
    case: VolumeCase,
    volume: np.ndarray,
    gt: np.ndarray,
    method: VolumeMethod,
    tool: SegmentationTool,
    propagator: Propagator,
    settings: VolumeSettings,
    out_dir: Path,
) -> dict:
    """One method on one volume: the result row (VOLUME_RESULTS); the record JSON goes to records/<method>/."""
    gts = [take_slice(gt, i, case.axis) for i in range(gt.shape[case.axis])]
    key = int(np.argmax([g.sum() for g in gts]))
    row = {"case_id": case.case_id, "method": method.name, "modality": case.modality, "target": case.target}
    t0 = time.perf_counter()
    session, error, clicks = None, "", 0
    try:
        session = VolumeSession(
            tool, propagator, volume, case.question, case.target, case.axis, case.window,
            repair_budget=settings.repair_budget,
        )  # fmt: skip
        spent = method.run(session, gts, key, settings)
        record = session.record()
        clicks = record.num_clicks if spent is None else spent
    except Exception as exc:  # one broken volume must not end a long run; the row records what happened
        error = f"{type(exc).__name__}: {exc}"
        record = session.record() if session is not None else None
    finally:
        if session is not None:
            session.close()
    seconds = time.perf_counter() - t0
    pred = record.label_volume() if record is not None else np.zeros(gt.shape, bool)
    masks = {s.index: s.mask for s in record.slices} if record is not None else {}
    empty = np.zeros(gts[0].shape, bool)
    per_slice = [dice(masks.get(i, empty), g) for i, g in enumerate(gts) if g.any() or masks.get(i, empty).any()]
    row.update(
        dice3d=dice(pred, gt),
        iou3d=iou(pred, gt),
        slice_dice_mean=float(np.mean(per_slice)) if per_slice else 0.0,
        slices=len(masks),
        slices_labelled=sum(bool(g.any()) for g in gts),
        slices_flagged=sum(s.flagged for s in record.slices) if record is not None else 0,
        slices_repaired=record.repairs_used if record is not None else 0,
        key_slice=key,
        clicks=clicks,
        seconds=seconds,
        seconds_per_slice=seconds / max(len(masks), 1),
        failure="error" if error else ("no_mask" if not pred.any() else ""),
        error=" ".join(error.split())[:300],
        slice_dice=per_slice,
        record="",
    )
    if record is not None and method.name != "slice-2d":
        rel = Path("records") / method.name / f"{case.case_id}.json"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        record.meta.update(case=case.to_dict(), method=method.name, dice3d=row["dice3d"], seconds=seconds)
        record.to_json(out_dir / rel)
        row["record"] = rel.as_posix()
    return row


def evaluate_volumes(
    cases: Sequence[VolumeCase],
    methods: Sequence[VolumeMethod],
    tool: SegmentationTool,
    propagator: Propagator,
    out_dir: str | Path,
    settings: VolumeSettings | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Every method on every volume; rows (resumed ones included) in case x method order (see `evaluate`)."""
    from tqdm import tqdm

    settings = settings or VolumeSettings()
    out_dir = Path(out_dir)
    results, done = open_results(out_dir, resume, VOLUME_RESULTS)
    bar = tqdm(cases, desc="eval 3D", unit="volume", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for case in bar:
        pending = [m for m in methods if (case.case_id, m.name) not in done]
        if not pending:
            continue
        volume, gt = case.load()
        new = [run_volume_case(case, volume, gt, m, tool, propagator, settings, out_dir) for m in pending]
        _write_rows(results, new, "a", VOLUME_RESULTS)
        for r in new:
            done[(r["case_id"], r["method"])] = r
        bar.set_postfix_str(running_mean(done.values(), methods, "dice3d", "3D Dice"))
    return ordered_rows(done, cases, methods)


def volume_summary(rows: Sequence[dict], methods: Sequence[str]) -> str:
    """The Markdown table of a 3D run: per method the means over volumes."""
    lines = [
        "| method | volumes | 3D Dice % | 3D IoU % | slice Dice % | slices repaired | clicks / volume | s / volume "
        "| s / slice | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in methods:
        rs = [r for r in rows if r["method"] == name]
        if not rs:
            continue
        mean = {k: float(np.mean([r[k] for r in rs])) for k in VOLUME_RESULTS.floats + VOLUME_RESULTS.ints}
        lines.append(
            f"| {name} | {len(rs)} | {100 * mean['dice3d']:.2f} | {100 * mean['iou3d']:.2f} | "
            f"{100 * mean['slice_dice_mean']:.2f} | {mean['slices_repaired']:.1f} | {mean['clicks']:.1f} | "
            f"{mean['seconds']:.2f} | {mean['seconds_per_slice']:.3f} | {sum(bool(r['failure']) for r in rs)} |"
        )
    return "\n".join(lines)


def write_volume_summary(out_dir: str | Path, rows: Sequence[dict], methods: Sequence[VolumeMethod]) -> Path:
    """summary.md of a 3D run: the table and what each method is."""
    labels = "\n".join(f"- **{m.name}**: {m.label}" for m in methods)
    text = f"# Volume evaluation\n\n## Overall\n\n{volume_summary(rows, [m.name for m in methods])}\n\n{labels}\n"
    path = Path(out_dir) / "summary.md"
    path.write_text(text)
    return path
