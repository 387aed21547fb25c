"""The checked-in stubs must be exactly what the pinned grpcio-tools makes of proto/."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    checked_in = {p.name for p in (ROOT / "tandem" / "v1").glob("*_pb2*.py*")}
    assert {p.name for p in fresh} == checked_in
    stale = [p.name for p in fresh if p.read_bytes() != (ROOT / "tandem" / "v1" / p.name).read_bytes()]
    assert not stale, f"regenerate with `python proto/generate.py`: {stale} differ"


def test_stubs_import_without_the_proto_sources_on_the_path() -> None:
    from tandem.v1 import cloud_pb2, edge_pb2

    assert "proto" not in sys.modules or not hasattr(sys.modules["proto"], "tandem")
    assert edge_pb2.DESCRIPTOR.package == cloud_pb2.DESCRIPTOR.package == "tandem.v1"
