"""The audit log: appends chain, every kind of tampering is found, concurrent writers never fork."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.audit import AuditError, AuditLog, audit_uri
from cloud.audit.log import GENESIS, entry_hash


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(str(tmp_path / "audit"))
    for i in range(n):
        log.append("key_use", "retrainer", key_id=f"k{i}", version=f"v{i}")
    return log


def _rewrite(path: Path, entry: dict) -> None:
    path.chmod(0o644)
    path.write_text(json.dumps(entry))


def test_entries_are_chained_by_hash_and_verify(tmp_path: Path) -> None:
    log = _log(tmp_path)
    entries = log.entries()
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] == entry_hash(a) for a, b in zip(entries, entries[1:]))
    assert entries[2]["data"] == {"key_id": "k2", "version": "v2"} and entries[2]["actor"] == "retrainer"
    assert log.verify() == 5 and log.head() == entries[-1]
    # A second writer on the same log continues the chain.
    assert AuditLog(str(tmp_path / "audit")).append("promote", "operator", version="v9")["seq"] == 5
    assert log.append("rollback", "operator", version="v1", rollback_of="v9")["seq"] == 6
    assert log.verify() == 7
    assert [e["event"] for e in log.lineage("v9")] == ["promote", "rollback"]
    assert AuditLog(str(tmp_path / "empty")).verify() == 0


def test_unknown_event_or_actor_is_refused(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path))
    with pytest.raises(ValueError, match="audit event 'deploy'"):
        log.append("deploy", "retrainer")
    with pytest.raises(ValueError, match="audit actor 'me'"):
        log.append("publish", "me")


def test_a_changed_entry_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    path = tmp_path / "audit" / "000000000002.json"
    entry = json.loads(path.read_text())
    entry["data"]["key_id"] = "attacker"
    _rewrite(path, entry)
    with pytest.raises(AuditError, match="audit entry 2: changed") as exc:
        log.verify()
    assert exc.value.seq == 2


def test_a_changed_entry_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    log = _log(tmp_path)
    path = tmp_path / "audit" / "000000000002.json"
    entry = json.loads(path.read_text())
    entry["data"]["key_id"] = "attacker"
    entry["hash"] = entry_hash(entry)
    _rewrite(path, entry)
    with pytest.raises(AuditError, match="audit entry 3: does not follow"):
        log.verify()


def test_a_removed_entry_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    (tmp_path / "audit" / "000000000001.json").unlink()
    with pytest.raises(AuditError, match="audit entry 1: missing"):
        log.verify()


def test_reordered_entries_are_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    a, b = tmp_path / "audit" / "000000000001.json", tmp_path / "audit" / "000000000003.json"
    tmp = tmp_path / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(AuditError, match="audit entry 1: holds entry 3"):
        log.verify()


def test_an_unreadable_entry_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    path = tmp_path / "audit" / "000000000004.json"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AuditError, match="audit entry 4: unreadable"):
        log.verify()


def test_concurrent_appenders_in_two_processes_never_fork_the_chain(tmp_path: Path) -> None:
    uri = str(tmp_path / "audit")
    AuditLog(uri).append("enroll", "ca", device="d0")  # both writers start with a head to race past
    go = tmp_path / "go"
    # Each writer imports, says it is ready, then waits for `go`, so that their appends overlap.
    code = (
        "import pathlib, sys, time\nfrom cloud.audit import AuditLog\n"
        "log = AuditLog(sys.argv[1]); go = pathlib.Path(sys.argv[3])\n"
        "go.with_name('ready-' + sys.argv[2]).touch()\n"
        "while not go.exists(): time.sleep(0.001)\n"
        "for i in range(60):\n    log.append('rollout_ack', 'fleet', device=sys.argv[2], version=str(i))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, uri, name, str(go)]) for name in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    log = AuditLog(uri)
    assert log.verify() == 121
    devices = "".join(e["data"]["device"] for e in log.entries()[1:])
    assert devices.count("a") == devices.count("b") == 60
    assert "ab" in devices and "ba" in devices  # the appends did interleave
    assert not [p for p in (tmp_path / "audit").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_audit_uri_sits_beside_the_feedback_partitions() -> None:
    assert audit_uri("/var/tandem/feedback/") == "/var/tandem/feedback/_audit"
    assert audit_uri("s3://bucket/feedback?region=eu-west-1") == "s3://bucket/feedback/_audit?region=eu-west-1"
