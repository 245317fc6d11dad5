"""Running methods (the agent and the baselines) over benchmark cases, one result row per case × method.

A method is a policy in the agent loop (`ibisagent.loop.run_episode`) with a step limit, so the agent, the oracle and
the tool-alone baselines produce the same trajectory record and are scored by the same code:

* ``agent``:  any policy, normally the Hugging Face VLM (`ibisagent.policies.hf_vlm.HFVLMPolicy`).
* ``oracle``: `ibisagent.policies.OraclePolicy`, the click simulator with the ground truth: the upper bound.
* ``center``: the tool alone with one fixed positive click at the ground truth's deepest pixel (the maximum of its
  distance transform, the image border counting as outside; `ibisagent.simulator.next_click` on an empty mask).
  It knows where the target is; ``image-center`` does not.
* ``image-center``: the tool alone with one fixed positive click at the image's centre pixel, wherever the target
  is: what a click that knows nothing of the instruction gets.
* ``box``:    the tool alone with a ground-truth box. `SegmentationTool.predict` takes clicks only, so the box is
  given as box-derived clicks: one positive click at the box centre and four negative clicks just outside its
  corners (dropped where the box touches the image border). Named "box (clicks)" in reports for that reason.

Besides the mask metrics, every row says whether the method's output followed the grammar (``format_valid``: the
share of steps whose text parsed) and whether its first click was positive and on the target (``click_in_target``).
Each run writes `results.csv` (one row per case × method, appended and flushed as cases finish, so an interrupted
run resumes where it stopped), the final mask of every case as PNG and its trajectory as JSON.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.episode import Episode
from ibisagent.evaluation.cases import BenchmarkError, Case
from ibisagent.grammar import Grammar
from ibisagent.io import write_mask
from ibisagent.loop import run_episode
from ibisagent.metrics import click_in_target, dice, entity_f1, iou, iou_at, noc
from ibisagent.policies.base import Observation, Policy
from ibisagent.simulator import next_click
from ibisagent.tools.base import SegmentationTool
from ibisagent.trajectory import Trajectory
from ibisagent.types import Action, Click

BASELINES = ("oracle", "box", "center", "image-center")
K_CLICKS = (1, 3, 5, 10)
FAILURES = ("no_mask", "invalid_output", "policy_error", "error")
RESULT_FIELDS = (
    "case_id",
    "method",
    "modality",
    "target",
    "question",
    "iou",
    "dice",
    "f1",
    "tp",
    "fp",
    "fn",
    "gt_empty",
    "pred_empty",
    "noc85",
    "noc90",
    *(f"iou_at{k}" for k in K_CLICKS),
    "steps",
    "clicks",
    "format_valid",
    "click_in_target",
    "stop_reason",
    "failure",
    "error",
    "seconds",
    "encode_seconds",
    "step_iou",
    "click_iou",
    "mask",
    "trajectory",
)
_FLOATS = ("iou", "dice", "f1", *(f"iou_at{k}" for k in K_CLICKS), "format_valid", "seconds", "encode_seconds")
_INTS = ("tp", "fp", "fn", "gt_empty", "pred_empty", "noc85", "noc90", "steps", "clicks", "click_in_target")
_LISTS = ("step_iou", "click_iou")


@dataclass
class Method:
    """One column of the comparison: `policy_for(case, gt)` gives the policy for a case (gt: HxW bool, for the
    privileged baselines only); episodes stop after `max_steps` actions."""

    name: str
    label: str
    policy_for: Callable[[Case, np.ndarray], Policy]
    max_steps: int


class FixedClicksPolicy:
    """Writes one action with fixed clicks, then Terminate: the 'tool alone' baselines in the agent loop."""

    def __init__(self, clicks: Sequence[Click], think: str, dialect: str = "ibis"):
        self.clicks = tuple(clicks)
        self.think = think
        self.dialect = dialect
        self._grammar = Grammar(dialect)
        self._done = False

    def start(self, instruction: str, targets: list[str]) -> None:
        self._done = False

    def act(self, obs: Observation) -> str:
        if self._done or not self.clicks:
            return self._grammar.format(Action(terminate=True), obs.image_size, think="No clicks to give.", answer="")
        self._done = True
        return self._grammar.format(Action(self.clicks), obs.image_size, think=self.think)


def center_click(gt: np.ndarray, target: str) -> Click | None:
    """The single click of the ``center`` baseline: positive, at the deepest pixel of `gt` (HxW bool); None for an
    empty mask."""
    return next_click(np.zeros(gt.shape, bool), gt, target=target)


def image_center_click(shape: tuple[int, int], target: str) -> Click:
    """The single click of the ``image-center`` baseline: positive, at the centre of pixel (H // 2, W // 2) of an
    image of `shape` (H, W), (x, y) = (W // 2 + 0.5, H // 2 + 0.5)."""
    h, w = shape
    return Click(w // 2 + 0.5, h // 2 + 0.5, True, target)


def box_clicks(gt: np.ndarray, target: str) -> list[Click]:
    """The ground-truth box as clicks ((x, y) pixel centres): positive at the box centre, negative just outside each
    corner (by 3 % of the box's longer side, at least 2 pixels); a corner whose outside point would leave the image
    is dropped (clipping it would put it inside the box). Empty for an empty mask."""
    rows, cols = np.nonzero(gt)
    if rows.size == 0:
        return []
    h, w = gt.shape
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    d = max(2, round(0.03 * max(r1 - r0 + 1, c1 - c0 + 1)))
    clicks = [Click((c0 + c1) // 2 + 0.5, (r0 + r1) // 2 + 0.5, True, target)]
    for col, row in ((c0 - d, r0 - d), (c1 + d, r0 - d), (c0 - d, r1 + d), (c1 + d, r1 + d)):
        if 0 <= col < w and 0 <= row < h:
            clicks.append(Click(col + 0.5, row + 0.5, False, target))
    return clicks


def agent_method(policy: Policy, max_steps: int, label: str = "agent") -> Method:
    """The agent: one policy object reused for every case (`run_episode` restarts it)."""
    return Method("agent", label, lambda case, gt: policy, max_steps)


def baseline_methods(names: Sequence[str], max_steps: int, oracle_stop_iou: float = 0.9) -> list[Method]:
    """Baselines by name (see the module docstring): any of BASELINES, in the order given."""
    from ibisagent.policies import OraclePolicy

    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise BenchmarkError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    out = []
    for name in dict.fromkeys(names):
        if name == "oracle":
            out.append(
                Method(
                    "oracle",
                    f"oracle clicks stopping at IoU {oracle_stop_iou:g}",
                    lambda case, gt: OraclePolicy({case.target: gt}, iou_threshold=oracle_stop_iou),
                    max_steps,
                )
            )
        elif name == "center":
            out.append(
                Method(
                    "center",
                    "tool + 1 click at the gt's centre",
                    lambda case, gt: FixedClicksPolicy(
                        [c for c in [center_click(gt, case.target)] if c is not None],
                        "One positive click at the centre of the ground truth.",
                    ),
                    1,
                )
            )
        elif name == "image-center":
            out.append(
                Method(
                    "image-center",
                    "tool + 1 click at the image centre",
                    lambda case, gt: FixedClicksPolicy(
                        [image_center_click(gt.shape, case.target)], "One positive click at the centre of the image."
                    ),
                    1,
                )
            )
        else:
            out.append(
                Method(
                    "box",
                    "tool + gt box (as clicks)",
                    lambda case, gt: FixedClicksPolicy(
                        box_clicks(gt, case.target),
                        "The ground-truth box as clicks: its centre positive, just outside its corners negative.",
                    ),
                    1,
                )
            )
    return out


# -- scoring ---------------------------------------------------------------------------------------------------------
def _union(masks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    for m in masks.values():
        out |= m
    return out


def iou_curves(trajectory: Trajectory, gt: np.ndarray) -> tuple[list[float], list[float]]:
    """(step_iou, click_iou) of the union of all targets' masks against `gt` (HxW bool).

    step_iou[s]:    IoU after s steps (s = 0: the initial state, before the first model turn).
    click_iou[c-1]: IoU after the c-th click spent (clicks undone still count). A step with m clicks reaches its
                    new IoU at its last click; its earlier clicks carry the IoU from before the step.
    """
    current = iou(_union(trajectory.initial_masks, gt.shape), gt)
    step_iou, click_iou = [current], []
    for step in trajectory.steps:
        before = current
        if step.masks:
            current = iou(_union(step.masks, gt.shape), gt)
        n = len(step.action.clicks) if step.action is not None else 0
        if n:
            click_iou += [before] * (n - 1) + [current]
        step_iou.append(current)
    return step_iou, click_iou


def first_click_in_target(trajectory: Trajectory, gt: np.ndarray) -> bool:
    """True when the first click of the episode is positive and lies on `gt` (HxW bool); False without clicks."""
    first = next((c for s in trajectory.steps if s.action is not None for c in s.action.clicks), None)
    return first is not None and first.positive and click_in_target(first, gt)


def format_valid(trajectory: Trajectory) -> float:
    """The share of the trajectory's steps whose text parsed into an action (0.0 for no steps)."""
    steps = trajectory.steps
    return sum(s.error is None for s in steps) / len(steps) if steps else 0.0


def score(trajectory: Trajectory | None, gt: np.ndarray, noc_max: int) -> dict:
    """The metrics of one case from its trajectory (None: the method crashed before producing one)."""
    pred = trajectory.final_mask if trajectory is not None else np.zeros(gt.shape, bool)
    step_iou, click_iou = iou_curves(trajectory, gt) if trajectory is not None else ([0.0], [])
    value = iou(pred, gt)
    has_p, has_g, hit = bool(pred.any()), bool(gt.any()), value >= 0.5
    return {
        "iou": value,
        "dice": dice(pred, gt),
        "f1": entity_f1([(pred, gt)]),
        # entity counts in `ibisagent.metrics.entity_f1`'s rules, so that group F1 = 2TP / (2TP + FP + FN)
        "tp": int(has_p and has_g and hit),
        "fp": int(has_p and not (has_g and hit)),
        "fn": int(has_g and not (has_p and hit)),
        "gt_empty": int(not has_g),
        "pred_empty": int(not has_p),
        "noc85": noc(click_iou, 0.85, noc_max),
        "noc90": noc(click_iou, 0.90, noc_max),
        **{f"iou_at{k}": iou_at(click_iou, k) for k in K_CLICKS},
        "steps": len(trajectory.steps) if trajectory is not None else 0,
        "clicks": len(click_iou),
        "format_valid": format_valid(trajectory) if trajectory is not None else 0.0,
        "click_in_target": int(trajectory is not None and first_click_in_target(trajectory, gt)),
        "step_iou": step_iou,
        "click_iou": click_iou,
        "pred": pred,
    }


def _failure(trajectory: Trajectory | None, error: str, row: dict) -> tuple[str, str]:
    if trajectory is None:
        return "error", error
    if trajectory.stop_reason == "policy_error":
        return "policy_error", str(trajectory.meta.get("error", ""))
    if trajectory.stop_reason == "invalid_action":
        last = next((s.error for s in reversed(trajectory.steps) if s.error), "")
        return "invalid_output", last or ""
    if row["pred_empty"] and not row["gt_empty"]:
        return "no_mask", ""
    return "", ""


# -- results.csv -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultSchema:
    """The columns of a results.csv and how to type them back: 2D cases (`RESULTS`) and volumes
    (`ibisagent.evaluation.volumes.VOLUME_RESULTS`) share the writer, the reader and resuming."""

    fields: tuple[str, ...]
    floats: tuple[str, ...]
    ints: tuple[str, ...]
    lists: tuple[str, ...]


RESULTS = ResultSchema(RESULT_FIELDS, _FLOATS, _INTS, _LISTS)


def _to_csv(row: dict, schema: ResultSchema = RESULTS) -> dict:
    out = {}
    for k in schema.fields:
        v = row.get(k, "")
        if k in schema.lists:
            v = ";".join(repr(float(x)) for x in v)
        elif isinstance(v, float):
            v = repr(v)
        out[k] = v
    return out


def _from_csv(raw: dict, schema: ResultSchema = RESULTS) -> dict:
    row = dict(raw)
    for k in schema.floats:
        row[k] = float(row[k])
    for k in schema.ints:
        row[k] = int(row[k])
    for k in schema.lists:
        row[k] = [float(x) for x in row[k].split(";") if x]
    return row


def read_results(path: str | Path, schema: ResultSchema = RESULTS) -> list[dict]:
    """Rows of a results.csv, typed (floats, ints, IoU lists). A last line cut short by a killed run is dropped."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != schema.fields:
            raise BenchmarkError(
                f"{path}: its columns are not those of this IBISAgent's results.csv; evaluate into a new --out folder"
            )
        rows = []
        for raw in reader:
            if None in raw.values() or None in raw:
                continue
            try:
                rows.append(_from_csv(raw, schema))
            except ValueError:
                continue
    return rows


def _write_rows(path: Path, rows: list[dict], mode: str, schema: ResultSchema = RESULTS) -> None:
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=schema.fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(_to_csv(r, schema) for r in rows)
        f.flush()


def open_results(out_dir: Path, resume: bool, schema: ResultSchema = RESULTS) -> tuple[Path, dict]:
    """(results.csv path, {(case_id, method): row} done earlier). Without `resume` an existing results.csv is an
    error (nothing is overwritten by accident); the file is rewritten clean (drops a line cut short by a kill)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.csv"
    done: dict[tuple[str, str], dict] = {}
    if results.exists():
        if not resume:
            raise BenchmarkError(f"{results} exists; pass --resume to continue that run, or choose another --out")
        for r in read_results(results, schema):
            done[(r["case_id"], r["method"])] = r
    _write_rows(results, list(done.values()), "w", schema)
    return results, done


# -- the run ---------------------------------------------------------------------------------------------------------
def run_case(
    case: Case,
    image: np.ndarray,
    gt: np.ndarray,
    method: Method,
    tool: SegmentationTool,
    out_dir: Path,
    *,
    encode_seconds: float = 0.0,
    noc_max: int = 20,
    max_invalid: int = 1,
) -> dict:
    """Run one method on one case (the tool already holds this image) and save its mask and trajectory.

    image: HxWx3 uint8; gt: HxW bool. Returns the result row (see RESULT_FIELDS); `seconds` is the episode's wall
    time plus `encode_seconds`, the tool's image encode (measured once per image and charged to every case on it).
    """
    t0 = time.perf_counter()
    trajectory, error = None, ""
    try:
        policy = method.policy_for(case, gt)
        episode = Episode(tool, image, [case.target], max_steps=method.max_steps, image_is_set=True)
        trajectory = run_episode(policy, episode, case.question, gt={case.target: gt}, max_invalid=max_invalid)
    except Exception as exc:  # one broken case must not end a long run; the row records what happened
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0 + encode_seconds
    scored = score(trajectory, gt, noc_max)
    pred = scored.pop("pred")
    row = {"case_id": case.case_id, "method": method.name, "modality": case.modality, "target": case.target}
    row.update(question=case.question, **scored)
    row["failure"], row["error"] = _failure(trajectory, error, row)
    row["error"] = " ".join(row["error"].split())[:300]
    row["stop_reason"] = trajectory.stop_reason if trajectory is not None else "error"
    row.update(seconds=seconds, encode_seconds=encode_seconds)
    mask_rel = Path("masks") / method.name / f"{case.case_id}.png"
    traj_rel = Path("trajectories") / method.name / f"{case.case_id}.json"
    write_mask(out_dir / mask_rel, pred)
    if trajectory is None:
        trajectory = Trajectory(case.question, gt.shape, [case.target], stop_reason="policy_error")
    trajectory.meta.update(
        case=case.to_dict(),
        method=method.name,
        method_label=method.label,
        tool=getattr(tool, "name", type(tool).__name__),
        step_iou=scored["step_iou"],
        click_iou=scored["click_iou"],
        failure=row["failure"],
        error=row["error"] or trajectory.meta.get("error"),
        seconds=seconds,
        encode_seconds=encode_seconds,
    )
    (out_dir / traj_rel).parent.mkdir(parents=True, exist_ok=True)
    trajectory.to_json(out_dir / traj_rel)
    row.update(mask=mask_rel.as_posix(), trajectory=traj_rel.as_posix())
    return row


def evaluate(
    cases: Sequence[Case],
    methods: Sequence[Method],
    tool: SegmentationTool,
    out_dir: str | Path,
    *,
    noc_max: int = 20,
    max_invalid: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Run every method on every case; returns all rows (resumed ones included) in case × method order.

    Each image is encoded by the tool once and shared by all methods and by consecutive cases on the same image.
    resume: keep the rows of an earlier run in `out_dir/results.csv` and run only the missing case × method pairs;
    without it an existing results.csv is an error (nothing is overwritten by accident).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    results, done = open_results(out_dir, resume)

    encoded_key, encode_s = None, 0.0
    bar = tqdm(cases, desc="eval", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for case in bar:
        pending = [m for m in methods if (case.case_id, m.name) not in done]
        if not pending:
            continue
        try:
            image, gt = case.load()
            if encoded_key != case.image_key:
                encoded_key = None
                t0 = time.perf_counter()
                tool.set_image(image)
                encode_s, encoded_key = time.perf_counter() - t0, case.image_key
        except Exception as exc:  # an unreadable file or a tool that cannot encode: every method fails this case
            message = f"{type(exc).__name__}: {exc}"
            print(f"ibisagent: warning: case {case.case_id}: {message}", file=sys.stderr)
            new = [_error_row(case, m, message, out_dir, noc_max) for m in pending]
        else:
            new = [
                run_case(
                    case,
                    image,
                    gt,
                    m,
                    tool,
                    out_dir,
                    encode_seconds=encode_s,
                    noc_max=noc_max,
                    max_invalid=max_invalid,
                )
                for m in pending
            ]
        _write_rows(results, new, "a")
        for r in new:
            done[(r["case_id"], r["method"])] = r
        bar.set_postfix_str(running_mean(done.values(), methods))
    return ordered_rows(done, cases, methods)


def ordered_rows(done: dict, cases: Sequence, methods: Sequence) -> list[dict]:
    """The rows of `done` for these cases and methods, in case x method order."""
    order = {c.case_id: i for i, c in enumerate(cases)}
    morder = {m.name: i for i, m in enumerate(methods)}
    rows = [r for r in done.values() if r["case_id"] in order and r["method"] in morder]
    return sorted(rows, key=lambda r: (order[r["case_id"]], morder[r["method"]]))


def running_mean(rows, methods: Sequence, key: str = "iou", label: str = "IoU") -> str:
    """The progress bar's text: the mean `key` per method so far."""
    rows = list(rows)
    parts = []
    for m in methods:
        values = [r[key] for r in rows if r["method"] == m.name]
        if values:
            parts.append(f"{m.name} {sum(values) / len(values):.3f}")
    return f"{label} " + ", ".join(parts) if parts else ""


def _error_row(case: Case, method: Method, message: str, out_dir: Path, noc_max: int) -> dict:
    """The row of a case that could not be loaded or encoded (no mask or trajectory files)."""
    row = {"case_id": case.case_id, "method": method.name, "modality": case.modality, "target": case.target}
    row.update(question=case.question, iou=0.0, dice=0.0, f1=0.0, tp=0, fp=0, fn=1, gt_empty=0, pred_empty=1)
    row.update(noc85=noc_max + 1, noc90=noc_max + 1, **{f"iou_at{k}": 0.0 for k in K_CLICKS})
    row.update(steps=0, clicks=0, format_valid=0.0, click_in_target=0)
    row.update(stop_reason="error", failure="error", error=" ".join(message.split())[:300])
    row.update(seconds=0.0, encode_seconds=0.0, step_iou=[0.0], click_iou=[], mask="", trajectory="")
    return row


def write_run_info(out_dir: str | Path, info: dict, resume: bool) -> dict:
    """Write `run.json`; on resume, first check that the settings that change results equal the earlier run's."""
    path = Path(out_dir) / "run.json"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if resume and path.exists():
        old = json.loads(path.read_text())
        keys = ("benchmark", "format", "tool", "checkpoint", "tool_config", "max_steps", "settings")
        changed = [k for k in keys if old.get(k) != info.get(k)]
        if changed:
            raise BenchmarkError(
                f"--resume: {', '.join(changed)} differ from the run in {out_dir} "
                f"({'; '.join(f'{k}: {old.get(k)!r} then, {info.get(k)!r} now' for k in changed)}); "
                "use the same settings or another --out"
            )
        resumed = {"resumed": info.get("started"), "resume_command": info.get("command")}
        info = {**old, **info, **resumed, "started": old.get("started"), "command": old.get("command")}
    path.write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")
