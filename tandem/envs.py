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
}


def __getattr__(name: str) -> Any:
    # Read lazily, so that a variable set after import still takes effect.
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
