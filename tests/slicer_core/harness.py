"""The harness of the slicer-core suite: the Slicer module (slicer_module/IBISAgent/IBISAgent.py, imported unchanged)
runs on slicer-core, Slicer's own MRML scene, nodes, module logics and slicer.util, without Qt. Run in .venv-slicer
(`bash scripts/test.sh slicer`).

Stand-ins only where slicer-core has no counterpart, each raising on use rather than pretending: import-only `qt` and
`ctk` (standins/), `slicer.ScriptedLoadableModule` base classes (standins/ScriptedLoadableModule.py), `slicer.app`
without a main window, and `slicer.modules` as a registry of the real module logics (Volumes, Segmentations, Markups,
Colors) on a real scene with the real application logic. The server is the real one, started from the project
environment (.venv) as a subprocess."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import slicer
import vtk

REPO = Path(__file__).resolve().parents[2]

_scripted = importlib.import_module("ScriptedLoadableModule")  # standins/: Slicer's Base/Python, not in slicer-core
sys.modules["slicer.ScriptedLoadableModule"] = _scripted
slicer.ScriptedLoadableModule = _scripted


class _HeadlessApp:
    """`slicer.app` of a Slicer started without a main window, in testing mode; anything else it offers (IO manager,
    layout, settings, ...) is Qt and raises here."""

    class _Options:
        noMainWindow = True

    def commandOptions(self):
        return self._Options()

    def testingEnabled(self):
        return True

    def __getattr__(self, name):
        raise RuntimeError(f"slicer.app.{name} is Qt application code, not in slicer-core; these tests run headless")


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    """`slicer.modules`: the module logics registered on the application logic; other modules raise."""

    def __init__(self, logics: dict):
        for name, logic in logics.items():
            setattr(self, name, _Module(logic))

    def __getattr__(self, name):
        raise AttributeError(f"slicer.modules.{name} is not available on slicer-core (no Qt module of that name)")


_alive: list = []


def new_scene():
    """A real MRML scene with the application logic and the module logics the module uses, set as slicer.mrmlScene."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colors = appLogic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    appLogic.SetModuleLogic("Colors", colors)
    appLogic.SetSliceLogics(vtk.vtkCollection())
    appLogic.SetViewLogics(vtk.vtkCollection())
    logics = {"colors": colors}
    for name, cls in (
        ("volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("markups", slicer.vtkSlicerMarkupsLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name.capitalize(), logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.app = _HeadlessApp()
    slicer.modules = _Modules(logics)
    _alive[:] = [scene, appLogic, logics]  # the logics live as long as the scene in use
    return scene


SHARED_DATA = REPO.parent / "shared" / "data"
RECIST = SHARED_DATA / "medsam2-recist-npz"
ROWS, COLS = slice(220, 316), slice(230, 360)  # a 96 x 130 crop with the lesion off its diagonal


def erode(mask):
    """One 6-neighbour binary erosion (numpy only: .venv-slicer has no scipy)."""
    out = mask.copy()
    for axis in range(mask.ndim):
        for shift in (1, -1):
            rolled = np.roll(mask, shift, axis=axis)
            edge = [slice(None)] * mask.ndim
            edge[axis] = 0 if shift == 1 else -1
            rolled[tuple(edge)] = False
            out &= rolled
    return out


def geometries(spacing):
    """IJK -> RAS of the three volume kinds of the matrix: right-handed axis-aligned, left-handed (LAS), oblique."""
    sx, sy, sz = spacing
    rh = np.diag([-sx, -sy, sz, 1.0])
    rh[:3, 3] = (20.0, 15.0, -30.0)
    lh = np.diag([-sx, sy, sz, 1.0])
    lh[:3, 3] = (20.0, -15.0, -30.0)
    a, b = np.radians(25.0), np.radians(12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rz @ rx @ np.diag([sx, sy, sz])
    oblique[:3, 3] = (-10.0, 5.0, 40.0)
    return {"rh": rh, "lh": lh, "oblique": oblique}


def vtk_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def to_world(node) -> np.ndarray:
    """The node's parent transforms to world, from Slicer (identity when it has none)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return vtk_array(m)


def homogeneous(points) -> np.ndarray:
    points = np.asarray(points, float).reshape(-1, 3)
    return np.c_[points, np.ones(len(points))]


def segment_world_points(segmentation, segment_id) -> np.ndarray:
    """World RAS of the centres of the segment's voxels, as Slicer exports the segment (its own geometry)."""
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation, ids, labelmap)
    kji = np.argwhere(slicer.util.arrayFromVolume(labelmap) > 0)
    m = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(m)
    world = to_world(labelmap) @ vtk_array(m)
    slicer.mrmlScene.RemoveNode(labelmap)
    return (world @ homogeneous(kji[:, ::-1]).T).T[:, :3]


def add_transform(name, matrix):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node
