"""Minimal NIfTI-1 and PNG writers/readers (standard library + numpy) for moving voxels between Slicer and the server.

Written here rather than through Slicer's storage nodes so the voxel order is exact and testable without Slicer:
a (K, J, I) array from `slicer.util.arrayFromVolume` is written with dim = (I, J, K) and its C-order bytes, which is
NIfTI's on-disk order (i fastest), so the server's nibabel array a[i, j, k] is Slicer's voxel (i, j, k).
The affine (sform) is the volume's IJK-to-RAS matrix; NIfTI's world frame is RAS like Slicer's.

`read_nifti` reads files that come from a server, so it checks the header before reading data: at most
`MAX_VOLUME_VOXELS` voxels (2**29, as the server's readers), and a gzip stream is decompressed only up to the bytes
the header declares.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

# NIfTI-1 datatype codes
_DTYPES = {
    np.dtype(np.uint8): 2,
    np.dtype(np.int16): 4,
    np.dtype(np.int32): 8,
    np.dtype(np.float32): 16,
    np.dtype(np.float64): 64,
    np.dtype(np.int8): 256,
    np.dtype(np.uint16): 512,
    np.dtype(np.uint32): 768,
    np.dtype(np.int64): 1024,
    np.dtype(np.uint64): 1280,
}
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
_HEADER_SIZE = 348
MAX_VOLUME_VOXELS = 2**29
_VOX_OFFSET = 352  # header + the 4-byte extension flag


def nifti_bytes(array_kji: np.ndarray, ijk_to_ras=None, compress: bool = True) -> bytes:
    """Encode a (K, J, I) voxel array as a NIfTI-1 file (gzip-compressed unless `compress` is False).

    ijk_to_ras: 4x4 matrix (default identity) stored as the sform (code 2, "aligned"); pixdim holds the spacing.
    Booleans are written as uint8; other numpy dtypes keep their type when NIfTI has it.
    """
    a = np.asarray(array_kji)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D (K, J, I) array, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    base = np.dtype(a.dtype.name)  # the same type in native byte order
    if base not in _DTYPES:
        raise ValueError(f"voxel type {a.dtype} cannot be written to NIfTI; convert to int16, float32, ...")
    code = _DTYPES[base]
    m = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, float)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be 4x4, got {m.shape}")
    k, j, i = a.shape
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    header = bytearray(_VOX_OFFSET)
    struct.pack_into("<i", header, 0, _HEADER_SIZE)
    struct.pack_into("<8h", header, 40, 3, i, j, k, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, code, base.itemsize * 8)
    struct.pack_into("<8f", header, 76, 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<fff", header, 108, float(_VOX_OFFSET), 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    struct.pack_into("<B", header, 123, 2)  # xyzt_units: millimetres
    description = b"IBISAgent Slicer module"
    header[148 : 148 + len(description)] = description
    struct.pack_into("<hh", header, 252, 0, 2)  # qform_code 0 (unused), sform_code 2 (aligned)
    for row in range(3):
        struct.pack_into("<4f", header, 280 + 16 * row, *m[row])
    header[344:348] = b"n+1\x00"
    data = np.ascontiguousarray(a, dtype=base.newbyteorder("<")).tobytes(order="C")
    raw = bytes(header) + data
    return gzip.compress(raw, compresslevel=1) if compress else raw


def write_nifti(path: str | Path, array_kji: np.ndarray, ijk_to_ras=None) -> Path:
    """Write a (K, J, I) array to `path` (.nii.gz compressed, .nii plain); see `nifti_bytes`."""
    path = Path(path)
    path.write_bytes(nifti_bytes(array_kji, ijk_to_ras, compress=path.name.lower().endswith(".gz")))
    return path


def read_nifti(source: str | Path | bytes, max_voxels: int = MAX_VOLUME_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI-1 file (path or bytes, gzip or not) -> ((K, J, I) array like `arrayFromVolume`, 4x4 affine).

    The affine is the sform when its code is set, else a diagonal of the spacing. Scaling (scl_slope/inter) is
    applied when present. Only 3D volumes (or 4D with one time point) of at most `max_voxels` voxels are read; the
    header is checked before any data is decompressed, and nothing past the declared data is.
    """
    raw = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    stream = io.BytesIO(bytes(raw))
    if raw[:2] == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    try:
        head = stream.read(_VOX_OFFSET)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"not a readable NIfTI-1 file: {exc}") from exc
    if len(head) < _HEADER_SIZE:
        raise ValueError("not a NIfTI-1 file: shorter than its 348-byte header")
    if struct.unpack_from("<i", head, 0)[0] == _HEADER_SIZE:
        endian = "<"
    elif struct.unpack_from(">i", head, 0)[0] == _HEADER_SIZE:
        endian = ">"
    else:
        raise ValueError("not a NIfTI-1 file: sizeof_hdr is not 348")
    dim = struct.unpack_from(endian + "8h", head, 40)
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : 1 + ndim]):
        raise ValueError(f"NIfTI dim {list(dim)} is not a valid shape")
    shape_ijk = [int(d) for d in dim[1 : 1 + ndim]]
    if ndim == 4 and shape_ijk[3] == 1:
        shape_ijk = shape_ijk[:3]
    while len(shape_ijk) < 3:
        shape_ijk.append(1)
    if len(shape_ijk) != 3:
        raise ValueError(f"expected a 3D NIfTI volume, got dim {dim[: 1 + ndim]}")
    count = math.prod(shape_ijk)
    if count > max_voxels:
        raise ValueError(
            f"the NIfTI header declares {shape_ijk} = {count} voxels, above the limit of max_voxels={max_voxels}"
        )
    code = struct.unpack_from(endian + "h", head, 70)[0]
    if code not in _CODES:
        raise ValueError(f"NIfTI datatype code {code} is not supported")
    vox_offset = struct.unpack_from(endian + "f", head, 108)[0]
    if not _VOX_OFFSET <= vox_offset <= _VOX_OFFSET + 2**24:
        raise ValueError(f"NIfTI vox_offset {vox_offset} is not a valid data offset")
    vox_offset = int(vox_offset)
    slope, inter = struct.unpack_from(endian + "ff", head, 112)
    dtype = _CODES[code].newbyteorder(endian)
    size = count * dtype.itemsize
    try:
        stream.read(vox_offset - len(head))  # extensions, at most 16 MiB
        body = stream.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"not a readable NIfTI-1 file: {exc}") from exc
    if len(body) < size:
        raise ValueError(f"the NIfTI file ends before its {size} bytes of data; it is cut short")
    data = np.frombuffer(body, dtype=dtype, count=count)
    i, j, k = shape_ijk
    array_kji = data.reshape(k, j, i).astype(dtype.newbyteorder("="))
    if slope not in (0.0, 1.0) or inter != 0.0:
        array_kji = array_kji * (slope or 1.0) + inter
    sform_code = struct.unpack_from(endian + "h", head, 254)[0]
    if sform_code > 0:
        affine = np.eye(4)
        for row in range(3):
            affine[row] = struct.unpack_from(endian + "4f", head, 280 + 16 * row)
    else:
        pixdim = struct.unpack_from(endian + "8f", head, 76)
        affine = np.diag([pixdim[1] or 1.0, pixdim[2] or 1.0, pixdim[3] or 1.0, 1.0])
    return array_kji, affine


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_mask_bytes(mask) -> bytes:
    """An HxW bool mask -> 8-bit grayscale PNG bytes (0 / 255), row y = image row (the server's `read_mask`)."""
    m = np.asarray(mask, bool)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty HxW mask, got shape {m.shape}")
    h, w = m.shape
    rows = np.zeros((h, w + 1), np.uint8)  # each row starts with filter type 0
    rows[:, 1:] = m.astype(np.uint8) * 255
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def write_png_mask(path: str | Path, mask) -> Path:
    """Write an HxW bool mask as an 8-bit grayscale PNG (0 / 255)."""
    path = Path(path)
    path.write_bytes(png_mask_bytes(mask))
    return path
