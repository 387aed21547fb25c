"""A task Tandem has never seen, end to end with no code change: a transit kiosk's five intents
and an out-of-scope label with no training examples, from a task file and two CSVs, through
`tandem task check`, `tandem train all`, the real cloud (Serve, vLLM, the mTLS proxy), an edge
daemon escalating to it, and `tandem bench load`."""

import csv
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.system import cloud, cloud_config, edge_config, edge_daemon

pytestmark = pytest.mark.integration

INTENTS = {
    "buy_ticket": ["I want to buy a {t} ticket to {p}", "how much is a {t} ticket to {p}", "can I pay for a {t} fare to {p} here",
                   "sell me a {t} pass for {p}", "where do I get a {t} ticket for {p}"],
    "lost_item": ["I left my {o} on the {v}", "I lost my {o} on the {v} to {p}", "has anyone handed in a {o} from the {v}",
                  "my {o} is missing since the {v} ride", "where is lost property for a {o} left on the {v}"],
    "timetable": ["when does the next {v} to {p} leave", "what time is the last {v} to {p}", "how often does the {v} go to {p}",
                  "is the {v} to {p} running late", "show me the {v} departures for {p}"],
    "refund": ["I want my money back for the {t} ticket", "can I get a refund on my {t} fare to {p}",
               "the {v} was cancelled, refund my {t} ticket", "how do I claim a refund for a {t} pass", "return my {t} ticket to {p}"],
    "accessibility": ["is there step free access at {p} for the {v}", "I need a wheelchair ramp for the {v} to {p}",
                      "does the {v} to {p} have a lift", "can someone help me board the {v} to {p} with my wheelchair",
                      "is the {v} stop at {p} accessible for a wheelchair"],
}
FILL = {"t": ["single", "return", "day", "weekly", "child"], "p": ["Lisbon", "Porto", "the airport", "Coimbra", "Faro"],
        "o": ["umbrella", "wallet", "phone", "backpack", "scarf"], "v": ["bus", "train", "tram", "metro", "ferry"]}
OUT_OF_SCOPE = ["will it rain tomorrow", "tell me a joke", "what is the capital of Peru", "play some jazz music",
                "how do I bake bread", "who won the football match", "recommend a good novel", "what is two plus two"]


def _texts(template: str) -> list[str]:
    keys = [k for k in FILL if "{" + k + "}" in template]
    return [template.format(**dict(zip(keys, values))) for values in itertools.product(*(FILL[k] for k in keys))]


@pytest.fixture(scope="module")
def kiosk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tasks/kiosk.yaml with train.csv (known intents only) and test.csv (plus out-of-scope queries)."""
    work = tmp_path_factory.mktemp("kiosk")
    rng = random.Random(0)
    rows = {split: [] for split in ("train", "test")}
    for intent, templates in INTENTS.items():
        texts = [t for template in templates for t in _texts(template)]
        rng.shuffle(texts)
        rows["train"] += [(t, intent) for t in texts[:60]]
        rows["test"] += [(t, intent) for t in texts[60:70]]
    rows["test"] += [(t, "other") for t in OUT_OF_SCOPE]
    for split, data in rows.items():
        with (work / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("utterance", "intent"), *data])
    (work / "kiosk.yaml").write_text(yaml.safe_dump({
        "name": "kiosk", "train": str(work / "train.csv"), "test": str(work / "test.csv"),
        "text_column": "utterance", "label_column": "intent", "out_of_scope": "other",
        "labels": {name: f"the traveller asks about {name.replace('_', ' ')}" for name in INTENTS}}))
    return work / "kiosk.yaml"


def _tandem(*args: str, timeout: float = 600) -> str:
    run = subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_a_new_task_trains_serves_escalates_and_load_tests(kiosk: Path, tmp_path: Path) -> None:
    check = json.loads(_tandem("task", "check", str(kiosk)))
    assert check["labels"] == 6 and check["train"]["size"] == 300 and check["test"]["label_counts"]["other"] == 8

    models = tmp_path / "models"
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({
        "task": str(kiosk), "output_dir": str(models), "dev_keys": True, "signing_key": str(tmp_path / "key.pem"),
        "teacher": {"epochs": 4, "max_length": 32}, "student": {"layers": 2, "epochs": 8, "lr": 3e-4, "max_length": 32}}))
    _tandem("train", "all", "--config", str(train_cfg))
    manifest = json.loads((models / "student" / "manifest.json").read_text())
    assert manifest["out_of_scope"]["label"] == "other" and manifest["label_set_version"] == 1

    cfg = cloud_config(feedback_uri=str(tmp_path / "feedback"), registry_dir=str(tmp_path / "registry"))
    cfg["tasks"] = {"kiosk": {"task": str(kiosk), "expert": "kiosk-classifier"}}
    cfg["experts"] = [{"name": "kiosk-classifier", "kind": "classify", "model": str(models / "teacher"),
                       "dtype": "float32", "max_model_len": 64,
                       "deployment": {"num_replicas": 1, "max_ongoing_requests": 32, "num_cpus": 1}}]
    out = tmp_path / "load"
    with cloud(cfg) as c:
        edge = edge_config("kiosk", models / "student", c, policy={"mode": "threshold", "threshold": 0.9},
                           feedback={"outbox": str(tmp_path / "outbox.sqlite3")})
        with edge_daemon(edge) as daemon:
            _tandem("bench", "load", "--target", f"127.0.0.1:{daemon.port}", "--task", str(kiosk),
                    "--data", str(kiosk.parent / "test.csv"), "--out", str(out), "--rate", "20", timeout=300)
    r = json.loads((out / "load.json").read_text())
    assert r["failed"] == 0 and r["answered"] == r["sent"] == 58
    assert r["by_path"]["escalated"]["answered"] > 0, "some answers must come from the cloud's expert"
    assert r["known_accuracy"] > 0.8
    assert r["open_recall"] > 0 and r["out_of_scope_answers"] > 0
