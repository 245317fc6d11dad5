"""The segmentation-tool protocol, in sam2's stateful-predictor shape: set the image once, predict many times.

Every tool turns *all* clicks so far for one target, plus that target's previous low-resolution logits, into a
new mask. Tools are built by name through `ibisagent.tools.build_tool`; heavy imports stay inside each adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ibisagent.types import Click


class ToolError(RuntimeError):
    """A segmentation tool was misused or misconfigured; the message says what to do."""


@dataclass
class ToolOutput:
    """One prediction.

    mask:   HxW bool, in the frame of the image given to `set_image`.
    logits: float32 low-resolution logits (tool-specific shape, e.g. 256x256 for SAM-family tools) that the same
            tool accepts back as `prev_logits` on the next call; > 0 means foreground.
    score:  the tool's own confidence for this mask (predicted IoU for SAM-family tools), not a ground-truth metric.
    """

    mask: np.ndarray
    logits: np.ndarray
    score: float = 1.0


class SegmentationTool:
    """Base class: tracks the current image and validates inputs; subclasses implement `_encode` and `_predict`."""

    name = "base"

    def __init__(self) -> None:
        self._image: np.ndarray | None = None
        self.encode_count = 0  # how many times an image embedding was computed (tests and benchmarks read it)

    # -- public protocol -------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> None:
        """Compute whatever the tool needs per image (the expensive part). image: HxWx3 uint8 RGB or HxW grey."""
        image = as_rgb_uint8(image)
        self._image = image
        self._encode(image)
        self.encode_count += 1

    def predict(self, clicks: Sequence[Click], prev_logits: np.ndarray | None = None) -> ToolOutput:
        """Segment one target from all its clicks so far ((x, y) pixels) and its previous logits (or None)."""
        if self._image is None:
            raise ToolError(f"{self.name}: predict() called before set_image(); set the image first")
        h, w = self._image.shape[:2]
        for c in clicks:
            if not (0 <= c.x < w and 0 <= c.y < h):
                raise ToolError(
                    f"{self.name}: click ({c.x:g}, {c.y:g}) lies outside the {w}x{h} image (x < {w}, y < {h})"
                )
        if not clicks:
            return ToolOutput(np.zeros((h, w), bool), self.empty_logits(), 0.0)
        out = self._predict(list(clicks), prev_logits)
        if out.mask.shape != (h, w):
            raise ToolError(f"{self.name}: produced a mask of shape {out.mask.shape}, expected {(h, w)}")
        return out

    def reset(self) -> None:
        """Forget the current image."""
        self._image = None

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(H, W) of the current image, or None before `set_image`."""
        return None if self._image is None else self._image.shape[:2]

    def empty_logits(self) -> np.ndarray:
        """Logits that mean 'nothing segmented yet' in this tool's low-resolution frame."""
        return np.full((256, 256), -20.0, np.float32)

    def mask_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """An HxW bool mask (e.g. a user's initial mask) as logits this tool accepts as `prev_logits`.

        Default: the mask resized to the 256x256 low-resolution frame (the whole image, stretched, as SAM2 frames
        it), +-10 inside/outside. Tools whose low-resolution frame differs override this.
        """
        from PIL import Image

        m = Image.fromarray(np.asarray(mask, bool).astype(np.float32))
        small = np.asarray(m.resize((256, 256), Image.BILINEAR), np.float32)
        return ((small - 0.5) * 20.0).astype(np.float32)

    # -- for subclasses ---------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, clicks: list[Click], prev_logits: np.ndarray | None) -> ToolOutput:
        raise NotImplementedError


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 array of any numeric dtype -> HxWx3 uint8 (intensity rescaled when not uint8)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ToolError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        image = (
            np.zeros(image.shape, np.uint8) if hi <= lo else ((image - lo) / (hi - lo) * 255).round().astype(np.uint8)
        )
    return np.ascontiguousarray(image)
