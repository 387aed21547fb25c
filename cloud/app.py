"""The Ray Serve applications: one per expert, each implementing `tandem.v1.Expert` directly
on its vLLM engine, and the fleet application implementing `tandem.v1.Fleet` (feedback in,
students out, each task's expert application).

Serve's gRPC proxy routes by the `application` metadata, so the proxy is the router and
each escalation takes one Serve hop: an ingress deployment in front of the experts would
add a second hop to every escalation (`tandem bench cloud` measures the overhead). Edges
learn each task's expert application from Fleet.GetRoutes.

An expert records nothing: it answers each escalation with a receipt, the escalation's
feedback record signed with the cloud's receipt key (`cloud.feedback.receipts`), which the
edge keeps in its outbox and delivers to the fleet application like its other feedback.

`cloud/topology.py` names the builders below (`expert_app`, `fleet_app`) in the Serve
config; `tandem cloud serve` and `serve run cloud/serve_config.yaml` both call them.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.metrics import Counter, Histogram

from cloud.audit.log import AuditLog, audit_uri
from cloud.config import CloudConfig, ExpertConfig, FleetOptions
from cloud.errors import (EscalationError, ExpertTimeout, ExpertUnavailable, FleetError, InvalidAnswer,
                          InvalidEscalation, NotAuthenticated, UnauthenticatedEscalation)
from cloud.experts.protocol import Runner
from cloud.feedback.receipts import escalation_record, issue, load_key
from cloud.feedback.records import LabelSet, check_edge
from cloud.feedback.store import FeedbackStore
from cloud.identity import Unauthenticated, caller_device, proxy_token
import cloud.ingress  # noqa: F401  (quiets Serve's tracebacks of deliberate statuses, in this replica too)
from cloud.registry.models import ModelRegistry
from cloud.registry.routes import RouteStore
from cloud.registry.service import FleetMetrics, FleetServicer
from tandem.contract import CALLER_TIMEOUT_METADATA, REQUEST_ID_MAX_CHARS, FieldError, check_request_id, check_text
from tandem.settings import load_config
from tandem.tasks import SHIPPED_TASKS, Task
from tandem.v1 import common_pb2, expert_pb2, fleet_pb2
from tandem.wire import Undecodable, parsed

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
FLEET_DEPLOYMENT = "Fleet"
# The task label of metrics for a task the cloud does not have (or this expert does not answer):
# the wire value would let any client add label values. Not a valid task name, so it collides with none.
UNKNOWN_TASK = "(unknown)"


def log_to_serve() -> None:
    """Gives the `cloud` package's loggers the handlers Serve set up for `ray.serve` in this
    replica (its log file, and stderr): Serve configures no other logger."""
    serve_logger = logging.getLogger("ray.serve")
    cloud_logger = logging.getLogger("cloud")
    cloud_logger.handlers[:] = serve_logger.handlers
    cloud_logger.setLevel(serve_logger.level)
    cloud_logger.propagate = False


@serve.deployment
class Expert:
    """One vLLM engine answering the tasks routed to it. Concurrent calls share the engine:
    vLLM batches them continuously. Method names are the RPC names."""

    def __init__(self, cfg: dict[str, Any], tasks: dict[str, dict[str, Any]], timeout_s: float, receipt_key: str,
                 insecure: bool) -> None:
        """`tasks`: route -> the task it answers (`Task` as JSON values). `receipt_key`: the file of
        the key that signs receipts, read once here. `insecure` (development only): the caller is
        the device its request names."""
        from cloud.experts.engine import build_engine

        log_to_serve()
        self._cfg = ExpertConfig.model_validate(cfg)
        self._tasks = {route: Task.model_validate(task) for route, task in tasks.items()}
        self._labels = {route: task.label_names() for route, task in self._tasks.items()}
        self._timeout_s = timeout_s
        self._proxy_token = proxy_token(insecure)
        self._receipt_key = load_key(Path(receipt_key))
        if insecure:
            log.warning("expert %s: insecure, development only: device ids are whatever requests claim, unverified",
                        self._cfg.name)
        self._engine = build_engine(self._cfg)
        self._runner = self._build_runner(self._engine)
        self._in_flight = 0
        self._tags = {"expert": self._cfg.name}
        self._escalations = Counter("tandem_cloud_escalations", "Escalations by task, expert and gRPC status.",
                                    tag_keys=("task", "expert", "code"))
        self._latency = Histogram("tandem_expert_seconds", "Expert compute time per escalation.",
                                  LATENCY_BOUNDARIES, tag_keys=("expert",))
        self._batch = Histogram("tandem_expert_concurrent_requests", "Requests inside the engine when one starts (its batch).",
                                [1, 2, 4, 8, 16, 32, 64], tag_keys=("expert",))

    def _build_runner(self, engine: Any) -> Runner:
        if self._cfg.kind == "generate":
            from cloud.experts.generate import GenerateRunner

            return GenerateRunner(engine, self._cfg, self._tasks)
        from cloud.experts.classify import ClassifyRunner

        return ClassifyRunner(engine, self._cfg, self._tasks)

    async def Escalate(self, body: expert_pb2.EscalateRequest | Undecodable,
                       grpc_context: RayServegRPCContext) -> expert_pb2.EscalateResponse:
        received = time.monotonic()
        tags = {"task": UNKNOWN_TASK, "expert": self._cfg.name}
        request = expert_pb2.EscalateRequest()  # until the body parses
        try:
            request = _parsed(body)
            tags["task"] = request.task if request.task in self._tasks else UNKNOWN_TASK
            labels = self._validate(request, grpc_context.invocation_metadata())
            budget_s = caller_budget_s(grpc_context.invocation_metadata(), self._timeout_s)
            response = await self._escalate(request, labels, budget_s)
            if time.monotonic() - received > budget_s:
                # The caller has answered without this and would drop the reply, receipt and
                # all: counted as what it was for the caller, DEADLINE_EXCEEDED.
                raise ExpertTimeout(f"expert {self._cfg.name} answered after the caller's deadline; answer dropped")
        except EscalationError as exc:
            # A refused request is the caller's business, and a missed deadline happens at the
            # request rate under overload: both are counted, and logged at INFO without a traceback,
            # so that neither a misbehaving client nor an overload fills the log. Other failures
            # get a traceback.
            routine = isinstance(exc, (InvalidEscalation, NotAuthenticated, ExpertTimeout))
            log.log(logging.INFO if routine else logging.WARNING, "escalation %r task=%r failed: %s %s",
                    request.request_id[:128], request.task[:128], exc.code.name, exc, exc_info=not routine)
            self._escalations.inc(tags={**tags, "code": exc.code.name})
            grpc_context.set_code(exc.code)
            grpc_context.set_details(str(exc))
            return expert_pb2.EscalateResponse(request_id=request.request_id[:REQUEST_ID_MAX_CHARS])
        self._escalations.inc(tags={**tags, "code": "OK"})
        log.debug("escalation %s task=%s label=%s %.1f ms", request.request_id, request.task, response.label, response.expert_ms)
        record = escalation_record(request, response, int(time.time() * 1000))
        response.receipt.CopyFrom(issue(record, self._receipt_key))
        return response

    def _validate(self, request: expert_pb2.EscalateRequest, metadata: Sequence[tuple[str, str]]) -> list[str]:
        """The labels of the request's task, once its caller is identified and its fields are
        checked (the cloud's only check of them); sets its device id to the caller's, and gives
        it an id if it came without one."""
        try:
            request.device_id = caller_device(metadata, request.device_id, self._proxy_token)
        except Unauthenticated as exc:
            raise UnauthenticatedEscalation(str(exc)) from None
        except FieldError as exc:  # insecure: the id the request claims
            raise InvalidEscalation.of(exc) from None
        labels = self._labels.get(request.task)
        if labels is None:
            raise InvalidEscalation("task", f"unknown task {request.task[:128]!r}; expert {self._cfg.name} answers "
                                            f"{sorted(self._tasks)}")
        try:
            check_text("text", request.text)
            check_request_id("request_id", request.request_id)
            check_edge("edge", request.edge, request.task, labels)
        except FieldError as exc:
            raise InvalidEscalation.of(exc) from None
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        return labels

    async def _escalate(self, request: expert_pb2.EscalateRequest, labels: list[str],
                        budget_s: float) -> expert_pb2.EscalateResponse:
        if budget_s <= 0:
            raise ExpertTimeout("the caller's deadline passed before the expert started")
        self._in_flight += 1
        self._batch.observe(self._in_flight, tags=self._tags)
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self._runner.answer(request.text, request.task, request.request_id), budget_s)
        except asyncio.TimeoutError as exc:
            raise ExpertTimeout(f"expert {self._cfg.name} did not answer within {budget_s:.3f} s "
                                "(the caller's deadline, at most expert_timeout_s)") from exc
        except EscalationError:
            raise  # the runner's own verdict (e.g. an answer cut off): not worth a retry
        except Exception as exc:  # a dead or broken engine: the health check gets the replica replaced
            raise ExpertUnavailable(f"expert {self._cfg.name} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._in_flight -= 1
        elapsed = time.perf_counter() - started
        self._latency.observe(elapsed, tags=self._tags)
        if answer.label not in labels:
            raise InvalidAnswer(f"expert {self._cfg.name} answered {answer.label!r}, not a label of task {request.task}")
        task = self._tasks[request.task]
        return expert_pb2.EscalateResponse(
            request_id=request.request_id,
            label=answer.label,
            confidence=answer.confidence,
            distribution=[common_pb2.LabelScore(label=label, probability=p) for label, p in answer.distribution],
            expert=self._cfg.name,
            expert_ms=elapsed * 1e3,
            out_of_scope=answer.label == task.oos_label,
            label_set_version=task.label_set_version,
        )

    async def __del__(self) -> None:
        # Serve awaits `__del__` when it stops a replica gracefully, after in-flight requests
        # finish: the hook for stopping the engine, whose EngineCore process otherwise outlives
        # the replica.
        self._engine.shutdown()

    async def check_health(self) -> None:
        # A real, tiny inference: vLLM's engine can hang while its process stays up.
        probe = self._runner.answer("health check", next(iter(self._tasks)), f"health-{uuid.uuid4().hex}")
        await asyncio.wait_for(probe, timeout=self._cfg.deployment.health_check_timeout_s)


# One replica: the feedback store's one writer (see FeedbackStore), the audit log's, and the
# one count of each device's quota. With more, a record that reaches two replicas at once may
# be stored twice, which FeedbackStore.read hides.
@serve.deployment(name=FLEET_DEPLOYMENT, num_replicas=1)
class Fleet(FleetServicer):
    """`tandem.v1.Fleet` behind Serve's gRPC proxy."""

    def __init__(self, feedback_uri: str, registry_dir: str, receipt_key: str, tasks: dict[str, LabelSet],
                 routes: dict[str, str], max_batch: int, fleet: dict[str, Any], insecure: bool,
                 routes_file: str | None = None, config: str | None = None) -> None:
        """`receipt_key`: the file of the key that checks escalation receipts, read once here.
        `fleet`: FleetOptions. `routes`: task -> expert; `routes_file`, where given, names the
        application serving each expert after a rollout (RouteStore). `config`, where given: the
        cloud YAML, whose task files' label sets are read again when they change."""
        log_to_serve()
        options = FleetOptions.model_validate(fleet)
        metrics = ServeFleetMetrics(tasks)
        store = FeedbackStore(feedback_uri, on_quarantine=metrics.quarantined)
        label_sets = tasks if config is None else LiveLabelSets(Path(config), tasks)
        super().__init__(store, ModelRegistry(Path(registry_dir)), label_sets, routes, metrics, max_batch,
                         request_timeout_s=options.request_timeout_s, insecure=insecure,
                         device_quota_per_day=options.device_quota_per_day, audit=AuditLog(audit_uri(feedback_uri)),
                         receipt_key=load_key(Path(receipt_key)),
                         route_store=None if routes_file is None else RouteStore(Path(routes_file)))

    async def FetchModel(self, request: fleet_pb2.FetchModelRequest,
                         grpc_context: RayServegRPCContext) -> AsyncIterator[fleet_pb2.ModelChunk]:
        async for chunk in super().FetchModel(request, grpc_context):
            yield chunk
        if grpc_context.code():
            # Serve carries a stream's context to the client only with a message; an exception
            # carries the status the servicer set.
            raise StreamRefusal(grpc_context.details())


class StreamRefusal(FleetError):
    """Carries a refused stream's status out of the replica; the servicer has logged why."""


class ServeFleetMetrics(FleetMetrics):
    """Exported on Ray's metrics port, prefixed "ray_". A task the cloud does not have counts
    as UNKNOWN_TASK."""

    def __init__(self, tasks: Collection[str]) -> None:
        self._tasks = frozenset(tasks)
        self._requests = Counter("tandem_fleet_requests", "Fleet RPCs by method and gRPC status.",
                                 tag_keys=("method", "code"))
        self._records = Counter("tandem_feedback_records", "Feedback records by task, kind and outcome (stored, duplicate).",
                                tag_keys=("task", "kind", "outcome"))
        self._quarantined = Counter("tandem_feedback_quarantined_files",
                                    "Feedback store files set aside under _quarantine/ as unreadable, by task.",
                                    tag_keys=("task",))

    def request(self, method: str, code: grpc.StatusCode) -> None:
        self._requests.inc(tags={"method": method, "code": code.name})

    def feedback(self, task: str, kind: str, outcome: str, count: int) -> None:
        self._records.inc(count, tags={"task": self._task(task), "kind": kind, "outcome": outcome})

    def quarantined(self, task: str, path: str) -> None:
        self._quarantined.inc(tags={"task": self._task(task)})  # the path is in the store's log line

    def _task(self, task: str) -> str:
        return task if task in self._tasks else UNKNOWN_TASK


def fleet_app(args: dict[str, str]) -> serve.Application:
    """Builder of the fleet application (`serve run` / `serve deploy`, `tandem cloud serve`):
    args.config is the cloud YAML."""
    cfg = load_config(CloudConfig, Path(args["config"]))
    return Fleet.options(**fleet_options(cfg.fleet)).bind(cfg.feedback_uri, str(cfg.registry_dir), str(cfg.receipt_key),
                                                          _label_sets(cfg), cfg.routes(), cfg.feedback_max_batch,
                                                          cfg.fleet.model_dump(mode="json"), cfg.insecure,
                                                          routes_file=str(cfg.routes_file()), config=args["config"])


def fleet_options(fleet: FleetOptions) -> dict[str, Any]:
    """The Serve options of the fleet deployment: bounded, like the experts', so that a
    burst of slow calls is refused (RESOURCE_EXHAUSTED, retried by edges) instead of queueing
    without end behind a few slots."""
    return {
        "max_ongoing_requests": fleet.max_ongoing_requests,
        "max_queued_requests": fleet.max_queued_requests,
        # No CPU reserved: the replica is I/O-bound and must not take an expert's CPU. Custom
        # resources pin it to the nodes that hold the store's credentials.
        "ray_actor_options": {"num_cpus": 0, "resources": fleet.ray_resources},
    }


def expert_app(args: dict[str, str]) -> serve.Application:
    """Builder of one expert's application: args.config is the cloud YAML, args.expert the
    expert, which answers the tasks routed to it."""
    cfg = load_config(CloudConfig, Path(args["config"]))
    expert = next((e for e in cfg.experts if e.name == args["expert"]), None)
    if expert is None:
        raise ValueError(f"{args['config']}: no expert named {args['expert']!r}")
    return Expert.options(**_deployment_options(expert)).bind(*expert_args(cfg, expert))


def expert_version_app(cfg: CloudConfig, expert: ExpertConfig, application: str, model: str) -> serve.Application:
    """`expert` as the application `application` loading the checkpoint `model`: a rollout's new
    version, answering the expert's tasks beside the version that serves them now."""
    _, tasks, timeout_s, receipt_key, insecure = expert_args(cfg, expert)
    version = expert.model_copy(update={"name": application, "model": model})
    return Expert.options(**_deployment_options(version)).bind(version.model_dump(mode="json"), tasks, timeout_s,
                                                               receipt_key, insecure)


def expert_args(cfg: CloudConfig, expert: ExpertConfig) -> tuple[dict[str, Any], dict[str, Any], float, str, bool]:
    """What `Expert.__init__` takes for `expert` of `cfg`."""
    return (
        expert.model_dump(mode="json"),
        {route: t.task.model_dump(mode="json") for route, t in cfg.tasks.items() if t.expert == expert.name},
        cfg.expert_timeout_s,
        str(cfg.receipt_key),
        cfg.insecure,
    )


def _parsed(body: expert_pb2.EscalateRequest | Undecodable) -> expert_pb2.EscalateRequest:
    """The request, or InvalidEscalation naming its type if its body did not parse (`tandem.wire`)."""
    try:
        return parsed(body)
    except FieldError as exc:
        raise InvalidEscalation.of(exc) from None


def caller_budget_s(metadata: Sequence[tuple[str, str]], limit_s: float) -> float:
    """Seconds the caller gives an escalation: its remaining deadline as it sent the call
    (CALLER_TIMEOUT_METADATA), at most `limit_s`; `limit_s` when it sent none. Time spent in
    Serve's proxy and queues is not counted: the expert may overrun the caller by that much."""
    value = dict(metadata).get(CALLER_TIMEOUT_METADATA)
    if value is None:
        return limit_s
    try:
        caller_ms = int(value)
    except ValueError:
        raise InvalidEscalation(f"metadata {CALLER_TIMEOUT_METADATA}",
                                f"{value!r} is not a whole number of milliseconds") from None
    return min(caller_ms / 1000, limit_s)


def _label_sets(cfg: CloudConfig) -> dict[str, LabelSet]:
    return {name: LabelSet(frozenset(t.task.label_names()), t.task.label_set_version) for name, t in cfg.tasks.items()}


class LiveLabelSets(Mapping[str, LabelSet]):
    """Each task's label set, read again from the cloud config when the config or a task file
    it names changes (checked at most every `check_every_s`): a label an operator adds, with
    its task's new `label_set_version`, reaches the fleet without a restart."""

    def __init__(self, config: Path, initial: dict[str, LabelSet], check_every_s: float = 1.0) -> None:
        self._config = config
        self._sets = initial
        self._every_s = check_every_s
        self._files = _watched_files(config)
        self._stamps = _stamps(self._files)
        self._checked = time.monotonic()

    def __getitem__(self, task: str) -> LabelSet:
        return self._current()[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def _current(self) -> dict[str, LabelSet]:
        if time.monotonic() - self._checked < self._every_s:
            return self._sets
        self._checked = time.monotonic()
        stamps = _stamps(self._files)
        if stamps == self._stamps:
            return self._sets
        self._stamps = stamps  # a broken edit is logged once, and read again when it changes
        try:
            sets = _label_sets(load_config(CloudConfig, self._config))
            self._files = _watched_files(self._config)
        except (ValueError, OSError, yaml.YAMLError) as exc:  # ConfigError and pydantic's are ValueErrors
            log.error("cloud config %s changed but does not load; keeping the label sets read before: %s",
                      self._config, exc)
            return self._sets
        self._stamps = _stamps(self._files)
        if sets != self._sets:
            log.info("label sets reloaded from %s: %s", self._config,
                     {task: s.version for task, s in sets.items()})
        self._sets = sets
        return sets


def _watched_files(config: Path) -> list[Path]:
    """The cloud config and the task files it names by path (relative: to the config's folder)."""
    raw = yaml.safe_load(config.read_text()) or {}
    if "tasks" not in raw:
        return [config, SHIPPED_TASKS / "banking77.yaml"]  # CloudConfig's default task
    named = [Path(t["task"]) for t in raw["tasks"].values() if isinstance(t, dict) and isinstance(t.get("task"), str)]
    return [config, *(p if p.is_absolute() else config.parent / p for p in named)]


def _stamps(files: list[Path]) -> list[tuple[int, int] | None]:
    stamps = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((stat.st_mtime_ns, stat.st_size))
    return stamps


def _deployment_options(expert: ExpertConfig) -> dict[str, Any]:
    d = expert.deployment
    options: dict[str, Any] = {
        "name": expert.name,
        "max_ongoing_requests": d.max_ongoing_requests,
        # Past this, Serve's proxy answers RESOURCE_EXHAUSTED at once.
        "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": d.ray_resources,
                              "runtime_env": {"env_vars": expert.env}},
    }
    if d.autoscaling_config is not None:
        options["autoscaling_config"] = d.autoscaling_config
    else:
        options["num_replicas"] = d.num_replicas
    return options
