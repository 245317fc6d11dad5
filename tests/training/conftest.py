"""Small BiomedParse-format folders cut from the shared demo (downscaled, written to tmp) for fast data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibisagent.datasets import list_biomedparse
from tests.conftest import DEMO

# Three images with several targets each: user-inconsistency variants need a second structure.
DEMO_IMAGES = ("06_CT_abdomen", "08_MRI_heart", "16_X-Ray_chest")


def write_small_demo(out: Path, size: int = 192, images: tuple[str, ...] = DEMO_IMAGES, split: str = "train") -> Path:
    """Copy the demo's masks of `images` into `out/<split>`, `out/<split>_mask`, scaled to `size` px; returns out."""
    (out / split).mkdir(parents=True)
    (out / f"{split}_mask").mkdir()
    for s in list_biomedparse(DEMO):
        stem = s.image.stem
        if stem not in images:
            continue
        img_path = out / split / f"{stem}.png"
        if not img_path.exists():
            Image.open(s.image).convert("RGB").resize((size, size), Image.BILINEAR).save(img_path)
        m = np.asarray(Image.open(s.mask).convert("L").resize((size, size), Image.NEAREST)) > 0
        if m.sum() >= 30:
            Image.fromarray(m.astype(np.uint8) * 255).save(out / f"{split}_mask" / s.mask.name)
    return out


@pytest.fixture
def small_demo(tmp_path):
    return write_small_demo(tmp_path / "Demo")
