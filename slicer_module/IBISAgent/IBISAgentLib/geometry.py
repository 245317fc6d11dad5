"""Coordinate conversions between Slicer's RAS, a volume's voxel IJK, and the 2D slice pixels of the IBISAgent core.
The voxel <-> slice pixel rule mirrors the core's `ibisagent/geometry.py` (this library cannot import it);
`tests/test_geometry.py` checks that both agree.

Written down once here; the Slicer module converts only through these functions.

- RAS: millimetres in the volume's frame. A 4x4 `ijk_to_ras` matrix maps homogeneous IJK to RAS
  (Slicer: `volumeNode.GetIJKToRASMatrix`; compose with the parent transform for world coordinates).
- IJK: voxel indices as Slicer and the NIfTI file number them. Integer IJK is the voxel *centre*: voxel i covers
  continuous IJK [i - 0.5, i + 0.5). An array "in IJK order" is indexed a[i, j, k] (nibabel's `dataobj`, the server).
- KJI order: `slicer.util.arrayFromVolume(node)` returns a numpy array of shape (K, J, I), indexed a[k, j, i]
  (VTK stores i fastest). Every labelmap array in this module is in KJI order unless its name says otherwise.
- Slice pixels (the core's `ibisagent.io.read_volume_slice`): a slice along `axis` at index s drops that axis; the
  HxW image has x (column) = the first remaining IJK index, y (row) = the second:
  axis 2: voxel (i, j, s) -> x = i, y = j;  axis 1: (i, s, k) -> x = i, y = k;  axis 0: (s, j, k) -> x = j, y = k.
  A click (x, y) is a float whose integer part indexes the pixel (`mask[int(y), int(x)]`), pixel centre at +0.5, so
  continuous IJK = pixel - 0.5 on the two in-plane axes.
- In a KJI array the slice's HxW mask is a plain view with no transpose, because the remaining axes keep their
  order and the slower one is the row: axis 2 -> a[s, :, :] ([j, i] = [y, x]); axis 1 -> a[:, s, :] ([k, i]);
  axis 0 -> a[:, :, s] ([k, j]).
"""

from __future__ import annotations

import numpy as np

AXES = (0, 1, 2)
_IN_PLANE = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


def _check_axis(axis: int) -> int:
    if axis not in AXES:
        raise ValueError(f"slice axis must be 0, 1 or 2 (an IJK axis), got {axis!r}")
    return int(axis)


def _matrix(ijk_to_ras) -> np.ndarray:
    m = np.asarray(ijk_to_ras, float)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    return m


def _points(p) -> tuple[np.ndarray, bool]:
    a = np.asarray(p, float)
    if a.shape == (3,):
        return a[None, :], True
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"expected a point (3,) or points (N, 3), got shape {a.shape}")
    return a, False


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The IJK axes that become (x, y) of a slice along `axis`: 0 -> (1, 2), 1 -> (0, 2), 2 -> (0, 1)."""
    return _IN_PLANE[_check_axis(axis)]


def ijk_to_ras(ijk, ijk_to_ras) -> np.ndarray:
    """Continuous IJK, (3,) or (N, 3) float -> RAS in millimetres, same shape."""
    pts, single = _points(ijk)
    m = _matrix(ijk_to_ras)
    out = pts @ m[:3, :3].T + m[:3, 3]
    return out[0] if single else out


def ras_to_ijk(ras, ijk_to_ras) -> np.ndarray:
    """RAS (3,) or (N, 3) -> continuous IJK float, same shape (integer values are voxel centres)."""
    pts, single = _points(ras)
    inv = np.linalg.inv(_matrix(ijk_to_ras))
    out = pts @ inv[:3, :3].T + inv[:3, 3]
    return out[0] if single else out


def ijk_index(ijk) -> np.ndarray:
    """Continuous IJK -> the index of the voxel that contains it (nearest centre), int64, same shape."""
    return np.floor(np.asarray(ijk, float) + 0.5).astype(np.int64)


def ras_to_ijk_index(ras, ijk_to_ras) -> np.ndarray:
    """RAS (3,) or (N, 3) -> integer voxel index (i, j, k) of the voxel containing the point."""
    return ijk_index(ras_to_ijk(ras, ijk_to_ras))


def slice_index_from_ras(ras, ijk_to_ras, axis: int) -> int:
    """The index along IJK `axis` of the slice through the RAS point (3,)."""
    return int(ras_to_ijk_index(ras, ijk_to_ras)[_check_axis(axis)])


def slice_axis_from_normal(normal_ras, ijk_to_ras) -> int:
    """The IJK axis most parallel to a slice plane's normal given in RAS (e.g. column 2 of a slice node's SliceToRAS).

    Voxel spacing does not bias the choice: the IJK directions are normalised first.
    """
    n = np.asarray(normal_ras, float).reshape(3)
    directions = _matrix(ijk_to_ras)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    if not np.all(norms > 0) or not np.linalg.norm(n) > 0:
        raise ValueError("cannot choose a slice axis: the IJK-to-RAS matrix or the normal is degenerate")
    return int(np.argmax(np.abs((directions / norms).T @ (n / np.linalg.norm(n)))))


def slice_shape(dims_ijk, axis: int) -> tuple[int, int]:
    """(H, W) of a slice along `axis` of a volume with dimensions (I, J, K)."""
    x_axis, y_axis = in_plane_axes(axis)
    dims = [int(d) for d in dims_ijk]
    return dims[y_axis], dims[x_axis]


def ijk_to_pixel(ijk, axis: int) -> np.ndarray:
    """Continuous IJK (3,) or (N, 3) -> slice pixel coordinates (x, y), float, (2,) or (N, 2).

    x = (first in-plane IJK) + 0.5, y = (second) + 0.5, so a voxel centre maps to its pixel's centre.
    """
    pts, single = _points(ijk)
    x_axis, y_axis = in_plane_axes(axis)
    out = pts[:, [x_axis, y_axis]] + 0.5
    return out[0] if single else out


def pixel_to_ijk(xy, axis: int, slice_index: int) -> np.ndarray:
    """Slice pixel coordinates (x, y) (2,) or (N, 2) float -> continuous IJK (3,) or (N, 3) on slice `slice_index`.

    The inverse of `ijk_to_pixel` on the slice: in-plane IJK = pixel - 0.5, IJK[axis] = slice_index.
    """
    a = np.asarray(xy, float)
    single = a.shape == (2,)
    a = a[None, :] if single else a
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"expected a pixel (x, y) (2,) or pixels (N, 2), got shape {np.shape(xy)}")
    x_axis, y_axis = in_plane_axes(axis)
    out = np.empty((len(a), 3), float)
    out[:, axis] = slice_index
    out[:, x_axis] = a[:, 0] - 0.5
    out[:, y_axis] = a[:, 1] - 0.5
    return out[0] if single else out


def pixel_to_voxel_centre(xy, axis: int, slice_index: int) -> np.ndarray:
    """Slice pixels (x, y) (2,) or (N, 2) -> continuous IJK (3,) or (N, 3) of the centre of the voxel each pixel
    indexes (`mask[int(y), int(x)]`): in-plane IJK = floor(x), floor(y).

    Use it to show clicks: a click sent as an integer voxel index (x = i) and a model click at a pixel centre
    (x = i + 0.5) both land on voxel i's centre, where `pixel_to_ijk` would put the first half a voxel off.
    """
    a = np.asarray(xy, float)
    return pixel_to_ijk(np.floor(a) + 0.5, axis, slice_index)


def ijk_index_to_pixel_index(ijk, axis: int) -> tuple[int, int]:
    """Integer voxel index (i, j, k) -> integer pixel (x, y) of its slice along `axis` (row y, column x)."""
    x_axis, y_axis = in_plane_axes(axis)
    v = [int(c) for c in ijk]
    return v[x_axis], v[y_axis]


def pixel_index_to_ijk_index(x, y, axis: int, slice_index: int) -> tuple[int, int, int]:
    """Pixel (x, y) -> the integer voxel index (i, j, k) of that pixel on slice `slice_index` (floor of x and y)."""
    x_axis, y_axis = in_plane_axes(axis)
    out = [0, 0, 0]
    out[axis] = int(slice_index)
    out[x_axis] = int(np.floor(x))
    out[y_axis] = int(np.floor(y))
    return out[0], out[1], out[2]


def ijk_array_to_kji(array_ijk: np.ndarray) -> np.ndarray:
    """An (I, J, K) array (nibabel / server order) -> the (K, J, I) view `arrayFromVolume` would give."""
    return np.asarray(array_ijk).transpose(2, 1, 0)


def kji_array_to_ijk(array_kji: np.ndarray) -> np.ndarray:
    """A (K, J, I) array (`arrayFromVolume` order) -> the (I, J, K) view (nibabel / server order)."""
    return np.asarray(array_kji).transpose(2, 1, 0)


def dims_ijk_of_kji(array_kji: np.ndarray) -> tuple[int, int, int]:
    """(I, J, K) dimensions of a (K, J, I) array."""
    k, j, i = np.shape(array_kji)
    return i, j, k


def _slice_index_tuple(axis: int, slice_index: int) -> tuple:
    # KJI array axes are (k, j, i): IJK axis a is array axis 2 - a.
    index = [slice(None)] * 3
    index[2 - _check_axis(axis)] = int(slice_index)
    return tuple(index)


def kji_slice(array_kji: np.ndarray, axis: int, slice_index: int) -> np.ndarray:
    """The HxW view of slice `slice_index` along IJK `axis` of a (K, J, I) array, indexed [y, x] (module docstring)."""
    a = np.asarray(array_kji)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D (K, J, I) array, got shape {a.shape}")
    n = a.shape[2 - _check_axis(axis)]
    if not 0 <= int(slice_index) < n:
        raise ValueError(f"slice {slice_index} is out of range; IJK axis {axis} has slices 0..{n - 1}")
    return a[_slice_index_tuple(axis, slice_index)]


def write_slice_mask(array_kji: np.ndarray, mask, axis: int, slice_index: int, value: int = 1) -> np.ndarray:
    """Write an HxW bool mask into slice `slice_index` along IJK `axis` of a (K, J, I) labelmap array, in place.

    Pixels in the mask get `value`; pixels of this slice outside the mask that held `value` become 0, so label
    `value` on this slice ends up exactly equal to the mask. Other labels and other slices are left alone.
    Returns the array.
    """
    view = kji_slice(array_kji, axis, slice_index)
    m = np.asarray(mask, bool)
    if m.shape != view.shape:
        x_axis, y_axis = in_plane_axes(axis)
        raise ValueError(
            f"mask is {m.shape[0]}x{m.shape[1]} (HxW) but slice {slice_index} along IJK axis {axis} is "
            f"{view.shape[0]}x{view.shape[1]} (rows = IJK axis {y_axis}, columns = IJK axis {x_axis})"
        )
    view[(view == value) & ~m] = 0
    view[m] = value
    return array_kji


def geometry_mismatch(geometry, dims_ijk, volume_ijk_to_ras, atol: float = 1e-3) -> str | None:
    """Why a server image's geometry is not the volume's, or None when it is.

    geometry: the `geometry` of the server's image info ({"kind", "shape", "affine"}; None when the server does not
    report it). dims_ijk: the volume's (I, J, K); volume_ijk_to_ras: its 4x4 IJK -> RAS without parent transforms.
    Equal means the same voxel grid in the same place: voxel (i, j, k) of both is the same point (within `atol` mm
    over the volume's extent). Slicer's NIfTI reader reverses axes of a left-handed file, nibabel (the server) does
    not: such a pair has equal dimensions and differs here.
    """
    if not isinstance(geometry, dict) or geometry.get("affine") is None:
        return "the server does not report the image's voxel-to-RAS matrix"
    shape = [int(v) for v in geometry.get("shape") or []]
    dims = [int(v) for v in dims_ijk]
    if shape[:3] != dims or any(v != 1 for v in shape[3:]):
        return f"the server's image has dimensions {shape}, the volume {dims}"
    try:
        affine = _matrix(geometry["affine"])
    except (TypeError, ValueError) as exc:
        return f"the server's voxel-to-RAS matrix is unreadable ({exc})"
    corners = np.array([[i, j, k] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1) for k in (0, dims[2] - 1)], float)
    offsets = ijk_to_ras(corners, affine) - ijk_to_ras(corners, _matrix(volume_ijk_to_ras))
    distance = float(np.max(np.linalg.norm(offsets, axis=1)))
    if distance > atol:
        return f"the server's voxels lie up to {distance:.3g} mm from the volume's (another orientation or origin)"
    return None
