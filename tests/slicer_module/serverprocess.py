"""Starts the real IBISAgent MONAI Label server as a subprocess for the Slicer module's tests, as scripts/serve.sh runs
it: a runtime app folder outside the checkout (links to monailabel_app/main.py and lib), 127.0.0.1, a free port, its
own process group (only that group is ended). Standard library only: the slicer-core suite (tests/slicer_core) uses it
from an interpreter without the project's packages, with the `monailabel` command of the project environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "monailabel_app"
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_monailabel(venv_bin: Path) -> str | None:
    """The `monailabel` command beside `venv_bin`'s python, else on PATH."""
    return shutil.which("monailabel", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def running_server(tmp: Path, studies: Path, monailabel: str, conf: dict[str, str]):
    """Yield (url, log path) of a server on `studies` with `--conf` values, ready (GET /info/ answers 200)."""
    log_config = tmp / "logging.json"  # console only: MONAI Label's default also writes into the app folder
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"console": {"class": "logging.StreamHandler"}},
                "root": {"level": "INFO", "handlers": ["console"]},
            }
        )
    )
    venv_bin = str(Path(monailabel).parent)
    env = dict(os.environ)
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",  # the monailabel script runs the first python on PATH
        PYTHONDONTWRITEBYTECODE="1",
        MONAI_LABEL_SESSION_PATH=str(tmp / "monailabel-sessions"),
        HF_HUB_OFFLINE="1",
    )
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    app = tmp / "app"  # as scripts/serve.sh runs it: MONAI Label's model/, logs/, bin/ land here, not in the checkout
    app.mkdir()
    for name in ("main.py", "lib"):
        (app / name).symlink_to(APP / name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [monailabel, "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log_config", str(log_config)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    log = tmp / "server.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    try:
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise RuntimeError(
                    f"server not ready after {READY_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        print(f"server ready after {time.monotonic() - started:.1f} s")
        yield url, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this helper created (start_new_session)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
