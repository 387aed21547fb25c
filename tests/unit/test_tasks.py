import json
from pathlib import Path

import pytest

from tandem.contract import OUT_OF_SCOPE
from tandem.settings import ConfigError
from tandem.tasks import Example, Task, banking77, check_task, read_examples


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
    task = Task(name="t", train=Path("t/train.csv"), test=Path("t/train.csv"))
    assert task.label_names() == ["x", "y", OUT_OF_SCOPE]
    assert task.model_labels(task.load("train")) == ["x", "y"]
    assert task.load("train")[0] == Example("b", "y")


def test_a_named_out_of_scope_label_with_examples_is_a_class_the_model_learns(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhi,greet\nweather?,oos\n")
    task = Task(name="t", train=tmp_path / "train.csv", test=tmp_path / "train.csv", out_of_scope="oos",
                labels={"greet": "a greeting", "oos": "anything else"})
    assert task.label_names() == ["greet", "oos"]
    assert task.model_labels(task.load("train")) == ["greet", "oos"]
    assert task.descriptions() == {"greet": "a greeting", "oos": "anything else"}


@pytest.mark.parametrize(("body", "field"), [
    ("name: t\ntrain: a.csv\n", "test: Field required"),
    ("name: ../t\ntrain: a.csv\ntest: a.csv\n", "name: String should match pattern"),
    ("name: t\ntrain: a.csv\ntest: a.csv\nlabels: [a, a]\n", "labels: Value error, duplicate label names"),
    ("name: t\ntrain: a.csv\ntest: a.csv\nlabels: [\"a\\tb\"]\n", "labels: Value error, invalid label names"),
    ("name: t\ntrain: a.csv\ntest: a.csv\nlabel_set_version: 0\n", "label_set_version: Input should be greater"),
    ("name: t\ntrain: a.csv\ntest: a.csv\nout_of_scope: ' x'\n", "out_of_scope: Value error, invalid label name"),
    ("name: t\ntrain: a.csv\ntest: a.csv\nlabelz: [a]\n", "labelz: Extra inputs are not permitted"),
    ("- just a list\n", "top level must be a mapping"),
])
def test_task_file_errors_name_the_file_and_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        Task.from_file(path)
    assert str(info.value).startswith(f"task file {path}: ") and field in str(info.value)


def test_check_names_the_split_whose_labels_are_outside_the_label_set(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhi,greet\n")
    (tmp_path / "test.csv").write_text("text,label\nbye,leave\n")
    task = Task(name="t", train=tmp_path / "train.csv", test=tmp_path / "test.csv", labels=["greet"])
    with pytest.raises(ConfigError, match=r"test: labels not in the label set \(field labels\): \['leave'\]"):
        check_task(task)


def test_check_counts_labels_and_splits(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhi,greet\nhello,greet\nbye,leave\n")
    (tmp_path / "test.csv").write_text("text,label\nhey,greet\nrain?,out_of_scope\n")
    report = check_task(Task(name="t", train=tmp_path / "train.csv", test=tmp_path / "test.csv"))
    assert report["train"] == {"size": 3, "label_counts": {"greet": 2, "leave": 1}}
    assert report["test"] == {"size": 2, "label_counts": {"greet": 1, "out_of_scope": 1}}
    assert report["labels"] == 3 and report["out_of_scope"] == OUT_OF_SCOPE


def test_the_shipped_banking77_task_declares_its_77_intents_and_attribution() -> None:
    task = banking77()
    assert task.name == "banking77" and len(task.label_names()) == 78 and task.oos_label == OUT_OF_SCOPE
    assert "CC BY 4.0" in (task.attribution or "")


def test_a_malformed_csv_is_a_clear_error_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\nhi,greet\n" + "x" * 200_000 + ",leave\n")
    with pytest.raises(ValueError, match=r"a.csv, line 3: field larger than field limit"):
        read_examples(tmp_path / "a.csv", "text", "label")
