"""GRPO with 2 processes on CPU (`accelerate launch --multi_gpu --num_processes 2`, gloo), both modes, through the
command line's own `main`: the run finishes (no deadlock when the processes have different numbers of sequences to
train), both processes hold the same weights after every step, the learning rate follows the 1-process run's, the
processes' prompts are disjoint, the logged metrics cover both processes' rollouts, and a resumed run reproduces the
straight one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training import distributed_probe
from tests.training.launch import accelerate_launch, read_records

MODES = ("multi_turn", "step")
PROCESSES, PROMPTS, GENERATIONS, STEPS = 2, 2, 2, 2


def _options(root, model_dir, traj, mode: str, out) -> list[str]:
    common = {
        "model_name_or_path": model_dir,
        "template_dir": root / "templates",
        "instructions": root / "instructions.json",
        "num_generations": GENERATIONS,
        "prompts_per_step": PROMPTS,
        "max_steps": STEPS,
        "max_new_tokens": 48,
        "max_invalid": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "micro_batch_size": 1,  # one pass per sequence: processes differ in how many passes they have to run
        "save_steps": 1,
        "logging_steps": 0,
        "output_dir": out,
    }
    if mode == "multi_turn":  # a VQA prompt and a segmentation prompt on each process
        common.update(data=root / "shapes", max_turns=2, vqa_file=root / "vqa.json", vqa_fraction=0.5)
    else:  # two updates per step (old log-probabilities kept) and per-sequence loss weighting
        common.update(data=traj, num_iterations=2, loss_type="grpo")
    return ["--mode", mode, *(str(x) for k, v in common.items() for x in (f"--{k}", v))]


def _run(mode: str, prefix, options: list[str]) -> list[str]:
    return ["grpo", str(prefix), *options]


@pytest.fixture(scope="module")
def launched(setup, tmp_path_factory):
    """Per mode: a straight 2-process run (checkpoint after step 1), a 2-process run resumed from that checkpoint,
    and the 1-process run of the same options (here, in this process)."""
    from ibisagent_training.generate import GenerateConfig, generate

    root, model_dir, _, _ = setup
    tmp = tmp_path_factory.mktemp("distributed")
    traj = tmp / "traj"
    generate(root / "shapes", traj, GenerateConfig(max_steps=4, stop_iou=0.8), progress=False)
    runs = {mode: {kind: tmp / f"{mode}-{kind}" for kind in ("straight", "resumed", "single")} for mode in MODES}
    straight, resumed = [], []
    for mode, out in runs.items():
        straight += [*_run(mode, out["straight"], _options(root, model_dir, traj, mode, out["straight"])), "---"]
        options = _options(root, model_dir, traj, mode, out["resumed"])
        resumed += [*_run(mode, out["resumed"], options), "--resume_from_checkpoint"]
        resumed += [str(out["straight"] / "checkpoint-1"), "---"]
    accelerate_launch(["tests.training.distributed_probe", *straight[:-1]], PROCESSES)
    accelerate_launch(["tests.training.distributed_probe", *resumed[:-1]], PROCESSES)
    for mode, out in runs.items():
        assert (
            distributed_probe.run("grpo", str(out["single"]), _options(root, model_dir, traj, mode, out["single"])) == 0
        )
    return runs


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_hold_the_same_weights_and_the_one_process_learning_rate(launched, mode):
    ranks = read_records(launched[mode]["straight"], PROCESSES)
    assert [[r["step"] for r in rank] for rank in ranks] == [list(range(1, STEPS + 1))] * PROCESSES
    for step in range(STEPS):
        assert len({rank[step]["checksum"] for rank in ranks}) == 1, f"the processes' weights differ after step {step}"
    # the case that used to deadlock: in some step the processes had different numbers of sequences to train
    assert any(ranks[0][step]["trained"] != ranks[1][step]["trained"] for step in range(STEPS))
    (single,) = read_records(launched[mode]["single"], 1)
    assert [r["lr"] for r in ranks[0]] == [r["lr"] for r in single] == pytest.approx([0.5e-3, 0.0])
    assert [m["learning_rate"] for m in _metrics(launched[mode]["straight"])] == [r["lr"] for r in single]


@pytest.mark.parametrize("mode", MODES)
def test_processes_split_the_prompts_and_the_metrics_cover_both(launched, mode):
    ranks = read_records(launched[mode]["straight"], PROCESSES)
    metrics = _metrics(launched[mode]["straight"])
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # written once, by the main process
    for step, m in enumerate(metrics):
        prompts = [rank[step]["prompts"] for rank in ranks]
        assert all(len(p) == PROMPTS for p in prompts)
        assert not set(prompts[0]) & set(prompts[1]), f"step {step + 1}: both processes drew {prompts}"
        rewards = [x for rank in ranks for x in rank[step]["rewards"]]
        assert m["episodes"] == len(rewards) == PROCESSES * PROMPTS * GENERATIONS
        assert m["reward/total"] == pytest.approx(np.mean(rewards))


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_two_process_run_reproduces_the_straight_one(launched, mode):
    straight = read_records(launched[mode]["straight"], PROCESSES)
    resumed = read_records(launched[mode]["resumed"], PROCESSES)
    for a, b in zip(straight, resumed):
        assert [r["step"] for r in b] == [STEPS]
        assert b[0] == a[-1]  # same prompts, rewards, learning rate and weights
    assert (
        _metrics(launched[mode]["resumed"])[-1]["reward/total"]
        == _metrics(launched[mode]["straight"])[-1]["reward/total"]
    )
