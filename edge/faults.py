"""Files found corrupt at start are set aside, never deleted: an operator may recover them."""

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def set_aside(path: Path) -> Path | None:
    """Renames `path` to `<name>.corrupt-<unix time>` beside it; the new path, or None when
    there was nothing to rename or the rename failed (logged)."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot set %s aside: %s", path, exc)
        return None
    log.error("set the corrupt %s aside as %s", path, aside)
    return aside
