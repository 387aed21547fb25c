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
    from tandem.v1 import common_pb2, edge_pb2, expert_pb2, fleet_pb2

    assert "proto" not in sys.modules or not hasattr(sys.modules["proto"], "tandem")
    packages = {m.DESCRIPTOR.package for m in (common_pb2, edge_pb2, expert_pb2, fleet_pb2)}
    assert packages == {"tandem.v1"}


def test_each_service_carries_only_the_methods_its_role_serves() -> None:
    from tandem.v1 import edge_pb2, expert_pb2, fleet_pb2

    services = {
        name: sorted(service.methods_by_name)
        for module in (edge_pb2, expert_pb2, fleet_pb2)
        for name, service in module.DESCRIPTOR.services_by_name.items()
    }
    assert services.pop("Expert") == ["Escalate"]
    assert services.pop("Fleet") == ["AckRollout", "FetchModel", "GetManifest", "GetRoutes", "ReportFeedback"]
    assert "Cloud" not in services
    assert fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].methods_by_name["FetchModel"].server_streaming
