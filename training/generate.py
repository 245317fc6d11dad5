"""Trajectory generation: the click simulator with the segmentation tool in the loop, over a BiomedParse dataset.

For every (image, target) the oracle clicks at the centre of the largest error region, the tool re-segments from all
clicks so far plus its previous logits, until IoU >= `stop_iou` or `max_steps` (paper B.1). Trajectories longer than
`max_length` clicks or with a final Dice below `min_dice` are kept in the file but marked rejected (paper 3.2).
Reflective variants (paper 3.2, "Reflective Behavior Synthesis") are generated with the same tool:

- self_correction: at one step the agent places a wrong click (a negative click inside the correctly segmented part,
  or a positive click on the background next to the target), sees the worse mask, undoes it and continues. The wrong
  step is listed in `meta["masked_steps"]` so that SFT masks its loss.
- user_inconsistency: the episode starts from a mask of another structure given as the target's initial mask; the
  agent discards it (Undo with nothing of its own to revert) and segments the right target from scratch.

Output, one folder per run: `trajectories-<i>-of-<n>.jsonl` (one JSON record per (sample, variant), appended and
flushed as it goes) and `problems-<i>-of-<n>.jsonl` (skipped entries). A killed run resumes where it stopped (a
partly written last line is dropped and redone); `--shard i/n` takes every n-th sample, so n machines can split a
dataset with any scheduler, and `merge_stats` reads all shards.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ibisagent.episode import Episode
from ibisagent.grammar import Grammar
from ibisagent.io import ImageReadError, read_mask
from ibisagent.loop import run_episode
from ibisagent.metrics import dice, iou
from ibisagent.policies.base import Observation
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.specs import SpecError, ToolSpec
from ibisagent.types import Action, Click

from .data import BiomedParseDataset
from .records import Appender, TrajectoryRecord, iter_kept, iter_records, read_records


@dataclass
class GenerateConfig(ToolSpec):
    """How trajectories are simulated and filtered. The tool is the core's `ToolSpec` this class extends (tool,
    checkpoint, tool_config), built on `device`."""

    device: str = field(default="cpu", metadata={"help": "tool device (a torch device string)"})
    max_steps: int = field(default=20, metadata={"help": "click steps per episode at most"})
    stop_iou: float = field(default=0.9, metadata={"help": "the oracle stops when IoU reaches this"})
    max_length: int = field(default=20, metadata={"help": "reject trajectories with more clicks than this"})
    min_dice: float = field(default=0.9, metadata={"help": "reject trajectories whose final Dice is below this"})
    self_correction: float = field(
        default=0.0, metadata={"help": "fraction of samples that also get a self-correction variant"}
    )
    user_inconsistency: float = field(
        default=0.0, metadata={"help": "fraction of samples that also get a wrong-initial-mask variant"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the variant choices (per sample, so shards agree)"})
    workers: int = field(
        default=1,
        metadata={
            "help": "worker processes per shard, each with its own tool (the output is the same for any number; "
            "use up to the cores of the machine)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 1:
            raise SpecError("workers", self.workers, "at least 1 worker process")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the samples whose position in the sorted listing is index mod count."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {text}: need 0 <= i < n and n >= 1")
        return cls(i, n)

    def take(self, n_items: int) -> list[int]:
        return list(range(self.index, n_items, self.count))

    @property
    def suffix(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"


# -- reflective variants -----------------------------------------------------------------------------------------------
def wrong_clicks(
    mask: np.ndarray, gt: np.ndarray, target: str, clicked: Iterable[Click], rng: random.Random
) -> list[Click]:
    """Candidate clicks that should make `mask` worse, in random order: a negative click at the centre of the
    correct part (mask & gt) and a positive click on the background just outside the target. HxW bool in, (x, y)
    pixels out; empty when neither place exists."""
    taken = {c.pixel(*gt.shape) for c in clicked}
    options = []
    correct = mask & gt
    if correct.sum() >= 16:
        options.append((False, correct))
    ring = ndimage.binary_dilation(gt, iterations=max(3, int(0.15 * np.sqrt(gt.sum())))) & ~gt & ~mask
    if ring.sum() >= 16:
        options.append((True, ring))
    rng.shuffle(options)
    out = []
    for positive, region in options:
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        for r, c in taken:
            depth[r, c] = 0
        r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if depth[r, c] > 0:
            out.append(Click(c + 0.5, r + 0.5, positive, target))
    return out


class _ReflectivePolicy:
    """The oracle, but with one scripted mistake: at step `at` a wrong click that the tool confirms lowers the IoU by
    at least `min_drop`, then Undo (self_correction); or an Undo first to discard a wrong initial mask
    (user_inconsistency)."""

    def __init__(
        self, oracle: OraclePolicy, episode: Episode, variant: str, at: int, rng: random.Random, min_drop: float = 0.05
    ):
        self.oracle, self.episode, self.variant, self.at, self.rng = oracle, episode, variant, at, rng
        self.min_drop = min_drop
        self.dialect = oracle.dialect
        self.grammar = Grammar(oracle.dialect)
        self.wrong_steps: list[int] = []

    def start(self, instruction: str, targets: list[str]) -> None:
        self.oracle.start(instruction, targets)

    def act(self, obs: Observation) -> str:
        size = obs.image_size
        if self.variant == "user_inconsistency" and obs.step == 0:
            return self.grammar.format(Action(undo=True), size, think="The shown mask does not match the target.")
        if self.variant == "self_correction" and obs.step == self.at:
            click = self._harmful_click(obs.targets[0])
            if click is not None:
                self.wrong_steps.append(obs.step)
                return self.grammar.format(Action((click,)), size, think="A wrong click.")
        if self.wrong_steps and obs.step == self.wrong_steps[-1] + 1:
            return self.grammar.format(Action(undo=True), size, think="The last click made the mask worse.")
        return self.oracle.act(obs)

    def _harmful_click(self, target: str) -> Click | None:
        state, gt = self.episode.state, self.oracle.gt[target]
        before = iou(state.masks[target], gt)
        for click in wrong_clicks(state.masks[target], gt, target, state.clicks[target], self.rng):
            after = self.episode.tool.predict([*state.clicks[target], click], state.logits[target]).mask
            if iou(after, gt) <= before - self.min_drop:
                return click
        return None


def _read_other_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Another mask of the same image (HxW bool; empty when unreadable or of another size: it is then not used)."""
    try:
        return read_mask(path, shape)
    except ImageReadError:
        return np.zeros(shape, bool)


def _other_structure(gt: np.ndarray, others: list[np.ndarray]) -> np.ndarray | None:
    """A mask of another structure of the same image that overlaps the target little (IoU < 0.3), else None."""
    for m in others:
        if m.shape == gt.shape and m.any() and iou(m, gt) < 0.3:
            return m
    return None


# -- one sample --------------------------------------------------------------------------------------------------------
@dataclass
class _Timer:
    io: float = 0.0
    tool: float = 0.0
    simulator: float = 0.0


def simulate(
    tool,
    image: np.ndarray,
    gt: np.ndarray,
    target: str,
    config: GenerateConfig,
    variant: str = "gold",
    rng: random.Random | None = None,
    initial_mask: np.ndarray | None = None,
    image_is_set: bool = False,
):
    """One oracle episode on `image` (HxWx3 uint8) for `gt` (HxW bool). Returns (Trajectory, tool seconds,
    simulator seconds). "self_correction" places its wrong click at an `rng`-chosen step 1..3; "user_inconsistency"
    needs `initial_mask` (HxW bool, a mask of another structure)."""
    rng = rng or random.Random(0)
    oracle = OraclePolicy({target: gt}, iou_threshold=config.stop_iou)
    initial = {target: initial_mask} if variant == "user_inconsistency" else None
    episode = Episode(
        tool, image, [target], initial_masks=initial, max_steps=config.max_steps, image_is_set=image_is_set
    )
    policy = oracle
    if variant != "gold":
        policy = _ReflectivePolicy(oracle, episode, variant, rng.randint(1, 3), rng)
    traj = run_episode(policy, episode, f"segment the {target}", gt={target: gt})
    if variant == "self_correction":
        traj.meta["masked_steps"] = list(policy.wrong_steps)
    tool_s = sum(s.timings.get("tool", 0.0) for s in traj.steps)
    sim_s = sum(s.timings.get("policy", 0.0) for s in traj.steps)
    return traj, tool_s, sim_s


def _summary(traj, gt: np.ndarray, target: str, config: GenerateConfig, variant: str) -> dict:
    final = traj.final_masks.get(target, np.zeros(gt.shape, bool))
    clicks = sum(1 for s in traj.steps if s.action is not None and s.action.clicks)
    wrong = len(traj.meta.get("masked_steps", []))
    out = {"iou": iou(final, gt), "dice": dice(final, gt), "length": clicks - wrong, "turns": len(traj.steps)}
    reject = None
    if traj.stop_reason not in ("terminate", "answer"):
        reject = f"no terminate: {traj.stop_reason}"
    if out["length"] > config.max_length:
        reject = f"too long: {out['length']} clicks > {config.max_length}"
    elif out["dice"] < config.min_dice:
        reject = f"low dice: {out['dice']:.3f} < {config.min_dice}"
    elif variant == "self_correction" and not wrong:
        reject = "no wrong click possible"
    out["reject"] = reject
    return out


# -- the run -----------------------------------------------------------------------------------------------------------
def _variants_for(sample_id: str, config: GenerateConfig) -> list[str]:
    rng = random.Random(f"{config.seed}:{sample_id}:variants")
    out = ["gold"]
    if rng.random() < config.self_correction:
        out.append("self_correction")
    if rng.random() < config.user_inconsistency:
        out.append("user_inconsistency")
    return out


# Settings that change no record: a run may resume with other values of these.
_RESUMABLE = ("device", "workers")


def _check_same_settings(path: Path, config: GenerateConfig) -> None:
    """A run folder resumes only with the settings it was started with: records of two settings would mix."""
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise ValueError(
            f"{path} cannot be read; it is not the config of a trajectories run: use another --out"
        ) from None
    now = json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in set(before) | set(now) if k not in _RESUMABLE and before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds trajectories made with other settings ({shown}); resume it with its settings "
            "(see its config.json) or write to a new --out"
        )


def generate(
    root: str | Path,
    out_dir: str | Path,
    config: GenerateConfig,
    shard: Shard = Shard(),
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or continue generating) this shard's trajectories into `out_dir`. Returns a small summary dict
    (written, skipped_existing, problems, seconds split into io/tool/simulator).

    With `config.workers` > 1 the shard's images are simulated by that many worker processes (each builds its own
    tool and encodes each of its images once); the records are written in the order one process writes them, so
    the output is the same whatever the number of workers (up to the measured seconds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out_dir / "config.json", config)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    data_path = out_dir / f"trajectories-{shard.suffix}.jsonl"
    problems_path = out_dir / f"problems-{shard.suffix}.jsonl"
    done = {(r["id"], r["variant"]) for r in read_records(data_path)}
    known_problems = {r["file"] for r in read_records(problems_path)}

    dataset = BiomedParseDataset(root, split)
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(dataset.entries):
        by_image[e["image"]].append(i)
    # Shard by image, so that one machine encodes each image once and sees all of its targets.
    images = sorted(by_image)
    indices = [i for k in shard.take(len(images)) for i in by_image[images[k]]][:limit]
    todo = [
        i
        for i in indices
        if any((dataset.entries[i]["id"], v) not in done for v in _variants_for(dataset.entries[i]["id"], config))
    ]
    jobs: dict[str, list[int]] = defaultdict(list)  # the images to simulate, in order, with their masks to do
    for i in todo:
        jobs[dataset.entries[i]["image"]].append(i)

    writer, problems = Appender(data_path), Appender(problems_path)
    timer, written = _Timer(), 0
    try:
        bar = tqdm(
            total=len(indices),
            initial=len(indices) - len(todo),
            desc=f"trajectories {shard.index}/{shard.count}",
            unit="mask",
            disable=not progress,
        )
        for result in _run_jobs(list(jobs.values()), (root, split, dataset.entries, config, done), config.workers):
            for record in result.records:
                writer.write(record)
            written += len(result.records)
            for file, reason in result.problems:
                dataset.report.add(file, reason)
            dataset.report.loaded += result.loaded
            for k, v in asdict(result.timer).items():
                setattr(timer, k, getattr(timer, k) + v)
            bar.update(result.masks)
        bar.close()
        for p in dataset.report.problems:
            if p.file not in known_problems:
                problems.write({"file": p.file, "reason": p.reason})
    finally:
        writer.close()
        problems.close()
    return {
        "written": written,
        "already_done": len(indices) - len(todo),
        "problems": dataset.report.skipped,
        "problem_kinds": dataset.report.by_reason(),
        "seconds": asdict(timer),
        "file": str(data_path),
    }


@dataclass
class _ImageResult:
    """What simulating one image's masks gave: the records (JSON objects, in order), the samples that could not
    be loaded ((file, reason)), how many loaded, the masks handled and the time split."""

    records: list[dict]
    problems: list[tuple[str, str]]
    loaded: int
    masks: int
    timer: _Timer


class _ImageSimulator:
    """Simulates the masks of one image at a time with one tool (built once): the work of one process."""

    def __init__(self, root, split, entries: list[dict], config: GenerateConfig, done: set) -> None:
        self.dataset = BiomedParseDataset(root, split, entries=entries)
        self.config, self.done = config, done
        self.by_image: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            self.by_image[e["image"]].append(i)
        self.tool = config.build(config.device)  # the config is a ToolSpec

    def __call__(self, todo: list[int]) -> _ImageResult:
        config, dataset, timer = self.config, self.dataset, _Timer()
        records, encoded = [], False
        before = len(dataset.report.problems)
        t_io = time.perf_counter()
        for i, item in dataset.iter_valid(todo):
            timer.io += time.perf_counter() - t_io
            image, gt, target = item["image"], item["label"], item["target"]
            for variant in _variants_for(item["id"], config):
                if (item["id"], variant) in self.done:
                    continue
                rng = random.Random(f"{config.seed}:{item['id']}:{variant}")
                initial = None
                if variant == "user_inconsistency":
                    t0 = time.perf_counter()
                    others = [
                        _read_other_mask(dataset.entries[j]["label"], gt.shape)
                        for j in self.by_image[item["image_path"]]
                        if j != i
                    ]
                    timer.io += time.perf_counter() - t0
                    initial = _other_structure(gt, others)
                    if initial is None:
                        continue  # no other structure in this image to confuse it with
                encode_s = 0.0
                if not encoded:
                    t0 = time.perf_counter()
                    self.tool.set_image(image)
                    encode_s, encoded = time.perf_counter() - t0, True
                traj, tool_s, sim_s = simulate(
                    self.tool, image, gt, target, config, variant, rng, initial, image_is_set=True
                )
                timer.tool += tool_s + encode_s
                timer.simulator += sim_s
                traj.meta.update(image=item["image_path"], mask=item["label_path"], variant=variant)
                record = TrajectoryRecord(
                    **{k: item[k] for k in ("id", "target", "modality", "site", "group", "sentences")},
                    image=item["image_path"],
                    mask=item["label_path"],
                    variant=variant,
                    **_summary(traj, gt, target, config, variant),
                    seconds={"encode": encode_s, "tool": tool_s, "simulator": sim_s},
                    trajectory=traj.to_dict(),
                )
                records.append(record.to_json())
            t_io = time.perf_counter()
        found = [(p.file, p.reason) for p in dataset.report.problems[before:]]
        return _ImageResult(records, found, len(todo) - len(found), len(todo), timer)


_worker: _ImageSimulator | None = None  # the simulator of a worker process


def _start_worker(args: tuple, threads: int | None) -> None:
    global _worker
    if threads is not None:  # the workers share the cores: the classical tool's encoding threads follow this too
        os.environ["OMP_NUM_THREADS"] = str(threads)
    _worker = _ImageSimulator(*args)
    torch = sys.modules.get("torch")  # a model tool: share the cores between the workers instead of oversubscribing
    if torch is not None and threads is not None:
        torch.set_num_threads(threads)


def _work(todo: list[int]) -> _ImageResult:
    return _worker(todo)


def _run_jobs(jobs: list[list[int]], args: tuple, workers: int) -> Iterator[_ImageResult]:
    """The results of `jobs` (one list of entry indices per image), in order: in this process, or in `workers`
    spawned processes (spawned, not forked: a forked copy of a process whose torch threads ran can hang)."""
    if not jobs:
        return
    if workers <= 1 or len(jobs) == 1:
        simulate_image = _ImageSimulator(*args)
        yield from map(simulate_image, jobs)
        return
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    threads = min(threads, int(os.environ.get("OMP_NUM_THREADS", threads)) or threads)
    with mp.get_context("spawn").Pool(workers, _start_worker, (args, threads)) as pool:
        yield from pool.imap(_work, jobs)


# -- statistics (paper Tab. 6 / Tab. 11) -------------------------------------------------------------------------------
STAT_COLUMNS = ("samples", "trajectories", "qas", "avg_length", "avg_iou", "median_iou", "avg_dice", "median_dice")


def merge_stats(out_dir: str | Path, by: str = "modality") -> dict[str, dict]:
    """Statistics of the kept gold trajectories per `by` ("modality" or "group") and "Total".

    samples: distinct images; trajectories: (image, target) pairs; qas: assistant turns (each click step and the
    final answer); avg_length: clicks per trajectory; IoU and Dice of the final masks.
    """
    if by not in ("modality", "group"):
        raise ValueError(f"statistics are by modality or group, got {by!r}")
    rows: dict[str, list[TrajectoryRecord]] = defaultdict(list)
    for r in iter_kept(out_dir, ("gold",)):
        rows[getattr(r, by)].append(r)
        rows["Total"].append(r)
    out = {}
    for key in sorted(rows, key=lambda k: (k == "Total", k)):
        rs = rows[key]
        ious, dices = np.array([r.iou for r in rs]), np.array([r.dice for r in rs])
        out[key] = {
            "samples": len({r.image for r in rs}),
            "trajectories": len(rs),
            "qas": sum(r.turns for r in rs),
            "avg_length": float(np.mean([r.length for r in rs])),
            "avg_iou": float(ious.mean()),
            "median_iou": float(np.median(ious)),
            "avg_dice": float(dices.mean()),
            "median_dice": float(np.median(dices)),
        }
    return out


def run_summary(out_dir: str | Path) -> dict:
    """Counts over all records (kept and rejected, per variant and reject reason) and the time split."""
    counts: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for r in iter_records(out_dir):
        counts[f"{r.variant}/{'kept' if r.kept else 'rejected'}"] += 1
        if r.reject:
            counts[f"reject/{r.reject.split(':')[0]}"] += 1
        for k, v in r.seconds.items():
            seconds[k] += v
    return {"counts": dict(counts), "seconds": dict(seconds)}


def stats_markdown(stats: dict[str, dict], by: str) -> str:
    head = f"| {by} | Samples | Trajectories | QAs | Avg. length | Avg. IoU | Median IoU | Avg. DSC | Median DSC |"
    lines = [head, "|" + "---|" * 9]
    for key, s in stats.items():
        lines.append(
            f"| {key} | {s['samples']} | {s['trajectories']} | {s['qas']} | {s['avg_length']:.2f} | {s['avg_iou']:.4f} | "
            f"{s['median_iou']:.4f} | {s['avg_dice']:.4f} | {s['median_dice']:.4f} |"
        )
    return "\n".join(lines)
