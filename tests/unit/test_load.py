"""`tandem bench load`'s pure parts: the rate schedule, the config's rules, the data's truth,
and the out-of-scope arithmetic."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from benchmarks.edge_load import Accuracy, timeline
from benchmarks.load import LoadConfig, arrivals, schedule_offsets, sequence, truth_examples
from tandem.tasks import Task
from tandem.v1 import edge_pb2


def _task(tmp_path: Path, **fields: object) -> Task:
    return Task(name="kiosk", train=tmp_path / "train.csv", test=tmp_path / "test.csv", labels=["balance", "card"],
                **fields)


def _cfg(tmp_path: Path, **fields: object) -> LoadConfig:
    return LoadConfig(target="127.0.0.1:1", task=_task(tmp_path), data=tmp_path / "data.csv", **fields)


def test_a_schedule_string_becomes_steps_of_poisson_arrivals(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, schedule="100:10, 0:5,400:10")
    assert [(s.rate, s.duration) for s in cfg.schedule or []] == [(100, 10), (0, 5), (400, 10)]
    offsets = schedule_offsets(cfg.schedule or [], seed=3)
    first = [t for t in offsets if t < 10]
    paused = [t for t in offsets if 10 <= t < 15]
    last = [t for t in offsets if t >= 15]
    assert abs(len(first) - 1000) < 4 * 1000**0.5 and not paused and abs(len(last) - 4000) < 4 * 4000**0.5
    assert offsets == sorted(offsets) and max(offsets) < 25
    assert offsets == schedule_offsets(cfg.schedule or [], seed=3)
    capped = _cfg(tmp_path, schedule="100:10", count=7, seed=3)
    assert arrivals(capped, 50) == offsets[:7]


@pytest.mark.parametrize(("fields", "message"), [
    ({"schedule": "10x30"}, "schedule.*RATE:SECONDS"),
    ({"schedule": "10:0"}, "schedule.*duration"),
    ({"schedule": "0:10"}, "every step has rate 0"),
    ({}, "exactly one"),
    ({"rate": 5, "schedule": "10:30"}, "exactly one"),
    ({"rate": 5, "duration": 10, "count": 10}, "not both"),
    ({"schedule": "10:30", "duration": 10}, "schedule sets the duration"),
    ({"rate": 5, "cert": "c.pem"}, "cert .* and key"),
    ({"rate": 5, "cert": "c.pem", "key": "k.pem"}, "need ca"),
    ({"rate": 5, "cloud": True, "ca": "ca.pem"}, "device certificate"),
    ({"rate": 5, "route": "no spaces"}, "route"),
])
def test_the_config_names_what_is_wrong(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=f"(?s){message}"):
        _cfg(tmp_path, **fields)


def test_without_duration_or_count_each_row_is_sent_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rate=50)
    assert len(arrivals(cfg, 123)) == 123 and cfg.route_name == "kiosk"
    assert len(arrivals(_cfg(tmp_path, rate=50, count=9), 123)) == 9
    assert max(arrivals(_cfg(tmp_path, rate=50, duration=2), 123)) < 2


def test_rows_outside_the_label_set_are_out_of_scope(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"q": "my balance", "y": "balance"}\n{"q": "weather?", "y": "weather"}\n'
                    '{"q": "lost card", "y": "card"}\n{"q": "a poem", "y": "poetry"}\n{"q": "hm", "y": "none"}\n')
    task = _task(tmp_path, text_column="q", label_column="y", out_of_scope="none")
    examples, info = truth_examples(task, data)
    assert [e.label for e in examples] == ["balance", "none", "card", "none", "none"]
    assert info["rows"] == 5 and info["unknown_label_rows"] == 2 and info["out_of_scope_rows"] == 3
    assert info["unknown_labels"] == ["poetry", "weather"]
    order = sequence(examples, 12, seed=1)
    assert len(order) == 12 and order[:5] != examples and sorted(order[:5], key=str) == sorted(examples, key=str)


def test_open_recall_and_known_accuracy_reconcile_with_accuracy() -> None:
    acc = Accuracy("out_of_scope")
    answers = [("local", "card", "card", False), ("local", "balance", "card", False),
               ("escalated", "out_of_scope", "out_of_scope", True), ("escalated", "out_of_scope", "card", False),
               ("local", "card", "out_of_scope", True)]
    for path, truth, label, flag in answers:
        acc.record(path, truth, edge_pb2.InferResponse(label=label, out_of_scope=flag))
    s = acc.summary()
    assert s["open_rows"] == 2 and s["open_recall"] == 0.5 and s["known_accuracy"] == pytest.approx(1 / 3)
    assert s["accuracy"] * s["answered"] == pytest.approx(
        s["open_recall"] * s["open_rows"] + s["known_accuracy"] * (s["answered"] - s["open_rows"]))
    assert s["out_of_scope_answers"] == 2 and s["by_path"]["escalated"]["out_of_scope_answers"] == 1
    assert sum(p["share"] for p in s["by_path"].values()) == pytest.approx(1.0)
    empty = Accuracy("out_of_scope").summary()
    assert empty["open_recall"] is None and empty["known_accuracy"] is None and empty["accuracy"] is None


def test_the_timeline_counts_requests_per_second() -> None:
    t = timeline([0.1, 0.5, 1.2, 2.9], [0.2, 1.4, 3.5], [0.6])
    assert t == {"bin_s": 1.0, "offered": [2, 1, 1, 0], "answered": [1, 1, 0, 1], "failed": [1, 0, 0, 0]}
