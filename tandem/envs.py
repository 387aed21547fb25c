"""Every environment variable Tandem reads, in one registry.

Configuration files are overridden field by field with variables named after
the config section, e.g. ``TANDEM_EDGE_POLICY__THRESHOLD=0.7`` (see
`tandem.settings`); the variables below are the ones that are not config fields.
"""

import os
from pathlib import Path
from typing import Any, Callable

environment_variables: dict[str, Callable[[], Any]] = {
    # Where built models, artifacts and run files are cached (never in git).
    "TANDEM_CACHE_DIR": lambda: Path(
        os.getenv("TANDEM_CACHE_DIR", "~/.cache/tandem")
    ).expanduser(),
    # Root that relative dataset paths in task configs are resolved against.
    "TANDEM_DATA_DIR": lambda: Path(
        os.getenv("TANDEM_DATA_DIR", "../shared/datasets")
    ).expanduser(),
    # Shared by the TLS proxy and the cloud's deployments: the proxy sends it with every call it
    # forwards, so a deployment can tell proxied calls (with a verified device identity) from
    # calls that reached Serve's port directly. A secret: never in a config file.
    "TANDEM_PROXY_TOKEN": lambda: os.getenv("TANDEM_PROXY_TOKEN", ""),
}


def __getattr__(name: str) -> Any:
    # Read lazily, so that a variable set after import still takes effect.
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
