"""The model registry: signed student versions per task and the promoted one."""

from cloud.registry.models import ModelNotFound, ModelRegistry

__all__ = ["ModelNotFound", "ModelRegistry"]
