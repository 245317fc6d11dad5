"""Make `import torchvision` work on a CPU-only torch whose torchvision `_C.so` cannot load (it links CUDA libraries):
define the `torchvision::nms`/`qnms` operators in pure torch before torchvision is first imported."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_done = False
_lib = None  # the torch.library.Library that owns our operator definitions; must stay referenced


def ensure_torchvision() -> None:
    """Call before torchvision is first imported (every entry point does). Idempotent; a no-op where torch or
    torchvision is missing, or where torchvision's compiled ops load (matching GPU builds)."""
    global _done
    if _done:
        return
    _done = True
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if _native_ops_load(torch):
        return
    if not hasattr(torch.ops.torchvision, "nms"):  # someone (an earlier copy of this fallback) may have defined it
        _define_ops(torch)
    import torchvision.ops.boxes

    # torchvision gates nms on `_has_ops()`, which is False without `_C.so`. Lift the gate for nms only: flipping
    # `_has_ops` itself would make roi_align skip its pure-python fallback and call an operator that does not exist.
    if not torchvision.extension._has_ops():
        torchvision.ops.boxes._assert_has_ops = _nms_ops_available


def _native_ops_load(torch) -> bool:
    """True when torchvision's own compiled operators are (or can be) loaded."""
    if "torchvision" in sys.modules and sys.modules["torchvision"].extension._has_ops():
        return True
    origin = importlib.util.find_spec("torchvision").origin  # finding a top-level package does not import it
    for path in glob.glob(os.path.join(os.path.dirname(origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            pass
    return False


def _define_ops(torch) -> None:
    global _lib
    # The schemas of torchvision's C++ registrations (torchvision/csrc/ops/nms.cpp); its _meta_registrations.py
    # adds the fake (meta) kernels on import and fails if these operators do not exist.
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.impl("nms", _nms, "CPU")
    # torchvision passes `int_repr()` tensors to qnms; IoU and score order are invariant to the affine
    # quantisation, so float nms on the integer representation gives the same kept indices.
    _lib.impl("qnms", lambda dets, scores, thr: _nms(dets.float(), scores.float(), thr), "CPU")


def _nms_ops_available() -> None:
    """Replacement for torchvision.ops.boxes._assert_has_ops: nms and qnms are defined by this module."""


def _nms(dets, scores, iou_threshold: float):
    """Greedy NMS as torchvision's CPU kernel does it: boxes (x1, y1, x2, y2) Nx4, scores N; keeps a box unless a
    higher-scoring kept box overlaps it with IoU > iou_threshold. Returns int64 indices in decreasing score order."""
    import torch

    if dets.dim() != 2 or dets.size(1) != 4:
        raise RuntimeError(f"boxes should be an Nx4 tensor, got shape {tuple(dets.shape)}")
    if scores.dim() != 1 or scores.size(0) != dets.size(0):
        raise RuntimeError(f"scores should have shape ({dets.size(0)},), got {tuple(scores.shape)}")
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = dets[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    n = boxes.size(0)
    suppressed = torch.zeros(n, dtype=torch.bool)
    suppressed_list = suppressed.numpy()  # a view: python-level reads without per-element tensor overhead
    keep = []
    for i in range(n):
        if suppressed_list[i]:
            continue
        keep.append(i)
        if i + 1 == n:
            break
        w = (torch.minimum(x2[i], x2[i + 1 :]) - torch.maximum(x1[i], x1[i + 1 :])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[i + 1 :]) - torch.maximum(y1[i], y1[i + 1 :])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[i + 1 :] - inter)
        suppressed[i + 1 :] |= (iou > iou_threshold).cpu()
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
