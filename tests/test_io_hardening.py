"""Hostile image and mask files against `ibisagent.io` (issue #18): NIfTI headers that claim GiB, gzip bombs,
scl_slope scaling and PNG pixel bombs are refused from their headers, before any data is read or decoded.

Each file is built in tmp_path and is small on disk. Memory is measured with tracemalloc, which sees numpy arrays and
the bytes that decompression or PIL's `tobytes` produce: a refused file must not allocate what its header claims.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ibisagent import io
from ibisagent.io import ImageReadError, read_image, read_mask, read_volume_slice

MiB = 2**20


def nifti_header(shape, dtype=np.uint8, slope=None, inter=0.0, **fields) -> bytes:
    """A 352-byte single-file NIfTI-1 header (+ the 4-byte extension flag) declaring `shape` and `dtype`."""
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["vox_offset"] = 352
    if slope is not None:
        h["scl_slope"], h["scl_inter"] = slope, inter
    for key, value in fields.items():
        h[key] = value
    return h.binaryblock + b"\0\0\0\0"


def write_gz(path, header: bytes, zeros: int = 0, data: bytes = b"") -> None:
    """A .nii.gz of `header`, `data`, then `zeros` zero bytes, compressed in 1 MiB pieces (small on disk)."""
    with gzip.open(path, "wb", compresslevel=1 if data else 9) as f:
        f.write(header + data)
        chunk = bytes(MiB)
        while zeros > 0:
            f.write(chunk[: min(zeros, MiB)])
            zeros -= MiB


def png_bomb(path, width: int, height: int) -> None:
    """A 1-bit grey PNG of width x height, all black: a few KB on disk, width*height pixels decoded."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def peak_of(fn) -> tuple[int, BaseException | None]:
    """(tracemalloc peak in bytes, the exception raised or None) of calling fn()."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001 -- returned for the caller to assert on
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def test_defaults_are_documented_bounds():
    assert io.MAX_IMAGE_PIXELS == 2**26 and io.MAX_VOLUME_VOXELS == 2**29
    assert "MAX_IMAGE_PIXELS" in io.__doc__ and "MAX_VOLUME_VOXELS" in io.__doc__


# -- NIfTI headers that claim more than the file holds or than the bound allows --------------------------------------

HOSTILE_NIFTI = {
    # name: (file name, header kwargs, zeros after the header, reader: "image" | "mask")
    "4 GiB claimed by a 352-byte .nii image": ("big.nii", {"shape": (2048, 2048, 1024)}, 0, "image"),
    "2 GiB claimed by a 352-byte .nii mask": ("big.nii", {"shape": (2048, 1024, 1024)}, 0, "mask"),
    "4 GiB float32 claimed by a .nii.gz of 8 MiB zeros": (
        "big.nii.gz",
        {"shape": (1024, 1024, 1024), "dtype": np.float32},
        8 * MiB,
        "image",
    ),
    "a 64 MiB gzip bomb whose shape is not the image's": ("bomb.nii.gz", {"shape": (4096, 4096, 4)}, 64 * MiB, "mask"),
    "a within-bounds .nii cut short": ("short.nii", {"shape": (512, 512, 64), "dtype": np.int16}, 1000, "image"),
}


@pytest.mark.parametrize("name", list(HOSTILE_NIFTI))
def test_hostile_nifti_is_refused_before_its_data_is_read(name, tmp_path):
    filename, header, zeros, reader = HOSTILE_NIFTI[name]
    path = tmp_path / filename
    if filename.endswith(".gz"):
        write_gz(path, nifti_header(**header), zeros)
    else:
        path.write_bytes(nifti_header(**header) + bytes(zeros))
    assert path.stat().st_size < 200_000
    if reader == "image":
        peak, error = peak_of(lambda: read_image(path))
    else:
        peak, error = peak_of(lambda: read_mask(path, (64, 64)))
    assert isinstance(error, ImageReadError), f"{name}: {error!r}"
    assert str(path) in str(error)
    assert peak < 8 * MiB, f"{name}: {peak / MiB:.0f} MiB allocated before the refusal"


def test_messages_name_the_bound_or_the_mismatch(tmp_path):
    big = tmp_path / "big.nii"
    big.write_bytes(nifti_header((2048, 2048, 1024)))
    with pytest.raises(ImageReadError, match=r"4294967296 voxels.*limit.*536870912.*max_voxels"):
        read_image(big)
    with pytest.raises(ImageReadError, match="declares 4294967296 bytes of data"):
        read_image(big, max_voxels=2**33)  # within a raised bound, the file is still too short
    mask = tmp_path / "mask.nii.gz"
    write_gz(mask, nifti_header((32, 48, 5)), 32 * 48 * 5)
    with pytest.raises(ImageReadError, match=r"mask is 32x48 but the image is 64x64"):
        read_mask(mask, (64, 64))


def test_gzip_data_beyond_the_declared_size_is_never_decompressed(tmp_path):
    """A 64x64x1 mask followed by 256 MiB of zeros (a bomb of ~250 KB): only the 4 KiB the header declares are read."""
    path = tmp_path / "tail.nii.gz"
    data = np.zeros((64, 64, 1), np.uint8)
    data[10:20, 30:40, 0] = 1
    write_gz(path, nifti_header((64, 64, 1)), 256 * MiB, data.tobytes(order="F"))
    peak, error = peak_of(lambda: read_mask(path, (64, 64)))
    assert error is None and peak < 4 * MiB
    mask = read_mask(path, (64, 64))
    assert mask.sum() == 100 and mask[30:40, 10:20].all()  # (i, j) voxel -> (row j, column i)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"datatype": 128, "bitpix": 24}, "voxel type"),  # RGB24
        ({"datatype": 32, "bitpix": 64}, "voxel type"),  # complex64
        ({"vox_offset": 1e30}, "data offset"),
        ({"vox_offset": 100}, "data offset"),
        ({"magic": b"ni1"}, "single-file NIfTI"),
        ({"dim": [5, 2, 2, 2, 2, 2, 1, 1]}, "2D or 3D"),
        ({"scl_slope": 2.0, "scl_inter": np.inf}, "invalid intercept"),
    ],
)
def test_malformed_header_fields_are_one_clear_error(fields, words, tmp_path):
    path = tmp_path / "bad.nii"
    path.write_bytes(nifti_header((4, 4, 4), **fields) + bytes(512))
    with pytest.raises(ImageReadError, match=words):
        read_image(path)


# -- scl_slope: labels are thresholded on the raw integers, images scale one slice -----------------------------------


@pytest.mark.parametrize("slope, inter", [(3.0, -1.0), (-2.0, 1.0), (0.5, 0.0), (-1.0, -0.5)])
def test_scaled_label_is_thresholded_without_scaling_the_volume(slope, inter, tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 3, (128, 128, 64), dtype=np.uint8)
    path = tmp_path / "label.nii.gz"
    write_gz(path, nifti_header(vol.shape, slope=slope, inter=inter), data=vol.tobytes(order="F"))
    peak, error = peak_of(lambda: read_mask(path, (128, 128), 40, 2))
    assert error is None
    assert peak < 1 * MiB, f"{peak / MiB:.1f} MiB for a 16 KiB slice (a float64 volume would be 8 MiB)"
    expected = (vol[:, :, 40].astype(np.float64) * slope + inter).T > 0
    assert np.array_equal(read_mask(path, (128, 128), 40, 2), expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_scaled_volume_slice_equals_nibabel_and_stays_near_one_slice(axis, tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(-1000, 1000, (96, 80, 200), dtype=np.int16)
    path = tmp_path / "ct.nii.gz"
    write_gz(path, nifti_header(vol.shape, np.int16, slope=0.5, inter=-3.0), data=vol.tobytes(order="F"))
    expected = np.take(np.asanyarray(nib.load(str(path)).dataobj), 17, axis=axis).T.astype(np.float32)
    peak, error = peak_of(lambda: read_volume_slice(path, 17, axis))
    # axis 2 reads one plane; axes 0 and 1 read blocks of planes (at most 16 MiB; here the whole 3 MiB volume),
    # where nibabel held the volume and its scaled float64 copy (24 MiB)
    assert error is None and peak < (1 if axis == 2 else 5) * MiB
    assert np.allclose(read_volume_slice(path, 17, axis), expected)


def test_big_endian_and_4d_single_time_point_volumes_read_as_before(tmp_path):
    vol = np.arange(6 * 5 * 4, dtype=">i2").reshape(6, 5, 4, 1)
    path = tmp_path / "be.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    assert np.array_equal(read_volume_slice(path, 2, 2), vol[:, :, 2, 0].T.astype(np.float32))
    assert np.array_equal(read_volume_slice(path, 3, 0), vol[3, :, :, 0].T.astype(np.float32))


# -- PNG pixel bombs -------------------------------------------------------------------------------------------------


def test_png_pixel_bomb_is_refused_as_an_image(tmp_path):
    path = tmp_path / "bomb.png"
    png_bomb(path, 10_000, 10_000)  # 100 M pixels, ~20 KB on disk; RGB decoding would be 300 MB
    assert path.stat().st_size < 100_000
    peak, error = peak_of(lambda: read_image(path))
    assert isinstance(error, ImageReadError) and "10000x10000" in str(error) and "max_pixels" in str(error)
    assert peak < 4 * MiB


def test_png_label_of_the_wrong_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "label.png"
    png_bomb(path, 8000, 8000)  # 64 M pixels, within the bound and PIL's own bomb limit
    peak, error = peak_of(lambda: read_mask(path, (64, 64)))
    assert isinstance(error, ImageReadError) and "mask is 8000x8000 but the image is 64x64" in str(error)
    assert peak < 4 * MiB


def test_the_pixel_bound_is_an_argument(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(path)
    assert read_image(path).shape == (100, 120, 3)
    with pytest.raises(ImageReadError, match=r"120x100 .*12000 pixels.*max_pixels=5000"):
        read_image(path, max_pixels=5000)
    with pytest.raises(ImageReadError, match="max_pixels=5000"):
        read_mask(path, max_pixels=5000)
    nii = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((100, 120, 3), np.uint8), np.eye(4)), nii)
    with pytest.raises(ImageReadError, match="max_pixels=5000"):
        read_image(nii, max_pixels=5000)
    with pytest.raises(ImageReadError, match="max_voxels=1000"):
        read_image(nii, max_voxels=1000)


def test_probe_reads_headers_only(tmp_path):
    png = tmp_path / "bomb.png"
    png_bomb(png, 3000, 2000)
    assert io.probe_image(png) == io.ImageInfo("raster", (2000, 3000))
    nii = tmp_path / "big.nii.gz"
    write_gz(nii, nifti_header((512, 512, 300), np.int16))  # no data at all: only the header is read
    assert io.probe_image(nii) == io.ImageInfo("nifti", (512, 512, 300))
    with pytest.raises(ImageReadError, match="max_pixels"):
        io.probe_image(png, max_pixels=10**6)
