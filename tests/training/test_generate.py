"""Trajectory generation with the real classical tool on (downscaled) demo data: records, filters, reflective
variants, sharding, resuming after a kill, statistics."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ibisagent.trajectory import Trajectory
from ibisagent_training.generate import GenerateConfig, Shard, generate, merge_stats
from ibisagent_training.records import read_records, shard_files
from tests.conftest import needs_demo

pytestmark = needs_demo
CONFIG = GenerateConfig(
    max_steps=12, stop_iou=0.85, max_length=12, min_dice=0.85, self_correction=1.0, user_inconsistency=1.0
)


def _records(folder):
    return [r for f in shard_files(folder) for r in read_records(f)]


def test_records_filters_and_reflective_variants(small_demo, tmp_path):
    out = tmp_path / "gen"
    summary = generate(small_demo, out, CONFIG, progress=False)
    records = _records(out)
    assert summary["written"] == len(records) and summary["problems"] == 0
    gold = [r for r in records if r["variant"] == "gold"]
    n_masks = len(list((small_demo / "train_mask").iterdir()))
    assert len(gold) == n_masks and len({r["id"] for r in gold}) == n_masks
    for r in records:
        traj = Trajectory.from_dict(r["trajectory"])
        assert r["turns"] == len(traj.steps)
        if r["reject"] is None:
            assert r["dice"] >= CONFIG.min_dice and r["length"] <= CONFIG.max_length
            assert traj.stop_reason == "answer" and traj.steps[-1].action.terminate
        elif r["reject"].startswith("low dice"):
            assert r["dice"] < CONFIG.min_dice
    sc = [r for r in records if r["variant"] == "self_correction" and r["reject"] is None]
    assert sc, "some self-correction variant must be kept"
    for r in sc:
        traj = Trajectory.from_dict(r["trajectory"])
        (k,) = traj.meta["masked_steps"]
        before = traj.steps[k - 1].metrics[f"iou/{r['target']}"]
        assert traj.steps[k].metrics[f"iou/{r['target']}"] < before  # the wrong click made it worse
        assert traj.steps[k + 1].action.undo and traj.steps[k + 1].metrics[f"iou/{r['target']}"] == before
    ui = [r for r in records if r["variant"] == "user_inconsistency"]
    assert ui, "images with several targets give wrong-initial-mask variants"
    for r in ui:
        traj = Trajectory.from_dict(r["trajectory"])
        assert traj.initial_masks[r["target"]].any() and traj.steps[0].action.undo
        assert not traj.steps[0].masks[r["target"]].any()  # discarded
    stats = merge_stats(out)
    assert stats["Total"]["trajectories"] == sum(1 for r in gold if r["reject"] is None)
    assert stats["Total"]["qas"] == sum(r["turns"] for r in gold if r["reject"] is None)
    kept_ious = [r["iou"] for r in gold if r["reject"] is None]
    assert np.isclose(stats["Total"]["avg_iou"], np.mean(kept_ious))


def test_shards_partition_the_dataset_by_image(small_demo, tmp_path):
    cfg = GenerateConfig(max_steps=3, stop_iou=0.5, max_length=3, min_dice=0.0)
    for i in range(2):
        generate(small_demo, tmp_path / "sharded", cfg, Shard(i, 2), progress=False)
    generate(small_demo, tmp_path / "whole", cfg, progress=False)
    sharded, whole = _records(tmp_path / "sharded"), _records(tmp_path / "whole")
    assert sorted(r["id"] for r in sharded) == sorted(r["id"] for r in whole)
    per_shard = [{r["image"] for r in read_records(f)} for f in shard_files(tmp_path / "sharded")]
    assert len(per_shard) == 2 and not per_shard[0] & per_shard[1]
    by_id = {r["id"]: r for r in whole}
    for r in sharded:  # deterministic: the same trajectory whichever machine made it
        assert r["trajectory"]["steps"][-1]["clicks"] == by_id[r["id"]]["trajectory"]["steps"][-1]["clicks"]


def test_killed_run_resumes_without_loss_or_duplicates(small_demo, tmp_path):
    out = tmp_path / "gen"
    cmd = [
        sys.executable,
        "-m",
        "ibisagent_training.cli",
        "trajectories",
        str(small_demo),
        "--out",
        str(out),
        "--max_steps",
        "8",
        "--stop_iou",
        "0.85",
        "--self_correction",
        "1.0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = out / "trajectories-00000-of-00001.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not data.exists() or len(read_records(data)) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_records(data))
    assert partial >= 2
    with data.open("a") as f:
        f.write('{"id": "half a line')  # what a kill in the middle of a write leaves
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    records = read_records(data)
    keys = [(r["id"], r["variant"]) for r in records]
    assert len(keys) == len(set(keys)) and summary["written"] == len(records) - partial
    n_masks = len(list((small_demo / "train_mask").iterdir()))
    assert sum(v == "gold" for _, v in keys) == n_masks
    assert data.read_bytes().endswith(b"\n") and b"half a line" not in data.read_bytes()


def test_stats_command_prints_the_paper_tables(small_demo, tmp_path):
    from ibisagent_training.cli import main

    cfg = GenerateConfig(max_steps=4, stop_iou=0.6, max_length=4, min_dice=0.0)
    generate(small_demo, tmp_path / "gen", cfg, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "ibisagent_training.cli", "stats", str(tmp_path / "gen")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| modality | Samples | Trajectories | QAs |" in proc.stdout and "| group |" in proc.stdout
    assert "| CT |" in proc.stdout and "| Total |" in proc.stdout and "seconds:" in proc.stdout
    assert main(["stats", str(tmp_path / "nothing-here")]) == 2
    assert main(["trajectories", str(small_demo), "--out", str(tmp_path / "x"), "--shard", "3/2"]) == 2


def test_trajectories_flags_are_the_config_fields_and_older_spellings_still_parse():
    """Flags are spelled like GenerateConfig's fields (underscores, as sft and grpo); the tool's are ToolSpec's. The
    dashed spellings and the tool config's older name (--config) give the same config, and are not in --help."""
    from ibisagent.specs import SpecError, ToolSpec
    from ibisagent_training.cli import _from_args, build_parser

    parser = build_parser()
    new = ["trajectories", "root", "--out", "o", "--stop_iou", "0.8", "--self_correction", "0.5"]
    new += ["--tool", "sam2", "--checkpoint", "w.pt", "--tool_config", "sam2.1_hiera_t", "--device", "cuda:1"]
    old = ["trajectories", "root", "--out", "o", "--stop-iou", "0.8", "--self-correction", "0.5"]
    old += ["--tool", "sam2", "--checkpoint", "w.pt", "--config", "sam2.1_hiera_t", "--device", "cuda:1"]
    config = _from_args(GenerateConfig, parser.parse_args(new))
    assert config == _from_args(GenerateConfig, parser.parse_args(old))
    assert isinstance(config, ToolSpec) and (config.tool, config.checkpoint, config.tool_config) == (
        "sam2",
        "w.pt",
        "sam2.1_hiera_t",
    )
    assert config.stop_iou == 0.8 and config.self_correction == 0.5 and config.device == "cuda:1"
    trajectories = next(a for a in parser._actions if a.dest == "command").choices["trajectories"]
    shown = trajectories.format_help()
    assert "--self_correction" in shown and "--self-correction" not in shown and "--config" not in shown
    with pytest.raises(SystemExit):  # argparse names the flag and the choices
        parser.parse_args(["trajectories", "root", "--out", "o", "--tool", "nope"])
    with pytest.raises(SpecError, match="tool 'nope' is invalid"):
        GenerateConfig(tool="nope")


def test_a_run_folder_resumes_only_with_its_own_settings(small_demo, tmp_path, capsys):
    from ibisagent_training.cli import main

    out = tmp_path / "gen"
    generate(small_demo, out, GenerateConfig(max_steps=4, stop_iou=0.6), limit=1, progress=False)
    before = (out / "trajectories-00000-of-00001.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(max_steps 4 -> 6\)"):
        generate(small_demo, out, GenerateConfig(max_steps=6, stop_iou=0.6), limit=1, progress=False)
    assert main(["trajectories", str(small_demo), "--out", str(out), "--max_steps", "6", "--stop_iou", "0.6"]) == 2
    assert "holds trajectories made with other settings" in capsys.readouterr().err
    assert (out / "trajectories-00000-of-00001.jsonl").read_bytes() == before
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4
    generate(small_demo, out, GenerateConfig(max_steps=4, stop_iou=0.6, device="cpu"), limit=1, progress=False)


def _without_timings(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        steps = [{k: v for k, v in s.items() if k != "timings"} for s in r["trajectory"]["steps"]]
        out.append({**r, "seconds": None, "trajectory": {**r["trajectory"], "steps": steps}})
    return out


def test_workers_write_what_one_process_writes(small_demo, tmp_path):
    """Worker processes split a shard's images; the records (all but the measured seconds) and their order are those
    of one process, and a run folder resumes with another number of workers."""
    cfg = GenerateConfig(max_steps=4, stop_iou=0.8, max_length=4, min_dice=0.0, self_correction=1.0)
    one = generate(small_demo, tmp_path / "one", cfg, progress=False)
    two = generate(small_demo, tmp_path / "two", dataclasses.replace(cfg, workers=2), progress=False)
    assert one["written"] == two["written"] > 0 and one["problems"] == two["problems"]
    assert _without_timings(_records(tmp_path / "two")) == _without_timings(_records(tmp_path / "one"))
    again = generate(small_demo, tmp_path / "one", dataclasses.replace(cfg, workers=2), progress=False)
    masks = sum(r["variant"] == "gold" for r in _records(tmp_path / "one"))
    assert again["written"] == 0 and again["already_done"] == masks
    with pytest.raises(ValueError, match="workers 0 is invalid"):
        GenerateConfig(workers=0)
