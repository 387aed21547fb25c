"""`tandem cloud rollout-expert`: a new checkpoint of an expert replaces the serving one with
no escalation failing (blue/green).

Serve stops a one-replica application's old replica before its new one is up, and vLLM
takes tens of seconds to load: updating the expert's application in place leaves its tasks
without an expert meanwhile. Instead, the new checkpoint is deployed as an application of
its own (`<expert>.<version>`) beside the serving one, on the running cloud's Ray cluster;
once it is RUNNING and answers a probe, the fleet's routes (`cloud.registry.routes`) name it;
the old application keeps answering for `drain_s` (the edges re-ask their routes every
`routes_refresh_s`, and an escalation sent just before lasts at most their deadline), then is
deleted. A failure before the switch removes the new application: the old one serves on.

The checkpoint is verified before anything is deployed: a signed manifest of kind "teacher"
under the cloud's keyring, every file as signed and none unlisted, the task and label set of
the tasks the expert answers, and a version newer than the serving one: a higher manifest
`sequence`, or an equal one and a later `created_at` (teachers built outside the registry
have sequence 0).
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from cloud.config import CloudConfig, ExpertConfig
from cloud.registry.routes import ExpertVersion, RouteStore
from tandem.contract import MANIFEST_FILE, NAME, SIGNATURE_FILE, Manifest
from tandem.settings import ConfigError, load_config
from tandem.signing import Keyring, VerificationError, verify_artifact
from tandem.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)

RAY_AUTH_MODE = "RAY_AUTH_MODE"
PROBE_TEXT = "rollout probe"
PROBE_DEVICE = "rollout-probe"
PROBE_RETRY_S = 0.5
# The probe's statuses that come from the new replica itself: it runs, and Serve's proxy routes
# to it. A secure cloud's replica refuses a call without the TLS proxy's token: UNAUTHENTICATED.
REPLICA_ANSWERED = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)


class RolloutRefused(ValueError):
    """The checkpoint is not deployed: unverified, not newer than the serving version, or for
    other tasks. Nothing changed."""


class RolloutFailed(RuntimeError):
    """The new version did not come up, or the cloud is unreachable; the old version serves."""


def rollout_expert(config: Path, expert: str, checkpoint: Path, drain_s: float | None = None,
                   say: Callable[[str], None] = print) -> ExpertVersion:
    """Replaces the serving version of `expert` (of the cloud YAML `config`, whose cloud runs)
    with the checkpoint directory `checkpoint`; returns the new version. `drain_s`: how long the
    old version answers after the switch (default the config's rollout.drain_s). Progress goes
    to `say`."""
    cfg = load_config(CloudConfig, config)
    spec = _expert(cfg, expert)
    checkpoint = checkpoint.resolve()
    manifest = verified_checkpoint(cfg, spec, checkpoint)
    store = RouteStore(cfg.routes_file())
    new = ExpertVersion(application=application_name(expert, manifest.version), model=str(checkpoint),
                        version=manifest.version, sequence=manifest.sequence, created_at=manifest.created_at)
    _check_newer(new, store.experts().get(expert) or _config_version(spec))
    old = store.application(expert)
    drain_s = cfg.rollout.drain_s if drain_s is None else drain_s
    say(f"verified {checkpoint}: {manifest.kind} {manifest.version} (sequence {manifest.sequence}, "
        f"created {manifest.created_at:%Y-%m-%dT%H:%M:%SZ}), signed by {manifest.key_id}")
    with ray_cluster(cfg):
        from ray import serve

        _deploy(cfg, spec, new, old, store, say)
        say(f"switched {expert} to {new.application}; {old} answers for {drain_s:g} s more (drain: the edges' "
            "routes refresh interval plus their longest escalation deadline)")
        time.sleep(drain_s)
        serve.delete(old)
        say(f"deleted {old}: {new.application} serves {expert}")
    return new


def verified_checkpoint(cfg: CloudConfig, spec: ExpertConfig, checkpoint: Path) -> Manifest:
    """The checkpoint's manifest, if it verifies under `cfg.keyring` and fits the tasks that
    `spec` answers; RolloutRefused naming what does not."""
    if cfg.keyring is None:
        raise RolloutRefused("keyring: not set in the cloud config; rollouts deploy only checkpoints signed under it")
    try:
        keyring = Keyring.load(cfg.keyring)
    except (OSError, ValueError) as exc:
        raise RolloutRefused(f"keyring {cfg.keyring}: {exc}") from exc
    try:
        manifest, _ = verify_artifact(checkpoint, keyring)
    except VerificationError as exc:
        raise RolloutRefused(f"checkpoint refused: {exc}") from exc
    unlisted = sorted({p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE, SIGNATURE_FILE, *manifest.files})
    if unlisted:  # vLLM would load what no signature covers
        raise RolloutRefused(f"checkpoint refused: {checkpoint}: files not in the signed manifest: {unlisted}")
    if manifest.kind != "teacher":
        raise RolloutRefused(f"checkpoint refused: manifest kind {manifest.kind!r}; an expert loads a 'teacher'")
    for route, t in cfg.tasks.items():
        if t.expert != spec.name:
            continue
        if manifest.task != t.task.name:
            raise RolloutRefused(f"checkpoint refused: manifest task {manifest.task!r}, but {spec.name} answers "
                                 f"{route} (task {t.task.name!r})")
        if manifest.label_set_version != t.task.label_set_version:
            raise RolloutRefused(f"checkpoint refused: manifest label_set_version {manifest.label_set_version}, but "
                                 f"task {route} is at {t.task.label_set_version}: update the task file first")
    return manifest


def application_name(expert: str, version: str) -> str:
    """The Serve application of `version` of `expert`."""
    name = f"{expert}.{version}"
    if not NAME.fullmatch(name):
        raise RolloutRefused(f"application name {name!r} is not a valid name (at most 128 letters, digits, '.', '_', "
                             "'-'): shorten the expert's name or the checkpoint's version")
    return name


@contextlib.contextmanager
def ray_cluster(cfg: CloudConfig) -> Iterator[None]:
    """Connected, as a driver, to the Ray cluster of the running cloud: RAY_ADDRESS, else the
    address `tandem cloud serve` wrote (`CloudConfig.ray_address_file`), with its token
    authentication mode unless RAY_AUTH_MODE says one (the token itself: ~/.ray/auth_token or
    RAY_AUTH_TOKEN, as Ray reads it)."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        path = cfg.ray_address_file()
        try:
            cluster = json.loads(path.read_text())
            address = cluster["address"]
        except FileNotFoundError:
            raise RolloutFailed(f"no running cloud: {path} is missing (`tandem cloud serve` writes it), and RAY_ADDRESS "
                                "is unset") from None
        except (OSError, ValueError, KeyError) as exc:
            raise RolloutFailed(f"{path}: unreadable Ray address: {exc}") from exc
        if cluster.get("auth_mode"):
            # A driver joining a cluster does not turn token authentication on by itself.
            os.environ.setdefault(RAY_AUTH_MODE, cluster["auth_mode"])
    import ray  # after RAY_AUTH_MODE is set: Ray reads it when imported

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise RolloutFailed(f"cannot join the cloud's Ray cluster at {address}: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _deploy(cfg: CloudConfig, spec: ExpertConfig, new: ExpertVersion, old: str, store: RouteStore,
            say: Callable[[str], None]) -> None:
    """Deploys `new` beside `old`, probes it and switches the routes to it; on any failure
    removes it, the routes unchanged."""
    from ray import serve

    from cloud.app import expert_version_app

    if new.application in serve.status().applications:  # an interrupted rollout's
        say(f"removing {new.application}, left by an earlier rollout")
        serve.delete(new.application)
    deadline = time.monotonic() + cfg.rollout.ready_timeout_s
    say(f"deploying {new.application} beside {old} (up to {cfg.rollout.ready_timeout_s:g} s)")
    try:
        _run_until(expert_version_app(cfg, spec, new.application, new.model), new.application, cfg, deadline)
        say(f"{new.application} is RUNNING; probing it")
        _probe(cfg, spec, new.application, deadline)
        store.switch(spec.name, new)
    except BaseException as exc:
        say(f"rollout failed ({type(exc).__name__}: {exc}); removing {new.application}, {old} still serves")
        serve.delete(new.application)
        raise


def _run_until(app: object, name: str, cfg: CloudConfig, deadline: float) -> None:
    """serve.run, which waits without end for RUNNING (or raises at DEPLOY_FAILED), bounded by
    `deadline`: past it the caller deletes the application, which ends the wait."""
    from ray import serve

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serve-run")
    running = pool.submit(serve.run, app, name=name, route_prefix=f"/{name}", logging_config=cfg.logging_config())
    pool.shutdown(wait=False)
    try:
        running.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        raise RolloutFailed(f"{name} was not RUNNING within rollout.ready_timeout_s "
                            f"({cfg.rollout.ready_timeout_s:g} s)") from None
    except RuntimeError as exc:  # DEPLOY_FAILED: the replica's constructor failed (the engine did not load)
        raise RolloutFailed(str(exc)) from exc


def _probe(cfg: CloudConfig, spec: ExpertConfig, application: str, deadline: float) -> None:
    """A real inference on the new engine (its health check), then an escalation through
    Serve's gRPC proxy until the proxy routes it to the new replica."""
    from ray import serve

    handle = serve.get_app_handle(application)
    handle.check_health.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
    task = next(route for route, t in cfg.tasks.items() if t.expert == spec.name)
    request = expert_pb2.EscalateRequest(task=task, text=PROBE_TEXT, device_id=PROBE_DEVICE)
    with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as channel:
        stub = expert_pb2_grpc.ExpertStub(channel)
        while True:
            try:
                answer = stub.Escalate(request, metadata=[("application", application)], timeout=cfg.expert_timeout_s)
                code, details = grpc.StatusCode.OK, f"answered {answer.label!r} as {answer.expert!r}"
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            if code in REPLICA_ANSWERED:
                return
            if time.monotonic() >= deadline:
                raise RolloutFailed(f"probe of {application} through Serve's gRPC port {cfg.grpc_port}: "
                                    f"{code.name} {details}")
            time.sleep(PROBE_RETRY_S)


def _expert(cfg: CloudConfig, name: str) -> ExpertConfig:
    spec = next((e for e in cfg.experts if e.name == name), None)
    if spec is None:
        raise ConfigError(f"--expert: no expert named {name!r} in the cloud config (have {[e.name for e in cfg.experts]})")
    return spec


def _config_version(spec: ExpertConfig) -> ExpertVersion | None:
    """The version the config's own checkpoint is, where it has a manifest."""
    directory = Path(spec.model_path())
    if not (directory / MANIFEST_FILE).is_file():
        return None
    manifest = Manifest.read(directory)
    return ExpertVersion(application=spec.name, model=str(directory), version=manifest.version,
                         sequence=manifest.sequence, created_at=manifest.created_at)


def _check_newer(new: ExpertVersion, serving: ExpertVersion | None) -> None:
    if serving is None:  # the config's checkpoint has no manifest: nothing to order by
        return
    if new.version == serving.version:
        raise RolloutRefused(f"checkpoint refused: version {new.version} already serves ({serving.application})")
    if (new.sequence, new.created_at) <= (serving.sequence, serving.created_at):
        raise RolloutRefused(f"checkpoint refused: version {new.version} (sequence {new.sequence}, created "
                             f"{new.created_at.isoformat()}) is not newer than the serving {serving.version} "
                             f"(sequence {serving.sequence}, created {serving.created_at.isoformat()})")
