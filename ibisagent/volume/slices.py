"""A volume seen as a stack of 2D slices: the (I, J, K) voxel array, the slice axis, and the windowing that turns a
slice into the HxWx3 uint8 RGB image every tool and policy takes (`ibisagent.geometry` gives the pixel frame)."""

from __future__ import annotations

import numpy as np

from ibisagent.geometry import check_axis, slice_shape, take_slice
from ibisagent.io import window as window_intensities
from ibisagent.tools.base import as_rgb_uint8


class SliceStack:
    """The slices of one volume along one axis.

    volume: (I, J, K) array as `ibisagent.io` reads NIfTI (voxel order); any numeric dtype.
    axis:   the slice axis (0, 1 or 2); slice s is `geometry.take_slice(volume, s, axis)`, HxW.
    window: (lower, upper) intensities mapped to 0..255. None: uint8 volumes are used as stored, others get the
            0.5 and 99.5 percentiles of the whole volume (computed once, so every slice shares one window).
    """

    def __init__(self, volume: np.ndarray, axis: int = 2, window: tuple[float, float] | None = None):
        volume = np.asarray(volume)
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise ValueError(f"a volume is a 3D (I, J, K) array, got shape {volume.shape}")
        self.volume = volume
        self.axis = check_axis(axis)
        if window is None and volume.dtype != np.uint8:
            finite = volume[np.isfinite(volume)] if volume.dtype.kind == "f" else volume
            window = tuple(float(v) for v in np.percentile(finite, [0.5, 99.5])) if finite.size else (0.0, 1.0)
        self.window = window

    def __len__(self) -> int:
        return int(self.volume.shape[self.axis])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every slice."""
        return slice_shape(self.volume.shape, self.axis)

    def check_index(self, index: int, what: str = "slice") -> int:
        """`index` as an int in 0..len-1, else IndexError naming it and the range."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise IndexError(
                f"{what} {index!r} is out of range; the volume has slices 0..{len(self) - 1} along axis {self.axis}"
            )
        return int(index)

    def grey(self, index: int) -> np.ndarray:
        """Slice `index` windowed to HxW uint8."""
        raw = take_slice(self.volume, self.check_index(index), self.axis)
        if self.window is None:
            return np.ascontiguousarray(raw)
        return window_intensities(raw, *self.window)

    def image(self, index: int) -> np.ndarray:
        """Slice `index` as the HxWx3 uint8 RGB image tools and policies take."""
        return as_rgb_uint8(self.grey(index))
