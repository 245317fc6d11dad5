"""Hardening, faults: the server restarts after a kill at any moment of its index writes, sets aside an index that an
older server left broken (rebuilding it from the studies folder), and changes its index in one thread at a time while
its file watcher reconciles it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.monailabel_app.attack import LIVER, build, call, start

pytest.importorskip("monailabel")


def test_a_broken_index_is_set_aside_and_rebuilt(tmp_path):
    build(tmp_path)
    (tmp_path / "studies" / "datastore_v2.json").write_text("")  # what a kill during an in-place rewrite left
    server = start(tmp_path, "broken-index")
    try:
        objects = call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"]
        assert LIVER in objects
        assert [p.name.split(".broken-")[0] for p in (tmp_path / "studies").glob("datastore_v2.json.broken-*")] == [
            "datastore_v2.json"
        ]
    finally:
        server.stop()


def test_a_kill_during_index_writes_never_stops_the_next_start(tmp_path):
    build(tmp_path)
    server = start(tmp_path, "killed")
    stop = threading.Event()

    def write_info():
        i = 0
        while not stop.is_set():
            info = {"note": "x" * 20_000, "i": i}
            try:
                call(server, "PUT", "/datastore/image/info", params={"image": LIVER}, data={"info": json.dumps(info)})
            except Exception:  # the server is killed under it
                return
            i += 1

    writers = [threading.Thread(target=write_info) for _ in range(3)]
    try:
        for w in writers:
            w.start()
        for delay in (0.7, 0.35, 0.9):  # three kills at different moments of the write stream
            time.sleep(delay)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(timeout=30)
            server.start()
            server.ready_after = None
            server.wait_ready()
            objects = call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"]
            assert LIVER in objects
            json.loads((tmp_path / "studies" / "datastore_v2.json").read_text())
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=60)
        server.stop()
    assert not list((tmp_path / "studies").glob("datastore_v2.json.broken-*"))  # never broken: the writes are atomic


def test_requests_and_the_file_watcher_change_the_index_one_at_a_time(tmp_path):
    """The watcher's reconciliation (a thread of its own) while requests remove and re-add studies: MONAI Label's
    index dict changed under the other thread's loop ("dictionary changed size during iteration", a DELETE answered
    500 in CI); every change now holds the datastore's lock."""
    import numpy as np
    from PIL import Image

    from monailabel_app.lib.datastore import StudiesDatastore

    for i in range(40):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / f"study{i}.png")
    datastore = StudiesDatastore(str(tmp_path), extensions=["*.png"], auto_reload=False)
    errors, stop = [], threading.Event()

    def watcher():
        while not stop.is_set():
            try:
                datastore.refresh()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))
            stop.wait(0.002)  # the watcher wakes on file events, not in a tight loop

    thread = threading.Thread(target=watcher)
    thread.start()
    try:
        for k in range(150):
            path = tmp_path / f"study{k % 40}.png"
            os.rename(path, f"{path}.away")
            try:
                datastore.refresh() if k % 2 else datastore.get_unlabeled_images()  # a change, or a listing
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            os.rename(f"{path}.away", path)
    finally:
        stop.set()
        thread.join(timeout=60)
    datastore.refresh()
    assert errors == []
    assert sorted(datastore.list_images()) == sorted(f"study{i}" for i in range(40))
