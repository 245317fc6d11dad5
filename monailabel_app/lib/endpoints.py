"""The server's HTTP surface, fitted onto MONAI Label's FastAPI app when the app starts.

MONAI Label 0.8.5 mounts some fifty endpoints. The app serves those its users need (`SERVED`: what Slicer's MONAI
Label module and this project's Slicer module call — info, the datastore's images and labels, next sample,
inference) and answers every other one 404 with a message: logs, model upload, batch inference (a second app
process), training, scoring, the DICOMweb proxy and OHIF are not needed by an app whose images live in its studies
folder. Upload sessions (`PUT /session/`, Slicer's stock module's File > Add Data) are the app's own: MONAI Label's
join the client's id onto a folder path and unpack tar/zip archives unchecked; these hold one image file each, never
unpacked, under an id the server makes (`UploadSessions`).

`POST /infer/{model}` is the app's own: MONAI Label's merges the client's params over the path of an uploaded label
(so a client names any server file as its "upload"), reads an image id that is
also a file name in the working directory as that file, leaves refused uploads on disk and runs the model on the
event loop (every other client waits). This one reads the params within bounds, keeps the upload where params
cannot point, deletes it in every case, and runs in a worker thread. Its wire format is MONAI Label's.

Access: `GET /health` answers without authentication. Bound to loopback, nothing else is needed; bound to any other
address the server does not start unless `IBISAGENT_API_TOKEN` is set, and with a token every other endpoint
requires `Authorization: Bearer <token>`. A request body is limited to `--conf max_upload_mb`.

Browsers: MONAI Label allows every origin (CORS `*`), so any web page the user opens could read the studies of a
server on the user's machine. Here a request that a browser sends from another site (an `Origin` header that is not
the server's own and not listed in MONAI Label's `MONAI_LABEL_CORS_ORIGINS`) is refused (403); a server without a
token also refuses a `Host` header that does not name this machine (a page on a name that resolves to 127.0.0.1,
DNS rebinding). Slicer, `monailabel.client` and other programs send no `Origin` header.
"""

from __future__ import annotations

import atexit
import errno
import hmac
import ipaddress
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Annotated, Any

from fastapi import BackgroundTasks, File, Form, UploadFile
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.interfaces.utils.app import app_instance

from .errors import ConfigError, RequestError
from .progress import BOARD
from .request import IMAGE_ID_KEY, SESSION_IMAGE_KEY, UPLOAD_KEY

TOKEN_ENV = "IBISAGENT_API_TOKEN"
HEALTH = "/health"
# MONAI Label's endpoints the app keeps, as (method, path).
SERVED = frozenset(
    {
        ("GET", "/"),
        ("GET", "/favicon.ico"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/info/"),
        ("GET", "/datastore/"),
        ("PUT", "/datastore/"),
        ("PUT", "/datastore/image"),
        ("HEAD", "/datastore/image"),
        ("GET", "/datastore/image"),
        ("DELETE", "/datastore/"),
        ("DELETE", "/datastore/image"),
        ("GET", "/datastore/image/info"),
        ("PUT", "/datastore/image/info"),
        ("PUT", "/datastore/label"),
        ("HEAD", "/datastore/label"),
        ("GET", "/datastore/label"),
        ("DELETE", "/datastore/label"),
        ("GET", "/datastore/label/info"),
        ("PUT", "/datastore/label/info"),
        ("POST", "/activelearning/{strategy}"),
        ("GET", "/train/"),
        ("POST", "/infer/{model}"),
        ("PUT", "/session/"),
        ("GET", "/session/{session_id}"),
        ("DELETE", "/session/{session_id}"),
        ("GET", "/ibisagent/progress/{progress_id}"),
    }
)
MAX_PARAMS_BYTES = 64 * 1024
MAX_PARAMS_DEPTH = 4  # the documented params are flat; points are lists of lists
_RESERVED = ("model", "image", "session", IMAGE_ID_KEY, UPLOAD_KEY, SESSION_IMAGE_KEY)
_LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def check_access(token: str | None, argv: list[str] | None = None) -> None:
    """Refuse to start (ConfigError) on a non-loopback address without a token, or with a weak token."""
    if token is not None and len(token) < 16:
        raise ConfigError(f"{TOKEN_ENV} is {len(token)} characters long; use at least 16 random characters")
    host = bind_host(sys.argv if argv is None else argv)
    if token is None and not _is_loopback(host):
        raise ConfigError(
            f"the server would listen on {host}, reachable beyond this machine, without authentication: set "
            f"{TOKEN_ENV} to a secret of at least 16 characters (clients send 'Authorization: Bearer <token>'), or "
            "start it with --host 127.0.0.1"
        )


def bind_host(argv: list[str]) -> str:
    """The address `monailabel start_server` binds, read from its command line (its default: 0.0.0.0)."""
    host = "0.0.0.0"
    for i, arg in enumerate(argv):
        if arg in ("-i", "--host") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    return host


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def install(app, max_body_bytes: int, token: str | None, origins: list[str] | None = None) -> None:
    """Fit the app's endpoints and guards onto MONAI Label's FastAPI `app` (idempotent). origins: the web origins
    besides the server's own whose browser requests are served (default: MONAI Label's MONAI_LABEL_CORS_ORIGINS)."""
    if getattr(app.state, "ibisagent_installed", False):
        return
    if origins is None:
        from monailabel.config import settings

        origins = [str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS]
    from monailabel.endpoints import infer as monailabel_infer
    from monailabel.endpoints import session as monailabel_session

    # MONAI Label's /infer and /session routers go: the app serves its own (FastAPI keeps an included router whole,
    # or its routes when flattened).
    replaced = (monailabel_infer, monailabel_session)
    app.router.routes = [
        route
        for route in app.router.routes
        if not any(getattr(route, "original_router", None) is module.router for module in replaced)
        and getattr(getattr(route, "endpoint", None), "__module__", "") not in {m.__name__ for m in replaced}
    ]
    app.add_api_route("/infer/{model}", infer, methods=["POST"], summary="Run the ibisagent task")
    app.add_api_route("/session/", put_session, methods=["PUT"], summary="Upload an image for one user's requests")
    app.add_api_route("/session/{session_id}", get_session, methods=["GET"], summary="An upload session's info")
    app.add_api_route("/session/{session_id}", delete_session, methods=["DELETE"], summary="Delete an upload session")
    app.add_api_route(
        "/ibisagent/progress/{progress_id}", get_progress, methods=["GET"], summary="A volume request's progress"
    )
    app.add_api_route(HEALTH, _health, methods=["GET"], summary="Liveness check (no authentication)")
    for kind in (ValueError, TypeError, RecursionError, OSError):
        app.add_exception_handler(kind, _form_field_error)
    # Starlette builds its middleware stack on the first request; the app is created inside uvicorn's start-up,
    # after that: dropping the stack makes the next request rebuild it with what is added here.
    app.middleware_stack = None
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, token=token, origins=origins)
    app.state.ibisagent_installed = True


def is_served(method: str, path: str) -> bool:
    """Whether the app answers `method path` (SERVED, its /infer and /health, MONAI Label's static files)."""
    if path == HEALTH or path.startswith("/static/"):
        return method in ("GET", "HEAD")
    if method == "HEAD":
        method = "GET" if ("HEAD", path) not in SERVED else method
    return any(method == m and pattern.fullmatch(path) for m, pattern in _SERVED_PATTERNS)


def _pattern(path: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)))


# -- /infer ---------------------------------------------------------------------------------------------------------
_UPLOADS: list[str] = []  # the private upload folder, made on first use


def _upload_dir() -> str:
    if not _UPLOADS:
        folder = tempfile.mkdtemp(prefix="ibisagent-uploads-")  # mode 0700: other users cannot place files there
        atexit.register(shutil.rmtree, folder, True)
        _UPLOADS.append(folder)
    return _UPLOADS[0]


def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: Annotated[str, Form()] = "{}",
    file: Annotated[UploadFile | None, File()] = None,
    label: Annotated[UploadFile | None, File()] = None,
    output: ResultType | None = None,
):
    """POST /infer/{model}: MONAI Label's request and response format, read within bounds (a plain def: FastAPI
    runs it in a worker thread, so other clients are answered while the model works)."""
    uploaded = upload_sessions().path(session_id) if session_id else None
    if file is not None or not (image or uploaded):
        if file is None:
            raise RequestError(
                400,
                "the request names no image: give ?image=<id> of an image in the studies datastore "
                "(GET /datastore/?output=all lists them)",
            )
        raise RequestError(
            404,
            "unknown image id '': give ?image=<id> of an image in the studies datastore; paths and uploaded "
            "images are not accepted (PUT /datastore/image adds one)",
        )
    if output == ResultType.dicom_seg:
        raise RequestError(
            400,
            "output=dicom_seg needs a DICOMweb datastore; this server's studies are a folder: ask for output=all, "
            "json or image",
        )
    request = {"model": model, "image": image, **parse_params(params)}
    if uploaded is not None:
        request[SESSION_IMAGE_KEY] = (f"upload-{session_id}", uploaded)
    upload = None
    try:
        if label is not None:
            upload = request[UPLOAD_KEY] = save_upload(label.filename or "", label.file)
        instance = app_instance()
        result = instance.infer(request)
        return send_response(instance.datastore(), result, output, background_tasks)
    finally:
        if upload is not None and os.path.exists(upload):
            os.unlink(upload)


class UploadSessions:
    """MONAI Label's upload sessions (`PUT /session/`, what Slicer's stock module uses for File > Add Data), kept
    safely: one image file per session, stored as `<folder>/<id>/image<suffix>` under a random 32-hex id the server
    makes, never unpacked, dropped after `expiry_s`. A session id is only ever looked up, never joined onto a path
    before it is checked."""

    def __init__(self, folder: str, expiry_s: int):
        self.folder = os.path.realpath(folder)
        self.expiry_s = expiry_s
        os.makedirs(self.folder, mode=0o700, exist_ok=True)

    def add(self, filename: str, stream) -> dict:
        self.drop_expired()
        suffix = _image_suffix(filename)
        session_id = uuid.uuid4().hex
        folder = os.path.join(self.folder, session_id)
        os.mkdir(folder, 0o700)
        try:
            with open(os.path.join(folder, "image" + suffix), "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.info(session_id)

    def path(self, session_id: str) -> str:
        """The session's image file; 404 for an id that is not one of this store's live sessions."""
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise RequestError(404, f"upload session {session_id[:40]!r} is unknown; PUT /session/ makes one")
        folder = os.path.join(self.folder, session_id)
        files = [f for f in os.listdir(folder) if f.startswith("image")] if os.path.isdir(folder) else []
        if not files or time.time() - os.stat(folder).st_mtime > self.expiry_s:
            raise RequestError(404, f"upload session {session_id!r} is unknown or expired; upload the image again")
        return os.path.join(folder, files[0])

    def info(self, session_id: str) -> dict:
        path = self.path(session_id)
        expires = os.stat(os.path.dirname(path)).st_mtime + self.expiry_s
        return {"session_id": session_id, "session_info": {"name": os.path.basename(path), "expiry": int(expires)}}

    def remove(self, session_id: str) -> dict:
        info = self.info(session_id)
        shutil.rmtree(os.path.join(self.folder, session_id), ignore_errors=True)
        return info

    def drop_expired(self) -> None:
        now = time.time()
        for name in os.listdir(self.folder):
            folder = os.path.join(self.folder, name)
            if _SESSION_ID.fullmatch(name) and now - os.stat(folder).st_mtime > self.expiry_s:
                shutil.rmtree(folder, ignore_errors=True)


_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
_STORE: list[UploadSessions] = []


def upload_sessions() -> UploadSessions:
    if not _STORE:
        from monailabel.config import settings

        folder = settings.MONAI_LABEL_SESSION_PATH or os.path.join(
            os.path.expanduser("~"), ".cache", "monailabel", "sessions"
        )
        _STORE.append(UploadSessions(os.path.join(folder, "ibisagent"), settings.MONAI_LABEL_SESSION_EXPIRY))
    return _STORE[0]


def _image_suffix(filename: str) -> str:
    lower = filename.lower()
    suffix = next((s for s in _IMAGE_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise RequestError(
            400,
            f"the upload {filename[:80]!r} must be a NIfTI volume (.nii, .nii.gz) or a PNG/JPG/TIFF/BMP/DICOM image",
        )
    return suffix


def put_session(files: Annotated[list[UploadFile], File()], uncompress: bool = False, expiry: int = 0):
    """PUT /session/: one image, never unpacked (archives are refused)."""
    if uncompress:
        raise RequestError(400, "uncompress is not supported: upload one image file (a NIfTI volume or a 2D image)")
    if len(files) != 1:
        raise RequestError(400, f"upload one image file per session, not {len(files)}")
    return upload_sessions().add(files[0].filename or "", files[0].file)


def get_session(session_id: str, image: bool = False):
    if image:
        from fastapi.responses import FileResponse

        path = upload_sessions().path(session_id)
        return FileResponse(path, filename=os.path.basename(path))
    return upload_sessions().info(session_id)


def delete_session(session_id: str):
    return upload_sessions().remove(session_id)


def get_progress(progress_id: str):
    """GET /ibisagent/progress/{progress_id}: {state, phase, slices_done, slices_total, seconds} of the request that
    sent this params.progress_id (`lib.progress`)."""
    return BOARD.get(progress_id)


def parse_params(text: str) -> dict[str, Any]:
    """The params form field: a JSON object of at most MAX_PARAMS_BYTES, nested at most MAX_PARAMS_DEPTH deep, of
    valid UTF-8 text, setting none of the keys the server fills in."""
    if len(text) > MAX_PARAMS_BYTES:
        raise RequestError(400, f"params is {len(text)} characters long; at most {MAX_PARAMS_BYTES} are accepted")
    try:
        value = json.loads(text) if text else {}
    except RecursionError:
        raise RequestError(400, "params nests too deeply to be read; send a flat JSON object") from None
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise RequestError(400, f"params is not valid JSON ({where}); send a JSON object") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RequestError(400, f"params cannot be read: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise RequestError(
            400,
            f'params must be a JSON object such as {{"instruction": "segment the liver"}}, got {type(value).__name__}',
        )
    stack = [(value, 1, "params")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_PARAMS_DEPTH:
            raise RequestError(
                400, f"{where[:80]} nests deeper than {MAX_PARAMS_DEPTH} levels; send the documented fields"
            )
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            name = f"{where}.{key}" if isinstance(item, dict) else f"{where}[{key}]"
            for text_value in (key, child):
                if isinstance(text_value, str) and not _encodable(text_value):
                    shown = name[:80].encode("utf-8", "backslashreplace").decode()
                    raise RequestError(400, f"{shown} is not valid UTF-8 text (a lone surrogate); send plain text")
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, name))
    reserved = [k for k in _RESERVED if k in value]
    if reserved:
        raise RequestError(
            400, f"params.{reserved[0]} is set by the server from the query and the upload; leave it out"
        )
    return value


def save_upload(filename: str, stream) -> str:
    """Copy an uploaded label into the private upload folder; returns its path (the caller deletes it)."""
    if len(filename) > 255:
        raise RequestError(
            400, "the label upload's file name is too long (its extensions name the file type); shorten it"
        )
    lower = filename.lower()
    if lower.endswith(".bin"):
        raise RequestError(
            400, "the .bin label upload cannot be converted by this server; send the label as a PNG/JPG mask or a NIfTI"
        )
    suffix = next((s for s in _LABEL_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise RequestError(
            400, f"the label upload {filename[:80]!r} must be a PNG/JPG mask or a NIfTI (.nii, .nii.gz) label"
        )
    fd, path = tempfile.mkstemp(suffix=suffix, dir=_upload_dir())
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- the rest ---------------------------------------------------------------------------------------------------------
async def _health():
    return {"status": "ok"}


def _not_served(method: str, path: str) -> str:
    return (
        f"{method} {path[:120]} is not served by the IBISAgent app; it serves /info/, /datastore/..., "
        "/activelearning/{strategy}, /infer/{model}, /ibisagent/progress/{id} and /health (see monailabel_app/README.md)"
    )


async def _form_field_error(request, exc: Exception):
    """MONAI Label's datastore endpoints read their form fields (params, info) with `json.loads` and use them as
    objects, and name their temporary files after the upload's extensions, unchecked: a field that is not a JSON
    object or a file name the file system refuses becomes a 400 with a message. Any other error (raised deeper, in a
    datastore or the app) keeps its 500."""
    import traceback

    from fastapi.responses import JSONResponse

    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)]
    json_dir = os.path.dirname(json.__file__)
    stdlib = os.path.dirname(json_dir)
    in_endpoint = [i for i, f in enumerate(frames) if os.path.join("monailabel", "endpoints", "") in f]
    below = frames[in_endpoint[-1] + 1 :] if in_endpoint else None
    if below is not None and all(f.startswith(stdlib) and "site-packages" not in f for f in below):
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            detail = "an uploaded file's name is too long (its extensions name the server's temporary file); shorten it"
        elif isinstance(exc, ValueError) and "null byte" in str(exc):
            detail = "an uploaded file's name contains a NUL character; rename the file"
        elif isinstance(exc, RecursionError):
            detail = "a form field (params or info) nests too deeply to be read; send a flat JSON object"
        elif below and below[-1].startswith(json_dir):
            detail = "a form field (params or info) is not valid JSON; send a JSON object"
        else:
            detail = 'a form field (params or info) must be a JSON object, e.g. {"note": "..."}'
        return JSONResponse(status_code=400, content={"detail": detail})
    raise exc


_SERVED_PATTERNS = [(method, _pattern(path)) for method, path in SERVED]


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: browser requests from other sites refused, the Host header of a server without a token
    checked, the bearer token (when set) on every path but /health, and the request body limit."""

    def __init__(self, app, max_body_bytes: int, token: str | None, origins: list[str] = ()):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path, method = scope.get("path", ""), scope.get("method", "GET")
        refused = self._refused_origin(headers) if path != HEALTH else None
        if refused is not None:
            return await _answer(send, 403, refused)
        if self.expected is not None and path != HEALTH:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                detail = "this server needs 'Authorization: Bearer <token>' (the server's IBISAGENT_API_TOKEN)"
                return await _answer(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        if not is_served(method, path):
            return await _answer(send, 404, _not_served(method, path))
        limit = self.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _answer(send, 400, "the Content-Length header is not a number")
        if declared > limit:
            return await _answer(send, 413, _too_large(limit))
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _answer(send, 413, _too_large(limit))

    def _refused_origin(self, headers: dict[bytes, bytes]) -> str | None:
        """Why a request is refused as coming from another web site (None: it is not)."""
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if self.expected is None and not _is_loopback(_host_name(host)):
            return (
                f"the Host header names {host[:80]!r}, not this machine: a server without IBISAGENT_API_TOKEN "
                "answers only requests to localhost, 127.0.0.1 or [::1]; set a token to serve other names"
            )
        origin = headers.get(b"origin")
        if origin is None:
            return None
        origin_text = origin.decode("latin-1").strip().rstrip("/").lower()
        if origin_text in (f"http://{host}", f"https://{host}") or origin_text in self.origins or "*" in self.origins:
            return None
        return (
            f"browser requests from {origin_text[:80]!r} are refused: only the server's own origin, and those listed "
            "in MONAI_LABEL_CORS_ORIGINS, may use it"
        )


def _host_name(host: str) -> str:
    """The name of a Host header without its port ("[::1]:8000" -> "[::1]", "localhost:8000" -> "localhost")."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _too_large(limit: int) -> str:
    return f"the request body exceeds {limit // (1 << 20)} MB (the server's --conf max_upload_mb)"


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})
