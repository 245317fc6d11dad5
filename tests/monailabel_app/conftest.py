"""The hardening tests' server (`attack.py`), started once for the test_hardening_* modules that use it."""

from tests.monailabel_app.attack import attack  # noqa: F401
