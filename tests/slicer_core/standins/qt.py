"""Import-only stand-in for Slicer's `qt` (PythonQt), which slicer-core does not ship: the module imports it at the top,
the Logic never uses it. Any use raises, so a test cannot pass by talking to a Qt that is not there."""


def __getattr__(name):
    raise RuntimeError(f"qt.{name} was used, but these tests run on slicer-core without Qt: only the Widget needs Qt")
