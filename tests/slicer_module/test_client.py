"""IBISAgentLib.client without the IBISAgent server: multipart encoding checked against the parsers the server runs
(python-multipart, as Starlette uses it) and decoding against the encoder MONAI Label answers with
(requests_toolbelt); HTTP errors, timeouts and unreachable servers against small local HTTP servers."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from IBISAgentLib import client as c

BINARY = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n\r\n" + b"\x00\xff" * 50


def test_encode_multipart_is_parsed_by_python_multipart():
    multipart = pytest.importorskip("python_multipart")
    content_type, body = c.encode_multipart(
        {"params": json.dumps({"instruction": "segment the liver", "slice": 3})},
        {"label": ('mask "1".png', BINARY, "image/png"), "file": ("v.nii.gz", b"abc", None)},
    )
    assert content_type.startswith("multipart/form-data; boundary=")
    fields, files = {}, {}

    def on_field(field):
        fields[field.field_name.decode()] = field.value.decode()

    def on_file(f):
        f.file_object.seek(0)
        files[f.field_name.decode()] = (f.file_name.decode(), f.file_object.read())

    boundary = content_type.split("boundary=")[1]
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    parser = multipart.create_form_parser(headers, on_field, on_file, config={"MAX_MEMORY_FILE_SIZE": 10**7})
    parser.write(body)
    parser.finalize()
    assert json.loads(fields["params"]) == {"instruction": "segment the liver", "slice": 3}
    assert files["label"] == ("mask %221%22.png", BINARY)  # quotes escaped as browsers do
    assert files["file"] == ("v.nii.gz", b"abc")
    assert boundary.encode() not in BINARY


def test_decode_multipart_reads_monailabel_answers():
    """MONAI Label 0.8.5 builds `output=all` answers with requests_toolbelt's MultipartEncoder: a `params` part
    (JSON, no filename) and an `image` part (the label file)."""
    toolbelt = pytest.importorskip("requests_toolbelt")
    result = {"session_id": "abc", "trajectory": {"version": "1"}}
    encoder = toolbelt.MultipartEncoder(
        fields={
            "params": (None, json.dumps(result), "application/json"),
            "image": ("tmpabc.nii.gz", BINARY, "application/gzip"),
        }
    )
    parts = c.decode_multipart(encoder.to_string(), encoder.content_type)
    by_name = {p.name: p for p in parts}
    assert json.loads(by_name["params"].text()) == result and by_name["params"].filename is None
    assert by_name["params"].content_type == "application/json"
    assert by_name["image"].filename == "tmpabc.nii.gz" and by_name["image"].data == BINARY


def test_decode_multipart_round_trip_and_errors():
    content_type, body = c.encode_multipart({"a": "1", "b": b"\r\n"}, {"f": ("x.bin", BINARY, None)})
    body = b"preamble\r\n" + body + b"epilogue"
    parts = c.decode_multipart(body, content_type)
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("a", None, b"1"),
        ("b", None, b"\r\n"),
        ("f", "x.bin", BINARY),
    ]
    quoted = content_type.replace("boundary=", 'boundary="') + '"'
    assert len(c.decode_multipart(body, quoted)) == 3
    with pytest.raises(ValueError, match="without a boundary"):
        c.decode_multipart(body, "multipart/form-data")
    with pytest.raises(ValueError, match="does not contain its boundary"):
        c.decode_multipart(b"nothing here", content_type)


def test_server_message_extraction():
    assert c._server_message(b'{"detail": "unknown image id"}') == "unknown image id"
    validation = {"detail": [{"loc": ["query", "output"], "msg": "value is not a valid enumeration member"}]}
    assert c._server_message(json.dumps(validation).encode()) == "query.output: value is not a valid enumeration member"
    assert c._server_message(b"Internal Server Error") == "Internal Server Error"


def test_server_url_is_checked():
    with pytest.raises(c.IBISAgentClientError, match="is not an http"):
        c.IBISAgentClient("127.0.0.1:8000")
    assert c.IBISAgentClient("http://h:1/ ").server_url == "http://h:1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(2)
        body = json.dumps({"detail": "params.axis must be 0, 1 or 2, got 5"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the timeout test hangs up before the slow answer is written


@pytest.fixture
def stub_server():
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_errors_carry_status_and_message(stub_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy for the internet is not used for the server
    client = c.IBISAgentClient(stub_server, timeout=5)
    with pytest.raises(c.IBISAgentClientError) as info:
        client.info()
    assert info.value.status == 400 and info.value.server_message == "params.axis must be 0, 1 or 2, got 5"
    assert "HTTP 400: params.axis must be 0, 1 or 2, got 5" in str(info.value)


def test_timeout_and_unreachable_server(stub_server):
    client = c.IBISAgentClient(stub_server, timeout=0.3)
    with pytest.raises(c.IBISAgentClientError, match="timed out after 0.3 s") as info:
        client._request("GET", "/slow")
    assert info.value.status is None
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(c.IBISAgentClientError, match="could not reach the IBISAgent server") as info:
        c.IBISAgentClient(f"http://127.0.0.1:{port}", timeout=2).info()
    assert info.value.status is None


def test_infer_rejects_unknown_output():
    with pytest.raises(ValueError, match="output must be one of"):
        c.IBISAgentClient("http://127.0.0.1:1").infer("x", {}, output="image")
