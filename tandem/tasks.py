"""Tasks: a named label set and its `text,label` data (CSV or JSONL)."""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tandem import envs
from tandem.settings import Section


@dataclass(frozen=True)
class Example:
    text: str
    label: str


class TaskSpec(Section):
    """A classification task; relative paths resolve against TANDEM_DATA_DIR."""

    name: str = Field(description="Task name used on the wire and in caches.")
    train: Path = Field(description="Training data, CSV or JSONL with text and label.")
    test: Path = Field(description="Held-out data for evaluation.")
    labels: Path | None = Field(
        None, description="JSON list of label names; default: sorted labels of `train`."
    )
    text_column: str = "text"
    label_column: str = Field("label", description="Column holding the label name.")

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else envs.TANDEM_DATA_DIR / p

    def load(self, which: str) -> list[Example]:
        """Reads the `train` or `test` split."""
        return read_examples(
            self.path(getattr(self, which)), self.text_column, self.label_column
        )

    def label_names(self) -> list[str]:
        if self.labels is not None:
            return list(json.loads(self.path(self.labels).read_text()))
        return sorted({e.label for e in self.load("train")})


def read_examples(path: Path, text_column: str, label_column: str) -> list[Example]:
    """Reads `text,label` rows from a .csv or .jsonl file."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    try:
        return [Example(r[text_column], r[label_column]) for r in rows]
    except KeyError as exc:
        raise ValueError(f"{path}: missing column {exc}") from exc


def banking77() -> TaskSpec:
    """BANKING77 (PolyAI, CC BY 4.0), as laid out under TANDEM_DATA_DIR/banking77."""
    return TaskSpec(
        name="banking77",
        train=Path("banking77/train.csv"),
        test=Path("banking77/test.csv"),
        labels=Path("banking77/categories.json"),
        label_column="category",
    )
