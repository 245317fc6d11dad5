"""The IBISAgent MONAI Label app: one interactive infer task, `ibisagent`, over the core library.

    monailabel start_server --app monailabel_app --studies <folder> --conf model <path or hub id> --conf tool classical

Settings come from --conf (see `lib/config.py`); they are checked, the tool built and the model loaded at start-up, so
a bad configuration stops the server with one message instead of failing on the first request.
"""

from ibisagent._compat import ensure_torchvision

ensure_torchvision()  # before anything imports torchvision (a CPU-only torch: see ibisagent._compat)

# ruff: noqa: E402 - the fallback above must run before these imports
import logging
import os
import re
import sys
from dataclasses import asdict

from lib.config import AppConfig
from lib.datastore import StudiesDatastore
from lib.endpoints import TOKEN_ENV, check_access, install
from lib.errors import ConfigError, RequestError
from lib.infers.ibisagent_task import IBISAgentTask
from lib.infers.ibisagent_volume_task import IBISAgentVolumeTask
from lib.progress import BOARD
from lib.request import IMAGE_ID_KEY, SESSION_IMAGE_KEY
from lib.sessions import ToolLeases
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)

TASK = "ibisagent"
VOLUME_TASK = "ibisagent_volume"
_LABEL_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")


class IBISAgentApp(MONAILabelApp):
    """The MONAI Label app: checks the configuration, builds the tool and loads the policy model once."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        try:
            self.config = AppConfig.from_conf(conf or {})
            if "monailabel.app" in sys.modules:
                check_access(os.environ.get(TOKEN_ENV))
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
        server = sys.modules.get("monailabel.app")  # the FastAPI app, when MONAI Label's server runs this app
        if server is not None:
            install(server.app, self.config.max_upload_mb << 20, os.environ.get(TOKEN_ENV))

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
        from ibisagent.tools import build_propagator

        c = self.config
        server_info = {k: v for k, v in asdict(c).items() if k != "labels"}
        task = IBISAgentTask(
            tool=self._tool,
            tool_factory=lambda: c.tool_spec.build(c.device),
            policy_factory=self._policy_factory,
            dialect=c.dialect,
            max_steps=c.max_steps,
            session_ttl=c.session_ttl,
            max_sessions=c.max_sessions,
            embedding_cache=c.embedding_cache,
            max_clicks=c.max_clicks,
            max_session_steps=c.max_session_steps,
            instruction_for=c.instruction_for,
            max_pixels=c.max_image_megapixels * 1_000_000,
            max_voxels=c.max_volume_megavoxels * 1_000_000,
            labels=c.label_names,
            server_info=server_info,
        )
        # The weight-free tool is cheap: each volume job builds its own. A model tool is borrowed from the 2D task's
        # pool (no second copy of the weights; volume and 2D requests then take turns on its embedding_cache slots).
        if c.tool == "classical":
            tools = ToolLeases(lambda: c.tool_spec.build(c.device), c.max_volume_jobs).lease
        else:
            tools = task.pool.borrow
        return {
            TASK: task,
            VOLUME_TASK: IBISAgentVolumeTask(
                tools=tools,
                propagator_factory=lambda tool: build_propagator(tool, c.checkpoint, c.tool_config, c.device),
                policy_factory=self._policy_factory,
                dialect=c.dialect,
                max_steps=c.max_steps,
                session_ttl=c.session_ttl,
                max_sessions=c.max_volume_sessions,
                max_jobs=c.max_volume_jobs,
                repair_budget=c.repair_budget,
                max_clicks=c.max_clicks,
                instruction_for=c.instruction_for,
                max_pixels=c.max_image_megapixels * 1_000_000,
                max_voxels=c.max_volume_megavoxels * 1_000_000,
                labels=c.label_names,
                server_info=server_info,
                progress=BOARD,
                agent_lock=task._agent_lock,  # one model: 2D and volume requests take turns on it
            ),
        }

    def infer(self, request, datastore=None):
        """Check what MONAI Label would take on trust, then run the task (as MONAI Label's `infer` does, without
        reading an image id that names a file in the working directory as that file). `model`, `image` and
        `label_tag` come from the client: an image must be an id of this server's datastore (never a path), and a
        label tag must be a plain name (it becomes a folder name)."""
        model = request.get("model")
        if not isinstance(model, str) or model not in self._infers:
            shown = model if not isinstance(model, str) or len(model) < 80 else model[:77] + "..."
            raise RequestError(404, f"unknown model {shown!r}; this server serves: {', '.join(self._infers)}")
        datastore = datastore or self.datastore()
        if SESSION_IMAGE_KEY in request:  # an upload session's image (set by the app's /infer, never by params)
            image_id, uri = request[SESSION_IMAGE_KEY]
            task = self._infers[model]
            label_file, result = task({**request, "image": uri, IMAGE_ID_KEY: image_id})
            return {"label": label_file, "tag": DefaultLabelTag.ORIGINAL.value, "file": label_file, "params": result}
        image_id = request.get("image")
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
        task = self._infers[model]
        uri = datastore.get_image_uri(image_id)
        request = {**request, "description": task.description, "image": uri, IMAGE_ID_KEY: image_id}
        label_file, result = task(request)
        tag = tag or DefaultLabelTag.ORIGINAL.value
        label_id = label_file
        if request.get("save_label"):
            label_id = datastore.save_label(image_id, label_file, tag, {"model": model, "params": result})
        return {"label": label_id, "tag": tag, "file": label_file, "params": result}
