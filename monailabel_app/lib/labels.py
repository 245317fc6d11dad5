"""Datastore images and label files of the ibisagent task: what a datastore image is (a 2D image or a volume, its
shape), which slice a request works on, an uploaded initial mask read as that slice, and the result written as the
label file MONAI Label returns. Slices are cut with `ibisagent.geometry`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.geometry import put_slice, slice_shape, take_slice, voxel_to_pixel
from ibisagent.io import NIFTI_SUFFIXES, RASTER_SUFFIXES, read_image

from .errors import RequestError


@dataclass(frozen=True)
class ImageSource:
    """A datastore image: `kind` "2d" (PNG/JPG/TIFF/BMP, one DICOM file, a 2D NIfTI) or "volume" (3D NIfTI);
    `shape` the voxel shape of a volume, (H, W) of a 2D image."""

    image_id: str
    path: str
    kind: str
    shape: tuple[int, ...]
    mtime_ns: int
    nifti: bool

    @classmethod
    def open(cls, image_id: str, path: str) -> ImageSource:
        p = Path(path)
        if p.is_dir():
            raise RequestError(
                400,
                f"image {image_id!r} is a DICOM series folder; this task reads NIfTI volumes (MONAI Label converts "
                "DICOMweb series with MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=true), PNG/JPG/TIFF and single DICOM files",
            )
        if not p.is_file():
            raise RequestError(404, f"image {image_id!r} has no file in the datastore")
        name, mtime = p.name.lower(), p.stat().st_mtime_ns
        try:
            if name.endswith(NIFTI_SUFFIXES):
                import nibabel as nib

                shape = tuple(int(s) for s in nib.load(str(p)).shape)
                if len(shape) == 4 and shape[3] == 1:
                    shape = shape[:3]
                if len(shape) == 2:
                    return cls(image_id, str(p), "2d", (shape[1], shape[0]), mtime, True)
                if len(shape) != 3:
                    raise RequestError(400, f"image {image_id!r} is a NIfTI of shape {shape}; expected 2D or 3D")
                return cls(image_id, str(p), "volume", shape, mtime, True)
            if name.endswith(RASTER_SUFFIXES):
                from PIL import Image

                with Image.open(p) as im:
                    return cls(image_id, str(p), "2d", (im.height, im.width), mtime, False)
            if name.endswith((".dcm", ".dicom")):
                return cls(image_id, str(p), "2d", read_image(p).shape[:2], mtime, False)
        except RequestError:
            raise
        except Exception as exc:  # corrupt files: nibabel and PIL raise many types
            raise RequestError(400, f"image {image_id!r} cannot be read: {type(exc).__name__}: {exc}") from exc
        raise RequestError(
            400, f"image {image_id!r} ({p.suffix}) is not supported; use PNG/JPG/TIFF, NIfTI or a DICOM file"
        )

    def resolve_slice(self, slice_index: int | None, axis: int | None, points3d: list[list[float]]):
        """(slice, axis) of the request: (None, 2) for a 2D image; for a volume the given slice, else the slice all
        3-number points lie in, else 0 when the volume has one slice along the axis."""
        if self.kind == "2d":
            if slice_index not in (None, 0):
                raise RequestError(
                    400, f"params.slice={slice_index} is out of range: image {self.image_id!r} is 2D; give slice null"
                )
            return None, 2
        axis = 2 if axis is None else axis
        n = self.shape[axis]
        if slice_index is None:
            ks = {voxel_to_pixel(p, axis)[0] for p in points3d} or ({0} if n == 1 else set())
            if len(ks) != 1:
                detail = "its points lie in several slices" if ks else "it has no [i, j, k] points"
                raise RequestError(
                    400,
                    f"params.slice is missing and {detail}; image {self.image_id!r} is a volume of shape "
                    f"{list(self.shape)}: give slice 0..{n - 1} (axis {axis})",
                )
            slice_index = ks.pop()
        if not 0 <= slice_index < n:
            raise RequestError(
                400,
                f"params.slice={slice_index} is out of range: image {self.image_id!r} has slices 0..{n - 1} "
                f"along axis {axis} (shape {list(self.shape)})",
            )
        return slice_index, axis

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """(H, W) of the 2D image a request works on."""
        if self.kind == "2d":
            return self.shape[0], self.shape[1]
        return slice_shape(self.shape, axis)


def read_label(
    path: str, source: ImageSource, slice_index: int | None, axis: int, shape: tuple[int, int]
) -> np.ndarray:
    """An uploaded initial mask -> HxW bool: a PNG/JPG of the slice's size (foreground = first channel > 0), or a
    NIfTI of the volume's shape (the request's slice is taken), or for a 2D image a NIfTI of shape (W, H[, 1])."""
    name = path.lower()
    height, width = shape
    try:
        if name.endswith(RASTER_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
            mask = (arr[..., 0] if arr.ndim == 3 else arr) > 0
            if mask.shape != shape:
                raise RequestError(
                    400,
                    f"the label upload is a {mask.shape[1]}x{mask.shape[0]} image but the slice is {width}x{height} "
                    "(width x height); send a mask of the slice's size",
                )
            return mask
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            arr = np.asanyarray(nib.load(path).dataobj)
            if arr.ndim == 4 and arr.shape[3] == 1:
                arr = arr[..., 0]
            if source.kind == "volume":
                if arr.shape != source.shape:
                    raise RequestError(
                        400,
                        f"the label upload has shape {list(arr.shape)} but image {source.image_id!r} has shape "
                        f"{list(source.shape)}; send a label volume of the image's shape",
                    )
                return take_slice(arr, slice_index, axis) > 0
            if arr.ndim == 3 and arr.shape[2] == 1:  # Slicer stores a 2D labelmap as one slice
                arr = arr[..., 0]
            if arr.shape != (width, height):
                raise RequestError(
                    400,
                    f"the label upload has shape {list(arr.shape)} but the {width}x{height} image needs a NIfTI of "
                    f"shape [{width}, {height}] (i = column, j = row)",
                )
            return arr.T > 0
    except RequestError:
        raise
    except Exception as exc:
        detail = str(exc).replace(path, "the upload")  # the server's temp path means nothing to the client
        raise RequestError(400, f"the label upload cannot be read: {type(exc).__name__}: {detail}") from exc
    raise RequestError(400, "the label upload must be a PNG/JPG mask or a NIfTI (.nii, .nii.gz) label")


def write_label(mask: np.ndarray, source: ImageSource, slice_index: int | None, axis: int) -> str:
    """The final mask as a temporary file MONAI Label sends and then deletes: uint8, 1 = foreground. 2D images give
    a PNG (a NIfTI for a NIfTI image); volumes a NIfTI of the volume's shape, the mask in the given slice."""
    mask = np.asarray(mask, np.uint8)
    if not source.nifti:
        from PIL import Image

        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            Image.fromarray(mask).save(f, format="PNG")
            return f.name
    import nibabel as nib

    ref = nib.load(source.path)
    if source.kind == "volume":
        data = np.zeros(source.shape, np.uint8)
        put_slice(data, slice_index, axis, mask)
    else:
        data = np.ascontiguousarray(mask.T)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(data.shape)
    image = nib.Nifti1Image(data, ref.affine, header)
    image.header.set_slope_inter(1, 0)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
        path = f.name
    nib.save(image, path)
    return path
