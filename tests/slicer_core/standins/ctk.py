"""Import-only stand-in for Slicer's `ctk` (no Qt in slicer-core); any use raises."""


def __getattr__(name):
    raise RuntimeError(f"ctk.{name} was used, but these tests run on slicer-core without Qt: only the Widget needs ctk")
