"""Shared test fixtures. The torchvision fallback runs first, as in every entry point of the project."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    from ibisagent._compat import ensure_torchvision

    ensure_torchvision()
except ImportError:  # the core tests run without torch
    pass

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = SHARED_DATA / "biomedparse-demo" / "biomedparse_datasets" / "BiomedParseData-Demo"
RECIST = SHARED_DATA / "medsam2-recist-npz"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared demo data not found at {DEMO}")


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    if not DEMO.is_dir():
        pytest.skip(f"shared demo data not found at {DEMO}")
    return DEMO


class FakeTool:
    """A deterministic stand-in for loop tests: each positive click paints a disk, each negative click erases one.
    The 'logits' are the mask as +-1 floats at full resolution."""

    name = "fake"

    def __init__(self, radius: int = 8):
        self.radius = radius
        self.encode_count = 0
        self.shape = None

    def set_image(self, image):
        self.shape = image.shape[:2]
        self.encode_count += 1

    def mask_to_logits(self, mask):
        return np.where(mask, 1.0, -1.0).astype(np.float32)

    def predict(self, clicks, prev_logits=None):
        from ibisagent.tools.base import ToolOutput

        h, w = self.shape
        yy, xx = np.ogrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for c in clicks:
            disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= self.radius**2
            mask = mask | disk if c.positive else mask & ~disk
        return ToolOutput(mask, np.where(mask, 1.0, -1.0).astype(np.float32), 1.0)


@pytest.fixture
def fake_tool() -> FakeTool:
    return FakeTool()
