"""Which Serve application serves each expert: the expert's own (as `tandem cloud serve`
deployed it from the config) until `tandem cloud rollout-expert` switches it to a versioned
one. Kept in one JSON file, replaced atomically, so that a restarted fleet replica answers
GetRoutes with the version that serves, not the config's."""

import logging
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.contract import SafeName
from tandem.fsio import atomic_write

log = logging.getLogger(__name__)


class ExpertVersion(BaseModel):
    """The application serving an expert, and the checkpoint it loaded."""

    model_config = ConfigDict(frozen=True)

    application: SafeName
    model: str = Field(description="The checkpoint directory.")
    version: SafeName = Field(description="The checkpoint's manifest version.")
    sequence: int = Field(0, ge=0, description="The checkpoint's manifest sequence.")
    created_at: datetime = Field(description="The checkpoint's manifest creation time.")


class _RoutesFile(BaseModel):
    experts: dict[SafeName, ExpertVersion] = Field(default_factory=dict)


class RouteStore:
    """Reads are cached until the file changes (its mtime and size): GetRoutes stats it once per call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._experts: dict[str, ExpertVersion] = {}

    def experts(self) -> dict[str, ExpertVersion]:
        """Expert -> its serving version, for the experts a rollout switched. A file that does
        not parse is logged and the last one read is kept: routes must not fall back to an
        application a rollout deleted."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._experts = None, {}
            return {}
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._seen = seen  # a broken file is logged once, not at every call
            try:
                self._experts = dict(_RoutesFile.model_validate_json(self.path.read_bytes()).experts)
            except (OSError, ValidationError) as exc:
                log.error("routes file %s unreadable, keeping the routes read before: %s", self.path, exc)
        return dict(self._experts)

    def routes(self, experts_by_task: Mapping[str, str]) -> dict[str, str]:
        """Task -> the application serving its expert (`experts_by_task`: task -> expert)."""
        serving = self.experts()
        return {task: serving[e].application if e in serving else e for task, e in experts_by_task.items()}

    def application(self, expert: str) -> str:
        """The application serving `expert`."""
        version = self.experts().get(expert)
        return expert if version is None else version.application

    def switch(self, expert: str, version: ExpertVersion) -> None:
        """Makes `version` the one serving `expert` (one writer: the rollout command)."""
        self._write({**self.experts(), expert: version})

    def reset(self) -> None:
        """Every expert served by its own application again (`tandem cloud serve` deploys them so)."""
        self._write({})

    def _write(self, experts: dict[str, ExpertVersion]) -> None:
        atomic_write(self.path, _RoutesFile(experts=experts).model_dump_json(indent=2).encode() + b"\n")
