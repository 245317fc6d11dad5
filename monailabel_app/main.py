"""The IBISAgent MONAI Label app: one interactive infer task, `ibisagent`, over the core library.

    monailabel start_server --app monailabel_app --studies <folder> --conf model <path or hub id> --conf tool classical

Settings come from --conf (see `lib/config.py`); they are checked, the tool built and the model loaded at start-up, so
a bad configuration stops the server with one message instead of failing on the first request.
"""

from ibisagent._compat import ensure_torchvision

ensure_torchvision()  # before anything imports torchvision (ENVIRONMENT.md: CPU-only torch)

# ruff: noqa: E402 - the fallback above must run before these imports
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import asdict

from lib.config import AppConfig
from lib.errors import ConfigError, RequestError
from lib.infers.ibisagent_task import IMAGE_ID_KEY, IBISAgentTask
from monailabel.interfaces.app import MONAILabelApp

from ibisagent.tools import build_tool

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
        _answer_malformed_params_with_400()

    def _build_tool(self):
        c = self.config
        if c.device != "cpu":
            import torch

            if c.device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"--conf device {c.device!r}: CUDA is not available on this machine; use cpu")
        try:
            return build_tool(c.tool, c.checkpoint, c.tool_config, c.device)
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
            base = HFVLMPolicy.from_pretrained(
                c.model,
                dialect=c.dialect,
                history=c.history,
                max_new_tokens=c.max_new_tokens,
                device=c.device,
                dtype=c.dtype,
            )
        except Exception as exc:  # a missing folder, an incompatible checkpoint, no network for a Hub id
            raise ConfigError(f"--conf model {c.model!r} could not be loaded: {type(exc).__name__}: {exc}") from exc

        def new_policy():
            return HFVLMPolicy(
                base.model, base.processor, dialect=c.dialect, history=c.history, max_new_tokens=c.max_new_tokens
            )

        return new_policy

    def init_infers(self):
        c = self.config
        return {
            TASK: IBISAgentTask(
                tool=self._tool,
                tool_factory=lambda: build_tool(c.tool, c.checkpoint, c.tool_config, c.device),
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
        if model not in self._infers:
            raise RequestError(404, f"unknown model {model!r}; this server serves: {', '.join(self._infers)}")
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


# -- MONAI Label 0.8.5 answers a malformed `params` field with a bare 500 -------------------------------------------
def _answer_malformed_params_with_400() -> None:
    """The /infer endpoint parses the `params` form field itself (`json.loads`, then `dict.update`) before any app
    code runs, so malformed JSON or a non-object reaches the client as "500 Internal Server Error". Register a
    handler that answers exactly those errors with 400 and a message. No-op outside the server."""
    server = sys.modules.get("monailabel.app")
    if server is None or ValueError in server.app.exception_handlers:
        return
    server.app.add_exception_handler(ValueError, _params_error)
    server.app.add_exception_handler(TypeError, _params_error)
    # Starlette copies the handlers into its middleware stack when it first builds it (the app is created inside
    # uvicorn's start-up, after that); dropping the stack makes the next request rebuild it with these handlers.
    server.app.middleware_stack = None


async def _params_error(request, exc: Exception):
    from fastapi.responses import JSONResponse

    if not _raised_parsing_params(exc):
        raise exc  # any other error keeps MONAI Label's answer (500)
    if isinstance(exc, json.JSONDecodeError):
        detail = f"params is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); send a JSON object"
    else:
        detail = f'params must be a JSON object such as {{"instruction": "segment the liver"}} ({exc})'
    return JSONResponse(status_code=400, content={"detail": detail})


def _raised_parsing_params(exc: Exception) -> bool:
    """True when `exc` was raised in MONAI Label's run_inference itself or in the json module it called, i.e. by
    json.loads(params) or request.update(params), not by anything the infer task ran."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    json_dir = os.path.dirname(json.__file__)
    for i, frame in enumerate(frames):
        code = frame.f_code
        if code.co_name == "run_inference" and code.co_filename.endswith(os.path.join("endpoints", "infer.py")):
            return all(f.f_code.co_filename.startswith(json_dir) for f in frames[i + 1 :])
    return False
