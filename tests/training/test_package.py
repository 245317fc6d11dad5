"""The training package's shape: every module imports without torch, transformers, trl or MONAI (they load when a
trainer or dataset runs), and each imports on its own, in a fresh interpreter (no import cycle, no hidden order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[2] / "training"  # installed as ibisagent_training
MODULES = sorted(
    ".".join(("ibisagent_training", *p.relative_to(TRAINING).with_suffix("").parts))
    for p in TRAINING.rglob("*.py")
    if p.name not in ("__init__.py", "__main__.py")
)
HEAVY = ("torch", "transformers", "trl", "accelerate", "monai")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_and_light(module):
    probe = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()} at import"


def test_the_chat_format_and_the_policy_module_import_without_torch():
    probe = "import sys, ibisagent, ibisagent.chat, ibisagent.policies.hf_vlm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
