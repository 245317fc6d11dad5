"""`ibisagent eval` on real data: the CLI with the oracle, the classical tool and the baselines on demo masks; tables
and CSV agree with metrics recomputed from the saved masks; the JSON and volume-slice benchmark readers; resuming;
one-line errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main
from ibisagent.evaluation import BenchmarkError, load_benchmark, read_results
from ibisagent.evaluation.runner import (
    baseline_methods,
    box_clicks,
    center_click,
    evaluate,
    first_click_in_target,
    format_valid,
    image_center_click,
    iou_curves,
)
from ibisagent.io import read_mask, write_mask
from ibisagent.metrics import click_in_target, dice, entity_f1, iou, iou_at, noc
from ibisagent.tools.classical import ClassicalTool
from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click
from tests.conftest import DEMO, RECIST, needs_demo

needs_recist = pytest.mark.skipif(not RECIST.is_dir(), reason=f"shared RECIST volumes not found at {RECIST}")
# Three modalities, four targets; the fundus image carries two masks (one tool encode shared by both).
DEMO_IMAGES = ("01_CT_lung", "20_ultrasound_breast", "23_fundus_retinal")
METHODS = ("oracle", "box", "center", "image-center")
MAX_STEPS, MAX_SIDE = 4, 256


def _demo_subset(root: Path) -> Path:
    """A BiomedParse-format split of symlinks to a few demo images and all their masks (the data stays in place)."""
    (root / "demo").mkdir(parents=True)
    (root / "demo_mask").mkdir()
    for stem in DEMO_IMAGES:
        (root / "demo" / f"{stem}.png").symlink_to(DEMO / "demo" / f"{stem}.png")
        for mask in (DEMO / "demo_mask").glob(f"{stem}_*.png"):
            (root / "demo_mask" / mask.name).symlink_to(mask)
    return root / "demo"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """(benchmark folder, output folder) of one CLI run: every baseline with the classical tool."""
    if not DEMO.is_dir():
        pytest.skip(f"shared demo data not found at {DEMO}")
    base = tmp_path_factory.mktemp("eval_demo")
    bench, out = _demo_subset(base / "bench"), base / "out"
    argv = ["eval", str(bench), "--baselines", ",".join(METHODS), "--max-steps", str(MAX_STEPS)]
    argv += ["--max-side", str(MAX_SIDE), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return bench, out


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_demo
def test_eval_writes_every_output(demo_run):
    _, out = demo_run
    for name in ("results.csv", "summary.md", "summary.csv", "report.html", "run.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("iou_vs_step.png", "iou_vs_click.png", "modality_bars.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    rows = read_results(out / "results.csv")
    n_masks = sum(len(list((DEMO / "demo_mask").glob(f"{s}_*.png"))) for s in DEMO_IMAGES)
    assert len(rows) == n_masks * len(METHODS)
    assert {(r["case_id"], r["method"]) for r in rows} == {(r["case_id"], m) for r in rows for m in METHODS}
    for r in rows:
        traj = Trajectory.from_json(out / r["trajectory"])
        assert traj.meta["method"] == r["method"] and traj.meta["case"]["case_id"] == r["case_id"]
        assert len(traj.steps) == r["steps"] <= (MAX_STEPS if r["method"] == "oracle" else 1)
    info = json.loads((out / "run.json").read_text())
    assert (
        info["format"] == "biomedparse" and info["tool"] == "classical" and set(info["method_labels"]) == set(METHODS)
    )


@needs_demo
def test_csv_metrics_agree_with_the_saved_masks(demo_run):
    bench, out = demo_run
    _, cases = load_benchmark(bench, max_side=MAX_SIDE)
    gts = {c.case_id: c.load()[1] for c in cases}
    rows = read_results(out / "results.csv")
    for r in rows:
        pred, gt = read_mask(out / r["mask"]), gts[r["case_id"]]
        assert pred.shape == gt.shape == (MAX_SIDE, MAX_SIDE)
        assert r["iou"] == pytest.approx(iou(pred, gt), abs=1e-12)
        assert r["dice"] == pytest.approx(dice(pred, gt), abs=1e-12)
        assert r["f1"] == entity_f1([(pred, gt)])
        assert r["pred_empty"] == int(not pred.any())
        # the click curve is recomputed from the masks stored in the trajectory
        step_iou, click_iou = iou_curves(Trajectory.from_json(out / r["trajectory"]), gt)
        assert r["step_iou"] == pytest.approx(step_iou) and r["click_iou"] == pytest.approx(click_iou)
        assert r["step_iou"][-1] == pytest.approx(r["iou"])
        clicks = [c for s in Trajectory.from_json(out / r["trajectory"]).steps if s.action for c in s.action.clicks]
        assert r["click_in_target"] == int(clicks[0].positive and click_in_target(clicks[0], gt))
        assert r["format_valid"] == 1.0  # the baselines write what the grammar parses
        assert r["noc85"] == noc(click_iou, 0.85, MAX_STEPS) and r["noc90"] == noc(click_iou, 0.90, MAX_STEPS)
        for k in (1, 3, 5, 10):
            assert r[f"iou_at{k}"] == pytest.approx(iou_at(click_iou, k))
    # summary.csv: overall rows from the per-case masks, F1 by metrics.entity_f1 over the group's pairs
    summary = _csv(out / "summary.csv")
    overall = {s["method"]: s for s in summary if s["group_by"] == "overall"}
    assert set(overall) == set(METHODS)
    for m, s in overall.items():
        mine = [r for r in rows if r["method"] == m]
        pairs = [(read_mask(out / r["mask"]), gts[r["case_id"]]) for r in mine]
        assert int(s["n"]) == len(mine)
        assert float(s["iou_pct"]) == pytest.approx(100 * np.mean([iou(p, g) for p, g in pairs]), abs=1e-3)
        assert float(s["dice_pct"]) == pytest.approx(100 * np.mean([dice(p, g) for p, g in pairs]), abs=1e-3)
        assert float(s["f1_pct"]) == pytest.approx(100 * entity_f1(pairs), abs=1e-3)
        assert float(s["noc90"]) == pytest.approx(np.mean([r["noc90"] for r in mine]), abs=1e-3)
        assert int(s["failures"]) == sum(1 for r in mine if r["failure"])


@needs_demo
def test_summary_tables_have_a_row_per_group_and_method(demo_run):
    _, out = demo_run
    rows = read_results(out / "results.csv")
    summary = _csv(out / "summary.csv")
    for grouping in ("modality", "target"):
        want = {(r[grouping], r["method"]) for r in rows}
        got = [(s["group"], s["method"]) for s in summary if s["group_by"] == grouping]
        assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert {r["modality"] for r in rows} == {"CT", "ultrasound", "fundus"}
    md = (out / "summary.md").read_text()
    for section in ("## Overall", "## Per modality", "## Per target", "## Failures"):
        assert section in md
    body = md.split("## Per modality")[1].split("## Per target")[0]
    table_rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| modality")]
    assert len(table_rows) == 3 * len(METHODS)
    assert "| fundus | oracle |" in body and "NoC@85" in md and "IoU@10 %" in md


@needs_demo
def test_baselines_click_where_they_say(demo_run):
    bench, out = demo_run
    _, cases = load_benchmark(bench, max_side=MAX_SIDE)
    for case in cases:
        gt = case.load()[1]
        center = Trajectory.from_json(out / "trajectories" / "center" / f"{case.case_id}.json")
        (click,) = center.steps[0].action.clicks
        assert click.positive and gt[int(click.y), int(click.x)]
        assert click == center_click(gt, case.target)
        box = Trajectory.from_json(out / "trajectories" / "box" / f"{case.case_id}.json")
        clicks = box.steps[0].action.clicks
        rows, cols = np.nonzero(gt)
        assert clicks[0].positive and rows.min() <= clicks[0].y <= rows.max() + 1
        for c in clicks[1:]:
            assert not c.positive
            assert not (rows.min() <= c.y <= rows.max() + 1 and cols.min() <= c.x <= cols.max() + 1)
        assert list(clicks) == box_clicks(gt, case.target) and 1 <= len(clicks) <= 5
        image_center = Trajectory.from_json(out / "trajectories" / "image-center" / f"{case.case_id}.json")
        (click,) = image_center.steps[0].action.clicks
        assert click == image_center_click(gt.shape, case.target)
        assert (click.x, click.y, click.positive) == (MAX_SIDE // 2 + 0.5, MAX_SIDE // 2 + 0.5, True)


def _one_case_benchmark(root: Path, box: tuple[int, int, int, int]) -> Path:
    """A BiomedParse split of one 40x60 image whose 'spot' mask is the (row0, row1, col0, col1) box; returns it."""
    image = np.full((40, 60, 3), 30, np.uint8)
    gt = np.zeros((40, 60), bool)
    gt[box[0] : box[1], box[2] : box[3]] = True
    image[gt] = 220
    (root / "test").mkdir(parents=True)
    Image.fromarray(image).save(root / "test" / "01_CT_test.png")
    write_mask(root / "test_mask" / "01_CT_test_spot.png", gt)
    return root / "test"


def test_image_center_baseline_clicks_the_image_centre_wherever_the_target_is(tmp_path):
    """`image-center` (no knowledge of the target) against `center` (the gt's deepest pixel): the same click when the
    target covers the image centre, a miss when it lies off-centre."""
    for name, box in (("centred", (10, 30, 20, 40)), ("corner", (2, 12, 3, 15))):
        _, cases = load_benchmark(_one_case_benchmark(tmp_path / name, box))
        out = tmp_path / f"{name}-out"
        rows = evaluate(cases, baseline_methods(["center", "image-center"], 3), ClassicalTool(), out, progress=False)
        by = {r["method"]: r for r in rows}
        (click,) = Trajectory.from_json(out / by["image-center"]["trajectory"]).steps[0].action.clicks
        assert (click.x, click.y, click.positive) == (30.5, 20.5, True)
        assert by["center"]["click_in_target"] == 1 and by["center"]["iou"] > 0.5
        assert by["image-center"]["click_in_target"] == int(name == "centred")
        assert by["image-center"]["steps"] == by["center"]["steps"] == 1
        assert all(r["format_valid"] == 1.0 and r["failure"] in ("", "no_mask") for r in rows)
    assert by["image-center"]["iou"] < 0.1  # the corner target: the centre click segments something else
    assert [m.label for m in baseline_methods(["image-center"], 1)] == ["tool + 1 click at the image centre"]


def test_format_valid_and_first_click_in_target_read_the_trajectory():
    gt = np.zeros((10, 10), bool)
    gt[2:5, 2:5] = True
    traj = Trajectory("segment the spot", (10, 10), ["spot"])
    assert format_valid(traj) == 0.0 and not first_click_in_target(traj, gt)
    traj.steps.append(Step(0, "garbled", error="no <action> section"))
    traj.steps.append(Step(1, "ok", action=Action((Click(3.5, 3.5, False, "spot"),))))
    traj.steps.append(Step(2, "ok", action=Action((Click(3.5, 3.5, True, "spot"),))))
    assert format_valid(traj) == pytest.approx(2 / 3)
    assert not first_click_in_target(traj, gt)  # the first click is negative, though on the target
    del traj.steps[1]
    assert first_click_in_target(traj, gt)
    traj.steps[1].action = Action((Click(8.5, 8.5, True, "spot"), Click(3.5, 3.5, True, "spot")))
    assert not first_click_in_target(traj, gt)  # only the first click counts


def test_box_clicks_drop_corners_outside_the_image():
    gt = np.zeros((40, 50), bool)
    gt[0:10, 20:30] = True  # touches the top border: the two upper corners cannot be clicked
    clicks = box_clicks(gt, "t")
    assert [c.positive for c in clicks] == [True, False, False]
    assert all(c.y > 10 for c in clicks[1:]) and (clicks[0].x, clicks[0].y) == (24.5, 4.5)
    assert box_clicks(np.zeros((5, 5), bool), "t") == [] and center_click(np.zeros((5, 5), bool), "t") is None


@needs_demo
def test_resume_runs_only_what_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", str(DEMO), "--baselines", "center", "--limit", "3", "--max-side", "128", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    first = read_results(out / "results.csv")
    assert len(first) == 3
    # A run killed while writing: the last row is gone and the one before is cut short.
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:2]) + lines[2][:40])
    assert main([*argv, "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--no-progress", "--resume"]) == 0
    again = read_results(out / "results.csv")
    assert [r["case_id"] for r in again] == [r["case_id"] for r in first]
    assert [r["iou"] for r in again] == pytest.approx([r["iou"] for r in first])
    capsys.readouterr()
    assert main([*argv[:-2], "--out", str(out), "--resume", "--max-side", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ibisagent: error: --resume: settings differ") and err.count("\n") == 1


@needs_demo
def test_json_benchmark_reader(tmp_path):
    def rel(p: Path) -> str:
        return os.path.relpath(p, tmp_path)

    image, ct = DEMO / "demo" / "20_ultrasound_breast.png", DEMO / "demo" / "01_CT_lung.png"
    entries = [
        {
            "image": rel(image),
            "question": "Where is the breast tumor?",
            "mask": rel(DEMO / "demo_mask" / "20_ultrasound_breast_tumor.png"),
            "modality": "ultrasound",
            "target": "tumor",
        },  # fmt: skip
        {
            "img_path": rel(ct),
            "instruction": "Segment the nodule.",
            "gt_mask": rel(DEMO / "demo_mask" / "01_CT_lung_nodule.png"),
            "id": "ct/1",
        },  # fmt: skip
        {
            "image": rel(ct),
            "conversations": [
                {"from": "human", "value": "<image>\nPlease segment the lung tumor."},
                {
                    "from": "gpt",
                    "value": f"Sure, it is <mask>{rel(DEMO / 'demo_mask' / '02_CT_lung_tumor.png')}</mask>.",
                },
            ],
        },
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(entries))
    fmt, cases = load_benchmark(path, modality="CT")
    assert fmt == "json" and [c.case_id for c in cases] == ["00000_20_ultrasound_breast_tumor", "ct_1", "00002_02_CT_lung_tumor"]  # fmt: skip
    assert [c.target for c in cases] == ["tumor", "nodule", "lung tumor"]
    assert [c.modality for c in cases] == ["ultrasound", "CT", "CT"]
    assert cases[2].question == "Please segment the lung tumor."
    img, gt = cases[1].load()
    assert img.shape == (1024, 1024, 3) and np.array_equal(gt, read_mask(DEMO / "demo_mask" / "01_CT_lung_nodule.png"))
    # JSONL and an object holding the list read the same; --image-root moves the base
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    assert load_benchmark(tmp_path / "b.jsonl")[1][0] == load_benchmark(path)[1][0]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"data": entries[:1]}))
    assert (
        load_benchmark(tmp_path / "sub" / "b.json", image_root=tmp_path)[1][0].image == tmp_path / entries[0]["image"]
    )

    bad = {
        "no_mask": ([{"image": rel(image), "question": "q"}], "has no mask"),
        "list_mask": ([{"image": rel(image), "question": "q", "mask": ["a.png", "b.png"]}], "one entry per mask"),
        "missing": (
            [{"image": "nope.png", "question": "q", "mask": rel(image)}],
            r"1 file\(s\) not found, first entry 0: .*nope.png",
        ),
        "no_question": ([{"image": rel(image), "mask": rel(image)}], "name it with one of question, instruction"),
        "not_list": ({"rows": []}, "expected a list of entries"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        with pytest.raises(BenchmarkError, match=message):
            load_benchmark(tmp_path / f"{name}.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        load_benchmark(tmp_path / "broken.json")


@needs_demo
def test_eval_cli_on_a_json_benchmark(tmp_path):
    entries = [
        {
            "image": str(DEMO / "demo" / "20_ultrasound_breast.png"),
            "question": "Segment the breast tumor.",
            "mask": str(DEMO / "demo_mask" / "20_ultrasound_breast_tumor.png"),
        },  # fmt: skip
    ]
    (tmp_path / "b.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    argv = ["eval", str(tmp_path / "b.json"), "--baselines", "center,box", "--max-side", "128", "--out", str(out)]
    assert main([*argv, "--modality", "ultrasound", "--no-progress"]) == 0
    rows = read_results(out / "results.csv")
    assert [(r["method"], r["modality"], r["target"]) for r in rows] == [
        ("center", "ultrasound", "breast tumor"),
        ("box", "ultrasound", "breast tumor"),
    ]
    assert all(r["iou"] > 0.2 for r in rows)


@needs_recist
def test_volume_slice_reader_on_recist(tmp_path):
    volume = RECIST / "CT_Lesion_000001_02_01_008-023.npz"
    with np.load(volume) as data:
        imgs, gts = data["imgs"], data["gts"]
    areas = gts.reshape(len(gts), -1).sum(1).astype(np.int64)
    fmt, cases = load_benchmark(volume)
    assert fmt == "volumes" and [c.slice_index for c in cases] == [int(np.argmax(areas))]
    image, gt = cases[0].load()
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    assert np.array_equal(image[..., 0], imgs[cases[0].slice_index]) and np.array_equal(
        gt, gts[cases[0].slice_index] > 0
    )
    assert cases[0].modality == "CT" and cases[0].question == "Segment the lesion."
    labelled = np.flatnonzero(areas)
    assert [c.slice_index for c in load_benchmark(volume, slices="every:2")[1]] == list(labelled[::2])
    assert len(load_benchmark(RECIST)[1]) == len(list(RECIST.glob("*.npz")))
    with pytest.raises(BenchmarkError, match="--slices"):
        load_benchmark(volume, slices="middle")
    with pytest.raises(BenchmarkError, match="no slice"):
        load_benchmark(volume, label_value=7)

    # The same volume as NIfTI in an nnU-Net layout, in Hounsfield units (the soft-tissue window maps back to the
    # stored uint8 values): voxel axis 2 is axial and rows follow voxel axis 1.
    import nibabel as nib

    hu = imgs.astype(np.float32) / 255 * 400 - 160
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), np.eye(4)), tmp_path / "imagesTr" / "lesion1_0000.nii.gz")
    nib.save(nib.Nifti1Image(gts.transpose(2, 1, 0), np.eye(4)), tmp_path / "labelsTr" / "lesion1.nii.gz")
    fmt, nii = load_benchmark(tmp_path, slices="largest:2")
    assert fmt == "volumes" and [c.source for c in nii] == ["nifti", "nifti"]
    assert [c.slice_index for c in nii] == sorted(np.argsort(-areas, kind="stable")[:2].tolist())
    image, gt = nii[-1].load()
    assert np.abs(image[..., 0].astype(int) - imgs[nii[-1].slice_index]).max() <= 1
    assert np.array_equal(gt, gts[nii[-1].slice_index] > 0)
    # label files beside their volumes (<name>_seg.nii.gz), and an explicit --labels file
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "lesion1.nii.gz").symlink_to(tmp_path / "imagesTr" / "lesion1_0000.nii.gz")
    (flat / "lesion1_seg.nii.gz").symlink_to(tmp_path / "labelsTr" / "lesion1.nii.gz")
    (beside,) = load_benchmark(flat)[1]
    assert (beside.image.name, beside.mask.name, beside.slice_index) == ("lesion1.nii.gz", "lesion1_seg.nii.gz", 9)
    explicit = load_benchmark(flat / "lesion1.nii.gz", labels=flat / "lesion1_seg.nii.gz")[1]
    assert [c.slice_index for c in explicit] == [9]
    with pytest.raises(BenchmarkError, match="--labels"):
        load_benchmark(flat / "lesion1.nii.gz")


@needs_recist
def test_eval_cli_on_volumes(tmp_path):
    out = tmp_path / "out"
    argv = [
        "eval",
        str(RECIST / "CT_Lesion_000002_03_01_035-047.npz"),
        "--baselines",
        "oracle,center",
        "--max-steps",
        "3",
    ]
    assert main([*argv, "--out", str(out), "--no-progress", "--max-side", "256"]) == 0
    rows = read_results(out / "results.csv")
    assert [(r["case_id"], r["method"]) for r in rows] == [
        ("CT_Lesion_000002_03_01_035-047_z006", "oracle"),
        ("CT_Lesion_000002_03_01_035-047_z006", "center"),
    ]
    assert 'id="case-CT_Lesion_000002_03_01_035-047_z006"' in (out / "report.html").read_text()


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    cases = [
        (["eval", str(tmp_path / "missing"), "--baselines", "center", "--out", str(tmp_path / "o")], "no such file"),
        (["eval", str(tmp_path), "--out", str(tmp_path / "o")], "nothing to evaluate"),
        (["eval", str(DEMO), "--baselines", "oracle,boxes", "--out", str(tmp_path / "o")], "unknown baseline"),
        (["eval", str(DEMO), "--baselines", "box", "--max-steps", "0", "--out", str(tmp_path / "o")], "--max-steps"),
        (["eval", str(tmp_path), "--baselines", "box", "--format", "json", "--out", str(tmp_path / "o")], "JSON file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ibisagent: error:") and message in err and err.count("\n") == 1, err


@needs_demo
def test_agent_failures_are_counted(tmp_path):
    """A tiny random-weight Qwen2.5-VL as the agent writes unusable text: the run completes and counts failures."""
    pytest.importorskip("transformers")
    import torch

    from ibisagent.testing import build_tiny_qwen2_5_vl

    torch.set_num_threads(1)
    build_tiny_qwen2_5_vl(tmp_path / "tiny", seed=0)
    out = tmp_path / "out"
    argv = ["eval", str(DEMO), "--model", str(tmp_path / "tiny"), "--baselines", "center", "--limit", "1"]
    argv += ["--max-side", "128", "--max-steps", "2", "--max-new-tokens", "12", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = read_results(out / "results.csv")
    assert [r["method"] for r in rows] == ["agent", "center"]
    agent = rows[0]
    assert agent["failure"] in ("invalid_output", "no_mask", "")
    if agent["failure"] == "invalid_output":
        assert agent["error"] and agent["stop_reason"] == "invalid_action"
    overall = {s["method"]: s for s in _csv(out / "summary.csv") if s["group_by"] == "overall"}
    assert int(overall["agent"]["failures"]) == int(bool(agent["failure"]))
    assert int(overall["agent"][agent["failure"] or "no_mask"]) == int(bool(agent["failure"]))


@needs_recist
def test_volume_reader_npz_and_nifti_give_the_same_voxels(tmp_path):
    from ibisagent.evaluation.cases import read_volumes
    from ibisagent.geometry import take_slice

    npz = RECIST / "CT_Lesion_000002_03_01_035-047.npz"
    with np.load(npz) as data:
        imgs, gts = data["imgs"], data["gts"]
    (case,) = read_volumes(npz)
    volume, gt = case.load()
    assert volume.shape == gt.shape == imgs.shape[::-1] and case.axis == 2
    assert np.array_equal(take_slice(volume, 4, 2), imgs[4]) and np.array_equal(take_slice(gt, 4, 2), gts[4] > 0)
    assert len(read_volumes(RECIST)) == len(list(RECIST.glob("*.npz")))
    import nibabel as nib

    hu = imgs.astype(np.float32) / 255 * 400 - 160
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(gts.transpose(2, 1, 0), np.eye(4)), tmp_path / "v_seg.nii.gz")
    (nii,) = read_volumes(tmp_path)
    nvol, ngt = nii.load()
    assert np.abs(nvol.astype(int) - volume).max() <= 1 and np.array_equal(ngt, gt)
    with pytest.raises(BenchmarkError, match="no volume holds label 7"):
        read_volumes(npz, label_value=7)


@needs_recist
def test_eval_cli_on_volumes_in_3d(tmp_path, capsys):
    from ibisagent.evaluation.volumes import VOLUME_RESULTS
    from ibisagent.volume import VolumeRecord

    out = tmp_path / "out3d"
    npz = RECIST / "CT_Lesion_000001_02_01_008-023.npz"
    argv = ["eval", str(npz), "--volume", "--baselines", "propagate,oracle-repair,slice-2d", "--out", str(out)]
    assert main([*argv, "--no-progress", "--max-steps", "5", "--repair-budget", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| propagate | 1 |" in printed and "clicks / volume" in printed
    rows = read_results(out / "results.csv", VOLUME_RESULTS)
    assert [r["method"] for r in rows] == ["propagate", "oracle-repair", "slice-2d"]
    by = {r["method"]: r for r in rows}
    assert by["propagate"]["slices_repaired"] == 0 and by["oracle-repair"]["slices_repaired"] <= 2
    assert by["oracle-repair"]["dice3d"] >= by["propagate"]["dice3d"] and by["slice-2d"]["clicks"] > 0
    assert by["propagate"]["slices_labelled"] == 7 and by["propagate"]["key_slice"] == 9
    record = VolumeRecord.from_json(out / by["oracle-repair"]["record"])
    assert record.key_slice == 9 and record.volume_shape == (512, 512, 16)
    assert main([*argv, "--no-progress"]) == 2  # results.csv exists: not overwritten without --resume
    assert main([*argv, "--no-progress", "--max-steps", "5", "--repair-budget", "2", "--resume"]) == 0
    assert "exists" in capsys.readouterr().err
    assert main(["eval", str(npz), "--volume", "--baselines", "oracle", "--out", str(tmp_path / "x")]) == 2
    assert "unknown volume baseline" in capsys.readouterr().err
