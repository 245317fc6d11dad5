"""Makes the Slicer module's Qt-free library importable as Slicer does: slicer_module/IBISAgent is on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_module" / "IBISAgent"
LIB_DIR = MODULE_DIR / "IBISAgentLib"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
