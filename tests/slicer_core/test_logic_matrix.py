"""The module's Logic on Slicer's own libraries against the real server, over the matrix of issue #19: slice axis x
volume geometry (right-handed, left-handed, oblique) x where the server's image comes from (uploaded, a name-matched
right-handed study, a name-matched LAS study) x frames (no transform; the volume under a linear transform with the
segmentation created by Run, under the same, another or no transform).

Every result is checked against references that use none of the module's geometry code: the segment is read back by
Slicer (exported by the Segmentations logic, placed in world space by Slicer's matrices and transforms); the server's
mask is placed by physical position from the geometry the server reports; both must lie on the CT's slice through the
clicked lesion voxel and overlap the RECIST ground-truth lesion there; a transposed mask, checked the same way, must
fail."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import numpy as np
import pytest
import slicer
import vtk

from tests.slicer_core.harness import (
    add_transform,
    geometries,
    homogeneous,
    segment_world_points,
    to_world,
    vtk_array,
)

AXES = (0, 1, 2)
GEOMETRIES = ("rh", "lh", "oblique")
SOURCES = ("uploaded", "named-ras", "named-las")
FRAMES = ("plain", "plain-chosen", "moved", "moved-same", "moved-same-late", "moved-other", "moved-none")
REFUSED = {
    "moved-other": "not in the frame of volume",
    "moved-none": "not in the frame of volume",
    "moved-same-late": "another voxel grid",
}
MIN_DICE = 0.5  # the classical tool from one click against the RECIST lesion, on the slice through that click


def server_geometry(url, image_id) -> dict:
    """The geometry the server reports for an image (GET /datastore/image/info), read without the module's client."""
    query = urllib.parse.urlencode({"image": image_id})
    with urllib.request.urlopen(f"{url}/datastore/image/info?{query}", timeout=30) as response:
        return json.loads(response.read())["geometry"]


def server_mask_world_points(mask, geometry, axis, slice_index, volume_to_world) -> np.ndarray:
    """World RAS of the server's slice mask placed by physical position: pixel (x, y) of slice s along IJK `axis` of
    the server's image is voxel x, y on the remaining axes in order, through the affine the server reports."""
    rows, cols = np.nonzero(mask)
    remaining = [a for a in range(3) if a != axis]
    ijk = np.zeros((len(rows), 3))
    ijk[:, axis] = slice_index
    ijk[:, remaining[0]], ijk[:, remaining[1]] = cols, rows
    return (volume_to_world @ np.asarray(geometry["affine"], float) @ homogeneous(ijk).T).T[:, :3]


def ct_voxels(points_world, world_from_ct) -> set:
    """The CT crop's voxel indices (i, j, k) at these world points, which must be voxel centres."""
    ijk = (np.linalg.inv(world_from_ct) @ homogeneous(points_world).T).T[:, :3]
    index = np.round(ijk).astype(int)
    assert np.allclose(ijk, index, atol=0.02), "the points are not the CT's voxel centres"
    return set(map(tuple, index))


def reference_check(points_world, world_from_ct, ct, axis) -> float:
    """Map world points into the CT crop's own voxel grid (the test's matrices): they must be voxel centres on the
    crop's slice through the clicked voxel along `axis`; returns the Dice with the ground-truth lesion there.
    Raises AssertionError otherwise."""
    ijk = (np.linalg.inv(world_from_ct) @ homogeneous(points_world).T).T[:, :3]
    index = np.round(ijk).astype(int)
    assert len(index) and np.allclose(ijk, index, atol=0.02), "the mask's voxels are not the CT's voxel centres"
    click_ijk = ct["click"][::-1]
    assert np.all(index[:, axis] == click_ijk[axis]), (
        f"mask on CT slices {sorted(set(index[:, axis]))} along axis {axis}, the clicked lesion is on {click_ijk[axis]}"
    )
    dims = ct["gts"].shape[::-1]
    assert np.all((index >= 0) & (index < dims)), "mask voxels outside the CT"
    gt = ct["gts"][index[:, 2], index[:, 1], index[:, 0]]
    gt_plane = np.take(ct["gts"], click_ijk[axis], axis=2 - axis)
    dice = 2.0 * gt.sum() / (len(index) + gt_plane.sum())
    assert dice >= MIN_DICE, f"Dice {dice:.2f} with the ground-truth lesion on that slice"
    return dice


def transposed(mask) -> np.ndarray:
    """The mask transposed within its slice (cropped to the slice's shape): what a swapped x/y would write."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    t = mask.T[:h, :w]
    out[: t.shape[0], : t.shape[1]] = t
    return out


def make_volume(ct, server, geometry_name, source):
    """(volume node, its IJK -> RAS as the CT crop's reference, expected image id or None for an upload)."""
    g = geometries(ct["spacing"])
    if source == "named-ras" and geometry_name == "rh":  # the study itself, read by Slicer's NIfTI reader
        return slicer.modules.volumes.logic().AddArchetypeVolume(
            str(server["studies"] / "ct-ras.nii.gz"), "ct-ras"
        ), "ct-ras"
    if source == "named-las" and geometry_name == "lh":  # Slicer reverses k of this left-handed file; nibabel does not
        return slicer.modules.volumes.logic().AddArchetypeVolume(
            str(server["studies"] / "ct-las.nii.gz"), "ct-las"
        ), None
    # the CT's voxels in another geometry than the study of its name (a wrong match), or a volume of its own
    name = {"uploaded": f"local-{geometry_name}", "named-ras": "ct-ras", "named-las": "ct-las"}[source]
    return slicer.util.addVolumeFromArray(ct["imgs"], ijkToRAS=g[geometry_name], name=name), None


def moved():
    """A registration-like rigid transform: 15 degrees about S, then a shift."""
    a = np.radians(15.0)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = (6.0, -9.0, 12.5)
    return m


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("geometry_name", GEOMETRIES)
@pytest.mark.parametrize("axis", AXES)
def test_click_lands_on_the_lesion(scene, ibisagent_module, server, ct, axis, geometry_name, source, frame):
    volume, expected_id = make_volume(ct, server, geometry_name, source)
    g = geometries(ct["spacing"])[geometry_name]
    ijk_to_ras_slicer = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras_slicer)
    if frame.startswith("moved"):
        volume.SetAndObserveTransformNodeID(add_transform("registration", moved()).GetID())
    segmentation = None
    if frame in ("plain-chosen", "moved-same", "moved-same-late", "moved-other", "moved-none"):
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
        segmentation.CreateDefaultDisplayNodes()
        if frame == "moved-same":
            segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        elif frame == "moved-other":
            segmentation.SetAndObserveTransformNodeID(add_transform("other", np.eye(4) + np.eye(4, k=3) * 4).GetID())
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if frame == "moved-same-late":  # put under the volume's transform after its geometry was set
            segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    world_from_ct = to_world(volume) @ g
    click_world = (world_from_ct @ [*ct["click"][::-1], 1.0])[:3]
    # the session slice: where Slicer's own matrices put the clicked point in the volume's IJK
    ijk = np.linalg.inv(to_world(volume) @ vtk_array(ijk_to_ras_slicer)) @ [*click_world, 1.0]
    slice_index = int(round(ijk[axis]))

    logic = ibisagent_module.IBISAgentLogic(server["url"])
    run = dict(maxSteps=1, positiveRas=[click_world], runAgent=False)
    if frame in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[frame]):
            logic.run(volume, slice_index, axis, "segment the lesion", segmentation, "", **run)
        assert logic.session is None and segmentation.GetSegmentation().GetNumberOfSegments() == 0
        return

    logic.run(volume, slice_index, axis, "segment the lesion", segmentation, "", **run)
    session = logic.session
    logic.accept(1)
    points = segment_world_points(session.segmentationNode, session.segmentId)

    # the server's own mask, placed by the geometry it reports, is exactly the segment Slicer holds
    result = session.result
    geometry = server_geometry(server["url"], session.imageId)
    server_points = server_mask_world_points(
        session.trajectory.final_mask, geometry, result["axis"], result["slice"], to_world(volume)
    )
    assert len(points) == len(server_points) > 0
    assert ct_voxels(points, world_from_ct) == ct_voxels(server_points, world_from_ct)
    reference_check(points, world_from_ct, ct, axis)  # on the clicked lesion's slice, overlapping the lesion

    # control: the same checks fail for the mask transposed in its slice
    swapped = server_mask_world_points(
        transposed(session.trajectory.final_mask), geometry, result["axis"], result["slice"], to_world(volume)
    )
    with pytest.raises(AssertionError):
        reference_check(swapped, world_from_ct, ct, axis)

    # a second accept of the same step reads the segment back and writes it again: nothing moves
    logic.accept(1)
    np.testing.assert_allclose(segment_world_points(session.segmentationNode, session.segmentId), points, atol=1e-6)
    assert session.segmentationNode.GetParentTransformNode() is volume.GetParentTransformNode()
    if expected_id:
        assert session.imageId == expected_id
    else:  # a name match whose geometry differs from the volume's is not trusted: the volume is uploaded
        assert session.imageId.startswith("slicer-"), session.imageId
