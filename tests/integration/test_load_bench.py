"""`tandem bench load` against a real edge daemon, with data holding queries of intents the task
does not know; against a cloud's Expert/Escalate (cloud-only mode); and against a target that
does not answer. The numbers must reconcile; none is judged (the student is briefly trained)."""

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.load import LoadConfig, run_load, sequence, truth_examples
from benchmarks.system import edge_config, edge_daemon
from tandem.subprocesses import free_port
from tandem.tasks import Task, banking77

from .conftest import serve_cloud

pytestmark = pytest.mark.integration

ROUTE = "banking77"  # the daemon's task; the task file has a name of its own
UNKNOWN = [("will it rain in Lisbon tomorrow", "weather"), ("play me some jazz", "music"),
           ("how tall is the Eiffel tower", "trivia"), ("book a table for two tonight", "restaurant"),
           ("what is the capital of Peru", "trivia")]


@pytest.fixture(scope="module")
def task_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A task file with banking77's labels under another name, and a CSV of 60 test queries
    plus 15 whose labels are outside the task."""
    work = tmp_path_factory.mktemp("load")
    shipped = banking77()
    task_file = work / "kiosk.yaml"
    task_file.write_text(yaml.safe_dump({
        "name": "kiosk", "train": str(shipped.train), "test": str(shipped.test), "label_column": "category",
        "labels": list(shipped.labels or {})}))
    data = work / "queries.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows((e.text, e.label) for e in shipped.load("test")[::50][:60])
        writer.writerows(UNKNOWN * 3)
    return task_file, data


def _reconciles(r: dict[str, Any], task_file: Path, data: Path) -> None:
    """The counts add up, and the out-of-scope figures cover exactly the open rows sent."""
    assert {"answered", "failed", "errors", "p50_ms", "p99_ms", "accuracy", "escalation_rate", "by_path",
            "open_recall", "known_accuracy"} <= r.keys()
    assert r["answered"] + r["failed"] == r["sent"] and r["failed"] == sum(r["errors"].values())
    assert r["data"]["rows"] == 75 and r["data"]["unknown_label_rows"] == 15 and r["data"]["out_of_scope_rows"] == 15
    assert r["data"]["unknown_labels"] == ["music", "restaurant", "trivia", "weather"]
    assert sum(p["share"] for p in r["by_path"].values()) == pytest.approx(1.0)
    assert sum(p["answered"] for p in r["by_path"].values()) == r["answered"]
    examples, _ = truth_examples(Task.from_file(task_file), data)
    sent = sequence(examples, r["sent"], seed=0)
    assert r["open_rows"] == sum(e.label == r["oos_label"] for e in sent) > 0  # nothing failed
    known = r["answered"] - r["open_rows"]
    assert 0 <= r["open_recall"] <= 1 and 0 <= r["known_accuracy"] <= 1
    correct = r["open_recall"] * r["open_rows"] + r["known_accuracy"] * known
    assert r["accuracy"] * r["answered"] == pytest.approx(correct)


def test_load_on_an_edge_daemon_with_unknown_intents(student_dir: Path, task_and_data: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    task_file, data = task_and_data
    out = tmp_path / "out"
    with edge_daemon(edge_config(ROUTE, student_dir, None)) as daemon:
        run = subprocess.run(
            [sys.executable, "-m", "tandem_cli", "bench", "load", "--target", f"127.0.0.1:{daemon.port}",
             "--task", str(task_file), "--data", str(data), "--out", str(out), "--route", ROUTE,
             "--schedule", "20:2,40:2", "--warmup", "5"],
            capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out / "load.json")
    r = json.loads((out / "load.json").read_text())
    assert r["mode"] == "edge" and r["task"] == "kiosk" and r["route"] == ROUTE and r["oos_label"] == "out_of_scope"
    assert r["failed"] == 0 and r["errors"] == {} and r["by_path"].keys() == {"local"} and r["escalation_rate"] == 0
    assert [s["rate"] for s in r["load"]["schedule"]] == [20, 40]
    _reconciles(r, task_file, data)
    assert sum(r["timeline"]["offered"]) == r["sent"] and sum(r["timeline"]["answered"]) == r["answered"]
    assert all((out / name).stat().st_size > 0 for name in r["plots"].values())


async def test_cloud_only_load_goes_to_the_tasks_expert_application(task_and_data: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    task_file, data = task_and_data
    async with serve_cloud() as (cloud, target):
        cfg = LoadConfig(target=target, cloud=True, task=task_file, data=data, route=ROUTE, rate=50, count=40,
                         warmup=2)
        r = await asyncio.to_thread(run_load, cfg, tmp_path)
    assert r["mode"] == "cloud" and r["sent"] == 40 and r["failed"] == 0
    assert r["by_path"].keys() == {"escalated"} and r["escalation_rate"] == 1.0
    assert {(request.task, meta["application"]) for request, meta in cloud.seen} == {(ROUTE, "banking77-expert")}
    _reconciles(r, task_file, data)


def test_a_target_that_never_answers_is_reported_not_raised(task_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    task_file, data = task_and_data
    cfg = LoadConfig(target=f"127.0.0.1:{free_port()}", task=task_file, data=data, rate=50, count=10, warmup=0,
                     timeout=2)
    r = run_load(cfg, tmp_path)
    assert r["answered"] == 0 and r["failed"] == r["sent"] == 10 and r["errors"] == {"UNAVAILABLE": 10}
    assert r["p50_ms"] is None and r["accuracy"] is None and r["open_recall"] is None and r["by_path"] == {}
    assert json.loads((tmp_path / "load.json").read_text())["failed"] == 10
