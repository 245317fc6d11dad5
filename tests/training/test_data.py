"""The MONAI-loaded BiomedParse dataset: listing from names and from COCO JSON, bad entries reported and skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ibisagent_training.data import BiomedParseDataset, SampleError, list_entries, write_coco_json
from tests.conftest import DEMO, needs_demo

pytestmark = needs_demo


def test_demo_loads_in_the_agent_frame():
    ds = BiomedParseDataset(DEMO)
    assert len(ds) == 71 and ds.report.skipped == 0
    item = ds[ds.entries.index(next(e for e in ds.entries if e["id"].endswith("06_CT_abdomen_liver")))]
    assert item["image"].shape == (1024, 1024, 3) and item["image"].dtype == np.uint8
    assert item["label"].dtype == bool and item["label"].shape == (1024, 1024)
    # the same pixels as a plain PIL read, rows first (MONAI's PIL reader would transpose by default)
    assert np.array_equal(item["label"], np.asarray(Image.open(item["label_path"]))[..., 0] > 0)
    assert item["target"] == "liver" and item["modality"] == "CT" and item["site"] == "abdomen"
    assert item["group"] == "BiomedParseData-Demo"


def test_bad_entries_are_reported_with_the_file_and_skipped(small_demo):
    masks = small_demo / "train_mask"
    Image.fromarray(np.zeros((192, 192), np.uint8)).save(masks / "06_CT_abdomen_empty+thing.png")
    Image.fromarray(np.full((100, 80), 255, np.uint8)).save(masks / "06_CT_abdomen_wrong+size.png")
    (masks / "06_CT_abdomen_broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((192, 192), 255, np.uint8)).save(masks / "99_CT_nowhere_orphan.png")
    ds = BiomedParseDataset(small_demo)
    good = [item["id"] for _, item in ds.iter_valid()]
    assert len(good) == len(ds) - 3 and ds.report.loaded == len(good)
    reasons = {p.file.split("/")[-1]: p.reason for p in ds.report.problems}
    assert reasons["99_CT_nowhere_orphan.png"].startswith("missing image")
    assert reasons["06_CT_abdomen_empty+thing.png"].startswith("empty mask")
    assert (
        reasons["06_CT_abdomen_wrong+size.png"].startswith("size mismatch")
        and "80x100" in reasons["06_CT_abdomen_wrong+size.png"]
    )
    assert any(k.startswith("06_CT_abdomen") and v.startswith("unreadable") for k, v in reasons.items())
    assert ds.report.skipped == 4 and "4 skipped" in ds.report.summary()
    with pytest.raises(SampleError, match="empty mask"):
        ds[next(i for i, e in enumerate(ds.entries) if "empty+thing" in e["label"])]


def test_coco_json_written_from_names_is_read_back(small_demo):
    from_names = list_entries(small_demo)
    path = write_coco_json(small_demo / "train")
    assert path == small_demo / "train.json"
    doc = json.loads(path.read_text())
    assert {"images", "annotations", "categories"} <= set(doc) and len(doc["annotations"]) == len(from_names)
    doc["annotations"][0]["sentences"] = [{"sent": "the big organ on the left"}, "a plain string too"]
    doc["annotations"].append({"id": 999, "image_id": 0, "mask_file": "gone.png", "category_id": 1})
    path.write_text(json.dumps(doc))
    from ibisagent_training.data import DataReport

    report = DataReport()
    from_json = list_entries(small_demo, report=report)
    assert [e["id"] for e in from_json] == [e["id"] for e in from_names]
    assert [e["target"] for e in from_json] == [e["target"] for e in from_names]
    assert from_json[0]["sentences"] == ["the big organ on the left", "a plain string too"]
    assert [p.reason.split(":")[0] for p in report.problems] == ["missing mask"]


def test_a_broken_coco_json_says_how_to_recover(small_demo):
    (small_demo / "train.json").write_text("{not json")
    with pytest.raises(SampleError, match="delete it to list the split from file names"):
        list_entries(small_demo)


def test_dataset_of_datasets_and_split_selection(tmp_path):
    from tests.training.conftest import write_small_demo

    write_small_demo(tmp_path / "all" / "A", images=("06_CT_abdomen",))
    write_small_demo(tmp_path / "all" / "B", images=("08_MRI_heart",))
    write_small_demo(tmp_path / "all" / "B", images=("16_X-Ray_chest",), split="test")
    entries = list_entries(tmp_path / "all", split="train")
    assert {e["group"] for e in entries} == {"A", "B"}
    assert all("X-Ray" not in e["id"] for e in entries)
    with pytest.raises(FileNotFoundError, match="'valid'"):
        list_entries(tmp_path / "all", split="valid")
