"""The `tandem` command. Each subcommand imports its side lazily, so an edge-only
install runs `tandem edge ...` without the training or cloud extras."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tandem.settings import ConfigError

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
def _edge_redrive(args: argparse.Namespace) -> int:
    from edge.config import EdgeConfig
    from edge.daemon import redrive
    from tandem.settings import load_config

    moved, dead = redrive(load_config(EdgeConfig, args.config))
    print(f"moved {moved} dead feedback records back to the outbox; {dead} still dead")
    return 0


@_imports("train")
def _train(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.training.config import TrainConfig
    from tandem.settings import load_config

    cfg = load_config(TrainConfig, args.config)
    out = args.out or cfg.model_dir(args.kind)
    if args.kind == "teacher":
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


@_imports("dev")
def _bench_flywheel(args: argparse.Namespace) -> int:
    _training_process()
    from benchmarks.flywheel import FlywheelConfig, run_flywheel
    from tandem.settings import load_config

    run_flywheel(load_config(FlywheelConfig, args.config), args.out)
    return 0


@_imports("train")
def _train_distill(args: argparse.Namespace) -> int:
    _training_process()
    from cloud.training.config import DistillConfig
    from cloud.training.distill import run_schedule
    from tandem.settings import load_config

    cfg = load_config(DistillConfig, args.config)
    run_schedule(cfg.model_copy(update={"interval_s": None}) if args.once else cfg)
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

    train = groups.add_parser("train", help="train and export models").add_subparsers(required=True)
    for kind, what in (("teacher", "fine-tune the MiniLM-L6 teacher"), ("student", "train, export and calibrate the edge student")):
        p = command(train, kind, _train, what)
        p.add_argument("--out", type=Path, help="output directory (default: in the cache)")
        p.set_defaults(kind=kind)

    p = command(train, "distill", _train_distill, "one retraining round from feedback (or rounds on the config's schedule)")
    p.add_argument("--once", action="store_true", help="one round, even if the config sets interval_s")

    bench = groups.add_parser("bench", help="benchmarks").add_subparsers(required=True)
    p = command(bench, "edge", _bench_edge, "edge daemon against raw ONNX Runtime and a gRPC echo")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "cloud", _bench_cloud, "each expert offline vs served through Serve's gRPC ingress")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p = command(bench, "suite", _bench_suite, "the standard load tests with baselines, floors, sweep and plots")
    p.add_argument("--out", type=Path, default=Path("results"), help="parent of the results folder")
    p = command(bench, "flywheel", _bench_flywheel, "the learning loop round by round: retrain, gate, roll out, measure")
    p.add_argument("--out", type=Path, required=True, help="JSON results file (the plot goes beside it)")

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
