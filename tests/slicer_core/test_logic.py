"""The module's Logic and self-test on slicer-core, case by case: points near the session slice, a name match whose
size differs, segment reads that fail, the parameter node <-> Logic arguments the Widget relies on, the clicks shown
as markups, undo, and IBISAgentTest (the module's own self-test) run headless against the real server."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from tests.slicer_core.harness import add_transform, geometries, segment_world_points, to_world, vtk_array


def ijk_to_world(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return to_world(volume) @ vtk_array(m)


def world_of(volume, ijk) -> np.ndarray:
    return (ijk_to_world(volume) @ [*ijk, 1.0])[:3]


@pytest.fixture
def ct_volume(scene, ct):
    """The CT crop as a right-handed volume under a rigid transform; its lesion click voxel (i, j, k)."""
    volume = slicer.util.addVolumeFromArray(ct["imgs"], ijkToRAS=geometries(ct["spacing"])["oblique"], name="ct")
    m = np.eye(4)
    m[:3, 3] = (3.0, -4.0, 7.5)
    volume.SetAndObserveTransformNodeID(add_transform("registration", m).GetID())
    return volume, tuple(ct["click"][::-1])


def test_a_point_on_the_neighbouring_slice_is_refused(ibisagent_module, ct_volume):
    volume, (i, j, k) = ct_volume
    logic = ibisagent_module.IBISAgentLogic("http://127.0.0.1:9")
    assert logic.pointsToIjk([world_of(volume, (i, j, k + 0.4))], volume, 2, k) == [[i, j, k]]
    for off in (1.0, -1.0, 0.6):  # the centre of slice k +- 1, and a point in the next slice's voxel
        with pytest.raises(ValueError, match="place points on that slice"):
            logic.pointsToIjk([world_of(volume, (i, j, k + off))], volume, 2, k)


def test_a_name_match_of_another_size_is_uploaded_before_the_server_runs(ibisagent_module, scene, server, ct):
    """A volume named like the study `ct-ras` but cropped: the server's geometry differs, so the Logic uploads the
    volume instead of running on the study and finding the size mismatch in the answer."""
    g = geometries(ct["spacing"])["rh"]
    volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(ct["imgs"][:, :, :-7]), ijkToRAS=g, name="ct-ras")
    (i, j, k) = ct["click"][::-1]
    logic = ibisagent_module.IBISAgentLogic(server["url"])
    logic.run(volume, k, 2, "segment the lesion", positiveRas=[world_of(volume, (i, j, k))], runAgent=False)
    assert logic.session.imageId.startswith("slicer-ct-ras-")
    assert logic.session.trajectory.image_size == (volume.GetImageData().GetDimensions()[1], ct["imgs"].shape[2] - 7)


def _segment_with_two_slices(volume, axis_k):
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentId = segmentation.GetSegmentation().AddEmptySegment("", "lesion")
    labelmap = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    labelmap[axis_k - 2, 10:20, 10:20] = 1
    labelmap[axis_k + 2, 30:40, 30:40] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(labelmap, segmentation, segmentId, volume)
    return segmentation, segmentId


@pytest.mark.parametrize("fault", ["read error", "shape mismatch"])
def test_an_unreadable_segment_is_not_taken_for_empty(ibisagent_module, server, ct_volume, monkeypatch, fault):
    """Fault injection into Slicer's segment export (the real function, made to fail or to answer another shape): the
    accept must raise and leave the segment's other slices as they were, not write one slice over an 'empty' read."""
    volume, (i, j, k) = ct_volume
    segmentation, segmentId = _segment_with_two_slices(volume, k)
    before = segment_world_points(segmentation, segmentId)
    logic = ibisagent_module.IBISAgentLogic(server["url"])
    logic.run(volume, k, 2, "segment the lesion", segmentation, segmentId, 1, positiveRas=[world_of(volume, (i, j, k))])
    real = slicer.util.arrayFromSegmentBinaryLabelmap

    def faulty(*args, **kwargs):
        if fault == "read error":
            raise RuntimeError("Export of segment failed.")
        return real(*args, **kwargs)[:-1]

    monkeypatch.setattr(slicer.util, "arrayFromSegmentBinaryLabelmap", faulty)
    with pytest.raises(ValueError, match="could not be read|reads as"):
        logic.accept(1)
    monkeypatch.undo()
    np.testing.assert_array_equal(segment_world_points(segmentation, segmentId), before)


def test_parameter_node_to_run_and_back(ibisagent_module, server, ct_volume):
    """What the Widget's Run, Continue and Accept compute from the parameter node, without Qt: the Red view's slice,
    the run's arguments, the session stored back (the segmentation Run created), Continue's arguments."""
    volume, (i, j, k) = ct_volume
    logic = ibisagent_module.IBISAgentLogic(server["url"])
    p = logic.getParameterNode()
    logic.setDefaultParameters(p)
    p.SetNodeReferenceID("InputVolume", volume.GetID())
    p.SetParameter("Instruction", "segment the lesion")
    p.SetParameter("MaxSteps", "1")
    red = slicer.vtkMRMLSliceNode()  # the Red slice view's node (Slicer's layout makes it), through the lesion
    red.SetName("Red")
    red.SetLayoutName("Red")
    red.SetSingletonTag("Red")
    slicer.mrmlScene.AddNode(red)
    sliceToRas = ijk_to_world(volume)[:3, :3] / np.linalg.norm(ijk_to_world(volume)[:3, :3], axis=0)
    m = np.eye(4)
    m[:3, :3] = sliceToRas
    m[:3, 3] = world_of(volume, (i, j, k))
    red.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(m))
    red.UpdateMatrices()

    args = logic.runArguments(p)
    assert (args["axis"], args["sliceIndex"], p.GetParameter("SliceIndex")) == (2, k, str(k))
    assert args["volumeNode"] is volume and args["segmentationNode"] is None and args["maxSteps"] == 1
    assert logic.agentAvailable() is True
    positive = logic.markupsNode(logic.ROLE_INPUT_POSITIVE)
    positive.AddControlPointWorld(vtk.vtkVector3d(*world_of(volume, (i, j, k))))
    trajectory = logic.runFromParameterNode(p)  # the point placed first, then the agent (at most MaxSteps = 1)
    assert positive.GetNumberOfControlPoints() == 0
    assert 1 <= trajectory.num_steps <= 2 and logic.session.stopReason
    segmentation = p.GetNodeReference("Segmentation")
    assert segmentation is logic.session.segmentationNode
    assert segmentation.GetParentTransformNode() is volume.GetParentTransformNode()

    # step 1 (the placed point) shows its click as a markup on the clicked voxel's centre, in world space
    logic.showStep(1)
    shown = logic.markupsNode(logic.ROLE_CLICKS_POSITIVE)
    assert shown.GetNumberOfControlPoints() == 1
    position = [0.0, 0.0, 0.0]
    shown.GetNthControlPointPositionWorld(0, position)
    np.testing.assert_allclose(position, world_of(volume, (i, j, k)), atol=1e-4)

    segmentId = logic.accept(1)
    logic.storeSession(p)
    assert p.GetParameter("SegmentId") == segmentId
    assert logic.runArguments(p)["segmentationNode"] is segmentation
    p.SetParameter("AgentContinues", "false")
    assert logic.continueArguments(p, undoTo=0) == {"maxSteps": 1, "undoTo": 0, "runAgent": False}
    p.SetParameter("AgentContinues", "true")
    assert logic.continueArguments(p)["runAgent"] is None

    # a second point on the same slice, applied by the tool alone; then Undo accept removes the segment it created
    p.SetParameter("AgentContinues", "false")
    negative = world_of(volume, (i + 30, j, k))
    logic.continueSession(positiveRas=[], negativeRas=[negative], **logic.continueArguments(p))
    assert logic.session.trajectory.num_steps == trajectory.num_steps + 1
    assert logic.undoAccept() and segmentation.GetSegmentation().GetSegment(segmentId) is None


def test_self_test_headless(ibisagent_module, scene, server, monkeypatch):
    """IBISAgentTest, the module's self-test, as Slicer's Reload and Test runs it, against the real server."""
    monkeypatch.setenv("IBISAGENT_SERVER", server["url"])
    ibisagent_module.IBISAgentTest().runTest()
