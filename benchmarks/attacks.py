"""The attack table of `tandem bench security`: each attack on a running cloud (behind its
mTLS proxy) or on the model supply chain, what must happen, and what did."""

import asyncio
import dataclasses
import json
import shutil
import time
import urllib.request
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc

from benchmarks.artifacts import signed_copy
from cloud import pki
from cloud.audit.log import AuditError, AuditLog
from cloud.feedback import FeedbackStore
from cloud.feedback.receipts import escalation_record
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from cloud.registry import ModelRegistry
from edge.model_store import ModelStore
from tandem.contract import FLEET_APPLICATION, Manifest
from tandem.signing import (Keyring, VerificationError, generate_key, key_id, load_private_key, public_path, revoke,
                            trust)
from tandem.v1 import common_pb2, expert_pb2, expert_pb2_grpc, fleet_pb2, fleet_pb2_grpc

FLEET = (("application", FLEET_APPLICATION),)
TIMEOUT_S = 30.0
REFUSED = "refused"


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    expected: str
    observed: str
    reason: str = ""  # what the observed outcome must also say, where the outcome alone is not specific

    @property
    def passed(self) -> bool:
        return self.observed.split(":")[0] == self.expected and self.reason in self.observed

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "expected": self.expected, "observed": self.observed, "passed": self.passed}


@dataclasses.dataclass(frozen=True)
class Target:
    """A running cloud as the attacks see it."""

    proxy: str  # host:port of the TLS proxy
    serve: str  # host:port of Serve's own gRPC port
    ca_dir: Path
    feedback_uri: str
    registry_dir: Path
    metrics_url: str
    audit_uri: str
    task: str
    labels: list[str]
    expert: str
    quota: int

    def channel(self, device: str | None, ca_dir: Path | None = None) -> grpc.aio.Channel:
        """A TLS channel to the proxy, with `device`'s certificate (enrolled with `ca_dir`, the
        fleet CA by default) or none."""
        ca = (self.ca_dir / "ca.crt").read_bytes()
        # A connection of its own: gRPC would otherwise share one between channels alike, and
        # a call after a revocation could ride a connection verified before it.
        options = [("grpc.use_local_subchannel_pool", 1)]
        if device is None:
            return grpc.aio.secure_channel(self.proxy, grpc.ssl_channel_credentials(ca), options)
        ca_dir = ca_dir or self.ca_dir
        folder = ca_dir / "devices" / device
        if not (folder / "device.crt").is_file():  # enrolled once: enrolling again renews (readmits) it
            folder = pki.enroll(ca_dir, device)
        creds = grpc.ssl_channel_credentials(ca, (folder / "device.key").read_bytes(), (folder / "device.crt").read_bytes())
        return grpc.aio.secure_channel(self.proxy, creds, options)


async def status(call: Awaitable[Any]) -> str:
    """"OK", or the refusal's code and message."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def record(t: Target, kind: int = fleet_pb2.FALLBACK, **fields: Any) -> fleet_pb2.FeedbackRecord:
    """A valid record of `kind` unless `fields` break it."""
    values: dict[str, Any] = {"record_id": f"r-{uuid.uuid4().hex}", "request_id": "req-1", "task": t.task, "kind": kind,
                              "text": "how do I activate my card", "created_unix_ms": int(time.time() * 1000)}
    if kind in (fleet_pb2.CORRECTION, fleet_pb2.ESCALATION):
        values["label"] = t.labels[0]
    return fleet_pb2.FeedbackRecord(**{**values, **fields})


async def report(channel: grpc.aio.Channel, *records: fleet_pb2.FeedbackRecord,
                 metadata: tuple[tuple[str, str], ...] = ()) -> str:
    stub = fleet_pb2_grpc.FleetStub(channel)
    return await status(stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=records), metadata=FLEET + metadata,
                                            timeout=TIMEOUT_S))


async def transport_attacks(t: Target, work: Path) -> list[Attack]:
    """Who may connect at all."""
    routes = fleet_pb2.GetRoutesRequest()
    attacks = []
    async with t.channel(None) as channel:
        attacks.append(Attack("no client certificate", "UNAUTHENTICATED", await status(
            fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET, timeout=TIMEOUT_S))))
    pki.init_ca(work / "rogue-ca")
    async with t.channel("rogue-kiosk", work / "rogue-ca") as channel:
        attacks.append(Attack("certificate from another CA", "UNAUTHENTICATED", await status(
            fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET, timeout=TIMEOUT_S))))
    async with t.channel("stolen-kiosk") as channel:
        before = await status(fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET, timeout=TIMEOUT_S))
    pki.revoke(t.ca_dir, "stolen-kiosk", audit_uri=t.audit_uri)
    await asyncio.sleep(3)  # the proxy reloads the CRL within about a second
    async with t.channel("stolen-kiosk") as channel:
        after = await status(fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET, timeout=TIMEOUT_S))
    attacks.append(Attack("revoked certificate", "UNAUTHENTICATED", after if before == "OK" else f"enrolled call: {before}"))
    async with grpc.aio.insecure_channel(t.serve) as channel:
        attacks.append(Attack("plaintext straight to Serve's port, forged identity", "UNAUTHENTICATED",
                              await report(channel, record(t), metadata=((DEVICE_METADATA, "kiosk-b"),))))
    return attacks


async def write_attacks(t: Target) -> list[Attack]:
    """What an enrolled device may write."""
    attacks = []
    async with t.channel("kiosk-a") as channel:
        forged_id = f"forged-{uuid.uuid4().hex}"
        headers = ((DEVICE_METADATA, "kiosk-b"), (PROXY_TOKEN_METADATA, "guessed"))
        sent = await report(channel, record(t, record_id=forged_id), metadata=headers)
        attacks.append(Attack("identity headers set by the client", "stored as kiosk-a",
                              _stored_as(t, forged_id) if sent == "OK" else sent))
        attacks.append(Attack("record naming another device", "PERMISSION_DENIED",
                              await report(channel, record(t, device_id="kiosk-b"))))
        attacks.append(Attack("client-sent ESCALATION record (forged expert label)", "PERMISSION_DENIED",
                              await report(channel, record(t, fleet_pb2.ESCALATION, expert=t.expert)),
                              reason="records[0].receipt"))
        attacks.extend(await _receipt_attacks(t, channel))
        attacks.append(Attack("request_id of 5 MB", "RESOURCE_EXHAUSTED",
                              await report(channel, record(t, request_id="x" * (5 << 20)))))
        attacks.append(Attack("request_id of 129 characters", "INVALID_ARGUMENT",
                              await report(channel, record(t, request_id="x" * 129))))
        spam = [common_pb2.LabelScore(label=t.labels[i % len(t.labels)], probability=9.0) for i in range(1000)]
        attacks.append(Attack("distribution of 1,000 entries with p = 9", "INVALID_ARGUMENT",
                              await report(channel, record(t, distribution=spam))))
        attacks.append(await _unknown_task(t, channel))
        attacks.append(await _suppression(t, channel))
    async with t.channel("greedy-kiosk") as channel:
        attacks.append(await _quota(t, channel))
    return attacks


def _stored_as(t: Target, record_id: str) -> str:
    rows = FeedbackStore(t.feedback_uri).read(t.task).select(["record_id", "device_id"]).to_pylist()
    devices = {r["device_id"] for r in rows if r["record_id"].endswith(record_id)}
    return f"stored as {', '.join(sorted(devices))}" if devices else "not stored"


async def _unknown_task(t: Target, channel: grpc.aio.Channel) -> Attack:
    """A random task name is refused, and never becomes a metric label value."""
    name = f"probe-{uuid.uuid4().hex[:12]}"
    observed = await report(channel, record(t, task=name))
    await asyncio.sleep(12)  # Ray exports metrics every few seconds
    scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(t.metrics_url, timeout=10).read().decode())
    if name in scraped:
        observed = f"metric label {name}"
    return Attack("unknown task name (metric series)", "INVALID_ARGUMENT", observed)


async def _escalated(t: Target, channel: grpc.aio.Channel, request_id: str) -> expert_pb2.EscalateResponse | str:
    """The expert's answer, with its receipt, to an escalation over `channel`; else the refusal."""
    try:
        return await expert_pb2_grpc.ExpertStub(channel).Escalate(
            expert_pb2.EscalateRequest(request_id=request_id, task=t.task, text="my card has not arrived yet"),
            metadata=(("application", t.expert),), timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return f"escalation {exc.code().name}: {exc.details()}"


def delivered(t: Target, receipt: common_pb2.Receipt) -> fleet_pb2.FeedbackRecord:
    """The ESCALATION record an edge delivers for `receipt` (edge.feedback.FeedbackRecorder)."""
    inner = fleet_pb2.FeedbackRecord.FromString(receipt.record)
    return fleet_pb2.FeedbackRecord(record_id=inner.record_id, request_id=inner.request_id, task=t.task,
                                    kind=fleet_pb2.ESCALATION, created_unix_ms=int(time.time() * 1000), receipt=receipt)


async def _receipt_attacks(t: Target, channel: grpc.aio.Channel) -> list[Attack]:
    """kiosk-a's own genuine receipt, its label altered; the same receipt sent by kiosk-b."""
    answer = await _escalated(t, channel, f"receipt-{uuid.uuid4().hex[:8]}")
    if isinstance(answer, str):
        return [Attack("ESCALATION receipt with its label altered", "PERMISSION_DENIED", answer),
                Attack("another device's ESCALATION receipt replayed", "PERMISSION_DENIED", answer)]
    altered = common_pb2.Receipt()
    altered.CopyFrom(answer.receipt)
    inner = fleet_pb2.FeedbackRecord.FromString(altered.record)
    other = next(label for label in t.labels if label != inner.label)
    # The same bytes, but for the label: the MAC was over the original ones.
    altered.record = altered.record.replace(inner.label.encode(), other.encode(), 1)
    attacks = [Attack("ESCALATION receipt with its label altered", "PERMISSION_DENIED",
                      await report(channel, delivered(t, altered)), reason="MAC")]
    async with t.channel("kiosk-b") as thief:
        attacks.append(Attack("another device's ESCALATION receipt replayed", "PERMISSION_DENIED",
                              await report(thief, delivered(t, answer.receipt)), reason="receipt.device_id"))
    return attacks


async def _suppression(t: Target, channel: grpc.aio.Channel) -> Attack:
    """kiosk-a claims the record id of kiosk-b's coming escalation; kiosk-b escalates and
    delivers the expert's receipt, as its edge would; the genuine record must be stored."""
    request_id = f"victim-{uuid.uuid4().hex[:8]}"
    # Exactly the id the expert will give kiosk-b's record (cloud.feedback.receipts).
    claim = escalation_record(expert_pb2.EscalateRequest(request_id=request_id, device_id="kiosk-b"),
                              expert_pb2.EscalateResponse(), 0).record_id
    claimed = await report(channel, record(t, fleet_pb2.CORRECTION, record_id=claim, request_id=request_id))
    if claimed != "OK":
        return Attack("claiming another device's escalation record id", "genuine record stored", f"claim {claimed}")
    async with t.channel("kiosk-b") as victim:
        answer = await _escalated(t, victim, request_id)
        if isinstance(answer, str):
            return Attack("claiming another device's escalation record id", "genuine record stored", answer)
        sent = await report(victim, delivered(t, answer.receipt))
    if sent != "OK":
        return Attack("claiming another device's escalation record id", "genuine record stored", f"receipt {sent}")
    rows = FeedbackStore(t.feedback_uri).read(t.task).select(["record_id", "kind", "device_id"]).to_pylist()
    if any(r["record_id"] == claim and r["kind"] == "ESCALATION" and r["device_id"] == "kiosk-b" for r in rows):
        return Attack("claiming another device's escalation record id", "genuine record stored", "genuine record stored")
    return Attack("claiming another device's escalation record id", "genuine record stored", "genuine record missing")


async def _quota(t: Target, channel: grpc.aio.Channel) -> Attack:
    """Batches of 1,000 records until the device's daily quota refuses one."""
    observed = "OK"
    for _ in range(t.quota // 1000 + 2):
        observed = await report(channel, *(record(t) for _ in range(1000)))
        if observed != "OK":
            break
    return Attack(f"more records than the daily quota ({t.quota:,})", "RESOURCE_EXHAUSTED", observed)


async def supply_chain_attacks(t: Target, student: Path, work: Path) -> list[Attack]:
    """Versions the edge must refuse or accept, offered by the real fleet through the proxy.
    The registry is the cloud's own folder, written here as the retrainer (or an attacker with
    write access to its volume) would."""
    registry = ModelRegistry(t.registry_dir)
    old_key, new_key = work / "keys" / "k1.pem", work / "keys" / "k2.pem"
    generate_key(old_key), generate_key(new_key)
    k1, k2 = load_private_key(old_key), load_private_key(new_key)
    keyring_path = work / "edge-keyring.json"
    trust(keyring_path, public_path(old_key))  # what `tandem keys trust|revoke` do, below too
    store = ModelStore(work / "edge-models", lambda: Keyring.load(keyring_path), lambda: None)

    v1 = registry.publish(t.task, signed_copy(student, work / "v1", t.task, registry.next_sequence(t.task), k1))
    registry.promote(t.task, v1, k1)
    replay = _copy_promotion(t.registry_dir / t.task, work / "v1-promotion")
    v2 = registry.publish(t.task, signed_copy(student, work / "v2", t.task, registry.next_sequence(t.task), k1))
    candidate = registry.publish(t.task, signed_copy(student, work / "v3", t.task, registry.next_sequence(t.task), k1))
    registry.promote(t.task, v2, k1)
    serving = Manifest.read(registry.path(t.task, v2))
    async with t.channel("kiosk-a") as channel:
        fleet = fleet_pb2_grpc.FleetStub(channel)

        async def offer_verdict(serving: Manifest) -> str:
            try:
                offer = await fleet.GetManifest(fleet_pb2.GetManifestRequest(task=t.task), metadata=FLEET,
                                                timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            try:
                store.check_offer(t.task, offer, serving)
            except VerificationError as exc:
                return f"{REFUSED}: {exc}"
            return f"accepted: {offer.version}"

        fetched = await status(_drain(fleet.FetchModel(fleet_pb2.FetchModelRequest(task=t.task, version=candidate),
                                                       metadata=FLEET, timeout=TIMEOUT_S)))
        attacks = [Attack("fetching a candidate the gate never promoted", "NOT_FOUND", fetched)]
        _copy_promotion(replay, t.registry_dir / t.task)  # the old signed promotion, replayed
        attacks.append(Attack("downgrade: the older version's signed promotion replayed", REFUSED,
                              await offer_verdict(serving), reason="older"))
        registry.promote(t.task, v2, k1)
        registry.promote(t.task, v1, k1, rollback_of=v2)
        attacks.append(Attack("signed rollback to the older version", "accepted", await offer_verdict(serving)))
        registry.promote(t.task, v2, k1)
        # Rotation: the new key joins the edges' keyring, signs the next version; the old one is revoked.
        trust(keyring_path, public_path(new_key))
        v4 = registry.publish(t.task, signed_copy(student, work / "v4", t.task, registry.next_sequence(t.task), k2))
        registry.promote(t.task, v4, k2)
        attacks.append(Attack("version signed by a rotated-in key", "accepted", await offer_verdict(serving)))
        revoke(keyring_path, key_id(k1.public_key()))
        v5 = registry.publish(t.task, signed_copy(student, work / "v5", t.task, registry.next_sequence(t.task), k1))
        registry.promote(t.task, v5, k1)
        attacks.append(Attack("version signed by a revoked key", REFUSED, await offer_verdict(serving), reason="revoked"))
    return attacks


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def _copy_promotion(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("promoted.json", "promoted.sig"):
        shutil.copyfile(source / name, destination / name)
    return destination


def audit_attack(t: Target, work: Path) -> Attack:
    """One entry of a copy of the cloud's audit log changed: `verify` must say which."""
    copy = work / "audit-copy"
    shutil.copytree(t.audit_uri, copy)
    try:
        entries = AuditLog(str(copy)).verify()
    except AuditError as exc:
        return Attack("audit log entry altered", "detected", f"broken before any change: {exc}")
    if not entries:
        return Attack("audit log entry altered", "detected", "no entries to alter")
    entry = sorted(p for p in copy.iterdir() if p.is_file())[0]
    data = json.loads(entry.read_text())
    data["data"] = {**data.get("data", {}), "tampered": True}
    entry.write_text(json.dumps(data))
    try:
        AuditLog(str(copy)).verify()
    except AuditError as exc:
        return Attack("audit log entry altered", "detected", f"detected: {exc}")
    return Attack("audit log entry altered", "detected", "not detected")

