"""Naming a cluster: its label added to the task file, its texts stored as that label's examples.

The task file is edited as text, not re-dumped, so that its comments and layout stay: one line
appended to the `labels:` block mapping (a whole block written if the file has none) and
`label_set_version` raised by one. The result is validated before it replaces the file.
"""

import re
from pathlib import Path
from typing import Any

import yaml

from cloud.audit import AuditLog
from cloud.discovery.clusters import Cluster
from cloud.discovery.field import store_named
from tandem.fsio import atomic_write
from tandem.settings import ConfigError
from tandem.tasks import LABEL_RULE, Task, is_label

VERSION_LINE = re.compile(r"^label_set_version:[ \t]*(\d+)", re.MULTILINE)
LABELS_LINE = re.compile(r"^labels:[ \t]*(#.*)?$", re.MULTILINE)


def add_label(path: Path, label: str, description: str) -> Task:
    """Adds `label` (with `description`) to the task file at `path` and raises its
    `label_set_version` by one; returns the task as it now reads. ConfigError if the label is
    invalid or already there, or the file's `labels` is not a block mapping."""
    task = Task.from_file(path)
    if not is_label(label):
        raise ConfigError(f"label {label!r}: {LABEL_RULE}")
    if label in task.label_names():
        raise ConfigError(f"task file {path}: labels: {label!r} is already a label of task {task.name}")
    text = path.read_text()
    text = _with_label(text, task, label, description, path)
    text = _with_version(text, task.label_set_version + 1)
    try:
        new = Task.model_validate(yaml.safe_load(text))
    except Exception as exc:  # the edit must not leave a file the other commands refuse
        raise ConfigError(f"task file {path}: adding {label!r} would make it invalid: {exc}") from None
    assert new.labels and new.labels.get(label) == description and new.label_set_version == task.label_set_version + 1
    atomic_write(path, text.encode(), mode=path.stat().st_mode & 0o777)
    return new


def name_cluster(path: Path, cluster: Cluster, label: str, description: str, store_uri: str,
                 audit_uri: str) -> dict[str, Any]:
    """Makes `cluster` examples of `label`: a new label of the task file at `path` (added with
    `description`), or one it already has (no new version: more examples of it). The texts are
    stored as the operator's field labels (`field.store_named`); the naming is audit-logged."""
    task = Task.from_file(path)
    if label == task.oos_label:
        raise ConfigError(f"label {label!r} is task {task.name}'s out-of-scope label: name the cluster as an intent")
    new = label not in task.label_names()
    if new:
        task = add_label(path, label, description)
    stored = store_named(store_uri, task, label, cluster.texts)
    result = {"task": task.name, "label": label, "new_label": new, "label_set_version": task.label_set_version,
              "cluster": cluster.id, "examples": cluster.size, "stored": stored, "devices": cluster.devices}
    AuditLog(audit_uri).append("name_label", "operator", **result, description=description,
                               task_file=str(Path(path).resolve()))
    return result


def _with_label(text: str, task: Task, label: str, description: str, path: Path) -> str:
    entry = yaml.safe_dump({label: description}, allow_unicode=True, width=10**6, default_flow_style=False)
    found = LABELS_LINE.search(text)
    if found is None:
        if "labels" in (yaml.safe_load(text) or {}):
            raise ConfigError(f"task file {path}: labels: write it as a block mapping (one 'name: description' "
                              "line each) to add labels with `tandem intents name`")
        # No label set declared: it was train's labels, which the new one now joins.
        names = sorted({e.label for e in task.load("train")})  # Task.label_names' order, which models learnt
        block = yaml.safe_dump({"labels": {**{n: "" for n in names}, label: description}}, allow_unicode=True,
                               width=10**6, default_flow_style=False, sort_keys=False)
        return text.rstrip("\n") + "\n" + block
    lines = text[found.end():].split("\n")
    last, indent = None, "  "
    for i, line in enumerate(lines[1:], start=1):  # lines[0] is the rest of the `labels:` line
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            break  # the next top-level key
        if line.strip() and not line.lstrip().startswith("#"):
            if line.lstrip().startswith("- "):
                raise ConfigError(f"task file {path}: labels: a list has no descriptions; write it as a mapping "
                                  "(name: description) to add labels with `tandem intents name`")
            last, indent = i, line[: len(line) - len(line.lstrip())]
    if last is None:
        raise ConfigError(f"task file {path}: labels: is empty or not a block mapping")
    lines.insert(last + 1, indent + entry.rstrip("\n"))
    return text[: found.end()] + "\n".join(lines)


def _with_version(text: str, version: int) -> str:
    if VERSION_LINE.search(text):
        return VERSION_LINE.sub(f"label_set_version: {version}", text, count=1)
    return f"label_set_version: {version}\n" + text
