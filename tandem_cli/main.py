"""The `tandem` command. Each subcommand imports its side lazily, so an edge-only
install runs `tandem edge ...` without the training or cloud extras."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tandem.settings import ConfigError, TandemSettings

Settings = TypeVar("Settings", bound=TandemSettings)

if TYPE_CHECKING:
    from cloud.config import CloudConfig
    from cloud.discovery.clusters import Cluster, DiscoveryConfig
    from cloud.training.config import DistillConfig
    from tandem.tasks import Task

# Tandem's own loggers report progress at INFO; other libraries only warnings and errors.
TANDEM_PACKAGES = ("tandem", "tandem_cli", "edge", "cloud", "benchmarks")


class MissingExtra(RuntimeError):
    """A subcommand needs an optional extra that is not installed."""


def _imports(extra: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Turns an ImportError inside a subcommand into an install hint."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] in TANDEM_PACKAGES:
                    raise
                raise MissingExtra(f"{exc.name} is missing: pip install 'tandem[{extra}]'") from exc

        return run

    return wrap


def _training_process() -> None:
    """Sets up a process that trains or loads models with torch; call it before torch is imported."""
    # torch reads this once, when OpenMP starts: its threads otherwise spin while waiting for
    # work, taking the cores from everything else on a small shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from cloud.training.quiet import quiet_third_party

    quiet_third_party()


@_imports("edge")
def _edge_serve(args: argparse.Namespace) -> int:
    from edge.config import EdgeConfig
    from edge.daemon import run_daemon
    from tandem.settings import load_config

    run_daemon(load_config(EdgeConfig, args.config))
    return 0


@_imports("edge")
def _edge_health(args: argparse.Namespace) -> int:
    import asyncio

    from edge.server import check_health

    target = args.target
    if target is None:
        from edge.config import EdgeConfig
        from tandem.settings import load_config

        target = load_config(EdgeConfig, args.config).listen
    status = asyncio.run(check_health(target, args.service, args.timeout))
    print(f"{args.service or '(overall)'} at {target}: {status}")
    return 0 if status == "SERVING" else 1


@_imports("edge")
def _edge_redrive(args: argparse.Namespace) -> int:
    from edge.config import EdgeConfig
    from edge.daemon import redrive
    from tandem.settings import load_config

    moved, dead = redrive(load_config(EdgeConfig, args.config))
    print(f"moved {moved} dead feedback records back to the outbox; {dead} still dead")
    return 0


def _task_check(args: argparse.Namespace) -> int:
    from tandem.tasks import Task, check_task

    task = Task.from_file(args.file)
    try:
        report = check_task(task)
    except ConfigError as exc:  # names the field; the file is the caller's to name
        raise ConfigError(f"task file {args.file}: {exc}") from None
    print(json.dumps(report, indent=2))
    return 0


@_imports("dev")
def _bench_open_intent(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.open_intent import OpenIntentConfig, format_table, run_open_intent
    from tandem.settings import load_config

    result = run_open_intent(load_config(OpenIntentConfig, args.config), args.out)
    print(format_table(result) + f"\n\n{args.out}")
    return 0


def _config_for_task(kind: type[Settings], args: argparse.Namespace) -> Settings:
    """The `kind` config of `--config`, its task replaced by the task file `--task` names, if any."""
    from tandem.settings import load_config
    from tandem.tasks import Task

    cfg = load_config(kind, args.config)
    return cfg if args.task is None else cfg.model_copy(update={"task": Task.from_file(args.task)})


@_imports("train")
def _train(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.training.config import TrainConfig

    cfg = _config_for_task(TrainConfig, args)
    for kind in ("teacher", "student") if args.kind == "all" else (args.kind,):
        out = args.out or cfg.model_dir(kind)
        if kind == "teacher":
            from cloud.training.teacher import train_teacher as train
        else:
            from cloud.training.student import train_student as train
        manifest = train(cfg, out)
        print(json.dumps({"out": str(out), **manifest}, indent=2))
    return 0


@_imports("cloud")
def _cloud_prepare(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.prepare import prepare_all
    from cloud.training.config import TrainConfig
    from tandem.settings import load_config

    prepare_all(load_config(TrainConfig, args.config))
    return 0


@_imports("cloud")
def _cloud_serve(args: argparse.Namespace) -> int:
    from cloud.server import serve_forever

    serve_forever(args.config)
    return 0


@_imports("cloud")
def _cloud_rollout_expert(args: argparse.Namespace) -> int:
    from cloud.rollout import RolloutFailed, RolloutRefused, rollout_expert

    try:
        version = rollout_expert(args.config, args.expert, args.checkpoint, args.drain_s,
                                 say=lambda line: print(line, flush=True))
    except (RolloutRefused, RolloutFailed) as exc:
        print(f"tandem cloud rollout-expert: {exc}", file=sys.stderr)
        return 1
    print(version.model_dump_json())
    return 0


@_imports("cloud")
def _cloud_serve_config(args: argparse.Namespace) -> int:
    from cloud.topology import generate_serve_config

    text = generate_serve_config(args.config, args.config_ref or str(args.config), args.out, args.rayservice)
    if args.out is None and args.rayservice is None:
        sys.stdout.write(text)
    return 0


@_imports("bench")
def _bench_edge(args: argparse.Namespace) -> int:
    from benchmarks.edge_bench import EdgeBenchConfig, run_edge_bench
    from tandem.settings import load_config

    run_edge_bench(load_config(EdgeBenchConfig, args.config), args.out)
    return 0


@_imports("cloud,bench")
def _bench_cloud(args: argparse.Namespace) -> int:
    from benchmarks.cloud_bench import CloudBenchConfig, run_cloud_bench
    from tandem.settings import load_config

    run_cloud_bench(load_config(CloudBenchConfig, args.config), args.out)
    return 0


@_imports("dev")
def _bench_suite(args: argparse.Namespace) -> int:
    _training_process()  # trains the models if they are missing
    from benchmarks.suite import SuiteConfig, run_suite
    from tandem.settings import load_config

    out = run_suite(load_config(SuiteConfig, args.config), args.out)
    print(out)  # last line: the results folder, for scripts
    return 0


@_imports("bench")
def _bench_load(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from benchmarks.load import LoadConfig, format_table, run_load

    flags = {k: getattr(args, k) for k in LoadConfig.model_fields if getattr(args, k, None) is not None}
    try:
        cfg = LoadConfig.model_validate({**flags, "cloud": args.cloud})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'flags'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bench load: {problems}") from None
    result = run_load(cfg, args.out)
    print(format_table(result) + f"\n\n{args.out / 'load.json'}")
    return 0


@_imports("dev")
def _bench_flywheel(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.flywheel import FlywheelConfig, run_flywheel
    from tandem.settings import load_config

    run_flywheel(load_config(FlywheelConfig, args.config), args.out)
    return 0


@_imports("dev")
def _bench_student(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.students import StudentBenchConfig, format_table, run_student_bench
    from tandem.settings import load_config

    result = run_student_bench(load_config(StudentBenchConfig, args.config), args.out)
    print(format_table(result) + f"\n\n{args.out}")
    return 0


@_imports("dev")
def _bench_security(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.security import SecurityBenchConfig, run_security_bench, security_targets_met
    from tandem.settings import load_config

    result = run_security_bench(load_config(SecurityBenchConfig, args.config), args.out)
    return 0 if security_targets_met(result) else 1


@_imports("dev")
def _bench_chaos(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.chaos.config import SHORT, ChaosConfig
    from benchmarks.chaos.figures import format_report, targets
    from benchmarks.chaos.run import run_chaos
    from tandem.settings import load_config

    cfg = load_config(ChaosConfig, args.config)
    result = run_chaos(cfg.model_copy(update=SHORT) if args.short else cfg, args.out)
    print(format_report(result) + f"\n\n{args.out / 'chaos.json'}")
    return 0 if all(targets(result).values()) else 1


@_imports("train")
def _train_distill(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.training.config import DistillConfig
    from cloud.training.distill import run_schedule
    from tandem.settings import load_config

    cfg = load_config(DistillConfig, args.config)
    run_schedule(cfg.model_copy(update={"interval_s": None}) if args.once else cfg)
    return 0


@_imports("edge")
def _keys_new(args: argparse.Namespace) -> int:
    from tandem.signing import generate_key, key_id, public_path

    try:
        public = generate_key(args.out)
    except FileExistsError:
        print(f"tandem: {args.out} exists; a new key never replaces one (what it signed would not verify)",
              file=sys.stderr)
        return 1
    print(f"wrote {args.out} (private, 0600) and {public_path(args.out)}", file=sys.stderr)
    print(key_id(public))
    return 0


@_imports("edge")
def _keys_trust(args: argparse.Namespace) -> int:
    from tandem.signing import trust

    try:
        print(trust(args.keyring, args.public_key))
    except (OSError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1
    return 0


@_imports("edge")
def _keys_revoke(args: argparse.Namespace) -> int:
    from tandem.signing import revoke

    try:
        revoke(args.keyring, args.key_id)
    except ValueError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    return 0


@_imports("cloud")
def _registry_rollback(args: argparse.Namespace) -> int:
    from cloud.audit.log import AuditLog
    from cloud.registry import ModelNotFound, ModelRegistry
    from tandem.signing import signing_key

    cfg = _cloud_config(args)
    registry = ModelRegistry(args.registry or cfg.registry_dir)
    current = registry.promoted(args.task)
    try:
        if current is None:
            raise ValueError(f"task {args.task!r} has no promoted version to roll back")
        promotion = registry.promote(args.task, args.to, signing_key(args.key), rollback_of=current)
    except (ValueError, ModelNotFound, FileNotFoundError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1
    audit = AuditLog(_audit_uri(args.audit_uri, cfg))
    audit.append("rollback", "operator", task=args.task, version=promotion.version, rollback_of=current,
                 sequence=promotion.sequence, key_id=promotion.key_id)
    print(promotion.model_dump_json(indent=2))
    return 0


@_imports("cloud")
def _audit_verify(args: argparse.Namespace) -> int:
    from cloud.audit.log import AuditError, AuditLog

    log = AuditLog(_audit_uri(args.uri, _cloud_config(args)))
    try:
        count = log.verify()
    except AuditError as exc:
        print(f"tandem: audit log {log.uri} is broken: {exc}", file=sys.stderr)
        return 1
    head = log.head()
    print(f"audit log {log.uri}: {count} entries verified; head: "
          + (f"entry {head['seq']}, hash {head['hash']}" if head else "none (empty)"))
    return 0


@_imports("cloud")
def _audit_show(args: argparse.Namespace) -> int:
    from cloud.audit.lineage import show_lineage
    from cloud.audit.log import AuditLog

    log = AuditLog(_audit_uri(args.uri, _cloud_config(args)))
    text = show_lineage(log, args.version)
    if text is None:
        print(f"tandem: audit log {log.uri} has no entries about {args.version}", file=sys.stderr)
        return 1
    print(text)
    return 0


@_imports("cloud")
def _cloud_proxy_config(args: argparse.Namespace) -> int:
    from cloud.config import CloudConfig
    from cloud.proxy import TOKEN_PLACEHOLDER, render_nginx_conf
    from tandem.settings import load_config

    cfg = load_config(CloudConfig, args.config)
    sys.stdout.write(render_nginx_conf(cfg.proxy, cfg.grpc_port, TOKEN_PLACEHOLDER))
    return 0


def _cloud_config(args: argparse.Namespace) -> "CloudConfig":
    """The cloud config whose CA folder, registry and feedback store the operator commands
    (`ca`, `registry`, `audit`) default to."""
    from cloud.config import CloudConfig
    from tandem.settings import load_config

    return load_config(CloudConfig, args.config)


def _audit_uri(given: str | None, cfg: "CloudConfig") -> str:
    """`given`, else the audit log beside the cloud config's feedback store."""
    from cloud.audit.log import audit_uri

    return given or audit_uri(cfg.feedback_uri)


@_imports("cloud")
def _ca_init(args: argparse.Namespace) -> int:
    from cloud.pki import init_ca

    ca_dir = args.dir or _cloud_config(args).proxy.ca_dir
    for path in init_ca(ca_dir, args.host):
        print(f"wrote {path}")
    print(f"fleet CA ready in {ca_dir}; enroll devices with `tandem ca enroll DEVICE --dir {ca_dir}`")
    return 0


@_imports("cloud")
def _ca_enroll(args: argparse.Namespace) -> int:
    from cloud.pki import DEVICE_DAYS, enroll

    cfg = _cloud_config(args)
    days = DEVICE_DAYS if args.days is None else args.days
    out = enroll(args.dir or cfg.proxy.ca_dir, args.device, days, _audit_uri(args.audit_uri, cfg))
    print(f"wrote {out}/device.key, {out}/device.crt (valid {days} days; enroll again to renew) and {out}/ca.crt")
    print(f"the edge's config: cloud.tls: {{ca: {out}/ca.crt, cert: {out}/device.crt, key: {out}/device.key}}")
    return 0


@_imports("cloud")
def _ca_revoke(args: argparse.Namespace) -> int:
    from cloud.pki import revoke

    cfg = _cloud_config(args)
    ca_dir = args.dir or cfg.proxy.ca_dir
    serials = revoke(ca_dir, args.device, _audit_uri(args.audit_uri, cfg))
    print(f"revoked {args.device}: {len(serials)} certificate(s) added to {ca_dir / 'crl.pem'}; "
          "a running proxy reloads it within seconds")
    return 0


@_imports("cloud")
def _ca_crl(args: argparse.Namespace) -> int:
    from cloud.pki import CRL_DAYS, write_crl

    path = write_crl(args.dir or _cloud_config(args).proxy.ca_dir)
    print(f"wrote {path}, valid {CRL_DAYS} days: re-issue it before then, or the proxy refuses every device")
    return 0


def _intents_setup(args: argparse.Namespace) -> "tuple[DistillConfig, Path, Task]":
    """The retrainer's config (store, audit log, corroboration_devices), the task file's path
    (--task, else the config's `task`, else the shipped banking77) and its task."""
    import yaml

    from cloud.training.config import DistillConfig
    from tandem.settings import load_config
    from tandem.tasks import SHIPPED_TASKS, Task

    path = args.task
    if path is None and args.config is not None:
        named = (yaml.safe_load(args.config.read_text()) or {}).get("task")
        path = args.config.parent / named if isinstance(named, str) else None
    path = path or SHIPPED_TASKS / "banking77.yaml"
    task = Task.from_file(path)
    return load_config(DistillConfig, args.config).model_copy(update={"task": task}), path, task


def _intents_found(args: argparse.Namespace) -> "tuple[DistillConfig, Path, Task, DiscoveryConfig, list[Cluster]]":
    _training_process()
    from cloud.discovery.clusters import DiscoveryConfig
    from cloud.discovery.field import task_clusters

    cfg, path, task = _intents_setup(args)
    discovery = DiscoveryConfig(min_similarity=args.min_similarity)
    clusters = task_clusters(cfg.feedback_store_uri(), task, discovery, cfg.corroboration_devices)
    return cfg, path, task, discovery, clusters


@_imports("train")
def _intents_clusters(args: argparse.Namespace) -> int:
    from cloud.discovery.clusters import format_clusters

    cfg, _, task, discovery, clusters = _intents_found(args)
    print(f"task {task.name} (label set version {task.label_set_version}): out-of-scope traffic in "
          f"{cfg.feedback_store_uri()}\n")
    print(format_clusters(clusters, discovery.examples, cfg.corroboration_devices))
    return 0


@_imports("train")
def _intents_page(args: argparse.Namespace) -> int:
    from cloud.discovery.page import render_page
    from tandem.fsio import atomic_write

    cfg, _, task, discovery, clusters = _intents_found(args)
    atomic_write(args.out, render_page(task.name, clusters, discovery.examples, cfg.corroboration_devices).encode())
    print(f"{len(clusters)} clusters: {args.out}")
    return 0


@_imports("train")
def _intents_name(args: argparse.Namespace) -> int:
    from cloud.discovery.naming import name_cluster

    cfg, path, _, _, clusters = _intents_found(args)
    cluster = next((c for c in clusters if c.id == args.cluster), None)
    if cluster is None:
        raise ConfigError(f"no cluster {args.cluster!r} among the {len(clusters)} shown now (new traffic changes "
                          "clusters): run `tandem intents clusters` again")
    result = name_cluster(path, cluster, args.label, args.description, cfg.feedback_store_uri(), cfg.audit_log_uri())
    print(json.dumps(result, indent=2))
    return 0


@_imports("train")
def _train_expert(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.training.config import DistillConfig
    from cloud.training.expert import run_expert

    cfg = _config_for_task(DistillConfig, args)
    result = run_expert(cfg, start=args.start)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


@_imports("dev")
def _bench_new_intent(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.new_intent import NewIntentConfig, run_new_intent
    from tandem.settings import load_config

    run_new_intent(load_config(NewIntentConfig, args.config), args.out)
    return 0


@_imports("dev")
def _demo(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.demo import run_demo

    return run_demo(args.config, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    def command(group: argparse._SubParsersAction, name: str, run: Callable, help: str,
                config_required: bool = False) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help)
        p.add_argument("--config", type=Path, required=config_required,
                       help="YAML config; environment variables override it")
        p.set_defaults(run=run)
        return p

    edge = groups.add_parser("edge", help="the device daemon").add_subparsers(required=True)
    command(edge, "serve", _edge_serve, "run the edge daemon (gRPC Edge service)")
    p = command(edge, "health", _edge_health, "ask a running daemon's grpc.health service (exit 0: SERVING); "
                "the DaemonSet's probes")
    p.add_argument("--target", help="host:port or unix:///path (default: the config's listen)")
    p.add_argument("--service", default="", help="e.g. tandem.v1.Edge; default: the overall health")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    command(edge, "redrive", _edge_redrive, "move the outbox's dead feedback records back for delivery (edge config)",
            config_required=True)

    cloud = groups.add_parser("cloud", help="the Ray Serve application").add_subparsers(required=True)
    command(cloud, "prepare", _cloud_prepare, "build the expert models into the cache (train config)")
    command(cloud, "serve", _cloud_serve, "run Ray Serve with the gRPC Expert and Fleet services (cloud config)",
            config_required=True)
    p = command(cloud, "serve-config", _cloud_serve_config,
                "generate the Serve config (and the RayService's serveConfigV2) from a cloud config", config_required=True)
    p.add_argument("--config-ref", help="how the generated config names the cloud config (default: --config as given)")
    p.add_argument("--out", type=Path, help="write the Serve config YAML here")
    p.add_argument("--rayservice", type=Path, help="replace the serveConfigV2 block of this RayService manifest")
    p = command(cloud, "rollout-expert", _cloud_rollout_expert,
                "deploy a signed checkpoint of an expert beside the serving one on the running cloud, switch the "
                "routes to it, then delete the old one (blue/green)", config_required=True)
    p.add_argument("--expert", required=True, help="the expert's name in the cloud config")
    p.add_argument("--checkpoint", type=Path, required=True, help="the signed checkpoint directory (kind teacher)")
    p.add_argument("--drain-s", type=float, help="seconds the old version answers after the switch "
                   "(default: the cloud config's rollout.drain_s)")
    command(cloud, "proxy-config", _cloud_proxy_config,
            "print the TLS proxy's nginx.conf for a cloud config; the proxy token is left as ${TANDEM_PROXY_TOKEN} "
            "for the deployment to substitute from its environment", config_required=True)

    train = groups.add_parser("train", help="train and export models").add_subparsers(required=True)
    for kind, what in (("teacher", "fine-tune the teacher (the classify expert's checkpoint)"),
                       ("student", "train, export and calibrate the edge student"),
                       ("all", "the teacher, then the student, each into the cache")):
        p = command(train, kind, _train, what)
        p.add_argument("--task", type=Path, help="task file (default: the config's task)")
        if kind != "all":
            p.add_argument("--out", type=Path, help="output directory (default: in the cache)")
        p.set_defaults(kind=kind, out=None)

    p = command(train, "distill", _train_distill, "one retraining round from feedback (or rounds on the config's schedule)")
    p.add_argument("--once", action="store_true", help="one round, even if the config sets interval_s")
    p = command(train, "expert", _train_expert, "fine-tune the classify expert from field labels devices agree on and "
                "named intents, with replay; gate, calibrate, sign, publish under <registry>/<task>/experts/ "
                "(distill config; exit 1 if the gate refuses it)")
    p.add_argument("--task", type=Path, help="task file (default: the config's task)")
    p.add_argument("--from", dest="start", type=Path, help="the checkpoint to start from (default: the config's "
                   "teacher_dir)")

    intents = groups.add_parser("intents", help="new intents from out-of-scope traffic").add_subparsers(required=True)
    for name, run, what in (
            ("clusters", _intents_clusters, "cluster the task's out-of-scope feedback; print the clusters from enough "
             "devices (the retrainer's corroboration_devices), with example texts"),
            ("name", _intents_name, "make a cluster a label of the task: the task file gains it (label_set_version + 1) "
             "and its texts become the operator's labelled examples in the feedback store"),
            ("page", _intents_page, "write the clusters as a static HTML page")):
        p = command(intents, name, run, what + " (distill config: feedback store, audit log)")
        p.add_argument("--task", type=Path, help="task file (default: the config's task, else tasks/banking77.yaml)")
        p.add_argument("--min-similarity", type=float, default=0.5,
                       help="clusters merge while their texts' mean cosine similarity is at least this (default 0.5)")
        if name == "name":
            p.add_argument("cluster", help="the cluster's id, as `tandem intents clusters` prints it")
            p.add_argument("label", help="the label: a new one, or one the task has (adds examples only)")
            p.add_argument("--description", default="", help="the new label's description (the LLM expert's prompt)")
        if name == "page":
            p.add_argument("--out", type=Path, required=True, help="HTML file")

    task = groups.add_parser("task", help="task files").add_subparsers(required=True)
    p = task.add_parser("check", help="validate a task file and its data; print label counts and split sizes")
    p.add_argument("file", type=Path, help="the task file (YAML)")
    p.set_defaults(run=_task_check)

    bench = groups.add_parser("bench", help="benchmarks").add_subparsers(required=True)
    p = command(bench, "open-intent", _bench_open_intent,
                "queries that fit no intent: 25/50/75% of the intents known, expert, student and cascade")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "edge", _bench_edge, "edge daemon against raw ONNX Runtime and a gRPC echo")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "cloud", _bench_cloud, "each expert offline vs served through Serve's gRPC ingress")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "suite", _bench_suite, "the standard load tests with baselines, floors, sweep and plots")
    p.add_argument("--out", type=Path, default=Path("results"), help="parent of the results folder")
    p = bench.add_parser("load", help="open-loop load on a running edge daemon (or, with --cloud, a cloud) with "
                         "your labelled data; writes OUT/load.json and plots")
    p.add_argument("--target", required=True, help="host:port or unix:///path of the edge daemon (the cloud's proxy "
                   "with --cloud)")
    p.add_argument("--task", type=Path, required=True, help="the task file")
    p.add_argument("--data", type=Path, required=True, help="labelled queries, CSV or JSONL with the task's columns; "
                   "a label outside the task's label set counts as out of scope")
    p.add_argument("--out", type=Path, required=True, help="results folder (load.json, plots)")
    p.add_argument("--route", help="the task name on the wire (default: the task file's name)")
    p.add_argument("--cloud", action="store_true", help="cloud-only: Expert/Escalate through the cloud's mTLS proxy, "
                   "the expert from Fleet.GetRoutes")
    p.add_argument("--ca", type=Path, help="TLS: the CA certificate of the target's server certificate")
    p.add_argument("--cert", type=Path, help="TLS client certificate (`tandem ca enroll DEVICE`: device.crt)")
    p.add_argument("--key", type=Path, help="TLS client key (device.key)")
    p.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    p.add_argument("--schedule", help="rate steps RATE:SECONDS,..., e.g. 10:30,50:30 (instead of --rate)")
    p.add_argument("--duration", type=float, help="seconds at --rate")
    p.add_argument("--count", type=int, help="requests to send (with --schedule: at most); neither this nor "
                   "--duration: one per data row")
    p.add_argument("--warmup", type=int, help="unmeasured requests first (default 20)")
    p.add_argument("--timeout", type=float, help="deadline of each request in seconds (default 10)")
    p.add_argument("--seed", type=int, help="seeds the arrivals and the rows' order (default 0)")
    p.set_defaults(run=_bench_load)
    p = command(bench, "flywheel", _bench_flywheel, "the learning loop round by round: retrain, gate, roll out, measure")
    p.add_argument("--out", type=Path, required=True, help="JSON results file (the plot goes beside it)")
    p = command(bench, "student", _bench_student, "students against their teacher in one run: parameters, accuracy "
                "(and on queries with unseen wordpieces), int8 size, single-query latency")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "new-intent", _bench_new_intent, "intents withheld from training arrive as out-of-scope "
                "traffic, get clustered and named; the expert is fine-tuned and rolled out, the student distilled")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "security", _bench_security, "attacks, fuzzers, poisoning and the cost of mTLS on the real system")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "chaos", _bench_chaos, "faults injected into the running system: nothing lost, hung or left behind")
    p.add_argument("--out", type=Path, required=True, help="results folder (chaos.json)")
    p.add_argument("--short", action="store_true", help="one of each fault, briefly (the run `make test` includes)")

    keys = groups.add_parser("keys", help="model signing keys and the edges' keyrings").add_subparsers(required=True)
    p = keys.add_parser("new", help="create an Ed25519 signing key (private 0600, public beside it); prints its id")
    p.add_argument("--out", type=Path, required=True, help="private key PEM; the public key goes to OUT.pub")
    p.set_defaults(run=_keys_new)
    p = keys.add_parser("trust", help="add a public key to a keyring (created if missing); prints its id")
    p.add_argument("keyring", type=Path, help="keyring JSON (the edges' updater.keyring)")
    p.add_argument("public_key", type=Path, help="public key PEM")
    p.set_defaults(run=_keys_trust)
    p = keys.add_parser("revoke", help="refuse everything a key signed, from the next verification on")
    p.add_argument("keyring", type=Path, help="keyring JSON (the edges' updater.keyring)")
    p.add_argument("key_id", help="the key's id (what `keys new` and `keys trust` print)")
    p.set_defaults(run=_keys_revoke)

    registry = groups.add_parser("registry", help="the model registry").add_subparsers(required=True)
    p = command(registry, "rollback", _registry_rollback,
                "promote an older version as a signed rollback of the promoted one")
    p.add_argument("task")
    p.add_argument("--to", required=True, help="the published version to roll back to")
    p.add_argument("--key", type=Path, required=True, help="the registry's signing key (private PEM)")
    p.add_argument("--registry", type=Path, help="registry root (default: the cloud config's registry_dir)")
    p.add_argument("--audit-uri", help="audit log (default: the cloud config's feedback store's _audit)")

    audit = groups.add_parser("audit", help="the hash-chained audit trail").add_subparsers(required=True)
    uri_help = "audit log: a directory or pyarrow filesystem URI (default: the cloud config's feedback store's _audit)"
    p = command(audit, "verify", _audit_verify, "recompute the chain; fails at the first changed, missing or moved entry")
    p.add_argument("--uri", help=uri_help)
    p = command(audit, "show", _audit_show, "a model version's lineage: its data, gate, signer, promotions, rollout")
    p.add_argument("version", help="the model version")
    p.add_argument("--uri", help=uri_help)

    ca = groups.add_parser(
        "ca", help="the fleet's certificate authority: device certificates for mTLS to the cloud's proxy (files "
        "under --dir, default the cloud config's proxy.ca_dir)").add_subparsers(required=True)
    ca_dir_help = "the CA's folder (default: the cloud config's proxy.ca_dir, TANDEM_CACHE_DIR/ca)"
    audit_help = "audit log to record this in (default: the cloud config's feedback store's _audit)"
    p = command(ca, "init", _ca_init, "create the CA (an existing one is kept), and issue the proxy's server "
                "certificate (1 year: run again to renew or to add hosts) and the CRL")
    p.add_argument("--dir", type=Path, help=ca_dir_help)
    p.add_argument("--host", action="append", default=[],
                   help="a name or address edges connect to, besides localhost and 127.0.0.1 (repeatable)")
    p = command(ca, "enroll", _ca_enroll, "issue a device its key and certificate (enroll again to renew)")
    p.add_argument("device", help="the device id: the certificate's CN, the id the cloud knows it by")
    p.add_argument("--dir", type=Path, help=ca_dir_help)
    p.add_argument("--days", type=int, help="validity in days (default 90)")
    p.add_argument("--audit-uri", help=audit_help)
    p = command(ca, "revoke", _ca_revoke, "revoke every certificate of a device; a running proxy reloads the CRL")
    p.add_argument("device")
    p.add_argument("--dir", type=Path, help=ca_dir_help)
    p.add_argument("--audit-uri", help=audit_help)
    p = command(ca, "crl", _ca_crl, "re-issue the CRL (valid 30 days; past that the proxy refuses every device: "
                "run it weekly, e.g. from cron)")
    p.add_argument("--dir", type=Path, help=ca_dir_help)

    p = command(groups, "demo", _demo, "train or reuse models, run the system, print the report")
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="folder for results")
    return parser


def configure_logging() -> None:
    """Log records to stderr: Tandem's from INFO up, other libraries' from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in TANDEM_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        return args.run(args)
    except (ConfigError, MissingExtra) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
