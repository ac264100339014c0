"""What a local Ray stage starts and what it skips (no Ray started here: seconds, not half a minute)."""
from __future__ import annotations

import json

import pytest

from updetr import phases


def test_phase_marks_only_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "phases.jsonl"
    monkeypatch.delenv(phases.ENV, raising=False)
    phases.mark("nothing")
    assert not log.exists()
    monkeypatch.setenv(phases.ENV, str(log))
    phases.mark("a")
    phases.mark("b")
    with open(log, "a") as fh:
        fh.write('{"phase": "half-writ')  # a writer killed mid-line
    marks = phases.read(str(log))
    assert [m["phase"] for m in marks] == ["a", "b"]
    assert marks[0]["t"] <= marks[1]["t"] and marks[0]["cpu"] >= 0
    assert json.loads(log.read_text().splitlines()[0])["pid"] > 0


def test_phase_log_that_cannot_be_written_never_fails_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv(phases.ENV, str(tmp_path / "missing" / "dir" / "phases.jsonl"))
    phases.mark("x")  # no exception
    assert phases.read(str(tmp_path / "nowhere")) == []


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True), ("true", True),
                                             ("on", True), ("no", False)])
def test_local_dashboard_off_unless_asked(monkeypatch, value, expected):
    from updetr.orchestration.ray_session import DASHBOARD_ENV, want_dashboard

    monkeypatch.setenv(DASHBOARD_ENV, value)
    assert want_dashboard() is expected
    assert want_dashboard(True) is True and want_dashboard(False) is False


def test_trainer_without_state_api_drops_only_the_placement_group_cleaner(tmp_path):
    from ray.train import RunConfig, ScalingConfig

    from updetr.orchestration.launch import _trainer_class

    def names(cleaner: bool) -> list[str]:
        trainer = _trainer_class(cleaner)(lambda config: None, scaling_config=ScalingConfig(num_workers=1),
                                          run_config=RunConfig(storage_path=str(tmp_path), name="t"))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    with_cleaner, without = names(True), names(False)
    assert "PlacementGroupCleanerCallback" in with_cleaner
    assert without == [n for n in with_cleaner if n != "PlacementGroupCleanerCallback"]
