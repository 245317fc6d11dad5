"""TrajectoryRecord, the one record type between trajectory generation and SFT, GRPO and the statistics: its JSON
round trip, its checks, and the record files' readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent.trajectory import Step, Trajectory
from ibisagent.types import Action, Click
from ibisagent_training.records import RECORD_VERSION, Appender, TrajectoryRecord, iter_kept, iter_records


def _record(variant: str = "gold", reject: str | None = None, masked: tuple[int, ...] = ()) -> TrajectoryRecord:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    click = Click(1.5, 1.5, True, "liver")
    steps = [Step(k, "text", action=Action((click,)), masks={"liver": mask}) for k in range(3)]
    traj = Trajectory("segment the liver", (4, 4), ["liver"], steps=steps, meta={"masked_steps": list(masked)})
    return TrajectoryRecord(
        id=f"ds/img_CT_abdomen_liver#{variant}",
        target="liver",
        modality="CT",
        image="img.png",
        mask="img_liver.png",
        variant=variant,
        reject=reject,
        trajectory=traj.to_dict(),
    )


def test_json_round_trip_and_step_views():
    record = _record("self_correction", masked=(1,))
    data = json.loads(json.dumps(record.to_json()))
    assert data["version"] == RECORD_VERSION and TrajectoryRecord.from_json(data) == record
    assert record.kept and record.num_steps == 3 and record.masked_steps == {1} and record.trained_steps == [0, 2]
    assert np.array_equal(record.load_trajectory().steps[0].masks["liver"], record.load_trajectory().final_mask)


def test_other_versions_and_incomplete_records_are_refused_by_name():
    data = _record().to_json()
    with pytest.raises(ValueError, match=r"version '0'.*regenerate"):
        TrajectoryRecord.from_json({**data, "version": "0"})
    del data["mask"]
    with pytest.raises(ValueError, match=r"'ds/img_CT_abdomen_liver#gold' is incomplete.*mask"):
        TrajectoryRecord.from_json(data)


def test_readers_keep_kept_records_of_the_asked_variants(tmp_path):
    writer = Appender(tmp_path / "trajectories-00000-of-00001.jsonl")
    for record in (_record(), _record("self_correction"), _record(reject="low dice: 0.5 < 0.9")):
        writer.write(record.to_json())
    writer.close()
    assert len(list(iter_records(tmp_path))) == 3
    assert [r.variant for r in iter_kept(tmp_path)] == ["gold", "self_correction"]
    assert [r.variant for r in iter_kept(tmp_path, ("gold",))] == ["gold"]


def test_a_damaged_line_in_the_middle_is_reported_and_later_records_are_kept(tmp_path):
    path = tmp_path / "trajectories-00000-of-00001.jsonl"
    first, second = _record().to_json(), _record("self_correction").to_json()
    path.write_text(json.dumps(first) + "\n" + "garbage {\n" + json.dumps(second) + "\n" + '{"id": "half')
    from ibisagent_training.records import read_records

    with pytest.warns(UserWarning, match=r":2: not a JSON object, skipped"):
        assert [r["variant"] for r in read_records(path)] == ["gold", "self_correction"]
    appender = Appender(path)  # resuming: only the partial last line is cut
    appender.write(_record("user_inconsistency").to_json())
    appender.close()
    with pytest.warns(UserWarning):
        assert [r["variant"] for r in read_records(path)] == ["gold", "self_correction", "user_inconsistency"]
