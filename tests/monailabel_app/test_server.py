"""The MONAI Label app over HTTP: the real `monailabel start_server` as a subprocess on 127.0.0.1, a studies folder
built in a temporary directory from ../shared/data, a tiny random Qwen2.5-VL built from a config.

Three server processes start once for the module, side by side: the agent server (tiny VLM + tool), a bare server
(no model, short session TTL) and one with `--conf tool magic` that must refuse to start.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO, RECIST

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from PIL import Image  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

from ibisagent.trajectory import STOP_REASONS, Trajectory  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "monailabel_app"
VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 150
LIVER, HEART, VOLUME = "04_CT_liver", "08_MRI_heart", "ct_lesion"
HEART_MASK = "08_MRI_heart_left+heart+ventricle.png"
# The weight-free classical tool is the app's default; until ibisagent.tools.classical exists the tests run the
# MedSAM2 adapter with random weights (its masks are noise, so mask-content checks need the classical tool).
TOOL = "classical" if importlib.util.find_spec("ibisagent.tools.classical") else "medsam2"
BARE_TTL_S = 4

pytestmark = pytest.mark.skipif(
    not (DEMO.is_dir() and RECIST.is_dir()), reason=f"shared data not found at {DEMO.parent} / {RECIST}"
)


# -- servers ---------------------------------------------------------------------------------------------------------
class _Server:
    """One `monailabel start_server` process in its own process group (so that stop() ends it and nothing else)."""

    def __init__(
        self,
        name: str,
        studies: Path,
        tmp: Path,
        conf: dict[str, str],
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ):
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.studies, self.tmp, self.conf, self.host = studies, tmp, conf, host
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}",
            PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ inside the repository's app folder
            MONAI_LABEL_SESSION_PATH=str(tmp / f"{name}-monailabel-sessions"),  # not ~/.cache
            HF_HUB_OFFLINE="1",
            **(env or {}),
        )
        self.start()

    def start(self) -> None:
        """Start the process (again, after stop() or a kill: same port, same folders)."""
        tmp, env = self.tmp, self.env
        app = (
            tmp / "app"
        )  # as scripts/serve.sh runs it: MONAI Label's model/, logs/, bin/ land here, not in the checkout
        app.mkdir(exist_ok=True)
        for name in ("main.py", "lib"):
            if not (app / name).exists():
                (app / name).symlink_to(APP / name)
        command = ["monailabel", "start_server", "--app", str(app), "--studies", str(self.studies)]
        command += ["--host", self.host, "--port", str(self.port), "--log_config", str(_log_config(tmp))]
        for key, value in self.conf.items():
            command += ["--conf", key, value]
        self.started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True
            )
        self.ready_after: float | None = None

    def wait_ready(self) -> _Server:
        while self.ready_after is None:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - self.started > READY_TIMEOUT_S:
                pytest.fail(f"{self.name} server not ready after {READY_TIMEOUT_S} s:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test created (start_new_session)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_config(tmp: Path) -> Path:
    """Console-only logging: MONAI Label's default also writes <app>/logs/app.log, inside the repository."""
    path = tmp / "logging.json"
    if not path.exists():
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"simple": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"}},
            "root": {"level": "INFO", "handlers": ["console"]},
        }
        path.write_text(json.dumps(config))
    return path


def _build_studies(root: Path) -> dict:
    """Two demo PNGs and a NIfTI volume (voxel order W, H, D) from a RECIST npz, plus what the tests compare with."""
    root.mkdir()
    for name in (LIVER, HEART):
        shutil.copyfile(DEMO / "demo" / f"{name}.png", root / f"{name}.png")
    npz = np.load(sorted(RECIST.glob("*.npz"))[0])
    imgs, gts = np.transpose(npz["imgs"], (2, 1, 0)), np.transpose(npz["gts"], (2, 1, 0)).astype(np.uint8)
    affine = np.diag([*np.asarray(npz["spacing"], float), 1.0])
    nib.save(nib.Nifti1Image(imgs, affine), root / f"{VOLUME}.nii.gz")
    heart = np.asarray(Image.open(DEMO / "demo_mask" / HEART_MASK))
    heart = (heart[..., 0] if heart.ndim == 3 else heart) > 0
    k = int(np.argmax(gts.sum(axis=(0, 1))))
    return {
        "files": sorted(p.name for p in root.iterdir()),
        "heart_mask": heart,
        "heart_click": _inner_point(heart),  # (x, y)
        "volume_shape": imgs.shape,
        "volume_affine": affine,
        "volume_gts": gts,
        "lesion_slice": k,
        "lesion_click": _inner_point(gts[:, :, k].T),  # (x, y) = (i, j)
    }


def _inner_point(mask: np.ndarray) -> list[int]:
    """The (x, y) pixel deepest inside an HxW mask."""
    from scipy.ndimage import distance_transform_edt

    y, x = np.unravel_index(int(np.argmax(distance_transform_edt(mask))), mask.shape)
    return [int(x), int(y)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monailabel_app")
    studies = tmp / "studies"
    data = _build_studies(studies)
    servers = {
        "bare": _Server("bare", studies, tmp, {"tool": TOOL, "session_ttl": str(BARE_TTL_S)}),
        "magic": _Server("magic", tmp / "studies-magic", tmp, {"tool": "magic"}),
    }
    try:
        from ibisagent.testing import build_tiny_qwen2_5_vl

        build_tiny_qwen2_5_vl(tmp / "tiny-vlm")
        servers["agent"] = _Server(
            "agent", studies, tmp, {"model": str(tmp / "tiny-vlm"), "tool": TOOL, "max_new_tokens": "24"}
        )
        yield {"studies": studies, "servers": servers, **data}
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def agent(setup) -> _Server:
    return setup["servers"]["agent"].wait_ready()


@pytest.fixture(scope="module")
def bare(setup) -> _Server:
    return setup["servers"]["bare"].wait_ready()


# -- requests --------------------------------------------------------------------------------------------------------
def _infer(server: _Server, image: str, params=None, output: str = "json", raw: str | None = None, label=None):
    files = {"label": label} if label is not None else None
    data = {"params": raw if raw is not None else json.dumps(params or {})}
    return requests.post(
        f"{server.url}/infer/ibisagent", params={"image": image, "output": output}, data=data, files=files, timeout=300
    )


def _ok(response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def _all(response) -> tuple[dict, bytes, str]:
    """output=all: (result JSON, label file bytes, label file name)."""
    assert response.status_code == 200, response.text[:2000]
    parts = {}
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        parts["params" if 'name="params"' in disposition else "image"] = (part.content, disposition)
    name = parts["image"][1].split('filename="')[1].rstrip('"')
    return json.loads(parts["params"][0]), parts["image"][0], name


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _nifti(path: Path, data: np.ndarray, affine=None) -> bytes:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path.read_bytes()


def _check_result(result: dict, image: str) -> Trajectory:
    """The contract's fields and a trajectory that the core reads back."""
    assert set(result) >= {"session_id", "image", "slice", "axis", "stop_reason", "encode_count", "trajectory"}
    assert result["image"] == image and result["label_kind"] in ("2d", "volume")
    trajectory = Trajectory.from_dict(result["trajectory"])
    assert trajectory.meta["image"] == image
    return trajectory


# -- the task --------------------------------------------------------------------------------------------------------
def test_a_server_without_a_token_answers_only_to_its_own_names(bare):
    """Hardening (the token-protected server is in test_hardening_endpoints.py). DNS rebinding: a page on a name
    that resolves to 127.0.0.1 is same-origin for the browser; the Host header gives it away."""
    for host in ("evil.example", f"evil.example:{bare.port}", "127.0.0.1.evil.example", "", "[::1", "[zz]:1"):
        response = requests.get(bare.url + "/datastore/", headers={"Host": host}, timeout=10)
        assert response.status_code == 403 and "Host header" in response.json()["detail"]
    for host in (f"localhost:{bare.port}", f"127.0.0.1:{bare.port}", "localhost"):
        assert requests.get(bare.url + "/datastore/", headers={"Host": host}, timeout=10).status_code == 200
    assert requests.get(bare.url + "/health", headers={"Host": "evil.example"}, timeout=10).status_code == 200


def test_info_lists_the_task(agent):
    info = requests.get(agent.url + "/info/", timeout=30).json()
    task = info["models"]["ibisagent"]
    assert task["dimension"] == 2 and task["type"] == "deepgrow" and task["labels"]
    assert task["config"]["max_steps"] == 20 and task["config"]["run_agent"] is True
    assert task["ibisagent"]["tool"] == TOOL and task["ibisagent"]["model"].endswith("tiny-vlm")
    assert info["labels"] == task["labels"]


def test_agent_run_on_png(agent):
    result, label, name = _all(_infer(agent, LIVER, {"instruction": "segment the liver", "max_steps": 3}, "all"))
    trajectory = _check_result(result, LIVER)
    # A random model writes malformed text: the episode must still end cleanly with a well-formed record.
    assert result["stop_reason"] in STOP_REASONS and trajectory.stop_reason == result["stop_reason"]
    assert 1 <= len(trajectory.steps) <= 3 and trajectory.meta["user_steps"] == []
    for step in trajectory.steps:
        assert isinstance(step.text, str) and (step.error is not None or step.action is not None or step.answer)
    assert name.endswith(".png") and result["slice"] is None and result["label_kind"] == "2d"
    mask = np.asarray(Image.open(io.BytesIO(label)))
    assert mask.shape == (1024, 1024) and set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(mask > 0, trajectory.final_mask)


def test_tool_only_clicks_give_a_mask_with_the_click(agent, setup):
    x, y = setup["heart_click"]
    params = {"instruction": "segment the left heart ventricle", "foreground": [[x, y]], "run_agent": False}
    result, label, _ = _all(_infer(agent, HEART, params, "all"))
    trajectory = _check_result(result, HEART)
    assert result["stop_reason"] == "agent_not_run" and trajectory.meta["user_steps"] == [0]
    (step,) = trajectory.steps
    (click,) = step.action.clicks
    assert (click.x, click.y, click.positive) == (x, y, True)
    mask = np.asarray(Image.open(io.BytesIO(label))) > 0
    assert np.array_equal(mask, trajectory.final_mask)
    if TOOL == "classical":
        assert mask[y, x] and mask.sum() < mask.size / 2


def test_stock_slicer_deepgrow_request(agent, setup):
    """Slicer's stock MONAI Label module sends the segment name as `label`, IJK points with k = 0 for a 2D image
    and the task's config values; no instruction."""
    x, y = setup["heart_click"]
    params = {"label": "heart", "foreground": [[x, y, 0]], "background": [], "max_steps": 20, "run_agent": False}
    trajectory = _check_result(_ok(_infer(agent, HEART, params)), HEART)
    assert trajectory.instruction == "segment the heart" and trajectory.targets == ["heart"]


def test_refinement_from_an_uploaded_label(agent, setup):
    heart = setup["heart_mask"]
    params = {"instruction": "segment the left heart ventricle", "max_steps": 2}
    result = _ok(_infer(agent, HEART, params, label=("initial.png", _png(heart), "image/png")))
    trajectory = _check_result(result, HEART)
    (initial,) = trajectory.initial_masks.values()
    assert np.array_equal(initial, heart)
    assert result["stop_reason"] in STOP_REASONS


def test_volume_slice_gives_a_volume_label(agent, setup, tmp_path):
    k, (i, j) = setup["lesion_slice"], setup["lesion_click"]
    params = {"instruction": "segment the lesion", "slice": k, "axis": 2, "foreground": [[i, j, k]], "run_agent": False}
    result, label, name = _all(_infer(agent, VOLUME, params, "all"))
    trajectory = _check_result(result, VOLUME)
    assert (result["slice"], result["axis"], result["label_kind"]) == (k, 2, "volume") and name.endswith(".nii.gz")
    (click,) = trajectory.steps[0].action.clicks
    assert (click.x, click.y) == (i, j)  # voxel (i, j, k) is pixel x = i, y = j of axial slice k
    path = tmp_path / "label.nii.gz"
    path.write_bytes(label)
    volume = nib.load(path)
    data = np.asanyarray(volume.dataobj)
    assert data.shape == setup["volume_shape"] and np.allclose(volume.affine, setup["volume_affine"])
    outside = np.delete(data, k, axis=2)
    assert not outside.any()
    assert np.array_equal(data[:, :, k].T > 0, trajectory.final_mask)
    if TOOL == "classical":
        assert data[i, j, k] == 1


def test_volume_slice_along_another_axis(agent, setup, tmp_path):
    """Axis 1: voxel (i, j, k) of slice j is pixel x = i, y = k; the label lands in data[:, j, :]."""
    i, j = setup["lesion_click"]
    k = setup["lesion_slice"]
    params = {"instruction": "segment the lesion", "axis": 1, "foreground": [[i, j, k]], "run_agent": False}
    result, label, _ = _all(_infer(agent, VOLUME, params, "all"))
    trajectory = _check_result(result, VOLUME)
    assert (result["slice"], result["axis"]) == (j, 1)  # the slice comes from the point
    (click,) = trajectory.steps[0].action.clicks
    assert (click.x, click.y) == (i, k) and trajectory.image_size == (16, 512)
    path = tmp_path / "label.nii.gz"
    path.write_bytes(label)
    data = np.asanyarray(nib.load(path).dataobj)
    assert not np.delete(data, j, axis=1).any()
    assert np.array_equal(data[:, j, :].T > 0, trajectory.final_mask)


def test_volume_refinement_takes_the_slice_of_a_label_volume(agent, setup, tmp_path):
    k, gts = setup["lesion_slice"], setup["volume_gts"]
    label = ("gts.nii.gz", _nifti(tmp_path / "gts.nii.gz", gts), "application/gzip")
    params = {"instruction": "segment the lesion", "slice": k, "max_steps": 1}
    trajectory = _check_result(_ok(_infer(agent, VOLUME, params, label=label)), VOLUME)
    (initial,) = trajectory.initial_masks.values()
    assert np.array_equal(initial, gts[:, :, k].T > 0)


def test_session_continues_without_re_encoding(agent, setup):
    x, y = setup["heart_click"]
    first = _ok(_infer(agent, HEART, {"instruction": "segment the heart", "foreground": [[x, y]], "run_agent": False}))
    sid, encodes = first["session_id"], first["encode_count"]
    tool_encodes = first["trajectory"]["meta"]["server"]["tool_encode_count"]

    # add a click; the agent carries on from the current state
    second = _ok(_infer(agent, HEART, {"session_id": sid, "background": [[5, 5]], "max_steps": 2}))
    assert second["session_id"] == sid and second["encode_count"] == encodes
    server = second["trajectory"]["meta"]["server"]
    assert server["tool_encode_count"] == tool_encodes and server["encode_seconds"] == 0.0
    steps = second["trajectory"]["steps"]
    assert len(steps) >= 3 and second["trajectory"]["meta"]["user_steps"] == [0, 1]
    assert [c["positive"] for c in steps[1]["clicks"]["heart"]] == [True, False]

    # undo to step 1: only the first user step is left, and the embedding is still not recomputed
    third = _ok(_infer(agent, HEART, {"session_id": sid, "undo_to": 1, "run_agent": False}))
    assert third["encode_count"] == encodes
    assert third["trajectory"]["meta"]["server"]["tool_encode_count"] == tool_encodes
    (step,) = Trajectory.from_dict(third["trajectory"]).steps
    assert [(c.x, c.y) for c in step.clicks["heart"]] == [(x, y)]

    # add two clicks, then remove the first one: the rest is re-applied as one user step
    _ok(_infer(agent, HEART, {"session_id": sid, "foreground": [[x + 3, y]], "run_agent": False}))
    fifth = _ok(_infer(agent, HEART, {"session_id": sid, "remove_clicks": [[x, y]], "run_agent": False}))
    (step,) = Trajectory.from_dict(fifth["trajectory"]).steps
    assert [(c.x, c.y) for c in step.clicks["heart"]] == [(x + 3, y)]
    assert fifth["encode_count"] == encodes


def test_new_session_on_the_same_slice_reuses_the_embedding(agent, setup):
    x, y = setup["heart_click"]
    params = {"instruction": "segment the heart", "foreground": [[x, y]], "run_agent": False}
    _ok(_infer(agent, HEART, params))
    again = _ok(_infer(agent, HEART, params))
    assert again["encode_count"] == 0 and again["trajectory"]["meta"]["server"]["encode_seconds"] == 0.0


# -- bad requests ------------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (id, image, params or raw JSON text, label upload maker, status, words the message must contain)
    ("unknown image id", "no_such_image", {"instruction": "x"}, None, 404, "unknown image id 'no_such_image'"),
    ("image path, not an id", "/etc/hostname", {"instruction": "x"}, None, 404, "unknown image id"),
    ("image id smuggled in params", LIVER, {"instruction": "x", "image": "/etc/hostname"}, None, 400, "params.image"),
    ("slice out of range", VOLUME, {"instruction": "x", "slice": 99}, None, 400, "slice=99 is out of range"),
    ("slice of a 2D image", LIVER, {"instruction": "x", "slice": 3}, None, 400, "is 2D"),
    ("volume without slice", VOLUME, {"instruction": "x"}, None, 400, "give slice 0..15"),
    ("malformed params JSON", LIVER, "{not json", None, 400, "params is not valid JSON"),
    ("params not an object", LIVER, "[1, 2]", None, 400, "params must be a JSON object"),
    ("click outside", LIVER, {"instruction": "x", "foreground": [[2000, 5]]}, None, 400, "outside the image"),
    ("negative click", LIVER, {"instruction": "x", "background": [[-1, 5]]}, None, 400, "background[0]"),
    ("malformed point", LIVER, {"instruction": "x", "foreground": [[1]]}, None, 400, "foreground[0] must be"),
    (
        "IJK point off the slice, nothing else to do",
        VOLUME,
        {"instruction": "x", "slice": 3, "foreground": [[9, 9, 4]], "run_agent": False},
        None,
        400,
        "slice 4",
    ),
    ("label of the wrong shape", LIVER, {"instruction": "x"}, "small_png", 400, "label upload is a 20x10 image"),
    (
        "volume label wrong shape",
        VOLUME,
        {"instruction": "x", "slice": 3},
        "small_nifti",
        400,
        "label upload has shape",
    ),
    ("unreadable label", LIVER, {"instruction": "x"}, "garbage_png", 400, "label upload cannot be read"),
    ("empty instruction", LIVER, {"instruction": "   "}, None, 400, "params.instruction is empty"),
    ("no instruction", LIVER, {"foreground": [[5, 5]]}, None, 400, "params.instruction is missing"),
    ("unknown session id", LIVER, {"session_id": "0123abcd"}, None, 404, "session_id '0123abcd' is unknown"),
    ("max_steps above the limit", LIVER, {"instruction": "x", "max_steps": 99}, None, 400, "max_steps=99"),
    ("run_agent not a bool", LIVER, {"instruction": "x", "run_agent": "yes"}, None, 400, "run_agent must be"),
    ("undo without session", LIVER, {"instruction": "x", "undo_to": 0}, None, 400, "need a session"),
    (
        "label tag escaping",
        LIVER,
        {"instruction": "x", "save_label": True, "label_tag": "../x"},
        None,
        400,
        "label_tag",
    ),
]
_UPLOADS = {
    "small_png": lambda tmp: ("m.png", _png(np.zeros((10, 20), bool)), "image/png"),
    "small_nifti": lambda tmp: (
        "m.nii.gz",
        _nifti(tmp / "m.nii.gz", np.zeros((4, 4, 4), np.uint8)),
        "application/gzip",
    ),
    "garbage_png": lambda tmp: ("m.png", b"not a png", "image/png"),
}


@pytest.mark.parametrize(
    "image, params, upload, status, words", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_request_is_refused_with_a_message(agent, tmp_path, image, params, upload, status, words):
    raw = params if isinstance(params, str) else None
    label = _UPLOADS[upload](tmp_path) if upload else None
    response = _infer(agent, image, None if raw else params, raw=raw, label=label)
    assert response.status_code == status, response.text[:1000]
    assert words in response.json()["detail"]


def test_session_errors(agent, setup):
    x, y = setup["heart_click"]
    sid = _ok(_infer(agent, HEART, {"instruction": "segment the heart", "foreground": [[x, y]], "run_agent": False}))[
        "session_id"
    ]
    other_image = _infer(agent, LIVER, {"session_id": sid})
    assert other_image.status_code == 400 and f"works on image '{HEART}'" in other_image.json()["detail"]
    undo = _infer(agent, HEART, {"session_id": sid, "undo_to": 5})
    assert undo.status_code == 400 and "undo_to=5 is out of range" in undo.json()["detail"]
    remove = _infer(agent, HEART, {"session_id": sid, "remove_clicks": [[1, 1]], "run_agent": False})
    assert remove.status_code == 400 and "no click at pixel (1, 1)" in remove.json()["detail"]
    # refused requests leave the session as it was
    unchanged = _ok(_infer(agent, HEART, {"session_id": sid, "run_agent": False}))
    assert len(unchanged["trajectory"]["steps"]) == 1


def test_unknown_model_in_the_url(agent):
    response = requests.post(f"{agent.url}/infer/magic", params={"image": LIVER}, data={"params": "{}"}, timeout=60)
    assert response.status_code == 404 and "unknown model 'magic'" in response.json()["detail"]


def test_server_survives_bad_requests_and_writes_only_its_folders(agent, setup):
    assert requests.get(agent.url + "/info/", timeout=30).status_code == 200
    studies = setup["studies"]
    written = {p.name for p in studies.iterdir()} - set(setup["files"])
    assert written <= {"labels", "datastore_v2.json", ".lock"}, written
    assert not [p for p in (studies / "labels").rglob("*") if p.is_file()]  # no request asked to save a label


# -- without a model, and with a bad configuration -------------------------------------------------------------------
def test_without_a_model_only_tool_requests_are_served(bare, setup):
    refused = _infer(bare, HEART, {"instruction": "segment the heart"})
    assert refused.status_code == 400 and "no policy model configured" in refused.json()["detail"]
    x, y = setup["heart_click"]
    params = {"instruction": "segment the heart", "foreground": [[x, y]], "run_agent": False}
    result = _ok(_infer(bare, HEART, params))
    assert result["stop_reason"] == "agent_not_run"
    info = requests.get(bare.url + "/info/", timeout=30).json()["models"]["ibisagent"]
    assert info["config"]["run_agent"] is False and info["ibisagent"]["model"] is None


def test_an_expired_session_is_gone(bare, setup):
    x, y = setup["heart_click"]
    params = {"instruction": "segment the heart", "foreground": [[x, y]], "run_agent": False}
    sid = _ok(_infer(bare, HEART, params))["session_id"]
    time.sleep(BARE_TTL_S + 1)
    response = _infer(bare, HEART, {"session_id": sid, "run_agent": False})
    assert response.status_code == 410 and "expired" in response.json()["detail"]


def test_an_unknown_tool_stops_the_server_at_start_up(setup):
    server = setup["servers"]["magic"]
    try:
        code = server.proc.wait(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the server with --conf tool magic did not exit")
    assert code != 0
    assert "ibisagent app: invalid configuration: --conf tool 'magic' is invalid: expected one of" in server.output()
