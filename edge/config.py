"""Edge daemon configuration (`tandem edge serve --config edge.yaml`).

Every field can be overridden from the environment with the prefix TANDEM_EDGE_ and
`__` between nested names, e.g. TANDEM_EDGE_POLICY__THRESHOLD=0.7.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.settings import TandemSettings


class PolicyConfig(BaseModel):
    """When to escalate, from the student's calibrated confidence."""

    mode: Literal["threshold", "target_rate", "edge_only", "cloud_only"] = Field(
        "threshold",
        description="threshold: escalate below `threshold`. target_rate: escalate the least "
        "confident `target_rate` share of recent traffic. edge_only / cloud_only: baselines.",
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Confidence below which to escalate.")
    target_rate: float = Field(0.2, gt=0.0, lt=1.0, description="Share of requests to escalate.")
    window: int = Field(2000, ge=10, description="Recent confidences the target-rate quantile uses.")
    min_samples: int = Field(
        100, ge=1, description="Below this many samples target_rate uses `threshold` instead."
    )
    budget_per_s: float | None = Field(
        None, gt=0, description="Escalations allowed per second (token bucket); None: unlimited."
    )
    budget_burst: int = Field(20, ge=1, description="Token-bucket capacity.")

    @model_validator(mode="after")
    def _window_holds_min_samples(self) -> "PolicyConfig":
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must not exceed window ({self.window})")
        return self


class CloudConfig(BaseModel):
    """Where and how to escalate."""

    target: str | None = Field(
        None, description="host:port of the Cloud gRPC service; None answers everything locally."
    )
    applications: dict[str, str] = Field(
        default_factory=dict,
        description="Task → Ray Serve application (the expert answering it), sent as `application` "
        "metadata; a task not listed uses its own name.",
    )
    deadline_ms: float = Field(2000.0, gt=0, description="Deadline of one escalation, retries included.")
    max_attempts: int = Field(3, ge=1, le=5, description="Attempts per call; retried only on UNAVAILABLE.")
    keepalive_ms: int = Field(
        300_000, ge=10_000, description="HTTP/2 keepalive ping interval; gRPC servers refuse idle pings "
        "more often than every 5 minutes unless configured to allow them.",
    )
    max_reconnect_backoff_ms: int = Field(
        5000, ge=100, description="Longest wait between reconnection attempts while the cloud is down."
    )


class EdgeConfig(TandemSettings):
    """What `tandem edge serve` reads."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_EDGE_")

    listen: str = Field("127.0.0.1:50051", description="gRPC address; loopback by default.")
    metrics_port: int | None = Field(9464, ge=0, le=65535, description="Prometheus port; None: off.")
    tasks: dict[str, Path] = Field(
        default_factory=dict, description="Task name → student artifact directory."
    )
    max_text_bytes: int = Field(2048, ge=1, description="Largest accepted `text`, in UTF-8 bytes.")
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads per inference.")
    allow_spinning: bool = Field(
        False, description="Let ONNX Runtime threads spin; costs CPU on a shared device."
    )
    max_batch: int = Field(
        32, ge=1, description="Most concurrent requests run as one batch; 1 disables batching."
    )
    policy: PolicyConfig = PolicyConfig()
    cloud: CloudConfig = CloudConfig()

    @field_validator("tasks")
    @classmethod
    def _expand_home(cls, tasks: dict[str, Path]) -> dict[str, Path]:
        return {name: path.expanduser() for name, path in tasks.items()}

    @model_validator(mode="after")
    def _consistent(self) -> "EdgeConfig":
        if not self.tasks:
            raise ValueError("tasks: at least one task → artifact directory is required")
        if self.cloud.target is None and self.policy.mode != "edge_only":
            raise ValueError(
                f"policy.mode {self.policy.mode!r} escalates, so cloud.target is required "
                "(or set policy.mode to edge_only)"
            )
        return self
