"""The deployment topology, generated from CloudConfig (its one source): the Serve config
that `serve run`/`serve deploy`, KubeRay's RayService and `tandem cloud serve` deploy.

`tandem cloud serve-config` writes it: `cloud/serve_config.yaml` from `cloud/cloud.yaml`,
the `serveConfigV2` block of `k8s/rayservice.yaml` from `cloud/cloud.prod.yaml`.
"""

from pathlib import Path
from typing import Any

import yaml

from cloud.config import CloudConfig
from tandem.contract import FLEET_APPLICATION
from tandem.settings import load_config

SERVICERS = ["cloud.ingress.add_expert_servicer", "cloud.ingress.add_fleet_servicer"]
FLEET_BUILDER = "cloud.app:fleet_app"
EXPERT_BUILDER = "cloud.app:expert_app"
RAYSERVICE_KEY = "  serveConfigV2: |\n"


def serve_config(cfg: CloudConfig, config_ref: str) -> dict[str, Any]:
    """Serve's config schema; every application's builder reads `config_ref` (the cloud YAML,
    as its replicas' nodes see it)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.http_port},
        "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": SERVICERS},
        "logging_config": cfg.logging_config(),
        # The fleet application first: edges ask it for the experts' routes.
        "applications": [
            _application(FLEET_APPLICATION, FLEET_BUILDER, {"config": config_ref}),
            *(_application(e.name, EXPERT_BUILDER, {"config": config_ref, "expert": e.name}) for e in cfg.experts),
        ],
    }


def _application(name: str, import_path: str, args: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "route_prefix": f"/{name}", "import_path": import_path, "args": args}


def generate_serve_config(config: Path, config_ref: str, out: Path | None = None, rayservice: Path | None = None) -> str:
    """The Serve config generated from the CloudConfig file `config`, with a header naming the
    command that generates it; written to `out` and/or as the `serveConfigV2` block of the
    RayService manifest at `rayservice`, where given."""
    command = f"tandem cloud serve-config --config {config}"
    if config_ref != str(config):
        command += f" --config-ref {config_ref}"
    if out is not None:
        command += f" --out {out}"
    if rayservice is not None:
        command += f" --rayservice {rayservice}"
    header = f"# Generated from {config} by `{command}`: edit that file and run this again.\n"
    body = yaml.safe_dump(serve_config(load_config(CloudConfig, config), config_ref), sort_keys=False)
    if out is not None:
        out.write_text(header + body)
    if rayservice is not None:
        rayservice.write_text(_with_serve_config(rayservice.read_text(), "  " + header, body))
    return header + body


def _with_serve_config(manifest: str, header: str, body: str) -> str:
    """`manifest` with its serveConfigV2 block (and the header line above it) replaced."""
    lines = manifest.splitlines(keepends=True)
    if RAYSERVICE_KEY not in lines:
        raise ValueError(f"no line {RAYSERVICE_KEY.strip()!r} in the RayService manifest")
    start = lines.index(RAYSERVICE_KEY)
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    if start > 0 and lines[start - 1].startswith("  # Generated from "):
        start -= 1
    block = "".join(f"    {line}\n" for line in body.splitlines())
    return "".join(lines[:start]) + header + RAYSERVICE_KEY + block + "".join(lines[end:])
