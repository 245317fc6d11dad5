"""Hardening, paths: no request reaches a file outside the studies folder — an upload-session id that is a path, a
linked study deleted, a server file named as the label upload, an image id that is also a file in the working
directory. The real server (`attack.py`); the package fixture checks the canaries at the end."""

from __future__ import annotations

import json

import pytest

from tests.monailabel_app.attack import CANARIES, LIVER, call, infer, png_bytes

pytest.importorskip("monailabel")


def test_a_session_id_path_in_the_query_is_unknown_and_nothing_is_deleted(attack):
    for session_id in ("../outside", "../../outside", str(attack["tmp"] / "outside")):
        response = infer(attack["server"], params={"instruction": "x"}, query={"session_id": session_id})
        assert response.status_code == 404 and "upload session" in response.json()["detail"]
    assert all((attack["tmp"] / name).is_file() for name in CANARIES)


def test_deleting_a_linked_study_removes_the_link_not_the_shared_file(attack):
    server, tmp = attack["server"], attack["tmp"]
    assert "linked" in call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"]
    assert call(server, "DELETE", "/datastore/image", params={"id": "linked"}).status_code == 200
    assert not (tmp / "studies" / "linked.png").exists()
    assert (tmp / "shared-data" / "linked_target.png").is_file()
    assert "linked" not in call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"]
    assert call(server, "DELETE", "/datastore/image", params={"id": "linked"}).status_code == 404


def test_a_server_file_is_never_read_as_the_label_upload(attack):
    server, tmp = attack["server"], attack["tmp"]
    for name in ("canary.png", "outside/image.png"):
        result = infer(server, params={"label": str(tmp / name), "foreground": [[5, 5]], "run_agent": False}).json()
        assert result["trajectory"]["initial_masks"] == {}  # a segment's name, nothing more
    # a file in the server's temp folder named as MONAI Label names its uploads (tmpXXXXXXXX.png): still a name
    planted = tmp / "server-tmp" / "tmpabcd1234.png"
    planted.write_bytes(attack_mask_png())
    try:
        result = infer(server, params={"label": str(planted), "foreground": [[5, 5]], "run_agent": False}).json()
    finally:
        planted.unlink()
    assert result["trajectory"]["initial_masks"] == {}
    response = infer(server, params={"ibisagent_label_upload": str(tmp / "canary.png"), "run_agent": False})
    assert response.status_code == 400 and "set by the server" in response.json()["detail"]


def attack_mask_png() -> bytes:
    """A 1024 x 1024 mask (the liver image's size) with a foreground square."""
    import io

    import numpy as np
    from PIL import Image

    mask = np.zeros((1024, 1024), np.uint8)
    mask[100:300, 100:300] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_id_that_names_a_file_in_the_working_directory_reads_the_datastore_image(attack):
    server = attack["server"]
    files = {"file": ("upload.png", png_bytes(48), "image/png")}
    assert call(server, "PUT", "/datastore/image", params={"image": "setup.py"}, files=files).status_code == 200
    result = infer(server, "setup.py", {"instruction": "x", "foreground": [[5, 5]], "run_agent": False})
    assert result.status_code == 200, result.text
    assert result.json()["trajectory"]["image_size"] == [48, 48]  # the upload, not ./setup.py
    assert call(server, "DELETE", "/datastore/image", params={"id": "setup.py"}).status_code == 200


def test_image_ids_are_datastore_ids_only(attack):
    for image in ("../canary", str(attack["tmp"] / "canary.png"), "canary.png", "studies/" + LIVER):
        response = infer(attack["server"], image, {"instruction": "x", "foreground": [[5, 5]], "run_agent": False})
        assert response.status_code == 404 and "unknown image id" in json.dumps(response.json())
