"""Slice geometry: how a voxel (i, j, k) of a volume and a pixel (x, y) of one of its 2D slices correspond.

The one rule, for every module that reads, writes or clicks in volume slices (the readers in `ibisagent.io`, the
MONAI Label task, and, as a documented mirror because it cannot import this package, the Slicer library
`IBISAgentLib.geometry`; `tests/test_geometry.py` checks that both agree):

- A volume array is indexed a[i, j, k] (nibabel's `dataobj` order). A slice along `axis` at index s drops that
  axis; the remaining two indices keep their order, the first becomes the column x, the second the row y:
  axis 2: voxel (i, j, s) -> (x, y) = (i, j);  axis 1: (i, s, k) -> (i, k);  axis 0: (s, j, k) -> (j, k).
- So the HxW slice image is `np.take(a, s, axis).T`: H = the size of the second remaining axis, W = the first.
- Clicks are (x, y) pixels as everywhere in the core (`ibisagent.types.Click`); a voxel's integer indices are the
  pixel's integer indices, so a point given as voxel indices maps to the same numbers in the slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AXES = (0, 1, 2)
_IN_PLANE = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


def check_axis(axis: int) -> int:
    """`axis` as an int in 0..2, else ValueError naming the value."""
    if isinstance(axis, bool) or axis not in AXES:
        raise ValueError(f"slice axis must be 0, 1 or 2 (a voxel index axis), got {axis!r}")
    return int(axis)


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The volume axes that become (x, y) of a slice along `axis`: 0 -> (1, 2), 1 -> (0, 2), 2 -> (0, 1)."""
    return _IN_PLANE[check_axis(axis)]


def slice_shape(volume_shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(H, W) of a slice along `axis` of a volume of shape (I, J, K)."""
    if len(volume_shape) != 3:
        raise ValueError(f"expected a 3D volume shape, got {tuple(volume_shape)}")
    first, second = (int(volume_shape[a]) for a in in_plane_axes(axis))
    return second, first


def voxel_to_pixel(point: Sequence[float], axis: int) -> tuple[int, float, float]:
    """A voxel position (i, j, k) -> (slice index along `axis`, x, y). The slice index is floor of that coordinate."""
    if len(point) != 3:
        raise ValueError(f"a voxel position has 3 numbers (i, j, k), got {len(point)}")
    a, b = in_plane_axes(axis)
    return int(np.floor(point[axis])), float(point[a]), float(point[b])


def pixel_to_voxel(x: float, y: float, slice_index: int, axis: int) -> tuple[float, float, float]:
    """A pixel (x, y) of slice `slice_index` along `axis` -> the voxel position (i, j, k)."""
    a, b = in_plane_axes(axis)
    out = [0.0, 0.0, 0.0]
    out[axis], out[a], out[b] = float(slice_index), float(x), float(y)
    return out[0], out[1], out[2]


def take_slice(volume: np.ndarray, slice_index: int, axis: int) -> np.ndarray:
    """The HxW slice image of an (I, J, K) array (a view where numpy allows)."""
    return np.take(volume, slice_index, axis=check_axis(axis)).T


def put_slice(volume: np.ndarray, slice_index: int, axis: int, image: np.ndarray) -> None:
    """Write an HxW slice image into an (I, J, K) array in place (the inverse of `take_slice`)."""
    index: list[int | slice] = [slice(None)] * 3
    index[check_axis(axis)] = slice_index
    target = volume[tuple(index)]
    if target.shape != np.shape(image)[::-1]:
        raise ValueError(
            f"a slice along axis {axis} of a volume of shape {volume.shape} is "
            f"{target.shape[1]}x{target.shape[0]} (HxW), got an image of shape {np.shape(image)}"
        )
    volume[tuple(index)] = np.asarray(image).T
