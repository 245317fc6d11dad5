"""The studies folder as MONAI Label's local datastore, with ids and tags that cannot leave it.

MONAI Label 0.8.5 joins the `image` id of `PUT /datastore/image` and the `tag` of `PUT /datastore/label` onto the
studies folder as they come, so `../x` or an absolute path writes a file outside it (which is then listed as an
image), and an id linked to a file elsewhere is overwritten there. It also answers an unknown id with the path ""
(the server's working directory), which the /infer endpoint reads as a DICOM series for a `.bin` label upload.
"""

from __future__ import annotations

import os
from typing import Any

from monailabel.datastore.local import LocalDatastore

from .errors import RequestError


class StudiesDatastore(LocalDatastore):
    """`LocalDatastore` that refuses (400) an image id or label tag that is not a plain name or whose file would lie
    outside the studies folder, and answers an unknown image id with 404 instead of an empty path."""

    def get_image_uri(self, image_id: str) -> str:
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        return super().get_image_uri(image_id)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:  # empty: MONAI Label takes the id from the temporary file's name
            _check_name("image", image_id)
            _, ext = self._to_id(os.path.basename(image_filename))
            self._check_inside(os.path.join(self._datastore.image_path(), self._filename(image_id, ext)), "image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        _check_name("tag", label_tag)
        _, ext = self._to_id(os.path.basename(label_filename))
        self._check_inside(os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, ext)), "tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def _check_inside(self, path: str, field: str) -> None:
        """Links resolved, `path` must stay in the studies folder (a linked study file is read, never written)."""
        root = os.path.realpath(self._datastore.base_path)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise RequestError(
                400, f"{field}: the file {os.path.basename(path)!r} links outside the studies folder; use a new name"
            )


def _check_name(field: str, value: Any) -> None:
    if not (isinstance(value, str) and value.strip() and value not in (".", "..")) or any(
        c in value for c in ("/", "\\", "\0")
    ):
        raise RequestError(
            400, f"{field} {_show(value)} must be a plain name: no '/', '\\', NUL, and not '.' or '..' (not a path)"
        )


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
