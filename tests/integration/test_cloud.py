"""The cloud as deployed: `tandem cloud serve` in a subprocess (real Ray Serve, real vLLM
on CPU, behind the real nginx mTLS proxy with a fleet CA of its own). The engines start once
for the module. The `test_tls_*` tests go through the proxy as devices would; the others call
Serve's port directly with the identity and token the proxy would forward (`PROXIED`), which
this module knows because it sets the cloud's TANDEM_PROXY_TOKEN."""

import asyncio
import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from cloud import pki
from cloud.feedback import FeedbackStore
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from edge.config import CloudLinkConfig, PolicyConfig, TLSFiles
from tandem.contract import FLEET_APPLICATION, OUT_OF_SCOPE, TEXT_MAX_BYTES
from tandem.subprocesses import Server, announced_server, free_port
from tandem.tasks import banking77
from tandem.v1 import common_pb2, edge_pb2, expert_pb2, expert_pb2_grpc, fleet_pb2, fleet_pb2_grpc

from .conftest import running_daemon

pytestmark = pytest.mark.integration

APPLICATION = {"banking77": "classifier", "banking77-llm": "llm"}  # task -> expert application
TOKEN = "test-proxy-token-0123456789"
PROXIED = [(DEVICE_METADATA, "kiosk-7"), (PROXY_TOKEN_METADATA, TOKEN)]  # what the proxy adds for kiosk-7
FLEET_APP = [("application", FLEET_APPLICATION)]
FLEET = [*FLEET_APP, *PROXIED]  # ReportFeedback, GetManifest, FetchModel, GetRoutes
LABELS = banking77().label_names()


@dataclass(frozen=True)
class Cloud:
    server: Server  # announces the TLS proxy's port
    serve_port: int
    metrics_port: int
    ca_dir: Path

    def credentials(self, device: str | None) -> grpc.ChannelCredentials:
        """`device`'s certificate (enrolled at its first use; enrolling again would renew a
        revoked one), or none."""
        ca = (self.ca_dir / "ca.crt").read_bytes()
        if device is None:
            return grpc.ssl_channel_credentials(ca)
        folder = self.ca_dir / "devices" / device
        if not (folder / "device.crt").is_file():
            folder = pki.enroll(self.ca_dir, device)
        return grpc.ssl_channel_credentials(ca, (folder / "device.key").read_bytes(), (folder / "device.crt").read_bytes())

    def channel(self, device: str | None) -> grpc.Channel:
        """A channel to the proxy as `device` (None: without a certificate)."""
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, verified afresh
        return grpc.secure_channel(f"127.0.0.1:{self.server.port}", self.credentials(device), options)


@pytest.fixture(scope="module")
def cloud_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cloud's config, feedback store (feedback/) and model registry (registry/)."""
    return tmp_path_factory.mktemp("cloud")


@pytest.fixture(scope="module")
def cloud(cloud_dir: Path, teacher_dir: Path) -> Iterator[Cloud]:
    """Both expert kinds: a briefly trained classifier and SmolLM2 (prepared into the cache)."""
    from cloud.prepare import SMOLLM2_DIR, prepare_smollm2
    from tandem import envs

    tmp = cloud_dir
    smollm2 = prepare_smollm2(envs.TANDEM_CACHE_DIR / "models" / SMOLLM2_DIR)
    task = banking77().model_dump(mode="json")
    metrics_port, serve_port = free_port(), free_port()
    pki.init_ca(tmp / "ca")
    cfg = {
        "grpc_port": serve_port, "http_port": free_port(), "ray_metrics_port": metrics_port,
        "feedback_uri": str(tmp / "feedback"), "registry_dir": str(tmp / "registry"), "receipt_key": str(tmp / "receipt.key"),
        "proxy": {"port": free_port(), "ca_dir": str(tmp / "ca"), "prefix": str(tmp / "proxy")},
        "tasks": {"banking77": {"task": task, "expert": "classifier"}, "banking77-llm": {"task": task, "expert": "llm"}},
        "experts": [
            {"name": "classifier", "kind": "classify", "model": str(teacher_dir), "dtype": "float32", "max_model_len": 128,
             "deployment": {"max_ongoing_requests": 64, "max_queued_requests": 64, "health_check_period_s": 2,
                            "health_check_timeout_s": 20}},
            # Small limits, so that the overload test can fill them.
            {"name": "llm", "kind": "generate", "model": str(smollm2), "max_model_len": 2048,
             "deployment": {"max_ongoing_requests": 2, "max_queued_requests": 2}},
        ],
    }
    (tmp / "cloud.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as env, contextlib.ExitStack() as stack:
        env.setenv("TANDEM_PROXY_TOKEN", TOKEN)  # the cloud keeps a token its environment holds
        server = stack.enter_context(announced_server(
            ["-m", "tandem_cli", "cloud", "serve", "--config", str(tmp / "cloud.yaml")], timeout_s=600, stop_timeout_s=120))
        yield Cloud(server, serve_port, metrics_port, tmp / "ca")
        started = psutil.Process(server.process.pid).children(recursive=True)
    # Stopping ends every process the cloud started: Ray's, the replicas' and vLLM's engines.
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running after the cloud stopped: {_commands(alive)}"


def _commands(procs: list[psutil.Process]) -> list[str]:
    commands = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            commands.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    return commands


@pytest.fixture(scope="module")
def stub(cloud: Cloud) -> Iterator[expert_pb2_grpc.ExpertStub]:
    with grpc.insecure_channel(f"127.0.0.1:{cloud.serve_port}") as channel:
        yield expert_pb2_grpc.ExpertStub(channel)


@pytest.fixture(scope="module")
def fleet(cloud: Cloud) -> Iterator[fleet_pb2_grpc.FleetStub]:
    with grpc.insecure_channel(f"127.0.0.1:{cloud.serve_port}") as channel:
        yield fleet_pb2_grpc.FleetStub(channel)


def _metadata(task: str) -> list[tuple[str, str]]:
    return [("application", APPLICATION.get(task, "classifier")), *PROXIED]


def _escalate(stub: expert_pb2_grpc.ExpertStub, task: str, text: str, timeout: float = 60, **kw: str) -> expert_pb2.EscalateResponse:
    return stub.Escalate(expert_pb2.EscalateRequest(task=task, text=text, **kw), metadata=_metadata(task), timeout=timeout)


FUZZ_INPUTS = 150  # per RPC here; `tandem bench security` sends 10,000


@pytest.mark.parametrize(("service", "method", "request_class", "application", "valid"), [
    ("Fleet", "ReportFeedback", fleet_pb2.ReportFeedbackRequest, FLEET_APPLICATION,
     {"records": [{"record_id": "fuzz-1", "task": "banking77", "kind": fleet_pb2.FALLBACK, "text": "card stuck",
                   "created_unix_ms": 1_700_000_000_000}]}),
    ("Fleet", "GetManifest", fleet_pb2.GetManifestRequest, FLEET_APPLICATION, {"task": "banking77"}),
    ("Fleet", "FetchModel", fleet_pb2.FetchModelRequest, FLEET_APPLICATION, {"task": "banking77"}),
    ("Fleet", "GetRoutes", fleet_pb2.GetRoutesRequest, FLEET_APPLICATION, {}),
    ("Fleet", "AckRollout", fleet_pb2.AckRolloutRequest, FLEET_APPLICATION, {"task": "banking77", "version": "v1"}),
    ("Expert", "Escalate", expert_pb2.EscalateRequest, "classifier", {"task": "banking77", "text": "card stuck"}),
])
def test_tls_fuzzed_cloud_rpcs_answer_every_input_and_name_every_refused_field(
        cloud: Cloud, service: str, method: str, request_class: type, application: str, valid: dict) -> None:
    from benchmarks.fuzz import fuzz_rpc

    async def fuzz() -> object:
        async with grpc.aio.secure_channel(f"127.0.0.1:{cloud.server.port}", cloud.credentials("fuzzer")) as channel:
            return await fuzz_rpc(channel, f"/tandem.v1.{service}/{method}", request_class, FUZZ_INPUTS,
                                  metadata=[("application", application)], known={"task": ["banking77"], "label": LABELS[:3]},
                                  valid=valid, seed=3)

    result = asyncio.run(fuzz())
    assert result.inputs == FUZZ_INPUTS
    assert (result.crashes, result.internal_or_unknown, result.unnamed_rejections) == (0, 0, 0), result.samples
    assert result.codes["INVALID_ARGUMENT"] > 0, result.codes


def test_classify_expert_answers_with_a_label_distribution(stub: expert_pb2_grpc.ExpertStub, banking_texts: list[str]) -> None:
    for i, text in enumerate(banking_texts[:10]):
        r = _escalate(stub, "banking77", text, request_id=f"cls-{i}")
        probs = [d.probability for d in r.distribution]
        assert r.label in LABELS and r.expert == "classifier" and r.request_id == f"cls-{i}"
        assert r.distribution[0].label == r.label and probs == sorted(probs, reverse=True)
        assert r.confidence == pytest.approx(probs[0]) and 0 < sum(probs) <= 1.0001
        assert r.expert_ms > 0 and r.label_set_version == 1 and r.out_of_scope == (r.label == OUT_OF_SCOPE)


def test_a_text_longer_than_the_classifiers_context_is_classified_on_its_first_tokens(
        stub: expert_pb2_grpc.ExpertStub, banking_texts: list[str]) -> None:
    text = " ".join(banking_texts)[:TEXT_MAX_BYTES]  # far more tokens than the classifier's max_model_len of 128
    assert _escalate(stub, "banking77", text).label in LABELS


def test_a_text_longer_than_the_llms_context_is_answered_on_its_first_tokens(stub: expert_pb2_grpc.ExpertStub) -> None:
    text = "\U0001f600" * (TEXT_MAX_BYTES // 4)  # 512 emoji: with the 77 labels' prompt, past max_model_len 2048
    assert _escalate(stub, "banking77-llm", text, timeout=120).label in LABELS


def test_generate_expert_answers_within_the_label_set(stub: expert_pb2_grpc.ExpertStub, banking_texts: list[str]) -> None:
    for text in banking_texts[:3]:
        r = _escalate(stub, "banking77-llm", text)
        assert r.label in LABELS and r.expert == "llm" and 0 < r.confidence <= 1


async def test_tls_edge_daemon_escalates_through_the_proxy_as_its_certificate_says(
        student_dir: Path, cloud: Cloud, cloud_dir: Path) -> None:
    device = pki.enroll(cloud.ca_dir, "kiosk-9")
    tls = TLSFiles(ca=device / "ca.crt", cert=device / "device.crt", key=device / "device.key")
    target = CloudLinkConfig(target=f"127.0.0.1:{cloud.server.port}", deadline_ms=30000, tls=tls)
    async with running_daemon(student_dir, policy=PolicyConfig(mode="cloud_only"), cloud=target,
                              device_id="kiosk-9") as (_, edge):
        r = await edge.Infer(edge_pb2.InferRequest(task="banking77", text=b"my card has not arrived", request_id="e2e-1"), timeout=60)
    assert (r.source, r.expert, r.request_id) == (edge_pb2.CLOUD, "classifier", "e2e-1")
    assert r.label in LABELS and r.timings.cloud_ms > 0
    store = FeedbackStore(str(cloud_dir / "feedback"))
    deadline = time.monotonic() + 10
    while not (rows := [row for row in store.read("banking77").to_pylist() if row["request_id"] == "e2e-1"]):
        assert time.monotonic() < deadline, "the escalation never reached the feedback store"
        time.sleep(0.5)
    assert [(row["device_id"], row["record_id"][:12]) for row in rows] == [("kiosk-9", "esc/kiosk-9/")]


def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_tls_a_client_without_an_enrolled_certificate_is_unauthenticated(cloud: Cloud, tmp_path: Path) -> None:
    with cloud.channel(None) as channel:
        code, details = _refusal(lambda: fleet_pb2_grpc.FleetStub(channel).GetRoutes(
            fleet_pb2.GetRoutesRequest(), metadata=FLEET_APP, timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "tandem ca enroll" in details
    with grpc.insecure_channel(f"127.0.0.1:{cloud.serve_port}") as channel:  # around the proxy, forged identity
        code, details = _refusal(lambda: fleet_pb2_grpc.FleetStub(channel).GetRoutes(
            fleet_pb2.GetRoutesRequest(), metadata=[*FLEET_APP, (DEVICE_METADATA, "kiosk-7")], timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "did not come through the TLS proxy" in details


def test_tls_a_revoked_certificate_is_refused_while_others_still_work(cloud: Cloud) -> None:
    routes = fleet_pb2.GetRoutesRequest()
    for device in ("kiosk-lost", "kiosk-kept"):
        with cloud.channel(device) as channel:
            assert fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET_APP, timeout=30).applications
    pki.revoke(cloud.ca_dir, "kiosk-lost")
    deadline = time.monotonic() + 15
    while True:  # the proxy reloads its CRL within about a second
        with cloud.channel("kiosk-lost") as channel:
            try:
                fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET_APP, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in exc.details()
                break
        assert time.monotonic() < deadline, "the revoked certificate was still accepted"
        time.sleep(1)
    with cloud.channel("kiosk-kept") as channel:
        assert fleet_pb2_grpc.FleetStub(channel).GetRoutes(routes, metadata=FLEET_APP, timeout=30).applications


def test_tls_a_device_cannot_write_as_another_nor_send_expert_labels(cloud: Cloud, cloud_dir: Path) -> None:
    def record(record_id: str, **fields: object) -> fleet_pb2.FeedbackRecord:
        return fleet_pb2.FeedbackRecord(**{"record_id": record_id, "task": "banking77", "kind": fleet_pb2.CORRECTION,
                                           "text": "card still not here", "label": "card_arrival",
                                           "created_unix_ms": 1_700_000_000_000, **fields})

    with cloud.channel("kiosk-a") as channel:
        fleet = fleet_pb2_grpc.FleetStub(channel)

        def report(r: fleet_pb2.FeedbackRecord, metadata: list[tuple[str, str]] = FLEET_APP) -> object:
            return lambda: fleet.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[r]), metadata=metadata, timeout=30)

        code, details = _refusal(report(record("as-b", device_id="kiosk-b")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("records[0].device_id")
        code, details = _refusal(report(record("forged-label", kind=fleet_pb2.ESCALATION, expert="classifier")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("records[0].receipt: missing")
        # Identity headers a client sets are replaced by the proxy's.
        report(record("headers", device_id=""), [*FLEET_APP, (DEVICE_METADATA, "kiosk-b"), (PROXY_TOKEN_METADATA, "x")])()
    rows = FeedbackStore(str(cloud_dir / "feedback")).read("banking77").to_pylist()
    assert [r["record_id"] for r in rows if r["record_id"].endswith("/headers")] == ["dev/kiosk-a/headers"]
    assert not [r for r in rows if r["record_id"].endswith(("/as-b", "/forged-label"))]


def test_concurrent_escalations_are_batched_in_the_engine(cloud: Cloud, stub: expert_pb2_grpc.ExpertStub,
                                                         banking_texts: list[str]) -> None:
    async def burst() -> list[expert_pb2.EscalateResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cloud.serve_port}") as channel:
            aio_stub = expert_pb2_grpc.ExpertStub(channel)
            calls = [aio_stub.Escalate(expert_pb2.EscalateRequest(task="banking77", text=t), metadata=_metadata("banking77"), timeout=60)
                     for t in banking_texts[:48]]
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    assert all(a.label in LABELS for a in answers)
    # Ray exports the replica's histogram of requests in flight when each one started.
    url = f"http://127.0.0.1:{cloud.metrics_port}/metrics"
    # Ray prefixes application metrics with "ray_".
    pattern = re.compile(r'^ray_tandem_expert_concurrent_requests_bucket\{.*expert="classifier".*le="1.0".*\} (\S+)$', re.M)
    count = re.compile(r'^ray_tandem_expert_concurrent_requests_count\{.*expert="classifier".*\} (\S+)$', re.M)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if (alone := pattern.search(text)) and (total := count.search(text)) and float(total.group(1)) >= 48:
            break
        time.sleep(2)
    else:
        pytest.fail("the expert's concurrency histogram never reached the burst")
    assert float(alone.group(1)) < float(total.group(1)) - 24, "escalations ran one at a time"


@pytest.mark.parametrize(
    ("task", "text", "fragment"),
    [("weather", "hi", "task: unknown task 'weather'; expert classifier answers ['banking77']"),
     ("banking77", "x" * (TEXT_MAX_BYTES + 1), f"text: {TEXT_MAX_BYTES + 1} bytes exceeds the limit of {TEXT_MAX_BYTES}"),
     ("banking77", "   ", "text: must not be empty")],
)
def test_bad_escalations_are_invalid_argument(stub: expert_pb2_grpc.ExpertStub, task: str, text: str, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _escalate(stub, task, text, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


def test_an_answers_receipt_is_stored_when_its_device_delivers_it(stub: expert_pb2_grpc.ExpertStub,
                                                                  fleet: fleet_pb2_grpc.FleetStub, cloud_dir: Path) -> None:
    """The expert signs, the fleet verifies: two deployments, one key, which `tandem cloud serve`
    created (private) in the configured place."""
    assert (cloud_dir / "receipt.key").stat().st_mode & 0o777 == 0o600
    edge = common_pb2.EdgePrediction(label="lost_or_stolen_card", confidence=0.41, model_version="student-v1")
    r = stub.Escalate(expert_pb2.EscalateRequest(request_id="fb-1", task="banking77", text="my card never came",
                                                edge=edge, device_id="kiosk-7"),
                      metadata=_metadata("banking77"), timeout=60)
    store = FeedbackStore(str(cloud_dir / "feedback"))
    assert not [row for row in store.read("banking77").to_pylist() if row["request_id"] == "fb-1"], \
        "the cloud records nothing itself"
    record_id = fleet_pb2.FeedbackRecord.FromString(r.receipt.record).record_id
    delivered = fleet_pb2.FeedbackRecord(record_id=record_id, request_id="fb-1", task="banking77", kind=fleet_pb2.ESCALATION,
                                         device_id="kiosk-7", created_unix_ms=int(time.time() * 1000), receipt=r.receipt)
    answer = fleet.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[delivered]), metadata=FLEET, timeout=30)
    assert (answer.stored, answer.duplicates) == (1, 0)
    (row,) = [row for row in store.read("banking77").to_pylist() if row["request_id"] == "fb-1"]
    assert row["record_id"].startswith("esc/kiosk-7/")
    assert (row["kind"], row["request_id"], row["text"], row["device_id"]) == ("ESCALATION", "fb-1", "my card never came", "kiosk-7")
    assert (row["edge_label"], row["edge_model_version"]) == ("lost_or_stolen_card", "student-v1")
    assert (row["label"], row["expert"]) == (r.label, "classifier")
    assert [d["label"] for d in row["distribution"]] == [d.label for d in r.distribution]
    assert row["created_unix_ms"] <= row["stored_unix_ms"]


def test_the_fleet_routes_each_task_to_its_expert_application(fleet: fleet_pb2_grpc.FleetStub) -> None:
    assert dict(fleet.GetRoutes(fleet_pb2.GetRoutesRequest(), metadata=FLEET, timeout=30).applications) == APPLICATION


def test_feedback_reported_through_the_proxy_is_stored_once(cloud: Cloud, fleet: fleet_pb2_grpc.FleetStub,
                                                            cloud_dir: Path) -> None:
    records = [fleet_pb2.FeedbackRecord(record_id=f"fix-{i}", task="banking77", kind=fleet_pb2.CORRECTION,
                                        text="card still not here", label="card_arrival", created_unix_ms=1_700_000_000_000,
                                        device_id="kiosk-7")
               for i in range(2)]
    request = fleet_pb2.ReportFeedbackRequest(records=records)
    first = fleet.ReportFeedback(request, metadata=FLEET, timeout=30)
    again = fleet.ReportFeedback(request, metadata=FLEET, timeout=30)
    assert (first.stored, first.duplicates, again.stored, again.duplicates) == (2, 0, 0, 2)
    stored = FeedbackStore(str(cloud_dir / "feedback")).read("banking77")["record_id"].to_pylist()
    assert stored.count("dev/kiosk-7/fix-0") == stored.count("dev/kiosk-7/fix-1") == 1
    pattern = re.compile(r'^ray_tandem_feedback_records_total\{(?=.*kind="CORRECTION")(?=.*outcome="duplicate").*\} (\S+)$', re.M)
    deadline = time.monotonic() + 60
    while not ((m := pattern.search(urllib.request.urlopen(f"http://127.0.0.1:{cloud.metrics_port}/metrics", timeout=5).read().decode()))
               and float(m.group(1)) >= 2):
        assert time.monotonic() < deadline, "the fleet's duplicate count never reached Prometheus"
        time.sleep(2)


def test_bad_feedback_is_invalid_argument_and_a_task_without_a_promoted_model_not_found(fleet: fleet_pb2_grpc.FleetStub) -> None:
    blank = fleet_pb2.FeedbackRecord(record_id="blank", task="banking77", kind=fleet_pb2.AUDIT, text=" ", created_unix_ms=1)
    with pytest.raises(grpc.RpcError) as info:
        fleet.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[blank]), metadata=FLEET, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "records[0].text: must not be empty" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        fleet.GetManifest(fleet_pb2.GetManifestRequest(task="banking77"), metadata=FLEET, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "task 'banking77' has no promoted model" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(fleet.FetchModel(fleet_pb2.FetchModelRequest(task="banking77", version="v0"), metadata=FLEET, timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "task 'banking77' has no promoted model" in info.value.details()


def test_overload_is_refused_with_resource_exhausted_before_queued_work_finishes(cloud: Cloud) -> None:
    async def flood() -> list[tuple[float, grpc.StatusCode]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cloud.serve_port}") as channel:
            aio_stub = expert_pb2_grpc.ExpertStub(channel)
            start = time.perf_counter()

            async def one(i: int) -> tuple[float, grpc.StatusCode]:
                try:
                    await aio_stub.Escalate(expert_pb2.EscalateRequest(task="banking77-llm", text=f"card {i} blocked"),
                                            metadata=_metadata("banking77-llm"), timeout=120)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                return time.perf_counter() - start, code

            return await asyncio.gather(*(one(i) for i in range(24)))

    results = asyncio.run(flood())
    refused = [t for t, code in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [t for t, code in results if code == grpc.StatusCode.OK]
    assert len(refused) + len(served) == 24, f"unexpected statuses: {results}"
    assert refused and served
    assert max(refused) < max(served), "refusals must not wait for the queue to drain"


def test_client_deadline_is_respected(stub: expert_pb2_grpc.ExpertStub) -> None:
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        _escalate(stub, "banking77-llm", "how do I top up by card", timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 5


def test_the_callers_deadline_reaches_the_expert(stub: expert_pb2_grpc.ExpertStub) -> None:
    """Serve's proxy passes no gRPC deadline to the replica: the edge sends what is left of
    its own as metadata, and the expert gives up there instead of at expert_timeout_s."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Escalate(expert_pb2.EscalateRequest(request_id="late-1", task="banking77-llm", text="how do I top up by card"),
                      metadata=[*_metadata("banking77-llm"), ("tandem-timeout-ms", "1")], timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "caller's deadline" in info.value.details()
    answer = _escalate(stub, "banking77-llm", "how do I top up by card", request_id="late-2")
    assert fleet_pb2.FeedbackRecord.FromString(answer.receipt.record).request_id == "late-2"


def test_dead_engine_fails_fast_and_serve_replaces_the_replica(stub: expert_pb2_grpc.ExpertStub) -> None:
    """Kills the classifier's vLLM engine process: requests fail with a status instead of
    hanging, the health check marks the replica unhealthy, Serve starts a new one."""
    replica = next(p for p in psutil.process_iter(["cmdline"])
                   if "ServeReplica:classifier:classifier" in " ".join(p.info["cmdline"] or []))
    engine = next(c for c in replica.children() if "EngineCore" in " ".join(c.cmdline()))
    for proc in [engine, *engine.children(recursive=True)]:
        proc.kill()
    with pytest.raises(grpc.RpcError) as info:
        _escalate(stub, "banking77", "is my card lost", timeout=30)
    assert info.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            assert _escalate(stub, "banking77", "is my card lost", timeout=30).label in LABELS
            break
        except grpc.RpcError:
            time.sleep(3)
    else:
        pytest.fail("Serve did not replace the replica whose engine died")
