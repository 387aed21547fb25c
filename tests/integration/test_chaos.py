"""The short chaos run (`tandem bench chaos --short`): the real cloud and four edge daemons
under traffic while one of each fault strikes. Asserts what must hold whatever the timing;
the speed targets (recovery time, RSS under overload, fallback latency) are the benchmark's."""

from pathlib import Path

import pytest

from benchmarks.chaos.config import SHORT, ChaosConfig
from benchmarks.chaos.run import run_chaos

pytestmark = pytest.mark.integration

FAULTS = ["network_cut", "edge_kill_during_delivery", "network_latency", "disk_full", "corrupt_parquet",
          "edge_kill_during_swap", "overload", "cloud_kill"]


@pytest.fixture(scope="module")
def result(teacher_dir: Path, student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_chaos(ChaosConfig(**SHORT, teacher=teacher_dir, student=student_dir), tmp_path_factory.mktemp("chaos"))


def test_every_fault_ran_and_its_part_came_back(result: dict) -> None:
    names = [f["name"] for f in result["faults"]]
    assert sorted(names[:2]) == ["replica_kill:banking77-classifier", "replica_kill:fleet"] and names[2:] == FAULTS
    assert all(f["back_s"] is not None and f["recovery_s"] is not None for f in result["faults"]), result["faults"]


def test_every_request_was_answered(result: dict) -> None:
    assert result["requests"] >= SHORT["requests"]
    assert result["failed"] == 0, result["errors"]
    assert result["answered"] == result["requests"]


def test_no_feedback_was_lost_or_stored_twice(result: dict) -> None:
    assert result["feedback_accepted"] > 0
    assert result["feedback_lost"] == 0
    assert result["feedback_duplicated"] == 0
    assert result["feedback_left_in_outboxes"] == 0


def test_every_answered_escalation_has_its_record(result: dict) -> None:
    assert result["escalations_answered"] > 0
    assert result["escalations_unrecorded"] == 0


def test_the_corrupt_file_was_quarantined_and_intake_went_on(result: dict) -> None:
    corrupt = next(f for f in result["faults"] if f["name"] == "corrupt_parquet")
    assert corrupt["quarantined"] == 1 and corrupt["records"] > 0


def test_an_edge_killed_mid_swap_comes_back_and_serves_the_new_version(result: dict) -> None:
    swap = next(f for f in result["faults"] if f["name"] == "edge_kill_during_swap")
    assert swap["killed_installed"] and swap["serves_new_version_s"] is not None


def test_a_full_queue_sheds_at_the_edges_door(result: dict) -> None:
    door = result["door_shed"]
    assert door["shed"] > 0 and door["answered"] > 0
    assert not {"INTERNAL", "UNKNOWN", "UNAVAILABLE"} & set(door["other_errors"])


def test_nothing_is_left_running(result: dict) -> None:
    assert result["orphans"] == 0, result["orphan_processes"]
    assert all(not f.get("orphans") for f in result["faults"])


def test_compaction_leaves_few_store_files(result: dict) -> None:
    assert result["store_files_per_1000_records"] < result["store_files_per_1000_records_before_compaction"]
