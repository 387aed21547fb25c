"""Task files: a task declared once (name, data, label set, descriptions, out-of-scope label).

`tandem train`, the retrainer, `tandem cloud` and every benchmark read a task file; the edge
reads none (its labels come from the signed artifact). Data paths resolve against
TANDEM_DATA_DIR; a task file's own path, against the directory of the config naming it.
"""

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator

from tandem import envs
from tandem.contract import LABEL_MAX_CHARS, OUT_OF_SCOPE, SafeName
from tandem.settings import ConfigError, Section, relative_to_config

# The shipped task files (banking77): beside the packages in a checkout and in the cloud image.
SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "tasks"


LABEL_RULE = f"1 to {LABEL_MAX_CHARS} printable characters, not starting or ending with a space"


def is_label(name: str) -> bool:
    return 0 < len(name) <= LABEL_MAX_CHARS and name.isprintable() and name == name.strip()


@dataclass(frozen=True)
class Example:
    text: str
    label: str


class Task(Section):
    """A classification task. Its fields are the task file's keys."""

    name: SafeName = Field(description="Task name used on the wire, in caches and in the registry.")
    label_set_version: int = Field(
        1, ge=1, description="Raise it whenever labels are added: artifacts and expert answers carry it, and the "
        "cloud retries (rather than refuses) feedback whose label comes from a newer version than it knows.",
    )
    train: Path = Field(description="Training data, CSV or JSONL with a text and a label column.")
    test: Path = Field(description="Held-out data for evaluation.")
    text_column: str = "text"
    label_column: str = Field("label", description="Column holding the label name.")
    labels: dict[str, str] | None = Field(
        None, description="The label set: a list of names, or a mapping from name to a short description (the "
        "LLM expert's prompt shows it). Default: the sorted labels of `train`, without descriptions.",
    )
    out_of_scope: str | None = Field(
        None, description="The label meaning 'fits no intent', whether or not the data holds examples of it. "
        f"Default: Tandem's reserved {OUT_OF_SCOPE!r}.",
    )
    attribution: str | None = Field(None, description="Where the data comes from and its licence.")

    @field_validator("labels", mode="before")
    @classmethod
    def _names_only(cls, labels: Any) -> Any:
        if isinstance(labels, list):
            if len(set(labels)) != len(labels):
                raise ValueError("duplicate label names")
            return {name: "" for name in labels}
        return labels

    @field_validator("labels")
    @classmethod
    def _valid_names(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        bad = [name for name in labels or {} if not is_label(name)]
        if bad:
            raise ValueError(f"invalid label names {bad[:5]}: {LABEL_RULE}")
        return labels

    @field_validator("out_of_scope")
    @classmethod
    def _valid_out_of_scope(cls, label: str | None) -> str | None:
        if label is not None and not is_label(label):
            raise ValueError(f"invalid label name {label!r}: {LABEL_RULE}")
        return label

    @classmethod
    def from_file(cls, path: Path) -> "Task":
        """Reads and validates a task file; errors name the file and the field."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read task file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"task file {path}: top level must be a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"task file {path}: {problems}") from None

    @property
    def oos_label(self) -> str:
        """The label that answers 'fits no intent'."""
        return self.out_of_scope or OUT_OF_SCOPE

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else envs.TANDEM_DATA_DIR / p

    def load(self, which: str) -> list[Example]:
        """Reads the `train` or `test` split."""
        return read_examples(self.path(getattr(self, which)), self.text_column, self.label_column)

    def label_names(self) -> list[str]:
        """The label set: the declared (or training) labels, then the out-of-scope label if they lack it."""
        names = list(self.labels) if self.labels is not None else sorted({e.label for e in self.load("train")})
        return names if self.oos_label in names else [*names, self.oos_label]

    def model_labels(self, train: list[Example]) -> list[str]:
        """The classes a model of the task learns from `train`: the label set, less the
        out-of-scope label unless `train` holds examples of it (the boundary answers it then)."""
        names = self.label_names()
        if any(e.label == self.oos_label for e in train):
            return names
        return [name for name in names if name != self.oos_label]

    def descriptions(self) -> dict[str, str]:
        """Each label's description ('' where the task file gives none)."""
        given = self.labels or {}
        return {name: given.get(name, "") for name in self.label_names()}


def load_task(value: Any) -> Any:
    """A task file path (str or Path; relative: to the config file naming it) becomes its Task;
    a mapping or Task passes through."""
    return Task.from_file(relative_to_config(Path(value))) if isinstance(value, (str, Path)) else value


# A config field naming a task file (or holding a task inline, as tests and benchmarks build them).
TaskFile = Annotated[Task, BeforeValidator(load_task)]


def banking77() -> Task:
    """The shipped BANKING77 task (PolyAI, CC BY 4.0), laid out under TANDEM_DATA_DIR/banking77."""
    return Task.from_file(SHIPPED_TASKS / "banking77.yaml")


def read_examples(path: Path, text_column: str, label_column: str) -> list[Example]:
    """Reads `text,label` rows from a .csv or .jsonl file."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            try:
                rows = list(reader)
            except csv.Error as exc:  # a field past csv's size limit, say: named, not a traceback
                raise ValueError(f"{path}, line {reader.line_num + 1}: {exc}") from exc  # the line being read
    try:
        return [Example(r[text_column], r[label_column]) for r in rows]
    except KeyError as exc:
        raise ValueError(f"{path}: missing column {exc}") from exc


def check_task(task: Task) -> dict[str, Any]:
    """Reads both splits and checks them against the label set; returns split sizes and label
    counts, or raises ConfigError naming the field at fault."""
    labels = set(task.label_names())
    report: dict[str, Any] = {"task": task.name, "label_set_version": task.label_set_version,
                              "labels": len(labels), "out_of_scope": task.oos_label}
    for split in ("train", "test"):
        try:
            examples = task.load(split)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{split}: {exc}") from exc
        unknown = sorted({e.label for e in examples} - labels)
        if unknown:
            raise ConfigError(f"{split}: labels not in the label set (field labels): {unknown[:5]}")
        blank = sum(1 for e in examples if not e.text.strip())
        if blank:
            raise ConfigError(f"{split}: {blank} rows with a blank {task.text_column!r}")
        report[split] = {"size": len(examples), "label_counts": dict(Counter(e.label for e in examples).most_common())}
    return report
