"""SAM 2.1 and MedSAM2 as click tools: `SAM2ImagePredictor` embeds the image once in `set_image`, and every click
re-runs only the prompt encoder and mask decoder on that embedding, fed with the previous low-resolution logits."""

from __future__ import annotations

import importlib.util
import logging
from importlib import resources
from pathlib import Path

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.tools._weights import load_weights, read_state_dict, seeded_init
from ibisagent.tools.base import SegmentationTool, ToolError, ToolOutput
from ibisagent.types import Click

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# MedSAM2 is SAM2.1 hiera-tiny at 512 px: the memory attention's RoPE tables shrink with the 32x32 embedding.
MEDSAM2_OVERRIDES = (
    "++model.image_size=512",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)


class SAM2Tool(SegmentationTool):
    """SAM 2.1 image predictor (`name` "sam2", or "medsam2" for MedSAM2 weights at 512 px).

    Logits are the decoder's low-resolution output, image_size/4 square: 256x256 for SAM 2.1 at 1024 px, 128x128
    for MedSAM2 at 512 px; `empty_logits` follows the model.

    Mask choice: a lone first click (no previous logits) is ambiguous, so the three multimask outputs are scored
    and the best predicted IoU wins. Later calls (several clicks, or previous logits) ask for the single-mask
    output: SAM and SAM 2 are trained to return only that token once a prompt is unambiguous, and sam2's
    `dynamic_multimask_via_stability` (on in `build_sam2`) still falls back to the best multimask output when the
    single mask is unstable. `always_multimask=True` reproduces the released IBISAgent tool instead, which took
    the argmax of the three multimask outputs on every call.
    """

    name = "sam2"

    def __init__(self, model, name: str = "sam2", always_multimask: bool = False) -> None:
        """model: a built `SAM2Base` (see `from_checkpoint`), on the device it should run on."""
        super().__init__()
        ensure_torchvision()
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.name = name
        self.model = model
        self.always_multimask = always_multimask
        self.predictor = SAM2ImagePredictor(model)
        # sam2 1.1.0 hard-codes the backbone feature sizes of a 1024 px model; at any other image_size
        # set_image would reshape the features wrongly (later sam2 releases derive them like this).
        hires = model.image_size // 4
        self.predictor._bb_feat_sizes = [(hires >> k, hires >> k) for k in range(3)]
        self.low_res_shape: tuple[int, int] = tuple(model.sam_prompt_encoder.mask_input_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | None,
        config: str | None = None,
        medsam2: bool = False,
        device: str = "cpu",
        always_multimask: bool = False,
    ) -> SAM2Tool:
        """Build from a config shipped in the `sam2` package and load weights.

        checkpoint: a `.pt` file holding a state dict, bare or under "model" (Meta's SAM 2.1 and MedSAM2_latest.pt
                    use "model"). None: random weights, for tests only.
        config:     a SAM2.1 config name: "sam2.1_hiera_t" (default), "sam2.1_hiera_s", "sam2.1_hiera_b+",
                    "sam2.1_hiera_l", or a path inside the sam2 package such as "configs/sam2.1/sam2.1_hiera_t.yaml".
        medsam2:    apply MedSAM2's overrides (image_size 512, RoPE feat_sizes [32, 32]) and name the tool "medsam2".
        """
        if importlib.util.find_spec("sam2") is None:
            raise ToolError("the sam2 and medsam2 tools need the `sam2` package: pip install 'ibisagent[sam2]'")
        ensure_torchvision()
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ToolError(
                f"SAM2 checkpoint {checkpoint!r} does not exist; pass the path of a .pt file "
                "(e.g. sam2.1_hiera_tiny.pt, or MedSAM2_latest.pt with --tool medsam2)"
            )
        config_name = resolve_config(config)
        import torch
        from sam2.build_sam import build_sam2

        overrides = list(MEDSAM2_OVERRIDES) if medsam2 else []
        with seeded_init(torch):
            model = build_sam2(config_name, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
        tool_name = "medsam2" if medsam2 else "sam2"
        if checkpoint is None:
            logger.warning(
                "%s: no checkpoint given, using RANDOM weights (%s); this is for tests only", tool_name, config_name
            )
        else:
            if not medsam2 and "medsam" in Path(checkpoint).name.lower():
                # MedSAM2 weights load into the 1024 px config without a key mismatch, then segment badly.
                logger.warning("%s looks like a MedSAM2 checkpoint; use --tool medsam2 (512 px) for it", checkpoint)
            load_weights(
                model,
                read_state_dict(checkpoint, torch, "SAM2"),
                f"{checkpoint!r} does not match {tool_name} built from {config_name}",
                _suggest,
            )
        model = model.to(device).eval()
        return cls(model, name=tool_name, always_multimask=always_multimask)

    def empty_logits(self) -> np.ndarray:
        """'Nothing segmented' in this model's low-resolution frame (256x256 at 1024 px, 128x128 at 512 px)."""
        return np.full(self.low_res_shape, -20.0, np.float32)

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """An HxW bool mask as `prev_logits`: stretched over the whole low-resolution frame (SAM2 resizes the
        image without padding), +-10 inside/outside."""
        return _mask_logits(mask, self.low_res_shape)

    def _encode(self, image: np.ndarray) -> None:
        import torch

        if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns about wrapping read-only memory
            image = image.copy()
        with torch.inference_mode():
            self.predictor.set_image(image)

    def _predict(self, clicks: list[Click], prev_logits: np.ndarray | None) -> ToolOutput:
        import torch

        # SAM2ImagePredictor takes (x, y) in original-image pixels, like Click, and normalises by (w, h) itself.
        coords = np.array([[c.x, c.y] for c in clicks], np.float32)
        labels = np.array([1 if c.positive else 0 for c in clicks], np.int32)
        mask_input = None
        if prev_logits is not None:
            prev = np.asarray(prev_logits, np.float32)
            if prev.shape != self.low_res_shape:
                raise ToolError(
                    f"{self.name}: prev_logits has shape {prev.shape}, expected {self.low_res_shape} "
                    "(pass back the logits this tool returned, or None)"
                )
            mask_input = prev[None]
        multimask = self.always_multimask or (len(clicks) == 1 and prev_logits is None)
        with torch.inference_mode():
            masks, scores, low_res = self.predictor.predict(
                point_coords=coords, point_labels=labels, mask_input=mask_input, multimask_output=multimask
            )
        best = int(np.argmax(scores))
        return ToolOutput(mask=masks[best] > 0, logits=low_res[best].astype(np.float32), score=float(scores[best]))


def _mask_logits(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """HxW bool -> `shape` float32 logits, +-10 inside/outside (bilinear, as the base class does at 256x256)."""
    from PIL import Image

    small = Image.fromarray(np.asarray(mask, bool).astype(np.float32)).resize(shape[::-1], Image.BILINEAR)
    return ((np.asarray(small, np.float32) - 0.5) * 20.0).astype(np.float32)


def resolve_config(config: str | None) -> str:
    """A config name as sam2's hydra finds it. `import sam2` registers the package root as the config module, so
    names are paths inside the package: "configs/sam2.1/sam2.1_hiera_t.yaml". (The bare "sam2_hiera_t.yaml" at
    the package root is the older SAM 2.0 config, not 2.1.)"""
    name = config or DEFAULT_CONFIG
    if "/" not in name:
        stem = name.removesuffix(".yaml")
        name = f"configs/{'sam2.1' if stem.startswith('sam2.1') else 'sam2'}/{stem}.yaml"
    elif not name.endswith(".yaml"):
        name += ".yaml"
    root = resources.files("sam2")
    if not root.joinpath(name).is_file():
        shipped = sorted(
            p.name.removesuffix(".yaml")
            for p in root.joinpath("configs", "sam2.1").iterdir()
            if p.name.endswith(".yaml")
        )
        raise ToolError(
            f"SAM2 config {config!r} is not in the installed sam2 package (looked for sam2/{name}); "
            f"use one of: {', '.join(shipped)}"
        )
    return name


def _suggest(sd: dict) -> str:
    """What the keys say the checkpoint is, as advice on --tool / --config."""
    keys = list(sd)
    if any(k.startswith("image_encoder.blocks.") for k in keys):
        return (
            "It looks like a SAM v1 / MedSAM checkpoint: use --tool sam or --tool medsam (--config vit_b|vit_l|vit_h)."
        )
    patch = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is not None:
        blocks = {int(k.split(".")[3]) for k in keys if k.startswith("image_encoder.trunk.blocks.")}
        size = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}.get((patch.shape[0], len(blocks)))
        if size:
            return f"Its image encoder matches --config sam2.1_hiera_{size} (MedSAM2 weights: --tool medsam2)."
    return "Check --tool (sam2, medsam2, sam, medsam) and --config against the file."
