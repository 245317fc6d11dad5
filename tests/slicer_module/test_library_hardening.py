"""The Slicer library against a hostile server (issue #18): every malformed RLE or trajectory JSON becomes the
library's own `TrajectoryFormatError` before any mask is allocated; the HTTP client keeps a total deadline per request, a bound
on the body it reads, refuses redirects to another server, and turns every failure into `IBISAgentClientError`;
the NIfTI reader of server files checks the header before decompressing."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from IBISAgentLib import client as c
from IBISAgentLib import imagefiles
from IBISAgentLib import trajectory as lib

from tests.test_io_hardening import MiB, nifti_header, peak_of, write_gz
from tests.test_trajectory_hardening import HOSTILE_RLES, HOSTILE_TRAJECTORIES

# -- the trajectory reader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE_RLES))
def test_hostile_rle_is_a_trajectory_format_error(name):
    rle, words = HOSTILE_RLES[name]
    peak, error = peak_of(lambda: lib.decode_rle(rle))
    assert isinstance(error, lib.TrajectoryFormatError), f"{name}: {error!r}"
    assert words in str(error), f"{name}: {error}"
    assert peak < 1 * MiB, f"{name}: {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("name", [n for n, (_, words) in HOSTILE_TRAJECTORIES.items() if words])
def test_hostile_trajectory_json_is_a_trajectory_format_error(name):
    data, words = HOSTILE_TRAJECTORIES[name]
    text = data if isinstance(data, str) else json.dumps(data)
    peak, error = peak_of(lambda: lib.TrajectoryView.from_json(text))
    assert isinstance(error, lib.TrajectoryFormatError), f"{name}: {error!r}"
    assert peak < 64 * MiB


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe not utf-8",
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"masks": {"t": "x"}}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "initial_masks": [1, 2]}),
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"index": "one"}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"clicks": {"t": [None]}}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "meta": [1]}),
        json.dumps({"version": "1" * 10_000}),
    ],
)
def test_every_malformed_field_is_the_library_error(text):
    with pytest.raises(lib.TrajectoryFormatError) as info:
        lib.TrajectoryView.from_json(text)
    assert len(str(info.value)) < 600


def test_masks_are_checked_when_read_so_mask_reads_cannot_fail():
    rle = {"size": [4, 5], "counts": [3, 4, 13]}
    view = lib.TrajectoryView.from_dict(
        {
            "version": "1",
            "image_size": [4, 5],
            "initial_masks": {"t": rle},
            "steps": [{"index": 0, "masks": {"t": rle}}],
        }
    )
    assert view.final_mask.sum() == 4 and view.initial_mask().sum() == 4
    assert lib.MAX_MASK_PIXELS == 2**26


# -- the HTTP client -------------------------------------------------------------------------------------------------


DEEP = b"[" * 100_000 + b"]" * 100_000


class _Hostile(BaseHTTPRequestHandler):
    """Answers by path; `hits` counts the requests each server saw."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _raw(self, data: bytes):
        self.wfile.write(data)
        self.wfile.flush()

    def _answer(self, status: int, body: bytes, content_type: str = "application/json", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self._raw(body)

    def do_GET(self):  # noqa: C901 -- one branch per hostile answer
        self.server.hits.append(self.path)
        path = self.path
        if path == "/info/":
            self._answer(200, b'{"name": "ok"}')
        elif path == "/trickle-body":  # a valid answer, one byte every 50 ms
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self._raw(b" ")
                time.sleep(0.05)
        elif path == "/trickle-headers":
            self._raw(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(100):
                self._raw(b"a")
                time.sleep(0.05)
            self._raw(b"\r\nContent-Length: 2\r\n\r\n{}")
        elif path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(300 * 2**20))
            self.end_headers()
            for _ in range(300 * 16):
                self._raw(bytes(2**16))
        elif path == "/huge-streamed":  # no length: read until the server closes
            self._raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for _ in range(300 * 16):
                self._raw(bytes(2**16))
            self.close_connection = True
        elif path == "/redirect-away":
            self._answer(307, b"", Location=f"http://127.0.0.1:{self.server.other_port}/info/")
        elif path == "/redirect-here":
            self._answer(307, b"", Location="/info/")
        elif path == "/redirect-loop":
            self._answer(307, b"", Location="/redirect-loop")
        elif path == "/deep":
            self._answer(200, DEEP)
        elif path == "/deep-error":
            self._answer(400, DEEP)
        elif path == "/short":
            self._raw(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"a": 1')
            self.close_connection = True
        elif path == "/bad-status":
            self._raw(b"HTTP/1.1 abc nonsense\r\n\r\n")
            self.close_connection = True
        elif path == "/hang-up":
            self.close_connection = True
        elif path == "/bad-chunks":
            self._raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            self.close_connection = True
        elif path == "/many-headers":
            self._raw(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n")
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # hostile answers are cut off by the client


def _serve(other_port: int = 0) -> _Server:
    server = _Server(("127.0.0.1", 0), _Hostile)
    server.hits, server.other_port = [], other_port
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.fixture
def servers():
    other = _serve()
    main = _serve(other.server_address[1])
    yield main, other
    for s in (main, other):
        s.shutdown()
        s.server_close()


def _client(server, **kw) -> c.IBISAgentClient:
    return c.IBISAgentClient(f"http://127.0.0.1:{server.server_address[1]}", **kw)


# name: (path, client options, words in the IBISAgentClientError, seconds it may take at most)
HOSTILE_ANSWERS = {
    "a body trickled one byte per 50 ms": ("/trickle-body", {"timeout": 0.5}, "timed out after 0.5 s", 1.5),
    "headers trickled one byte per 50 ms": ("/trickle-headers", {"timeout": 0.5}, "timed out after 0.5 s", 1.5),
    "300 MB declared": ("/huge-declared", {"max_response_bytes": 2**20}, "larger than", 2.0),
    "300 MB streamed without a length": ("/huge-streamed", {"max_response_bytes": 2**20}, "larger than", 2.0),
    "a redirect to another port": ("/redirect-away", {}, "redirect", 2.0),
    "a redirect loop": ("/redirect-loop", {}, "redirect", 2.0),
    "JSON nested 100000 deep": ("/deep", {}, "not JSON", 2.0),
    "an error body nested 100000 deep": ("/deep-error", {}, "HTTP 400", 2.0),
    "a body shorter than its Content-Length": ("/short", {}, "cut short", 2.0),
    "a malformed status line": ("/bad-status", {}, "failed", 2.0),
    "a hang-up before any answer": ("/hang-up", {}, "failed", 2.0),
    "malformed chunked encoding": ("/bad-chunks", {}, "failed", 2.0),
    "200 headers": ("/many-headers", {}, "failed", 2.0),
}


@pytest.mark.parametrize("name", list(HOSTILE_ANSWERS))
def test_hostile_answers_are_client_errors(name, servers):
    main, other = servers
    path, options, words, seconds = HOSTILE_ANSWERS[name]
    client = _client(main, **{"timeout": 5.0, **options})
    t0 = time.monotonic()
    peak, error = peak_of(lambda: client._json(client._request("GET", path)[2], path))
    elapsed = time.monotonic() - t0
    assert isinstance(error, c.IBISAgentClientError), f"{name}: {error!r}"
    assert words in str(error), f"{name}: {error}"
    assert elapsed < seconds, f"{name}: took {elapsed:.1f} s"
    assert peak < 8 * MiB, f"{name}: {peak / MiB:.0f} MiB"
    assert other.hits == [], "a redirect to another server was followed"


def test_same_origin_redirects_are_followed_and_defaults_are_documented(servers):
    main, _ = servers
    assert _client(main)._json(_client(main)._request("GET", "/redirect-here")[2], "") == {"name": "ok"}
    assert c.MAX_RESPONSE_BYTES == 64 * 2**20
    assert _client(main).max_response_bytes == c.MAX_RESPONSE_BYTES


def test_a_dead_port_is_still_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(c.IBISAgentClientError, match="could not reach the IBISAgent server"):
        c.IBISAgentClient(f"http://127.0.0.1:{port}", timeout=2).info()


# -- the NIfTI reader of server files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, header, zeros, words",
    [
        ("4 GiB declared by a 352-byte file", {"shape": (2048, 2048, 1024)}, 0, "max_voxels"),
        ("4 GiB declared, 8 MiB of zeros gzipped", {"shape": (2048, 2048, 1024)}, 8 * MiB, "max_voxels"),
        ("a volume cut short", {"shape": (64, 64, 64)}, 1000, "cut short"),
        ("a negative dimension", {"shape": (4, 4, 4), "dim": [3, 4, -4, 4, 1, 1, 1, 1]}, 64, "shape"),
        ("a data offset of 1e30", {"shape": (4, 4, 4), "vox_offset": 1e30}, 64, "offset"),
    ],
)
def test_hostile_nifti_files_are_refused_from_their_header(name, header, zeros, words, tmp_path):
    path = tmp_path / "label.nii.gz"
    write_gz(path, nifti_header(**header), zeros)
    for source in (path, path.read_bytes()):
        peak, error = peak_of(lambda s=source: imagefiles.read_nifti(s))
        assert isinstance(error, ValueError) and words in str(error), f"{name}: {error!r}"
        assert peak < 8 * MiB, f"{name}: {peak / MiB:.0f} MiB"


def test_a_gzip_tail_past_the_declared_data_is_not_decompressed(tmp_path):
    path = tmp_path / "label.nii.gz"
    write_gz(path, nifti_header((8, 6, 4)), 256 * MiB, bytes(range(192)))
    peak, error = peak_of(lambda: imagefiles.read_nifti(path))
    assert error is None and peak < 4 * MiB
    arr, _ = imagefiles.read_nifti(path)
    assert arr.shape == (4, 6, 8) and arr[1, 2, 3] == 1 * 48 + 2 * 8 + 3
