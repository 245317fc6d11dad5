"""SAM v1 and MedSAM as click tools via `segment_anything`: `SamPredictor` holds the image embedding computed once
in `set_image`; every click re-runs only the prompt encoder and mask decoder, fed with the previous logits."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.tools._weights import load_weights, read_state_dict, seeded_init
from ibisagent.tools.base import SegmentationTool, ToolError, ToolOutput
from ibisagent.types import Click

logger = logging.getLogger(__name__)

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
_DEPTH_TO_TYPE = {12: "vit_b", 24: "vit_l", 32: "vit_h"}


class SAMTool(SegmentationTool):
    """SAM v1 (`name` "sam") or MedSAM (`name` "medsam", ViT-B weights fine-tuned on medical images).

    Logits are the decoder's 256x256 low-resolution output, which `segment_anything` accepts back as mask input.

    SAM preprocessing is `SamPredictor.set_image`: longest side resized to 1024, zero-padded, ImageNet-normalised.
    MedSAM follows its reference inference (bowang-lab/MedSAM, MedSAM_Inference.py) instead: the image is resized
    to 1024x1024 regardless of aspect (bicubic, anti-aliased, back to uint8), min-max normalised to [0, 1] and fed
    to the image encoder directly, without SAM's pixel mean/std or padding; clicks scale by 1024/W and 1024/H and
    the logits map back to HxW by plain resizing. (The reference thresholds resized sigmoid probabilities at 0.5;
    here resized logits are thresholded at 0, which differs only at sub-pixel boundaries.)

    Mask choice: SAM: a lone first click without previous logits takes the best-scoring of the three multimask
    outputs; later calls take the single-mask output, the only one SAM was trained to return for more than one
    prompt. MedSAM was fine-tuned with the single-mask output only, so it always uses it. `always_multimask=True`
    reproduces the released IBISAgent tool (argmax of the multimask outputs on every call) for either.
    """

    name = "sam"

    def __init__(self, model, medsam: bool = False, always_multimask: bool = False) -> None:
        """model: a built `segment_anything.modeling.Sam` (see `from_checkpoint`), on the device it should run on."""
        super().__init__()
        ensure_torchvision()
        from segment_anything import SamPredictor

        self.name = "medsam" if medsam else "sam"
        self.model = model
        self.medsam = medsam
        self.always_multimask = always_multimask
        self.predictor = SamPredictor(model)
        self.low_res_shape: tuple[int, int] = tuple(model.prompt_encoder.mask_input_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | None,
        model_type: str = "vit_b",
        medsam: bool = False,
        device: str = "cpu",
        always_multimask: bool = False,
    ) -> SAMTool:
        """Build a SAM of `model_type` ("vit_b" | "vit_l" | "vit_h"; MedSAM is "vit_b") and load weights.

        checkpoint: a `.pth` state dict, bare (Meta's sam_vit_*.pth, medsam_vit_b.pth) or under "model" (MedSAM
                    training checkpoints). None: random weights, for tests only.
        """
        if importlib.util.find_spec("segment_anything") is None:
            raise ToolError(
                "the sam and medsam tools need the `segment_anything` package: pip install 'ibisagent[sam]'"
            )
        ensure_torchvision()
        if model_type not in MODEL_TYPES:
            raise ToolError(
                f"unknown SAM model type {model_type!r} (--config); choose one of: {', '.join(MODEL_TYPES)}"
            )
        tool_name = "medsam" if medsam else "sam"
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ToolError(
                f"{tool_name} checkpoint {checkpoint!r} does not exist; pass the path of a .pth file "
                "(e.g. sam_vit_b_01ec64.pth, or medsam_vit_b.pth with --tool medsam)"
            )
        import torch
        from segment_anything import sam_model_registry

        with seeded_init(torch):
            model = sam_model_registry[model_type](checkpoint=None)
        if checkpoint is None:
            logger.warning(
                "%s: no checkpoint given, using RANDOM weights (%s); this is for tests only", tool_name, model_type
            )
        else:
            load_weights(
                model,
                read_state_dict(checkpoint, torch, "SAM"),
                f"{checkpoint!r} does not match {tool_name} {model_type}",
                _suggest,
            )
        model = model.to(device).eval()
        return cls(model, medsam=medsam, always_multimask=always_multimask)

    def empty_logits(self) -> np.ndarray:
        """'Nothing segmented' in SAM's 256x256 low-resolution frame."""
        return np.full(self.low_res_shape, -20.0, np.float32)

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """An HxW bool mask as `prev_logits` in SAM's 256x256 frame, +-10 inside/outside. SAM's frame is the
        padded 1024 px input: the image fills the top-left part, scaled by its longest side, and the padding is
        outside. MedSAM stretches the image over the whole frame."""
        from PIL import Image

        mask = np.asarray(mask, bool)
        size = self.low_res_shape[0]
        if self.medsam:
            h, w = size, size
        else:
            h, w = self.predictor.transform.get_preprocess_shape(mask.shape[0], mask.shape[1], size)
        small = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BILINEAR), np.float32)
        logits = np.full(self.low_res_shape, -10.0, np.float32)
        logits[:h, :w] = (small - 0.5) * 20.0
        return logits

    def _encode(self, image: np.ndarray) -> None:
        import torch

        with torch.inference_mode():
            if not self.medsam:
                self.predictor.set_image(image, image_format="RGB")
                return
            size = self.model.image_encoder.img_size
            x = torch.as_tensor(_medsam_preprocess(image, size), device=self.predictor.device)
            features = self.model.image_encoder(x.permute(2, 0, 1)[None])
            # SamPredictor's own state, so that predict_torch's postprocessing maps (1024, 1024) -> (H, W) unpadded.
            self.predictor.reset_image()
            self.predictor.features = features
            self.predictor.original_size = image.shape[:2]
            self.predictor.input_size = (size, size)
            self.predictor.is_image_set = True

    def _predict(self, clicks: list[Click], prev_logits: np.ndarray | None) -> ToolOutput:
        import torch

        h, w = self.image_shape
        # Click (x, y) pixels -> the model's 1024 px input frame; SAM adds the half-pixel offset itself.
        coords = np.array([[c.x, c.y] for c in clicks], np.float64)
        if self.medsam:
            size = self.model.image_encoder.img_size
            coords = coords * np.array([size / w, size / h])
        else:
            coords = self.predictor.transform.apply_coords(coords, (h, w))
        device = self.predictor.device
        coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)[None]
        labels_t = torch.tensor([[1 if c.positive else 0 for c in clicks]], dtype=torch.int, device=device)
        mask_t = None
        if prev_logits is not None:
            prev = np.asarray(prev_logits, np.float32)
            if prev.shape != self.low_res_shape:
                raise ToolError(
                    f"{self.name}: prev_logits has shape {prev.shape}, expected {self.low_res_shape} "
                    "(pass back the logits this tool returned, or None)"
                )
            mask_t = torch.as_tensor(prev, device=device)[None, None]
        first_click = len(clicks) == 1 and prev_logits is None
        multimask = self.always_multimask or (first_click and not self.medsam)
        with torch.inference_mode():
            masks, scores, low_res = self.predictor.predict_torch(
                coords_t, labels_t, mask_input=mask_t, multimask_output=multimask
            )
        best = int(torch.argmax(scores[0]))
        return ToolOutput(
            mask=masks[0, best].cpu().numpy().astype(bool),
            logits=low_res[0, best].float().cpu().numpy(),
            score=float(scores[0, best]),
        )


def _medsam_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 float32 in [0, 1], exactly as MedSAM's reference inference prepares it."""
    from skimage import transform

    resized = transform.resize(image, (size, size), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    lo, hi = resized.min(), resized.max()
    return ((resized - lo) / np.clip(hi - lo, 1e-8, None)).astype(np.float32)


def _suggest(sd: dict) -> str:
    """What the keys say the checkpoint is, as advice on --tool / --config."""
    keys = list(sd)
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        return "It looks like a SAM 2 / MedSAM2 checkpoint: use --tool sam2 or --tool medsam2."
    blocks = {int(k.split(".")[2]) for k in keys if k.startswith("image_encoder.blocks.")}
    if len(blocks) in _DEPTH_TO_TYPE:
        return f"Its image encoder has {len(blocks)} blocks: use --config {_DEPTH_TO_TYPE[len(blocks)]}."
    return "Check --tool (sam, medsam, sam2, medsam2) and --config (vit_b, vit_l, vit_h) against the file."
