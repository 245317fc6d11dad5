"""Multi-process runs for the tests: `accelerate launch --multi_gpu --num_processes N` on CPU (accelerate picks the
gloo backend when the program's Accelerator runs on CPU and LOCAL_RANK is set), on a free port, killed with every
process it started when it outlives its timeout, so that a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(module_args: list[str], processes: int = 2, timeout: float = 240) -> str:
    """Runs `accelerate launch --multi_gpu --num_processes <processes> -m <module_args>` from the repository root;
    returns its output. Fails the test on a non-zero exit or when it runs past `timeout` seconds (a hang)."""
    command = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        *module_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(command)} did not finish in {timeout:.0f} s (a hang?); output:\n{out[-6000:]}")
    if proc.returncode:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}; output:\n{out[-6000:]}")
    return out


def _kill_tree(pid: int) -> None:
    """Kill the launcher and its descendants by pid (torch's launcher starts the workers in sessions of their own,
    so its process group does not hold them)."""
    launcher = psutil.Process(pid)
    for p in [*launcher.children(recursive=True), launcher]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def read_records(prefix: Path, processes: int = 2) -> list[list[dict]]:
    """Per process, the step records `tests.training.distributed_probe` wrote for `prefix`."""
    return [
        [json.loads(line) for line in Path(f"{prefix}.rank{r}.jsonl").read_text().splitlines()]
        for r in range(processes)
    ]
