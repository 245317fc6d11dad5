"""The torchvision fallback: after `ensure_torchvision()`, `torchvision.ops.nms` agrees with a brute-force NMS."""

from __future__ import annotations

import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the fallback only matters with torch installed")
torchvision = pytest.importorskip("torchvision", reason="the fallback only matters with torchvision installed")


def _brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Visit boxes by decreasing score; keep one unless a kept box overlaps it with IoU > threshold."""
    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if all(_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ax1, ay1, ax2, ay2 = a.tolist()
    bx1, by1, bx2, by2 = b.tolist()
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_nms_matches_brute_force(threshold):
    g = torch.Generator().manual_seed(int(threshold * 10))
    corners = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([corners, corners + 1 + torch.rand(200, 2, generator=g) * 30], dim=1)
    scores = torch.rand(200, generator=g)
    keep = torchvision.ops.nms(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert keep.tolist() == _brute_force_nms(boxes, scores, threshold)


def test_nms_edge_cases_and_batched_nms():
    empty = torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    # the same two overlapping boxes in different categories both survive
    assert torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]


def test_ensure_torchvision_twice_is_harmless():
    ensure_torchvision()
    ensure_torchvision()
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.1, 0.9]), 0.5).tolist() == [1]
    from torchvision.transforms import Normalize, Resize  # what sam2 and segment_anything import

    assert Resize((4, 4))(torch.zeros(3, 8, 8)).shape == (3, 4, 4)
    assert Normalize([0.5] * 3, [0.5] * 3)(torch.zeros(3, 2, 2)).min() == -1
