"""`tandem demo` (`make demo`): train or reuse the models, run the edge side, print the report."""

import json
from pathlib import Path
from typing import Any

from benchmarks.edge_bench import EdgeBenchConfig, run_edge_bench
from cloud.training.config import FitConfig, TrainConfig
from tandem.settings import load_config


def run_demo(config: Path | None, out: Path) -> int:
    train_cfg = load_config(TrainConfig, config)
    teacher = _trained(train_cfg, "teacher", train_cfg.teacher)
    student = _trained(train_cfg, "student", train_cfg.student)
    print(_model_report(teacher, student))
    bench = load_config(EdgeBenchConfig, None).model_copy(update={"student": train_cfg.model_dir("student")})
    print("\n== edge daemon benchmark ==")
    run_edge_bench(bench, out / "edge_bench.json")
    print(f"\nresults in {out}")
    return 0


def _trained(cfg: TrainConfig, kind: str, fit: FitConfig) -> dict[str, Any]:
    """The cached model's manifest if it was trained with this config; else trains it."""
    directory = cfg.model_dir(kind)
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fit") == fit.model_dump() and manifest.get("task") == cfg.task.name:
            print(f"reusing {kind} {manifest['version']} from {directory}")
            return manifest
    print(f"training the {kind} into {directory}")
    if kind == "teacher":
        from cloud.training.teacher import train_teacher as train
    else:
        from cloud.training.student import train_student as train
    return train(cfg, directory)


def _model_report(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    s = student["metrics"]
    return "\n".join([
        "\n== models (banking77 test split) ==",
        f"teacher  {teacher['layers']} layers  accuracy {teacher['metrics']['test_accuracy']:.1%}",
        f"student  {student['layers']} layers ({student['layers'] / teacher['layers']:.2f}x the teacher's per-query compute)"
        f"  int8 accuracy {s['test_accuracy']:.1%} (fp32 {s['test_accuracy_fp32']:.1%})",
        f"         ECE {s['test_ece_uncalibrated']:.3f} uncalibrated -> {s['test_ece']:.3f} at T={student['temperature']:.2f}",
    ])
