"""The IBISAgent MONAI Label app: one interactive infer task, `ibisagent`, over the core library.

    monailabel start_server --app monailabel_app --studies <folder> --conf model <path or hub id> --conf tool classical

Settings come from --conf (see `lib/config.py`); they are checked, the tool built and the model loaded at start-up, so
a bad configuration stops the server with one message instead of failing on the first request.
"""

from ibisagent._compat import ensure_torchvision

ensure_torchvision()  # before anything imports torchvision (a CPU-only torch: see ibisagent._compat)

# ruff: noqa: E402 - the fallback above must run before these imports
import errno
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import asdict

from lib.config import AppConfig
from lib.datastore import StudiesDatastore
from lib.errors import ConfigError, RequestError
from lib.infers.ibisagent_task import IMAGE_ID_KEY, IBISAgentTask
from monailabel.interfaces.app import MONAILabelApp

logger = logging.getLogger(__name__)

TASK = "ibisagent"
_LABEL_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")


class IBISAgentApp(MONAILabelApp):
    """The MONAI Label app: checks the configuration, builds the tool and loads the policy model once."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        try:
            self.config = AppConfig.from_conf(conf or {})
            self._tool = self._build_tool()
            self._policy_factory = self._load_policy()
        except ConfigError as exc:
            # MONAI Label starts the app in uvicorn's start-up hook: its traceback is long; this line says it all.
            logger.error("ibisagent app: invalid configuration: %s", exc)
            print(f"ibisagent app: invalid configuration: {exc}", file=sys.stderr, flush=True)
            raise
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="IBISAgent",
            description="Agentic interactive biomedical segmentation: a VLM policy writes clicks, a tool segments",
            version="1",
            labels=self.config.label_names,
        )
        _answer_client_errors_with_4xx()

    def _build_tool(self):
        c = self.config
        if c.device != "cpu":
            import torch

            if c.device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"--conf device {c.device!r}: CUDA is not available on this machine; use cpu")
        try:
            return c.tool_spec.build(c.device)
        except Exception as exc:  # ToolError, ImportError of an optional package, a bad checkpoint
            raise ConfigError(f"--conf tool {c.tool!r} could not be built: {type(exc).__name__}: {exc}") from exc

    def _load_policy(self):
        """A function that makes a fresh policy (for one request) over the one loaded model; None without a model."""
        c = self.config
        if c.model is None:
            logger.warning("ibisagent app: no --conf model; only requests with run_agent false can be served")
            return None
        from ibisagent.policies.hf_vlm import HFVLMPolicy

        try:
            base = c.policy_spec.build(c.device)
        except Exception as exc:  # a missing folder, an incompatible checkpoint, no network for a Hub id
            raise ConfigError(f"--conf model {c.model!r} could not be loaded: {type(exc).__name__}: {exc}") from exc

        options = c.policy_spec.options()

        def new_policy():
            return HFVLMPolicy(base.model, base.processor, **options)

        return new_policy

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return StudiesDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        c = self.config
        return {
            TASK: IBISAgentTask(
                tool=self._tool,
                tool_factory=lambda: c.tool_spec.build(c.device),
                policy_factory=self._policy_factory,
                dialect=c.dialect,
                max_steps=c.max_steps,
                session_ttl=c.session_ttl,
                max_sessions=c.max_sessions,
                embedding_cache=c.embedding_cache,
                labels=c.label_names,
                server_info={k: v for k, v in asdict(c).items() if k != "labels"},
            )
        }

    def infer(self, request, datastore=None):
        """Check what MONAI Label would take on trust, then run the task. The /infer endpoint merges the params JSON
        into the request, so `image`, `model` and `label_tag` may come from the client: an image must be an id of
        this server's datastore (never a path), and a label tag must be a plain name (it becomes a folder name)."""
        model = request.get("model")
        if not isinstance(model, str) or model not in self._infers:
            shown = model if not isinstance(model, str) or len(model) < 80 else model[:77] + "..."
            raise RequestError(404, f"unknown model {shown!r}; this server serves: {', '.join(self._infers)}")
        image_id = request.get("image")
        datastore = datastore or self.datastore()
        if not isinstance(image_id, str) or image_id not in datastore.list_images():
            shown = image_id if not isinstance(image_id, str) or len(image_id) < 80 else image_id[:77] + "..."
            raise RequestError(
                404,
                f"unknown image id {shown!r}: give the id of an image in the studies datastore "
                "(GET /datastore/?output=all lists them); paths and uploaded images are not accepted",
            )
        tag = request.get("label_tag")
        if request.get("save_label") and tag is not None and not (isinstance(tag, str) and _LABEL_TAG.fullmatch(tag)):
            raise RequestError(400, f"params.label_tag {tag!r} must be a plain name: letters, digits, _ and -")
        request = dict(request)
        request[IMAGE_ID_KEY] = image_id
        return super().infer(request, datastore)


# -- MONAI Label 0.8.5 answers some bad requests with a bare 500 -------------------------------------------------------
# Its /infer endpoint reads the request itself before any app code runs (`json.loads(params)`, `dict.update`, the
# uploads' temporary files, a `.bin` label's conversion) and raises HTTP 500 for a missing image and for
# output=dicom_seg on a local datastore. These handlers answer exactly those with 4xx and a message.
_ENDPOINT_HTTP_500S = {
    "Neither Image nor File not Session ID input is provided": (
        400,
        "the request names no image: give ?image=<id> of an image in the studies datastore "
        "(GET /datastore/?output=all lists them)",
    ),
    "DICOM SEG format is not supported in a non-DICOM datastore": (
        400,
        "output=dicom_seg needs a DICOMweb datastore; this server's studies are a folder: ask for output=all, json "
        "or image",
    ),
}


def _answer_client_errors_with_4xx() -> None:
    """Register the handlers with MONAI Label's FastAPI app. No-op outside the server."""
    server = sys.modules.get("monailabel.app")
    if server is None or RecursionError in server.app.exception_handlers:
        return
    from starlette.exceptions import HTTPException

    for kind in (ValueError, TypeError, RecursionError, OSError):
        server.app.add_exception_handler(kind, _endpoint_error)
    server.app.add_exception_handler(HTTPException, _endpoint_http_error)
    # Starlette copies the handlers into its middleware stack when it first builds it (the app is created inside
    # uvicorn's start-up, after that); dropping the stack makes the next request rebuild it with these handlers.
    server.app.middleware_stack = None


async def _endpoint_error(request, exc: Exception):
    from fastapi.responses import JSONResponse

    detail = _client_error(exc)
    if detail is None:
        raise exc  # any other error keeps MONAI Label's answer (500)
    return JSONResponse(status_code=400, content={"detail": detail})


async def _endpoint_http_error(request, exc):
    from fastapi.exception_handlers import http_exception_handler

    if exc.status_code == 500 and exc.detail in _ENDPOINT_HTTP_500S and _raised_by_the_endpoint(exc) == []:
        status, detail = _ENDPOINT_HTTP_500S[exc.detail]
        exc = type(exc)(status_code=status, detail=detail)
    return await http_exception_handler(request, exc)


def _client_error(exc: Exception) -> str | None:
    """The message for an error MONAI Label's /infer endpoint raised while reading the request; None for any other
    error (raised by the app, the task, or anything after the request was read)."""
    inner = _raised_by_the_endpoint(exc)
    if inner is None:
        return None
    json_dir = os.path.dirname(json.__file__)
    if isinstance(exc, ValueError | TypeError | RecursionError) and all(
        f.f_code.co_filename.startswith(json_dir) for f in inner
    ):
        if isinstance(exc, json.JSONDecodeError):
            return f"params is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); send a JSON object"
        if isinstance(exc, RecursionError):
            return "params nests too deeply to be read; send a flat JSON object of the documented fields"
        if inner:  # json.loads refused a value, e.g. an integer of more than 4300 digits
            return f"params cannot be read: {exc}"
        return f'params must be a JSON object such as {{"instruction": "segment the liver"}} ({exc})'
    if inner and inner[0].f_code.co_name == "binary_to_image":
        return (
            f"the .bin label upload cannot be converted against the image ({type(exc).__name__}: {exc}); "
            "send the label as a PNG/JPG mask or a NIfTI"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return "an uploaded file's name is too long (its extensions name the server's temporary file); shorten it"
    return None


def _raised_by_the_endpoint(exc: Exception) -> list | None:
    """The frames below MONAI Label's run_inference when `exc` passed through it and not through the app's `infer`
    (an empty list: raised by run_inference itself); None otherwise."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for i, frame in enumerate(frames):
        code = frame.f_code
        if code.co_name == "run_inference" and code.co_filename.endswith(os.path.join("endpoints", "infer.py")):
            inner = frames[i + 1 :]
            return None if any(f.f_code.co_name == "infer" for f in inner) else inner
    return None
