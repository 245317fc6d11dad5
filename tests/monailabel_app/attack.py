"""The harness of the hardening tests: one real server (`monailabel start_server`, tool only, a bearer token, small
limits) in a temporary folder laid out as a deployment is, with canary files where path tricks would land.

    tmp/
      studies/               the datastore; `linked.png` is a link to ../shared-data/linked_target.png (serve.sh)
      shared-data/           stands in for ../shared/data: may be read through the link, never written or deleted
      outside/               a sibling folder holding `meta.info` and an image (what upload sessions would delete)
      server-tmp/            the server's TMPDIR: empty again after every request
      canary.png, setup.py   files in the server's working directory (an image id equal to their name reads them)

`snapshot()` lists every file outside studies/ and server-tmp/ with its size, mtime and atime; tests compare it before
and after. Access times are set to 0 and must stay there (reading a file updates it on relatime mounts for a file
whose atime is older than its mtime).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from tests.monailabel_app.test_server import HEART, LIVER, TOOL, _build_studies, _Server

TOKEN = "t0ken-for-the-hardening-tests-" + "x" * 8
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_upload_mb": "8", "max_clicks": "16", "max_session_steps": "6", "max_sessions": "4"}
CANARIES = ("canary.png", "setup.py", "outside/meta.info", "outside/image.png", "shared-data/linked_target.png")


def build(tmp: Path) -> dict:
    studies = tmp / "studies"
    data = _build_studies(studies)
    heart = (studies / f"{HEART}.png").read_bytes()
    for name in CANARIES:
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_bytes(heart if name.endswith(".png") else b'{"image": "image.png"}\n')
    (studies / "linked.png").symlink_to(tmp / "shared-data" / "linked_target.png")
    (tmp / "server-tmp").mkdir()
    for name in CANARIES:
        os.utime(tmp / name, (0, (tmp / name).stat().st_mtime))
    return data


def start(tmp: Path, name: str = "attack", conf: dict | None = None) -> _Server:
    server = _Server(
        name,
        tmp / "studies",
        tmp,
        {"tool": TOOL, **LIMITS, **(conf or {})},
        env={"IBISAGENT_API_TOKEN": TOKEN, "TMPDIR": str(tmp / "server-tmp")},
    )
    return server.wait_ready()


def snapshot(tmp: Path) -> dict[str, tuple]:
    """Every file under tmp outside the server's own folders (studies, TMPDIR, upload sessions): (size, mtime,
    atime; no atime for shared-data, which the linked study may read)."""
    out = {}
    for path in tmp.rglob("*"):
        rel = path.relative_to(tmp)
        server_state = rel.parts[0] in ("studies", "server-tmp") or rel.parts[0].endswith("-monailabel-sessions")
        if server_state or path.suffix == ".log" or not path.is_file():
            continue
        st = path.stat()
        readable = rel.parts[0] == "shared-data"  # a linked study is read through its link, never written
        out[str(rel)] = (st.st_size, st.st_mtime_ns, None if readable else st.st_atime_ns)
    return out


def temp_files(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in (tmp / "server-tmp").rglob("*") if p.is_file())


def rss_mb(server: _Server) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def infer(server: _Server, image: str = LIVER, params=None, **kwargs) -> requests.Response:
    query = {"image": image, "output": "json", **kwargs.pop("query", {})}
    data = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    return requests.post(f"{server.url}/infer/ibisagent", params=query, data=data, headers=AUTH, timeout=120, **kwargs)


def call(server: _Server, method: str, path: str, **kwargs) -> requests.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return requests.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def png_bytes(side: int = 64) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="package")
def attack(tmp_path_factory):  # registered in conftest.py
    """The running server and its folder; checks at the end that nothing outside studies/ changed."""
    tmp = tmp_path_factory.mktemp("attack")
    data = build(tmp)
    server = start(tmp)
    before = snapshot(tmp)
    try:
        yield {"server": server, "tmp": tmp, "before": before, **data}
        after = snapshot(tmp)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"files outside the server's folders were read, written or deleted: {changed}"
        assert temp_files(tmp) == []
    finally:
        server.stop()
        shutil.rmtree(tmp / "server-tmp", ignore_errors=True)
