"""HTTP client for the IBISAgent MONAI Label server, standard library only (Slicer's Python has no guaranteed
`requests`), so the multipart encoder and decoder are written here.

The server side is MONAI Label 0.8.5: `POST /infer/ibisagent?image=<id>&output=all|json` takes a multipart form with
a `params` JSON string and an optional `label` file, and for `output=all` answers with a multipart/form-data body
built by requests_toolbelt's MultipartEncoder: a `params` part (the result JSON, no filename) and an `image` part
(the label file, with a filename). When the server has no label file it answers with the JSON alone.
`PUT /datastore/image?image=<id>` (older servers: `PUT /datastore/?image=<id>`) stores an uploaded image.

Limits, so that a slow, broken or hostile server cannot hold Slicer or fill its memory:
- `timeout` / `infer_timeout` are total deadlines for a whole request (connect, send, headers and body), checked
  before every read from the socket, not a limit per read;
- an answer's body is read in chunks up to `max_response_bytes` (default `MAX_RESPONSE_BYTES`, 64 MiB); a larger
  one is refused (a declared Content-Length at once);
- redirects are followed only within the server's own scheme, host and port (at most `_MAX_REDIRECTS`); a redirect
  elsewhere is refused;
- whatever goes wrong (timeouts, refused or dropped connections, malformed or cut-short answers, JSON nested too
  deep) raises `IBISAgentClientError` with a message.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

DEFAULT_MODEL = "ibisagent"
_OUTPUTS = ("all", "json")
MAX_RESPONSE_BYTES = 64 * 2**20
_MAX_REDIRECTS = 3
_MAX_ERROR_BYTES = 2**16  # an error answer is read this far for its message
_CHUNK = 2**16
_PROGRESS_ID = re.compile(r"[0-9a-f]{32}")


class IBISAgentClientError(RuntimeError):
    """A request to the server failed.

    status: the HTTP status (None when the server could not be reached or timed out); server_message: the text the
    server sent (FastAPI's `detail`), or None; url: the request URL.
    """

    def __init__(self, message: str, status: int | None = None, server_message: str | None = None, url: str = ""):
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.url = url


@dataclass(frozen=True)
class MultipartPart:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8")


def _quote_header_value(value: str) -> str:
    # The HTML form encoding: escape the characters that would end the quoted header parameter.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def encode_multipart(
    fields: dict[str, str | bytes], files: dict[str, tuple[str, bytes, str | None]] | None = None
) -> tuple[str, bytes]:
    """Build a multipart/form-data body.

    fields: {name: value} text parts; files: {name: (filename, data, content type or None)} file parts.
    Returns (the Content-Type header value with its boundary, the body bytes).
    """
    files = files or {}
    payloads = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in fields.values()]
    payloads += [bytes(data) for _, data, _ in files.values()]
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in p for p in payloads):  # practically never; a boundary must not occur in the data
        boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote_header_value(name)}"\r\n\r\n'.encode()
        out += value.encode("utf-8") if isinstance(value, str) else bytes(value)
        out += b"\r\n"
    for name, (filename, data, content_type) in files.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote_header_value(name)}"; '
            f'filename="{_quote_header_value(filename)}"\r\n'
            f"Content-Type: {content_type or 'application/octet-stream'}\r\n\r\n"
        ).encode()
        out += bytes(data)
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def _boundary_of(content_type: str) -> bytes:
    headers = BytesHeaderParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1"))
    boundary = headers.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise ValueError(f"multipart Content-Type without a boundary: {content_type!r}")
    return boundary.encode("latin-1")


def decode_multipart(body: bytes, content_type: str) -> list[MultipartPart]:
    """Split a multipart body (RFC 7578) into its parts. content_type: the response's Content-Type header value."""
    delimiter = b"\r\n--" + _boundary_of(content_type)
    # Prefix CRLF so the first delimiter looks like the others; what precedes it is the ignored preamble.
    chunks = (b"\r\n" + bytes(body)).split(delimiter)
    if len(chunks) < 2:
        raise ValueError("multipart body does not contain its boundary")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        line_end = chunk.find(b"\r\n")  # skip transport padding after the delimiter
        if line_end < 0:
            raise ValueError("malformed multipart part: no line break after the boundary")
        head, sep, data = chunk[line_end + 2 :].partition(b"\r\n\r\n")
        if not sep:  # a part with no headers starts with the blank line directly
            if chunk[line_end + 2 :].startswith(b"\r\n"):
                head, data = b"", chunk[line_end + 4 :]
            else:
                raise ValueError("malformed multipart part: no blank line after its headers")
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        parts.append(
            MultipartPart(
                name=name if isinstance(name, str) else None,
                filename=headers.get_filename(),
                content_type=headers.get_content_type() if headers.get("content-type") else None,
                data=data,
            )
        )
    return parts


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text[:1000]
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ..., ...}]
            return "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', d)}" if isinstance(d, dict) else str(d)
                for d in detail
            )
        return detail if isinstance(detail, str) else json.dumps(detail)
    return text[:1000]


class _DeadlineSocket:
    """A connected socket whose every send and receive gets the time left until `deadline` (time.monotonic) as its
    timeout, so a server that trickles bytes cannot stretch a request past its deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(left)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(bufsize, flags)

    def sendall(self, data, flags: int = 0) -> None:
        self._arm()
        self._sock.sendall(data, flags)

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_) -> io.BufferedReader:
        # http.client reads the status line, headers and body through this file, whose reads come back to recv_into.
        # As socket.makefile does, the file holds a reference: closing the connection early (Connection: close)
        # leaves the socket open until the response has been read.
        self._sock._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"), buffering or io.DEFAULT_BUFFER_SIZE)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _read_body(response: http.client.HTTPResponse, limit: int, url: str, truncate: bool = False) -> bytes:
    """The body in chunks of at most `limit` bytes: more raises IBISAgentClientError (or, with `truncate`, is not
    read). A body shorter than its Content-Length raises too."""
    declared = response.getheader("content-length")
    declared = int(declared) if declared and declared.strip().isdigit() else None
    if declared is not None and declared > limit and not truncate:
        raise IBISAgentClientError(
            f"{url} answered with {declared} bytes, larger than the client's limit of {limit} bytes "
            "(max_response_bytes); is the URL the IBISAgent server?",
            url=url,
        )
    chunks, total = [], 0
    while True:
        chunk = response.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            if truncate:
                return b"".join(chunks)[:limit]
            raise IBISAgentClientError(
                f"{url} answered with more than {limit} bytes, larger than the client's limit (max_response_bytes); "
                "is the URL the IBISAgent server?",
                url=url,
            )
    if declared is not None and total < declared:
        raise IBISAgentClientError(
            f"{url}: the answer was cut short ({total} of {declared} bytes); the server may have stopped", url=url
        )
    return b"".join(chunks)


class IBISAgentClient:
    """Talks to one IBISAgent MONAI Label server.

    server_url: e.g. "http://127.0.0.1:8000"; timeout: the total seconds a quick request (info, datastore) may take;
    infer_timeout: the total seconds for an inference, which runs the whole agent loop; model: the task name on the
    server; max_response_bytes: the largest answer body read (see the module docstring); token: the server's
    IBISAGENT_API_TOKEN, sent as "Authorization: Bearer <token>" (needed when the server listens beyond loopback;
    default: this machine's IBISAGENT_API_TOKEN environment variable, if set).
    """

    def __init__(
        self,
        server_url: str,
        timeout: float = 30.0,
        infer_timeout: float = 900.0,
        model: str = DEFAULT_MODEL,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        token: str | None = None,
    ):
        url = (server_url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise IBISAgentClientError(
                f"server URL {server_url!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8000"
            )
        self.server_url = url
        self.timeout = timeout
        self.infer_timeout = infer_timeout
        self.model = model
        self.max_response_bytes = max_response_bytes
        self.token = token if token is not None else os.environ.get("IBISAGENT_API_TOKEN") or None

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _url(self, path: str, query: dict | None = None) -> str:
        url = self.server_url + "/" + path.lstrip("/")
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return url

    def _request(
        self,
        method: str,
        path: str,
        query: dict | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict, bytes]:
        """One HTTP request; returns (status, lower-cased headers, body). Non-2xx raises IBISAgentClientError.

        Direct connections (http.client, no proxy), as MONAI Label's own client makes them: an http_proxy meant for
        the internet must not swallow requests to a server on this machine or the local network."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        url = self._url(path, query)
        for _ in range(_MAX_REDIRECTS + 1):
            status, headers, answer = self._exchange(method, url, body, content_type, timeout, deadline)
            if status not in (301, 302, 303, 307, 308):
                return status, headers, answer
            location = urllib.parse.urljoin(url, headers.get("location", ""))
            if not self._same_origin(location):
                raise IBISAgentClientError(
                    f"{method} {url} was redirected (HTTP {status}) to {location[:200]!r}; redirects to another "
                    f"server are not followed: set the server URL to the IBISAgent server itself",
                    status,
                    url=url,
                )
            url = location
        raise IBISAgentClientError(
            f"{method} {url}: more than {_MAX_REDIRECTS} redirects; check the server URL", url=url
        )

    def _same_origin(self, url: str) -> bool:
        mine, theirs = urllib.parse.urlsplit(self.server_url), urllib.parse.urlsplit(url)
        try:
            return (mine.scheme, mine.hostname, mine.port) == (theirs.scheme, theirs.hostname, theirs.port)
        except ValueError:  # a port that is not a number
            return False

    def _exchange(
        self, method: str, url: str, body: bytes | None, content_type: str | None, timeout: float, deadline: float
    ) -> tuple[int, dict, bytes]:
        """One request and answer on a fresh connection, within `deadline`; 3xx answers are returned as they are."""
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            conn = kind(parts.hostname, parts.port, timeout=max(deadline - time.monotonic(), 0.001))
        except ValueError as exc:  # a malformed host or port
            raise IBISAgentClientError(f"{url}: not a usable URL ({exc})", url=url) from exc
        try:
            try:
                conn.connect()
            except (socket.timeout, TimeoutError) as exc:  # noqa: UP041 -- distinct before Python 3.10 (Slicer 5.6)
                raise IBISAgentClientError(f"{method} {url} timed out after {timeout:g} s", url=url) from exc
            except OSError as exc:
                raise IBISAgentClientError(
                    f"could not reach the IBISAgent server at {self.server_url} ({exc}); is it running "
                    "(monailabel start_server --app monailabel_app ...) and is the URL right?",
                    url=url,
                ) from exc
            conn.sock = _DeadlineSocket(conn.sock, deadline)
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            status = response.status
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
            bodiless = method == "HEAD" or status in (204, 304)  # a Content-Length here describes no body
            if 300 <= status < 400:
                return status, answer_headers, b""
            if status >= 400:
                text = b"" if bodiless else _read_body(response, _MAX_ERROR_BYTES, url, truncate=True)
                message = _server_message(text) or response.reason
                raise IBISAgentClientError(
                    f"{method} {url} failed with HTTP {status}: {message}", status, str(message), url
                )
            if bodiless:
                return status, answer_headers, b""
            return status, answer_headers, _read_body(response, self.max_response_bytes, url)
        except IBISAgentClientError:
            raise
        except (socket.timeout, TimeoutError) as exc:  # noqa: UP041
            raise IBISAgentClientError(
                f"{method} {url} timed out after {timeout:g} s; the server may still be busy (raise the timeout)",
                url=url,
            ) from exc
        except http.client.HTTPException as exc:  # malformed status line, headers, chunks; a cut-short answer
            raise IBISAgentClientError(
                f"{method} {url} failed: the server's answer is malformed or cut short ({type(exc).__name__}: "
                f"{str(exc)[:200]})",
                url=url,
            ) from exc
        except OSError as exc:  # connection reset and friends
            raise IBISAgentClientError(f"{method} {url} failed: {exc}", url=url) from exc
        finally:
            conn.close()

    @staticmethod
    def _json(body: bytes, url: str):
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise IBISAgentClientError(
                f"{url} answered with something that is not JSON ({type(exc).__name__}): {body[:200]!r}", url=url
            ) from exc

    # -- API --------------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """GET /info/: the app's name, models (our task is "ibisagent") and labels."""
        _, _, body = self._request("GET", "/info/")
        return self._json(body, self._url("/info/"))

    def has_image(self, image_id: str) -> bool:
        """Whether the server's datastore holds an image with this id (HEAD /datastore/image)."""
        try:
            self._request("HEAD", "/datastore/image", {"image": image_id})
        except IBISAgentClientError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def image_info(self, image_id: str) -> dict:
        """GET /datastore/image/info: what the server stores about the image, with its `geometry` ({"kind", "shape"
        (I, J, K) or (H, W), "affine" 4x4 voxel -> RAS or None}) on servers that report it."""
        _, _, body = self._request("GET", "/datastore/image/info", {"image": image_id})
        return self._json(body, self._url("/datastore/image/info"))

    def upload_image(self, path: str | Path, image_id: str | None = None, params: dict | None = None) -> str:
        """Upload an image file (NIfTI .nii/.nii.gz, PNG, ...) into the server's datastore; returns its image id.

        The file name's extension is kept by the datastore, so give the file its real extension.
        """
        path = Path(path)
        data = path.read_bytes()
        content_type, body = encode_multipart(
            {"params": json.dumps(params or {})}, {"file": (path.name, data, "application/octet-stream")}
        )
        query = {"image": image_id}
        try:
            _, _, answer = self._request("PUT", "/datastore/image", query, body, content_type)
        except IBISAgentClientError as exc:
            if exc.status not in (404, 405):
                raise
            _, _, answer = self._request("PUT", "/datastore/", query, body, content_type)  # MONAI Label < 0.8
        result = self._json(answer, self._url("/datastore/image"))
        return str(result.get("image") or image_id)

    def infer(
        self,
        image_id: str,
        params: dict,
        label_path: str | Path | None = None,
        output: str = "all",
        save_label_to: str | Path | None = None,
        model: str | None = None,
    ) -> tuple[dict, bytes | Path | None]:
        """POST /infer/<model>?image=<image_id>&output=<output> with `params` (the IBISAgent request JSON, see the
        server app) and, optionally, an initial-mask file `label_path` (PNG of the slice or NIfTI of the volume).
        model: the task (default: the client's `model`; the volume mode's is `VOLUME_MODEL`).

        Returns (result JSON, label): the label file's bytes for output "all" (None for "json", or when the
        server sent no file); with `save_label_to` the bytes are written there and the path is returned instead.
        """
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        files = {}
        if label_path is not None:
            label_path = Path(label_path)
            files["label"] = (label_path.name, label_path.read_bytes(), "application/octet-stream")
        content_type, body = encode_multipart({"params": json.dumps(params)}, files)
        path = "/infer/" + urllib.parse.quote(model or self.model, safe="")
        url = self._url(path, {"image": image_id, "output": output})
        _, headers, answer = self._request(
            "POST", path, {"image": image_id, "output": output}, body, content_type, self.infer_timeout
        )
        label = None
        answer_type = headers.get("content-type", "")
        if answer_type.lower().startswith("multipart/"):
            try:
                parts = decode_multipart(answer, answer_type)
            except (ValueError, TypeError, LookupError) as exc:
                raise IBISAgentClientError(f"{url}: unreadable multipart answer ({exc})", url=url) from exc
            json_parts = [p for p in parts if p.name == "params" and not p.filename]
            file_parts = [p for p in parts if p.filename or p.name == "image"]
            if not json_parts:
                raise IBISAgentClientError(f"{url}: multipart answer without a 'params' JSON part", url=url)
            result = self._json(json_parts[0].data, url)
            label = file_parts[0].data if file_parts else None
        else:
            result = self._json(answer, url)
        if not isinstance(result, dict):
            raise IBISAgentClientError(f"{url}: expected a JSON object, got {type(result).__name__}", url=url)
        if label is not None and save_label_to is not None:
            save_label_to = Path(save_label_to)
            save_label_to.parent.mkdir(parents=True, exist_ok=True)
            save_label_to.write_bytes(label)
            return result, save_label_to
        return result, label

    def progress(self, progress_id: str) -> dict | None:
        """GET /ibisagent/progress/<progress_id>: the state of a running request that was sent with this
        `progress_id` ({"state", "phase", "slices_done", "slices_total", "seconds"}), or None while the server does not
        know the id (HTTP 404: the request has not reached it yet, or the server has no progress reports)."""
        if not isinstance(progress_id, str) or not _PROGRESS_ID.fullmatch(progress_id):
            raise ValueError(f"progress_id must be 32 lowercase hex digits, got {progress_id!r}")
        path = f"/ibisagent/progress/{progress_id}"
        try:
            _, _, body = self._request("GET", path)
        except IBISAgentClientError as exc:
            if exc.status == 404:
                return None
            raise
        result = self._json(body, self._url(path))
        if not isinstance(result, dict):
            raise IBISAgentClientError(
                f"{self._url(path)}: expected a JSON object, got {type(result).__name__}", url=self._url(path)
            )
        return result


def default_server_url() -> str:
    """The server URL from the IBISAGENT_SERVER environment variable, or MONAI Label's default local address."""
    return os.environ.get("IBISAGENT_SERVER", "http://127.0.0.1:8000")
