"""`tandem bench new-intent`: the cloud learns intents it was never trained on, from the field.

Protocol, on banking77 with `withheld` intents (a seeded choice) left out of training:
1. a task file without them trains its own teacher and student (cached by their settings);
2. field traffic through `devices` edge daemons into the real cloud: at most `field_examples`
   train texts of each withheld intent, mixed with `known_traffic` texts of the known ones. The
   edges escalate all of it by default (`field_policy`), so the expert judges what is out of
   scope; under another policy every local answer is audited (`audit_rate` 1) instead;
3. the out-of-scope texts are clustered (`cloud.discovery`); a simulated operator names each
   cluster shown by the majority true label of its texts, as a person reading them would, if
   that is a withheld intent (clusters of known intents' texts are left alone);
4. the expert is fine-tuned (`cloud.training.expert`), then rolled out blue/green
   (`tandem cloud rollout-expert`) while an edge in cloud_only mode escalates a steady stream:
   every request of it that fails or falls back during the update counts;
5. a distillation round from the new expert gives the student the new labels;
6. on banking77's test split: each new intent's recall (the cascade of the new student and the
   new expert at the student's fitted threshold, and the expert alone, as served: temperature and
   out-of-scope boundary), and the expert's accuracy on the old labels' texts before and after.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.edge_load import replay
from benchmarks.loadgen import poisson
from benchmarks.open_intent import _write_csv
from benchmarks.system import cloud, cloud_config, edge_config, edge_daemon
from cloud.discovery.clusters import DiscoveryConfig
from cloud.training.config import DistillConfig, ExpertTrainConfig, FitConfig, TrainConfig
from tandem import envs
from tandem.settings import TandemSettings
from tandem.signing import generate_key, public_path, trust
from tandem.tasks import Example, Task, TaskFile, banking77
from tandem.v1 import edge_pb2_grpc

log = logging.getLogger(__name__)

EXPERT = "new-intent-classifier"


class NewIntentConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_NEW_INTENT_")

    task: TaskFile = Field(default_factory=banking77, description="The task some of whose intents are withheld.")
    withheld: int = Field(3, ge=1, description="Intents left out of training, to arrive from the field.")
    seed: int = Field(0, description="Seeds the withheld intents, the field texts and the training.")
    field_examples: int = Field(50, ge=1, description="Texts of each withheld intent sent from the field (at most "
                                "this many reach the cloud).")
    known_traffic: int = Field(300, ge=0, description="Texts of known intents sent alongside.")
    devices: int = Field(3, ge=1, description="Edge daemons the field traffic comes through (round robin); also "
                         "the corroboration_devices a cluster needs.")
    field_rps: float = Field(20.0, gt=0, description="Arrival rate of the field traffic.")
    field_policy: dict[str, Any] = Field(
        default_factory=lambda: {"mode": "cloud_only"}, description="The field edges' policy. cloud_only: the expert "
        "answers every field text, and decides what is out of scope (the better detector); the shipped policy "
        "({mode: threshold}) leaves it to the student wherever it is confident.",
    )
    escalation_rps: float = Field(5.0, gt=0, description="Arrival rate of the escalations during the expert's update.")
    teacher: FitConfig = FitConfig()
    student: FitConfig = FitConfig(layers=2, lr=3e-4)
    expert: ExpertTrainConfig = ExpertTrainConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    distill: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields of the student's round.")
    max_examples: int | None = Field(None, ge=1, description="Train the first models on at most this many texts.")


def run_new_intent(cfg: NewIntentConfig, out: Path) -> dict[str, Any]:
    """The benchmark (see the module's docstring); writes `out` (JSON) and prints a summary."""
    with tempfile.TemporaryDirectory(prefix="tandem-new-intent-") as tmp:
        result = measure_new_intent(Path(tmp), cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_summary(result) + f"\n\n{out}")
    return result


def measure_new_intent(work: Path, cfg: NewIntentConfig | None = None) -> dict[str, Any]:
    """The benchmark in the scratch folder `work`: `{examples, recall, old_labels_accuracy_drop,
    failed_requests_during_update}` and the details behind them."""
    cfg = cfg or NewIntentConfig()
    return asyncio.run(_NewIntent(cfg, work).run())


class _NewIntent:
    def __init__(self, cfg: NewIntentConfig, work: Path) -> None:
        self.cfg, self.work = cfg, work
        original = cfg.task
        intents = [n for n in original.label_names() if n != original.oos_label]
        self.withheld = sorted(random.Random(cfg.seed).sample(intents, cfg.withheld))
        self.original = original
        self.models = _variant_models(cfg, original, self.withheld)
        # The task file the operator edits: a copy per run, beside the run's store and registry.
        work.mkdir(parents=True, exist_ok=True)
        self.task_file = work / "task.yaml"
        self.task_file.write_text(self.models.task_yaml)
        self.key = work / "keys" / "signing.pem"
        generate_key(self.key)
        self.keyring = work / "keyring.json"
        trust(self.keyring, public_path(self.key))

    async def run(self) -> dict[str, Any]:
        from cloud.registry import ModelRegistry
        from cloud.training.distill import run_distill
        from cloud.training.expert import run_expert

        started = time.monotonic()
        field = self._field_traffic()
        with cloud(self._cloud_config()) as c:
            sent = await self._stream_field(c, field)
            named = self._name_clusters({e.text: e.label for e in field})
            expert = run_expert(self._distill().model_copy(update={"expert": self.cfg.expert}))
            if not expert["passed"]:
                raise RuntimeError(f"the fine-tuned expert failed its gate: {expert['gate']}")
            update = await self._rollout_under_load(c, Path(expert["path"]))
        distill = self._distill().model_copy(update={"teacher_dir": Path(expert["path"])})
        student = run_distill(distill)
        measured = self._measure(Path(expert["path"]),
                                 ModelRegistry(distill.registry_root()).path(self.original.name, student["version"]))
        per_intent = Counter(e.label for e in field if e.label in self.withheld)
        return {
            "examples": max(per_intent.values()),
            "recall": measured["recall_by_model"]["cascade"],
            "old_labels_accuracy_drop": measured["old_labels"]["drop"],
            "failed_requests_during_update": update["failed"],
            "withheld": self.withheld,
            "field": sent,
            "named": named,
            # Field texts of each withheld intent the cloud saw answered out of scope (what clustering can find).
            "out_of_scope_field_texts": {i: self.out_of_scope.get(i, 0) for i in self.withheld},
            "expert_round": {k: expert[k] for k in ("version", "gate", "lineage", "metrics", "seconds")},
            "expert_update": update,
            "student_round": {k: student.get(k) for k in ("version", "promoted", "metrics", "seconds")},
            **measured,
            "seconds": round(time.monotonic() - started, 1),
        }

    def _distill(self) -> DistillConfig:
        return DistillConfig(**{**self.cfg.distill, "task": self.task_file, "teacher_dir": self.models.teacher,
                      "registry_dir": self.work / "registry", "feedback_uri": str(self.work / "feedback"),
                      "signing_key": self.key, "seed": self.cfg.seed, "corroboration_devices": self.cfg.devices,
                      "use_ray": False})

    def _field_traffic(self) -> list[Example]:
        rng = random.Random(self.cfg.seed)
        train = self.original.load("train")
        field = []
        for intent in self.withheld:
            texts = [e for e in train if e.label == intent]
            field += rng.sample(texts, min(self.cfg.field_examples, len(texts)))
        known = [e for e in train if e.label not in self.withheld]
        field += rng.sample(known, min(self.cfg.known_traffic, len(known)))
        rng.shuffle(field)
        return field

    def _cloud_config(self) -> dict[str, Any]:
        cfg = cloud_config(set(), registry_dir=str(self.work / "registry"), feedback_uri=str(self.work / "feedback"),
                           keyring=str(self.keyring))
        cfg["tasks"] = {self.original.name: {"task": str(self.task_file), "expert": EXPERT}}
        cfg["experts"] = [{"name": EXPERT, "kind": "classify", "model": str(self.models.teacher), "dtype": "float32",
                           "max_model_len": 128,
                           "deployment": {"num_replicas": 1, "max_ongoing_requests": 32, "num_cpus": 1}}]
        return cfg

    def _edge(self, c: Any, device: str, **fields: Any) -> dict[str, Any]:
        return edge_config(self.original.name, self.models.student, c, device,
                           feedback={"outbox": str(self.work / "edges" / f"{device}.sqlite3"), **fields.pop("feedback", {})},
                           **fields)

    async def _stream_field(self, c: Any, field: list[Example]) -> dict[str, Any]:
        """The field traffic through `devices` edges, every local answer audited; waits until the store settles."""
        from benchmarks.flywheel import _settle

        edges = [self._edge(c, f"field-{i}", policy=self.cfg.field_policy,
                            feedback={"audit_rate": 1.0, "audit_weighting": "uniform"}) for i in range(self.cfg.devices)]
        with contextlib.ExitStack() as stack:
            daemons = [stack.enter_context(edge_daemon(e)) for e in edges]
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{d.port}") for d in daemons]
            try:
                stubs = [edge_pb2_grpc.EdgeStub(ch).Infer for ch in channels]
                run = await replay(stubs, self.original.name, field, poisson(self.cfg.field_rps, count=len(field),
                                                                               seed=self.cfg.seed), "field")
            finally:
                await asyncio.gather(*(ch.close() for ch in channels))
        records = await _settle(str(self.work / "feedback"), self.original.name)
        return {"sent": len(field), "records": records, "escalation_rate": run["escalation_rate"],
                "errors": run["errors"], "per_intent": dict(Counter(e.label for e in field if e.label in self.withheld))}

    def _name_clusters(self, truth: dict[str, str]) -> list[dict[str, Any]]:
        """The simulated operator: each cluster shown, named by its texts' majority true label if
        that is a withheld intent (the same label again adds examples to it)."""
        from cloud.audit.log import audit_uri
        from cloud.discovery.field import out_of_scope_texts, task_clusters
        from cloud.discovery.naming import name_cluster

        task = Task.from_file(self.task_file)
        store = str(self.work / "feedback")
        self.out_of_scope = Counter(truth.get(t.text, "?") for t in out_of_scope_texts(store, task))
        clusters = task_clusters(store, task, self.cfg.discovery, self.cfg.devices)
        named = []
        for c in clusters:
            label, count = Counter(truth.get(t, "?") for t in c.texts).most_common(1)[0]
            entry = {"cluster": c.id, "size": c.size, "devices": c.devices, "majority": label,
                     "purity": round(count / c.size, 3), "named": label in self.withheld}
            if entry["named"]:
                result = name_cluster(self.task_file, c, label, self.original.descriptions()[label], store,
                                      audit_uri(store))
                entry["stored"] = result["stored"]
            named.append(entry)
        log.info("new intent: %d clusters shown, %d named: %s", len(clusters), sum(e["named"] for e in named), named)
        return named

    async def _rollout_under_load(self, c: Any, checkpoint: Path) -> dict[str, Any]:
        """`tandem cloud rollout-expert` (blue/green), as an operator runs it, while an edge in
        cloud_only mode escalates known test texts at `escalation_rps` until it is done."""
        texts = [e for e in self.original.load("test") if e.label not in self.withheld]
        random.Random(self.cfg.seed).shuffle(texts)
        edge = self._edge(c, "escalator", policy={"mode": "cloud_only"})
        with edge_daemon(edge) as daemon:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
                stub = edge_pb2_grpc.EdgeStub(channel)
                await replay([stub.Infer], self.original.name, texts[:20], poisson(self.cfg.escalation_rps, count=20,
                                                                                   seed=1), "warm")
                started = time.monotonic()
                rollout = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tandem_cli", "cloud", "rollout-expert", "--config", str(c.config),
                    "--expert", EXPERT, "--checkpoint", str(checkpoint),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                stream = asyncio.create_task(self._escalate_until(stub, texts, rollout))
                out, err = await rollout.communicate()
                seconds = round(time.monotonic() - started, 1)
                run = await stream
        if rollout.returncode != 0:
            raise RuntimeError(f"tandem cloud rollout-expert failed ({rollout.returncode}): {err.decode()[-2000:]}")
        failed = run["failed"] + round(run["fallback_rate"] * run["answered"])
        return {"version": json.loads(out.decode().strip().splitlines()[-1])["version"], "seconds": seconds, "requests": run["sent"],
                "failed": failed, "fallback_rate": run["fallback_rate"], "errors": run["errors"],
                "p99_ms": run["p99_ms"]}

    async def _escalate_until(self, stub: Any, texts: list[Example],
                              rollout: asyncio.subprocess.Process) -> dict[str, Any]:
        """Escalations at `escalation_rps`, in slices of 5 s, until `rollout` has exited."""
        runs = []
        while rollout.returncode is None or not runs:
            count = max(1, int(5 * self.cfg.escalation_rps))
            runs.append(await replay([stub.Infer], self.original.name, texts, poisson(
                self.cfg.escalation_rps, count=count, seed=len(runs)), f"update-{len(runs)}"))
        answered = sum(r["answered"] for r in runs)
        return {"sent": sum(r["sent"] for r in runs), "answered": answered, "failed": sum(r["failed"] for r in runs),
                "fallback_rate": sum(r["fallback_rate"] * r["answered"] for r in runs) / max(answered, 1),
                "errors": dict(sum((Counter(r["errors"]) for r in runs), Counter())),
                "p99_ms": max(r["p99_ms"] or 0.0 for r in runs)}

    def _measure(self, expert: Path, student: Path) -> dict[str, Any]:
        """On banking77's test split: new intents' recall (cascade, expert) and the old labels'
        accuracy of the expert before and after (as served: answers include out of scope)."""
        from edge.student import Student

        test = self.original.load("test")
        texts, truth = [e.text for e in test], np.array([e.label for e in test])
        before, after = _expert_answers(self.models.teacher, texts), _expert_answers(expert, texts)
        s = Student.load(student)
        probs = s.predict(texts)
        threshold = s.manifest.operating_point.threshold if s.manifest.operating_point else 0.7
        local = probs.max(-1) >= threshold
        cascade = np.where(local, np.array(s.labels)[probs.argmax(-1)], after)
        old = ~np.isin(truth, self.withheld)
        recall = {name: {intent: float(np.mean(answers[truth == intent] == intent)) for intent in self.withheld}
                  for name, answers in (("cascade", cascade), ("expert", after))}
        missed = {intent: dict(Counter(after[(truth == intent) & (after != intent)]).most_common(3))
                  for intent in self.withheld}
        return {
            "recall_by_model": {name: float(np.mean(list(r.values()))) for name, r in recall.items()},
            "recall_per_intent": recall,
            "expert_answers_when_missed": missed,  # the new intents' test texts it got wrong: what it said
            "old_labels": {"before": float(np.mean(before[old] == truth[old])),
                           "after": float(np.mean(after[old] == truth[old])),
                           "drop": float(np.mean(before[old] == truth[old]) - np.mean(after[old] == truth[old])),
                           "cascade_after": float(np.mean(cascade[old] == truth[old])), "texts": int(old.sum())},
            "cascade": {"threshold": threshold, "escalation_rate": float(1 - local.mean())},
        }


class _Models:
    def __init__(self, teacher: Path, student: Path, task_yaml: str) -> None:
        self.teacher, self.student, self.task_yaml = teacher, student, task_yaml


def _variant_models(cfg: NewIntentConfig, task: Task, withheld: list[str]) -> _Models:
    """The task without `withheld` (its texts left out of train and test), and its teacher and
    student, trained once and cached by everything that trains them."""
    from cloud.training.student import train_student
    from cloud.training.teacher import train_teacher

    known = [n for n in task.label_names() if n != task.oos_label and n not in withheld]
    spec = {"name": task.name, "label_set_version": task.label_set_version, "train": None, "test": None,
            "labels": {n: task.descriptions()[n] for n in known}, "out_of_scope": task.oos_label}
    fits = json.dumps([spec, cfg.teacher.model_dump(), cfg.student.model_dump(), cfg.seed, cfg.max_examples],
                      sort_keys=True)
    folder = envs.TANDEM_CACHE_DIR / "new-intent" / hashlib.sha256(fits.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        spec[split] = str(folder / f"{split}.csv")
        if not (folder / f"{split}.csv").exists():
            _write_csv(folder / f"{split}.csv", [e for e in task.load(split) if e.label in set(known)])
    task_yaml = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=10**6)
    (folder / "task.yaml").write_text(task_yaml)
    capped = {"max_examples": cfg.max_examples}
    train_cfg = TrainConfig(task=Task.from_file(folder / "task.yaml"), output_dir=folder / "models", seed=cfg.seed,
                            teacher=cfg.teacher.model_copy(update=capped), student=cfg.student.model_copy(update=capped),
                            signing_key=folder / "signing.pem", dev_keys=True)
    for kind, train in (("teacher", train_teacher), ("student", train_student)):
        if (train_cfg.model_dir(kind) / "manifest.json").exists():
            log.info("new intent: the %s without %s is cached in %s", kind, withheld, train_cfg.model_dir(kind))
        else:
            log.info("new intent: training the %s without %s", kind, withheld)
            train(train_cfg, train_cfg.model_dir(kind))
    return _Models(train_cfg.model_dir("teacher"), train_cfg.model_dir("student"), task_yaml)


def _expert_answers(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """The classify expert's answers as it serves them (`cloud.experts.classify`): the checkpoint's
    logits through its own tokenizer, scaled by its temperature, with its out-of-scope class."""
    from transformers import AutoModelForSequenceClassification

    from cloud.training.data import tokenizer
    from cloud.training.loop import encode, predict_logits
    from tandem.contract import Manifest
    from tandem.open_set import answer_labels, probabilities

    manifest = Manifest.read(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = (manifest.model_dump().get("fit") or {}).get("max_length", 64)
    logits = predict_logits(model, encode(tokenizer(str(checkpoint)), texts, max_length))
    probs = probabilities(logits / (manifest.temperature or 1.0), labels, manifest.out_of_scope)
    return np.array(answer_labels(labels, manifest.out_of_scope))[probs.argmax(-1)]


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"new intents {', '.join(result['withheld'])}: at most {result['examples']} field examples each"]
    for name in ("cascade", "expert"):
        per = ", ".join(f"{k} {v:.1%}" for k, v in result["recall_per_intent"][name].items())
        lines.append(f"recall ({name}): {result['recall_by_model'][name]:.1%} ({per})")
    old = result["old_labels"]
    lines.append(f"old labels, expert: {old['before']:.2%} before, {old['after']:.2%} after ({old['drop']:+.2%} drop)")
    lines.append(f"expert round {result['expert_round']['seconds']:.0f} s; update: {result['expert_update']['requests']} "
                 f"escalations, {result['failed_requests_during_update']} failed or fell back")
    return "\n".join(lines)
