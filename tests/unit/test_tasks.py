import json
from pathlib import Path

import pytest

from tandem.tasks import Example, TaskSpec, read_examples


def test_csv_and_jsonl_read_the_same_examples(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,category\n"hello, world",greet\nbye,leave\n')
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "hello, world", "category": "greet"}) + "\n\n" + json.dumps({"text": "bye", "category": "leave"}) + "\n"
    )
    expected = [Example("hello, world", "greet"), Example("bye", "leave")]
    assert read_examples(tmp_path / "a.csv", "text", "category") == expected
    assert read_examples(tmp_path / "a.jsonl", "text", "category") == expected


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,category\nhi,greet\n")
    with pytest.raises(ValueError, match="missing column 'label'"):
        read_examples(tmp_path / "a.csv", "text", "label")


def test_relative_paths_resolve_against_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.csv").write_text("text,label\nb,y\na,x\n")
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path))
    spec = TaskSpec(name="t", train=Path("t/train.csv"), test=Path("t/train.csv"))
    assert spec.label_names() == ["x", "y"]
    assert spec.load("train")[0] == Example("b", "y")
