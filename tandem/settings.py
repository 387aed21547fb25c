"""Loading configuration: a YAML file, then environment overrides, then validation."""

from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(ValueError):
    """A configuration file or override is missing, unreadable or invalid."""


class Section(BaseModel):
    """Base of every nested config section: an unknown or misspelt key is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class TandemSettings(BaseSettings):
    """Base of every top-level config: fields from YAML, overridden by the environment."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment must win over it.
        return env_settings, init_settings


S = TypeVar("S", bound=TandemSettings)


# The directory of the config file being loaded: paths a config names to other files (task
# files) resolve against it, so that a config means the same whatever directory, or Serve
# process, loads it.
CONFIG_DIR: ContextVar[Path | None] = ContextVar("CONFIG_DIR", default=None)


def relative_to_config(path: Path) -> Path:
    """`path`, if relative, against the directory of the config file being loaded (or the current one)."""
    base = CONFIG_DIR.get()
    return path if path.is_absolute() or base is None else base / path


def load_config(cls: type[S], path: Path | None) -> S:
    """Builds `cls` from the YAML file at `path` (or defaults) and the environment."""
    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
    token = CONFIG_DIR.set(None if path is None else Path(path).parent)
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path or '(defaults)'}:\n{exc}") from exc
    finally:
        CONFIG_DIR.reset(token)
