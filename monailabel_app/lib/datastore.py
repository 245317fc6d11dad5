"""The studies folder as MONAI Label's local datastore, with ids and tags that cannot leave it.

MONAI Label 0.8.5 joins the `image` id of `PUT /datastore/image` and the `tag` of `PUT /datastore/label` onto the
studies folder as they come, so `../x` or an absolute path writes a file outside it (which is then listed as an
image), and an id linked to a file elsewhere is overwritten there. It also answers an unknown id with the path ""
(the server's working directory), and `DELETE /datastore/image` of a study that is a link deletes the linked file.
It rewrites its index (`datastore_v2.json`) in place, so a kill during the write leaves a broken index that stops
the next start. Its file watcher (auto reload) reconciles the index from its own thread while a request changes it,
so a request can fail with "dictionary changed size during iteration" (a DELETE answered 500). This class closes
each of these.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import threading
import time
from typing import Any

import numpy as np
from monailabel.datastore.local import LocalDatastore

from .errors import RequestError

logger = logging.getLogger(__name__)

MAX_NAME = 128  # characters of an image id or a label tag
MAX_INFO_BYTES = 64 * 1024  # an image's or label's info (PUT /datastore/image/info), as JSON
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _serialised(method):
    """Run `method` holding the datastore's index lock (re-entrant: a change that reconciles takes it once more)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._index_lock:
            return method(self, *args, **kwargs)

    return locked


class StudiesDatastore(LocalDatastore):
    """`LocalDatastore` that refuses (400) an image id or label tag that is not a plain name or whose file would lie
    outside the studies folder, answers an unknown image id with 404 instead of an empty path, deletes a linked
    study's link (never the file it points to), bounds the info a client stores, writes its index atomically
    (a broken index found at start is set aside and rebuilt from the folder), and changes the index in one thread at
    a time (requests and the file watcher's reconciliation), never while a request lists it."""

    def __init__(self, datastore_path: str, *args, **kwargs):
        self._index_lock = threading.RLock()
        index = os.path.join(datastore_path, kwargs.get("datastore_config", "datastore_v2.json"))
        _set_aside_if_broken(index)
        super().__init__(datastore_path, *args, **kwargs)

    def get_image_uri(self, image_id: str) -> str:
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        return super().get_image_uri(image_id)

    @_serialised
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            if image_id:  # empty: MONAI Label takes the id from the temporary file's name
                _check_name("image", image_id)
                _, ext = self._to_id(os.path.basename(image_filename))
                self._check_inside(os.path.join(self._datastore.image_path(), self._filename(image_id, ext)), "image")
                known = self._datastore.objects.get(image_id)
                if known is not None and known.image.ext != ext:
                    raise RequestError(
                        409,
                        f"image id {_show(image_id)} already names a {known.image.ext} study; a {ext} upload would "
                        "hide it: upload under another id, or DELETE /datastore/image?id=... first",
                    )
            _check_info(image_info, "params")
        except RequestError:
            _remove_upload(image_filename)
            raise
        return super().add_image(image_id, image_filename, image_info)

    @_serialised
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            if image_id not in self._datastore.objects:
                raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
            _check_name("tag", label_tag)
            _, ext = self._to_id(os.path.basename(label_filename))
            path = os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, ext))
            self._check_inside(path, "tag")
            _check_info(label_info, "params")
        except RequestError:
            _remove_upload(label_filename)
            raise
        return super().save_label(image_id, label_filename, label_tag, label_info)

    @_serialised
    def remove_image(self, image_id: str) -> None:
        """Remove the image and its labels. A study that is a link loses its link; the linked file stays."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        path = os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))
        if os.path.islink(path):
            for tag in list(obj.labels):
                self.remove_label(image_id, tag)
            os.unlink(path)  # the link itself
            logger.info("removed the linked study %s (its target is kept)", _show(image_id))
            self.refresh()
            return
        self._check_inside(path, "id")
        super().remove_image(image_id)

    @_serialised
    def remove_label(self, label_id: str, label_tag: str) -> None:
        _check_name("tag", label_tag)
        obj = self._datastore.objects.get(label_id)
        if obj is None or label_tag not in obj.labels:
            raise RequestError(404, f"image {_show(label_id)} has no label tagged {_show(label_tag)}")
        path = os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, obj.labels[label_tag].ext))
        if os.path.islink(path):
            os.unlink(path)
            self.refresh()
            return
        self._check_inside(path, "tag")
        super().remove_label(label_id, label_tag)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """The image's stored info, without the server's file path (it means nothing to a client), with its geometry
        from the file's header: {"kind", "shape", "affine"} (the NIfTI's voxel -> RAS matrix; None for 2D files).
        A client compares it with its own volume before trusting an image id (Slicer's module does)."""
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        info = super().get_image_info(image_id)
        path = info.pop("path", None)
        if path:
            info["geometry"] = image_geometry(path)
        return info

    @_serialised
    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"unknown image id {_show(image_id)}; GET /datastore/?output=all lists the ids")
        _check_info(info, "info")
        _check_info({**self._datastore.objects[image_id].image.info, **info}, "the image's info with this update")
        return super().update_image_info(image_id, info)

    @_serialised
    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        obj = self._datastore.objects.get(label_id)
        if obj is None or label_tag not in obj.labels:
            raise RequestError(404, f"image {_show(label_id)} has no label tagged {_show(label_tag)}")
        _check_info(info, "info")
        _check_info({**obj.labels[label_tag].info, **info}, "the label's info with this update")
        return super().update_label_info(label_id, label_tag, info)

    # Reads that walk the index: a reconciliation must not change it under them.
    @_serialised
    def list_images(self) -> list[str]:
        return super().list_images()

    @_serialised
    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return super().get_labeled_images(label_tag, labels)

    @_serialised
    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return super().get_unlabeled_images(label_tag, labels)

    @_serialised
    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        return super().get_labels_by_image_id(image_id)

    @_serialised
    def status(self) -> dict[str, Any]:
        return super().status()

    @_serialised
    def json(self):
        return super().json()

    @_serialised
    def _reconcile_datastore(self):
        super()._reconcile_datastore()

    @_serialised
    def _on_modify_event(self, event):
        super()._on_modify_event(event)

    @_serialised
    def _update_datastore_file(self, lock=True):
        """Write the index to a temporary file beside it, then rename it over the old one: a kill at any moment
        leaves the old index or the new one, never a partial file."""
        from filelock import FileLock

        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            folder = os.path.dirname(self._datastore_config_path)
            fd, tmp = tempfile.mkstemp(prefix=".datastore-", suffix=".json.tmp", dir=folder)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._datastore_config_path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _check_inside(self, path: str, field: str) -> None:
        """Links resolved, `path` must stay in the studies folder (a linked study file is read, never written)."""
        root = os.path.realpath(self._datastore.base_path)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise RequestError(
                400, f"{field}: the file {os.path.basename(path)!r} links outside the studies folder; use a new name"
            )


def image_geometry(path: str) -> dict[str, Any]:
    """{"kind", "shape", "affine"} of an image file from its header alone; {"error": ...} for an unreadable file."""
    from ibisagent.io import ImageReadError, probe_image

    try:
        probed = probe_image(path)
        affine = None
        if probed.kind == "nifti":
            import nibabel as nib

            affine = np.asarray(nib.load(path).affine, float).round(6).tolist()
    except (ImageReadError, OSError, ValueError) as exc:
        return {"error": str(exc).replace(path, os.path.basename(path))}
    return {"kind": probed.kind, "shape": list(probed.shape), "affine": affine}


def _check_name(field: str, value: Any) -> None:
    if not (isinstance(value, str) and value.strip() and value not in (".", "..")) or any(
        c in value for c in ("/", "\\")
    ):
        raise RequestError(
            400, f"{field} {_show(value)} must be a plain name: no '/', '\\', and not '.' or '..' (not a path)"
        )
    if len(value) > MAX_NAME or _CONTROL.search(value) or not _encodable(value):
        raise RequestError(
            400,
            f"{field} {_show(value)} must be at most {MAX_NAME} characters without control characters (newline, "
            "NUL, ...) and valid UTF-8",
        )


def _check_info(info: Any, field: str) -> None:
    """Info a client stores with an image or label: a JSON object of at most MAX_INFO_BYTES."""
    if not isinstance(info, dict):
        raise RequestError(400, f"{field} must be a JSON object, got {type(info).__name__}")
    try:
        size = len(json.dumps(info).encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise RequestError(400, f"{field} cannot be stored: {type(exc).__name__}") from exc
    if size > MAX_INFO_BYTES:
        raise RequestError(400, f"{field} is {size} bytes as JSON; at most {MAX_INFO_BYTES} are stored")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can carry
        return False
    return True


def _remove_upload(path: str) -> None:
    """Delete the temporary copy MONAI Label made of a refused upload (its own clean-up runs only on success)."""
    real = os.path.realpath(path)
    if os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and os.path.isfile(real):
        os.unlink(real)


def _set_aside_if_broken(index: str) -> None:
    """An index that cannot be read (empty after a kill during a write of an older server, or edited by hand) is
    renamed, with a warning; MONAI Label then rebuilds it from the files in the folder."""
    if not os.path.isfile(index):
        return
    try:
        with open(index, encoding="utf-8") as f:
            json.load(f)
        return
    except (ValueError, UnicodeDecodeError):
        pass
    aside = f"{index}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(index, aside)
    logger.warning(
        "the datastore index %s could not be read; kept as %s, rebuilt from the studies folder", index, aside
    )


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
