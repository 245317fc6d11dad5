"""Slicer's stock MONAI Label module against the app, replayed with MONAI Label's own client
(`monailabel.client.MONAILabelClient`, what the module calls): Next Sample, Upload Volume, File > Add Data (an upload
session), the deepgrow request with points on several slices, a second point, and the label-name instruction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.monailabel_app.attack import TOKEN, call

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

VOLUME = "ct_lesion"


@pytest.fixture
def client(attack, tmp_path):
    c = MONAILabelClient(attack["server"].url, tmpdir=str(tmp_path), client_id="slicer")
    c.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    return c


def _deepgrow(attack, k, points, **extra):
    """The module's DeepGrow request: the segment's name, [i, j, k] points, its slice, its result options."""
    return {
        "label": "lesion",
        "foreground": points,
        "background": [],
        "slice": k,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        **extra,
    }


def test_next_sample_lists_a_study(client):
    sample = client.next_sample("random", {})
    assert sample["id"] in ("04_CT_liver", "08_MRI_heart", "ct_lesion", "linked")


def test_deepgrow_on_a_datastore_volume_uses_the_points_of_its_slice(attack, client):
    k, (i, j) = attack["lesion_slice"], attack["lesion_click"]
    points = [[i, j, k], [i + 2, j, k], [i, j, k + 3], [5, 5, 0]]  # the module sends the points of every slice
    label, result = client.infer("ibisagent", VOLUME, _deepgrow(attack, k, points, run_agent=False))
    assert result["slice"] == k and result["trajectory"]["instruction"] == "segment the lesion"
    assert [p["index"] for p in result["ignored_points"]] == [2, 3]
    assert [p["slice"] for p in result["ignored_points"]] == [k + 3, 0]
    clicks = result["trajectory"]["steps"][0]["clicks"]["lesion"]
    assert [(c["x"], c["y"]) for c in clicks] == [(i, j), (i + 2, j)]
    data = np.asanyarray(nib.load(label).dataobj)
    assert data.shape == attack["volume_shape"] and data[..., k].any() and not data[..., k + 3].any()


def test_file_add_data_goes_through_an_upload_session(attack, client, tmp_path):
    shape = attack["volume_shape"]
    path = tmp_path / "added.nii.gz"
    nib.save(nib.load(str(attack["tmp"] / "studies" / f"{VOLUME}.nii.gz")), path)
    session = client.create_session(str(path))
    sid = session["session_id"]
    assert len(sid) == 32 and session["session_info"]["name"] == "image.nii.gz"
    k, (i, j) = attack["lesion_slice"], attack["lesion_click"]
    label, result = client.infer(
        "ibisagent", "added", _deepgrow(attack, k, [[i, j, k]], run_agent=False), session_id=sid
    )
    assert result["image"] == f"upload-{sid}" and np.asanyarray(nib.load(label).dataobj).shape == shape
    assert call(attack["server"], "GET", f"/session/{sid}").json()["session_id"] == sid
    assert call(attack["server"], "DELETE", f"/session/{sid}").status_code == 200
    with pytest.raises(MONAILabelClientException, match="unknown or expired"):
        client.infer("ibisagent", "added", _deepgrow(attack, k, [[i, j, k]], run_agent=False), session_id=sid)


@pytest.mark.parametrize(
    ("session_id", "status"), [("../outside", 404), ("0" * 32, 404), ("a" * 31, 404), ("../../" + "a" * 32, 404)]
)
def test_upload_session_ids_are_looked_up_never_joined(attack, session_id, status):
    response = call(attack["server"], "GET", f"/session/{session_id}")
    assert response.status_code in (status, 404)
    response = call(
        attack["server"],
        "POST",
        "/infer/ibisagent",
        params={"image": "x", "session_id": session_id, "output": "json"},
        data={"params": json.dumps({"instruction": "x", "foreground": [[1, 1, 0]], "run_agent": False})},
    )
    assert response.status_code == 404 and "upload session" in response.json()["detail"]


def test_upload_sessions_take_one_image_and_never_unpack(attack, tmp_path):
    server = attack["server"]
    response = call(server, "PUT", "/session/", params={"uncompress": "true"}, files={"files": ("a.tar.gz", b"x")})
    assert response.status_code == 400 and "uncompress is not supported" in response.json()["detail"]
    response = call(server, "PUT", "/session/", files={"files": ("notes.txt", b"x")})
    assert response.status_code == 400 and "must be a NIfTI volume" in response.json()["detail"]
    two = [("files", ("a.png", b"x")), ("files", ("b.png", b"y"))]
    response = call(server, "PUT", "/session/", files=two)
    assert response.status_code == 400 and "one image file per session" in response.json()["detail"]


def test_a_second_upload_of_another_kind_does_not_replace_a_study(attack, client, tmp_path):
    path = tmp_path / "04_CT_liver.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), path)
    with pytest.raises(MONAILabelClientException, match="already names a .png study"):
        client.upload_image(str(path), "04_CT_liver")
    objects = call(attack["server"], "GET", "/datastore/", params={"output": "all"}).json()["objects"]
    assert objects["04_CT_liver"]["image"]["ext"] == ".png"


def test_image_info_reports_the_geometry_and_no_server_path(attack, tmp_path):
    """What a client compares with its own volume before trusting an image id (a left-handed affine included)."""
    las = np.diag([-0.8, 0.8, 2.5, 1.0])
    las[:3, 3] = [10.0, -20.0, 5.0]
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), las), path)
    files = {"file": ("las.nii.gz", path.read_bytes())}
    assert call(attack["server"], "PUT", "/datastore/image", params={"image": "las"}, files=files).status_code == 200
    try:
        info = call(attack["server"], "GET", "/datastore/image/info", params={"image": "las"}).json()
        assert "path" not in info and info["geometry"]["kind"] == "nifti" and info["geometry"]["shape"] == [6, 5, 4]
        np.testing.assert_allclose(info["geometry"]["affine"], las)
        png = call(attack["server"], "GET", "/datastore/image/info", params={"image": "08_MRI_heart"}).json()
        assert png["geometry"] == {"kind": "raster", "shape": [1024, 1024], "affine": None}
        assert call(attack["server"], "GET", "/datastore/image/info", params={"image": "nope"}).status_code == 404
    finally:
        call(attack["server"], "DELETE", "/datastore/image", params={"id": "las"})
