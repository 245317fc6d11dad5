"""Hardening, MONAI Label's endpoints: what the app does not need is not served (404 with a message, nothing
unpacked, nothing left in the temp folder), the rest is bounded — request bodies, names, stored info — and the bearer
token guards every endpoint but /health. Access rules at start-up are checked without a server too."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import requests

from tests.monailabel_app.attack import AUTH, LIVER, call, infer, png_bytes, temp_files

pytest.importorskip("monailabel")

from monailabel_app.lib.endpoints import bind_host, check_access, is_served  # noqa: E402
from monailabel_app.lib.errors import ConfigError  # noqa: E402


def _evil_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("../../escaped.txt", "/tmp/absolute-escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"owned"))
    return buf.getvalue()


NOT_SERVED = [
    ("GET", "/logs/", {}),
    ("GET", "/logs/gpu", {}),
    ("POST", "/batch/infer/ibisagent", {}),
    ("PUT", "/model/ibisagent", {"files": {"file": ("m.pt", b"x" * 1000)}}),
    ("GET", "/model/ibisagent", {}),
    ("GET", "/datastore/dataset", {}),
    ("POST", "/reload", {}),
    ("POST", "/train/ibisagent", {}),
    ("POST", "/scoring/dice", {}),
    ("GET", "/proxy/dicom/wado/x", {}),
    ("GET", "/ohif/", {}),
    ("POST", "/infer/wsi/ibisagent", {}),
    ("PUT", "/datastore/updatelabelinfo", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), NOT_SERVED, ids=[f"{m} {p}" for m, p, _ in NOT_SERVED])
def test_what_the_app_does_not_need_is_not_served(attack, method, path, kwargs):
    """(Upload sessions are served, safely: tests/monailabel_app/test_stock_plugin.py.)"""
    response = call(attack["server"], method, path, **kwargs)
    assert response.status_code == 404 and "is not served by the IBISAgent app" in response.json()["detail"]
    assert not (attack["tmp"] / "escaped.txt").exists() and temp_files(attack["tmp"]) == []


def test_an_archive_upload_session_is_never_unpacked(attack):
    server, tmp = attack["server"], attack["tmp"]
    for query in ({"uncompress": "true"}, {}):
        response = call(server, "PUT", "/session/", params=query, files={"files": ("a.tar.gz", _evil_tar())})
        assert response.status_code == 400
    assert not (tmp / "escaped.txt").exists() and not (tmp.parent / "escaped.txt").exists()
    assert not list(tmp.glob("*-monailabel-sessions/ibisagent/*"))


def test_the_token_guards_every_endpoint_but_health(attack):
    url = attack["server"].url
    assert requests.get(url + "/health", timeout=10).json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": AUTH["Authorization"] + "x"}):
        for method, path in (("GET", "/info/"), ("GET", "/datastore/"), ("POST", "/infer/ibisagent")):
            response = requests.request(method, url + path, headers=headers, timeout=10)
            assert response.status_code == 401 and "Bearer" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
    assert call(attack["server"], "GET", "/info/").status_code == 200


def test_browser_requests_from_other_sites_are_refused(attack):
    """A web page on another site may not read or change the studies, even where the user's browser holds the
    token's session (MONAI Label itself answers every origin); the server's own origin and programs (no Origin
    header) are served."""
    server = attack["server"]
    for origin in ("http://evil.example", "null", server.url.replace("127.0.0.1", "localhost")):
        for method, path in (("GET", "/datastore/"), ("GET", "/info/"), ("DELETE", "/datastore/image")):
            response = call(server, method, path, headers={"Origin": origin}, params={"id": LIVER})
            assert response.status_code == 403 and "browser requests from" in response.json()["detail"]
    assert call(server, "GET", "/datastore/", headers={"Origin": server.url}).status_code == 200
    assert call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"][LIVER]


def test_listed_origins_are_served():
    from monailabel_app.lib.endpoints import _Guard

    guard = _Guard(None, 1, "t" * 16, origins=["https://viewer.hospital.example/"])
    own = {b"host": b"labels.hospital.example:8000"}
    assert guard._refused_origin({**own, b"origin": b"https://viewer.hospital.example"}) is None
    assert guard._refused_origin({**own, b"origin": b"http://labels.hospital.example:8000"}) is None
    assert guard._refused_origin({**own, b"origin": b"https://other.example"}) is not None
    assert guard._refused_origin(own) is None  # a program, with a token: any name
    assert _Guard(None, 1, None)._refused_origin(own) is not None  # without a token: loopback names only


def test_request_bodies_are_bounded(attack):
    big = b"\0" * (9 << 20)  # the server takes 8 MB
    files = {"label": ("m.png", big, "image/png")}
    response = infer(attack["server"], params={"instruction": "x"}, files=files)
    assert response.status_code == 413 and "max_upload_mb" in response.json()["detail"]
    response = call(
        attack["server"], "PUT", "/datastore/image", params={"image": "big"}, files={"file": ("b.png", big)}
    )
    assert response.status_code == 413
    assert temp_files(attack["tmp"]) == []


@pytest.mark.parametrize(
    ("image_id", "words"),
    [("x" * 300, "at most 128 characters"), ("two\nlines", "control characters"), ("nul\0byte", "control")],
)
def test_image_ids_are_short_plain_names(attack, image_id, words):
    files = {"file": ("upload.png", png_bytes(), "image/png")}
    response = call(attack["server"], "PUT", "/datastore/image", params={"image": image_id}, files=files)
    assert response.status_code == 400 and words in response.json()["detail"]
    assert temp_files(attack["tmp"]) == []  # MONAI Label's copy of the refused upload is gone


def test_stored_info_is_a_bounded_json_object(attack):
    server = attack["server"]
    response = call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": "{not json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]
    response = call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": "[1, 2]"})
    assert response.status_code == 400 and "JSON object" in response.json()["detail"]
    half = json.dumps({"a": "x" * 40_000})
    assert call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": half}).status_code == 200
    other = json.dumps({"b": "x" * 40_000})  # fine alone, too much with what the image already holds
    response = call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": other})
    assert response.status_code == 400 and "65536" in response.json()["detail"]
    assert call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": '{"a": 1}'}).ok


def test_unknown_ids_are_404(attack):
    server = attack["server"]
    assert call(server, "DELETE", "/datastore/image", params={"id": "nope"}).status_code == 404
    assert call(server, "DELETE", "/datastore/label", params={"id": LIVER, "tag": "nope"}).status_code == 404
    assert (
        call(server, "PUT", "/datastore/image/info", params={"image": "nope"}, data={"info": "{}"}).status_code == 404
    )


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        (["monailabel", "start_server"], "0.0.0.0"),
        (["m", "--host", "127.0.0.1"], "127.0.0.1"),
        (["m", "-i", "::1"], "::1"),
        (["m", "--host=10.0.0.5"], "10.0.0.5"),
    ],
)
def test_bind_host_reads_monai_labels_command_line(argv, host):
    assert bind_host(argv) == host


def test_off_loopback_needs_a_token():
    check_access(None, ["m", "--host", "127.0.0.1"])
    check_access(None, ["m", "--host", "localhost"])
    check_access("s" * 16, ["m", "--host", "0.0.0.0"])
    with pytest.raises(ConfigError, match="without authentication: set IBISAGENT_API_TOKEN"):
        check_access(None, ["m"])  # MONAI Label's default: every interface
    with pytest.raises(ConfigError, match="at least 16"):
        check_access("short", ["m", "--host", "127.0.0.1"])


def test_served_endpoints():
    assert is_served("GET", "/info/") and is_served("POST", "/infer/ibisagent") and is_served("GET", "/health")
    assert is_served("HEAD", "/datastore/image") and is_served("POST", "/activelearning/random")
    assert not is_served("POST", "/infer/wsi/ibisagent") and not is_served("GET", "/logs/")
    assert is_served("PUT", "/session/") and not is_served("GET", "/datastore/dataset")


@pytest.mark.parametrize(
    ("filename", "words"),
    [("x." + "e" * 300, "name is too long"), ("x.pn\0g", "NUL character")],
)
def test_upload_file_names_are_checked(attack, filename, words):
    files = {"file": (filename, png_bytes(), "image/png")}
    response = call(attack["server"], "PUT", "/datastore/image", params={"image": "named"}, files=files)
    assert response.status_code == 400 and words in response.json()["detail"], response.text
    label = {"label": (filename, png_bytes(), "image/png")}
    response = call(attack["server"], "PUT", "/datastore/label", params={"image": LIVER}, files=label)
    assert response.status_code == 400 and words in response.json()["detail"], response.text
    assert temp_files(attack["tmp"]) == []
