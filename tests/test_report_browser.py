"""The HTML report of `ibisagent eval`, opened in headless Chromium (Debian's `chromium` package): every case has its
section, every image decodes, nothing is fetched from the network; a screenshot is kept as a test artifact in
build/test-artifacts/ (ignored by git).

Chromium is installed with apt-get on first use when it is missing and the tests run as root (as in CI); the test is
skipped, with the reason, only when that is impossible.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main
from ibisagent.evaluation import read_results
from tests.conftest import DEMO, needs_demo

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Runs after the page (and its data-URI images) loaded; lists every <img> that did not decode.
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); });
  var m = document.createElement("div");
  m.id = "img-check";
  m.setAttribute("data-total", String(imgs.length));
  m.setAttribute("data-bad", bad.map(function (i) { return i.id || "?"; }).join(" "));
  document.body.appendChild(m);
});
</script>"""
# A control: an image that cannot decode, so the check above is seen to catch one.
BROKEN = '<img id="control-broken" alt="control" src="data:image/png;base64,iVBORw0KGgo=">'


def _find() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _install() -> str:
    """Install Debian's chromium with apt-get; returns '' on success, else why it could not be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root; install it with `apt-get install chromium` (Debian) and rerun"
    if shutil.which("apt-get") is None:
        return "apt-get not found (not Debian); install Chromium and put `chromium` on PATH"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
        if done.returncode != 0:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=240)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired:
        return "apt-get install chromium timed out"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install chromium failed: {tail[0]}"
    return ""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find()
    if path is None:
        reason = _install()
        path = _find()
        if path is None:
            pytest.skip(
                f"chromium is not installed and could not be installed: {reason or 'not on PATH after install'}"
            )
    return path


def _run(chromium: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The output folder of a small eval run: two demo images, oracle and centre-click baselines."""
    if not DEMO.is_dir():
        pytest.skip(f"shared demo data not found at {DEMO}")
    out = tmp_path_factory.mktemp("report") / "out"
    argv = ["eval", str(DEMO), "--baselines", "oracle,center", "--limit", "3", "--max-steps", "3"]
    assert main([*argv, "--max-side", "256", "--thumb", "160", "--out", str(out), "--no-progress"]) == 0
    return out


@needs_demo
def test_report_is_self_contained(report):
    page = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "url(http" not in page
    assert page.count("data:image/png;base64,") > 10


@needs_demo
def test_report_in_headless_chromium(chromium, report, tmp_path):
    page = (report / "report.html").read_text()
    assert page.count("</body>") == 1
    checked = tmp_path / "report-checked.html"
    checked.write_text(page.replace("</body>", BROKEN + CHECK_SCRIPT + "</body>"))
    done = _run(chromium, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout

    rows = read_results(report / "results.csv")
    case_ids = list(dict.fromkeys(r["case_id"] for r in rows))
    assert len(case_ids) == 3
    for case_id in case_ids:
        section = re.search(rf'<section class="case" id="case-{re.escape(case_id)}"(.*?)</section>', dom, re.DOTALL)
        assert section, f"no section for {case_id}"
        for method in ("oracle", "center"):
            assert f'data-method="{method}"' in section.group(1)
        assert "step 1 · IoU" in section.group(1)
    for grouping in ("overall", "modality", "target"):
        assert f'data-grouping="{grouping}"' in dom
    check = re.search(r'<div id="img-check" data-total="(\d+)" data-bad="([^"]*)"', dom)
    assert check, "the image check did not run"
    n_imgs = page.count("<img")
    assert int(check.group(1)) == n_imgs + 1 > 10
    assert check.group(2) == "control-broken"  # every report image decoded; only the control did not

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "eval-report.png"
    shot.unlink(missing_ok=True)
    done = _run(chromium, "--window-size=1280,2000", "--hide-scrollbars", f"--screenshot={shot}", checked.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        pixels = np.asarray(im.convert("L"), np.float32)
    assert pixels.std() > 20  # tables, plots and thumbnails, not a blank page
    shutil.copy(report / "report.html", ARTIFACTS / "eval-report.html")
