"""The learning proof and the grounding probe (experiments at toy size): the acceptance checks, the training rise,
and both scripts end to end."""

from __future__ import annotations

import json

import pytest

@pytest.fixture
def learning_proof(monkeypatch):
    """benchmarks/learning_proof.py as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "learning_proof.py"
    spec = importlib.util.spec_from_file_location("learning_proof", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "learning_proof", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_learning_proof_criteria(learning_proof):
    """The acceptance checks: RL's gain must beat the larger of the two rows' spread over seeds, per metric."""

    def rows(iou, hit, fv=1.0):
        return [{"format_valid": fv, "iou": i, "click_in_target": h} for i, h in zip(iou, hit)]

    results = {
        "SFT": rows([0.20, 0.24, 0.22], [0.25, 0.31, 0.28], fv=0.96),
        "SFT+RL": rows([0.26, 0.27, 0.25], [0.30, 0.33, 0.31]),
        "centre click": rows([0.21] * 3, [0.1] * 3),
    }
    checks = [ok for _, ok in learning_proof.criteria(results)]
    # IoU gain 0.04 > spread 0.016; hit gain 0.033 > spread 0.0245; SFT IoU 0.22 > 0.21
    assert checks == [True, True, True, True]
    results["SFT+RL"] = rows([0.26, 0.27, 0.25], [0.30, 0.28, 0.31])  # hit gain 0.017 < SFT spread 0.0245
    results["centre click"] = rows([0.23] * 3, [0.1] * 3)
    results["SFT"][0]["format_valid"] = 0.8
    assert [ok for _, ok in learning_proof.criteria(results)] == [False, False, True, False]
    line = learning_proof.criteria(results)[3][0]
    assert "gain +0.017" in line and "seed spread 0.024" in line and "+0.050, -0.030, +0.030" in line


def test_learning_proof_training_rise_averages_the_first_and_last_steps(learning_proof):
    rates = [0.0] * 10 + [0.5] * 5 + [1.0] * 10
    curves = {0: [{"click_in_target": r} for r in rates], 3: [{"click_in_target": 0.25}] * 4}
    line = learning_proof.training_rise(curves)
    assert line.endswith(": 0.000 -> 1.000, 0.250 -> 0.250")


def test_learning_proof_script_runs_end_to_end(tmp_path, learning_proof):
    """The learning-proof benchmark at toy size (a few steps): every phase runs, the grounding probe stops the
    first-click phase once its target is met, the table and curves are written, and the baselines order as they
    must (oracle above a random object above the image centre is not guaranteed on 6 images, but the oracle is above
    both)."""
    module = learning_proof
    override = {
        "single_images": 12,
        "multi_images": 12,
        "rl_images": 4,
        "test_images": 4,
        "sft_single_steps": 3,
        "sft_probe_every": 1,
        "sft_probe_images": 3,
        "sft_probe_target": 0.0,  # met at the first probe: the first-click phase stops after one step
        "sft_multi_steps": 2,
        "sft_batch": 4,
        "rl_steps": 2,
        "rl_prompts": 2,
        "rl_generations": 2,
        "step_mode_steps": 1,
    }
    assert module.main(["--out", str(tmp_path), "--seeds", "0", "--override", json.dumps(override)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"untrained", "SFT", "SFT+RL", "centre click", "random object", "oracle"}
    oracle = results["results"]["oracle"][0]
    assert oracle["iou"] > 0.8 and oracle["iou"] > results["results"]["centre click"][0]["iou"]
    timing = results["timing"]["0"]
    assert timing["rl_steps_per_second"] > 0 and "step_mode_steps_per_second" in timing
    assert timing["sft_single_steps"] == 1 and timing["sft_steps"] == 3
    probes = [json.loads(line) for line in (tmp_path / "seed0" / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [1] and 0.0 <= probes[0]["click_in_target"] <= 1.0
    checks = {" ".join(c["check"].split()[:2]): c["met"] for c in results["criteria"]}
    assert list(checks) == ["SFT format-valid", "SFT IoU", "RL iou", "RL click_in_target"]
    sft, rl = results["results"]["SFT"][0], results["results"]["SFT+RL"][0]
    assert checks["RL iou"] == (rl["iou"] - sft["iou"] > 0.0)  # one seed: the spread is 0
    table = (tmp_path / "table.md").read_text()
    assert (tmp_path / "reward_curves.png").stat().st_size > 1000 and "| SFT+RL |" in table
    assert "training episodes' click-in-target" in table


def test_grounding_probe_script_runs(capsys, monkeypatch):
    """The grounding probe trains, evaluates through the grammar and reports its figures (a few seconds' run)."""
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "grounding_probe.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when the script runs: it imports the learning proof's plan
    spec = importlib.util.spec_from_file_location("grounding_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (
        module.main(["--pixels", "28", "--seconds", "3", "--batch", "4", "--eval-every", "2", "--test-images", "8"])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 image token(s)" in out and re.search(r"^\| 2 \| ", out, re.M)
    final = re.search(r"final: pixels 28, (\d+) steps .* hit ([\d.]+), err", out)
    assert final and int(final.group(1)) >= 2 and 0.0 <= float(final.group(2)) <= 1.0
    with pytest.raises(SystemExit):
        module.main(["--pixels", "30"])  # not a multiple of 28
    assert "not a multiple of 28" in capsys.readouterr().err
