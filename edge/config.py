"""Edge daemon configuration (`tandem edge serve --config edge.yaml`).

Every field can be overridden from the environment with the prefix TANDEM_EDGE_ and
`__` between nested names, e.g. TANDEM_EDGE_POLICY__THRESHOLD=0.7.
"""

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge.redact import DEFAULT_PATTERNS
from tandem import envs
from tandem.contract import check_device_id, check_name
from tandem.settings import Section, TandemSettings


class PolicyConfig(Section):
    """When to escalate, from the student's calibrated confidence."""

    mode: Literal["threshold", "target_rate", "risk", "edge_only", "cloud_only"] = Field(
        "threshold",
        description="threshold: escalate below the threshold (`threshold`, or the serving student's). "
        "target_rate: escalate the least confident `target_rate` share of recent traffic. risk: keep the "
        "error among local answers at most `epsilon`, at the threshold the student certifies for it. "
        "edge_only / cloud_only: baselines.",
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Confidence below which to escalate, pinned. None: each student's own, "
        "fitted by the trainer and signed in its manifest (operating_point.threshold), adopted with the student "
        "at each swap; a student without one (an older artifact) gets 0.5, with a warning.",
    )
    epsilon: float | None = Field(
        None, gt=0.0, lt=1.0, description="Risk mode (required there): the bound on the error rate among answers "
        "kept locally. The student's manifest certifies thresholds for some epsilons (operating_point.risk, each "
        "holding with probability 1 - risk_delta, 0.95 by default); the policy takes the one certified for the "
        "largest epsilon at most this. None certified, or no operating point: every request escalates "
        "(reason risk_uncertified), the budget still applying.",
    )
    target_rate: float = Field(0.2, gt=0.0, lt=1.0, description="Share of requests to escalate.")
    window: int = Field(2000, ge=10, description="Recent confidences the target-rate quantile uses.")
    min_samples: int = Field(
        100, ge=1, description="Below this many samples target_rate escalates below the threshold instead "
        "(`threshold`, or the serving student's).",
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

    @model_validator(mode="after")
    def _risk_takes_epsilon(self) -> "PolicyConfig":
        if self.mode == "risk" and self.epsilon is None:
            raise ValueError("policy.epsilon (0 < epsilon < 1) is required in risk mode")
        if self.mode == "risk" and self.threshold is not None:
            raise ValueError(f"policy.threshold ({self.threshold}) cannot be pinned in risk mode: the threshold "
                             "is the one the student certifies for policy.epsilon")
        return self


class BreakerConfig(Section):
    """Failing fast while the cloud is not answering (DEADLINE_EXCEEDED, UNAVAILABLE,
    RESOURCE_EXHAUSTED): escalations fall back locally at once, as `cloud_circuit_open`."""

    failure_threshold: int = Field(
        5, ge=1, description="Consecutive escalations the cloud did not answer before the breaker opens."
    )
    open_s: float = Field(
        2.0, gt=0, description="How long an open breaker answers locally before one probe escalation is let "
        "through; the probe's success closes it, its failure opens it again.",
    )


class TLSFiles(Section):
    """The device's mutual-TLS identity: `tandem ca enroll` writes all three into one directory
    (DIR/ca.crt, DIR/device.crt, DIR/device.key). Read when the daemon starts; a renewed
    certificate is used from the next start."""

    ca: Path = Field(description="The fleet CA certificate (PEM) the cloud's server certificate must chain to.")
    cert: Path = Field(description="This device's certificate (PEM); its CN is the device id the cloud sees.")
    key: Path = Field(description="This device's private key (PEM); keep it readable by the daemon only.")

    @field_validator("ca", "cert", "key")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        # Read when the daemon starts (a config error naming the file if unreadable), not here:
        # a config is also loaded where the device's files are not (CI, `tandem edge redrive`).
        return path.expanduser()


class CloudLinkConfig(Section):
    """Where and how to reach the cloud. Which expert application answers a task comes from
    the cloud itself (Fleet.GetRoutes), not from here."""

    target: str | None = Field(
        None, description="host:port of the cloud's gRPC ingress (its TLS proxy); None answers everything locally."
    )
    tls: TLSFiles | None = Field(
        None, description="The device's certificate, key and the fleet CA: required with a target, "
        "unless `insecure`.",
    )
    insecure: bool = Field(
        False, description="Plaintext to the cloud, with no device identity: development clouds "
        "without the TLS proxy only (the cloud must run insecure too). Logged as a warning at start.",
    )
    deadline_ms: float = Field(
        2000.0, gt=0, description="Deadline of one escalation, retries (and a routes lookup) included."
    )
    max_attempts: int = Field(3, ge=1, le=5, description="Attempts per call; retried only on UNAVAILABLE.")
    keepalive_ms: int = Field(
        300_000, ge=10_000, description="HTTP/2 keepalive ping interval; gRPC servers refuse idle pings "
        "more often than every 5 minutes unless configured to allow them.",
    )
    max_reconnect_backoff_ms: int = Field(
        5000, ge=100, description="Longest wait between reconnection attempts while the cloud is down."
    )
    routes_refresh_s: float = Field(
        5.0, gt=0, description="How often the routes are asked again: in the background once the known ones are "
        "this old (an expert rollout's switch reaches the edge within it), and at most this often while a task has "
        "no route or the last call failed (while the cloud is down, escalations do not each ask again).",
    )
    breaker: BreakerConfig = BreakerConfig()

    @model_validator(mode="after")
    def _secure_unless_told(self) -> "CloudLinkConfig":
        if self.target is None:
            return self
        if self.tls is None and not self.insecure:
            raise ValueError(
                f"cloud.tls (ca, cert, key: a device directory from `tandem ca enroll`) is required to reach "
                f"{self.target}; set cloud.insecure: true only for a development cloud without TLS"
            )
        if self.tls is not None and self.insecure:
            raise ValueError("cloud.tls and cloud.insecure: true exclude each other; choose one")
        return self


class FeedbackConfig(Section):
    """What the device records for retraining, and how it is delivered to the cloud."""

    outbox: Path | None = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "edge" / "outbox.sqlite3",
        description="SQLite file holding records until the cloud acknowledges them; one per daemon. "
        "None records nothing; so does a daemon without cloud.target (nowhere to deliver to).",
    )
    max_records: int = Field(
        100_000, ge=1, description="Outbox bound: when full, new records are refused (and counted); "
        "accepted ones are never evicted.",
    )
    max_bytes: int = Field(
        256 * 2**20, ge=1, description="Outbox bound on the serialized size of the records held (their "
        "texts, mostly): beyond it new records are refused and counted like `max_records`.",
    )
    journal_size_limit_bytes: int = Field(
        16 * 2**20, ge=0, description="SQLite journal_size_limit: the write-ahead log is truncated back to "
        "this size after a checkpoint, so a burst does not keep its disk space for ever.",
    )
    max_dead: int = Field(
        10_000, ge=1, description="Records the cloud refused for good kept in the `dead` table for "
        "inspection and `redrive`; beyond it the oldest are dropped (counted and logged).",
    )
    batch_size: int = Field(
        200, ge=1, le=1000, description="Records per ReportFeedback call, oldest first; at most the cloud's "
        "feedback_max_batch (1000: 2 KB texts stay under gRPC's 4 MB message limit).",
    )
    linger_s: float = Field(
        2.0, ge=0, description="Delivery waits until `batch_size` records wait or the oldest has waited this "
        "long, so that the store gets few large files rather than one per record (each ReportFeedback call is "
        "a file per task). Records wait in the outbox, on disk, meanwhile; stopping the daemon sends them at once.",
    )
    min_backoff_s: float = Field(0.5, gt=0, description="First wait after a failed delivery.")
    max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between deliveries; doubles up to this.")
    deadline_ms: float = Field(10_000.0, gt=0, description="Deadline of one ReportFeedback call.")
    audit_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Share of local (source EDGE) answers recorded as AUDIT samples."
    )
    audit_weighting: Literal["uniform", "margin"] = Field(
        "margin", description="Which local answers the audit samples are, for the same upload budget "
        "(`audit_rate` of them in the long run). uniform: any, alike. margin: in proportion to how unsure the "
        "student was, 1 - (p1 - p2) from the top two of its calibrated distribution (at least 0.05, so "
        "confident mistakes still reach the cloud), against the mean of the task's recent local answers; an "
        "`audit_rate` share of the samples stays uniform, so that audit_rate 1 records every answer. The "
        "retrainer gets the answers near the threshold, where a better student saves escalations, instead of "
        "the confident bulk it already gets right. (Disagreement between consecutive students is not used: "
        "it would run two models per request.)",
    )

    @field_validator("outbox")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @model_validator(mode="after")
    def _backoff_range(self) -> "FeedbackConfig":
        if self.min_backoff_s > self.max_backoff_s:
            raise ValueError(f"min_backoff_s ({self.min_backoff_s}) must not exceed max_backoff_s ({self.max_backoff_s})")
        return self


class UpdaterConfig(Section):
    """Pulling promoted students from the cloud registry and swapping them in while serving."""

    enabled: bool = Field(False, description="Poll the registry for new promoted versions.")
    poll_interval_s: float = Field(
        300.0, gt=0, description="Seconds between polls; the first comes after a random share of it. "
        "SIGHUP polls at once.",
    )
    models_dir: Path = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "edge" / "models",
        description="Pulled versions, `<models_dir>/<task>/<version>/`; the serving and the previous "
        "one are kept. At start a verified pulled version is served before the configured artifact.",
    )
    keyring: Path | None = Field(
        None, description="The signing keys the edge trusts (`tandem keys trust|revoke`), read again when the "
        "file changes: rotation needs no restart. Required when enabled; the configured artifacts must "
        "verify against it too.",
    )
    probe_texts: list[str] = Field(
        ["hello", "I need help with my account"], min_length=1,
        description="Texts a new version must answer (finite probabilities) before it serves.",
    )
    deadline_ms: float = Field(10_000.0, gt=0, description="Deadline of one GetManifest call.")
    fetch_timeout_s: float = Field(600.0, gt=0, description="Deadline of one whole FetchModel download.")
    swap_drain_timeout_s: float = Field(
        30.0, gt=0, description="How long a swap waits for the replaced version to answer what was queued "
        "on it. Past it the swap completes (the new version already serves; the wait is counted and "
        "logged) and the old one finishes on its own: a hung model run cannot stop updates.",
    )

    @field_validator("models_dir", "keyring")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @model_validator(mode="after")
    def _key_when_enabled(self) -> "UpdaterConfig":
        if self.enabled and self.keyring is None:
            raise ValueError("updater.keyring is required when the updater is enabled")
        return self


class LoopHealthConfig(Section):
    """When a background loop (feedback delivery, the updater) reports NOT_SERVING as its own
    grpc.health sub-service (`tandem.edge.delivery`, `tandem.edge.updater`). The daemon's own
    health ("" and tandem.v1.Edge) never follows them: a cloud outage must not restart edges."""

    failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures after which the loop reports NOT_SERVING."
    )
    failing_for_s: float = Field(
        300.0, gt=0, description="A loop failing without a success for this long reports NOT_SERVING, "
        "however few its attempts (its backoff grows). One success reports SERVING again.",
    )


class EdgeConfig(TandemSettings):
    """What `tandem edge serve` reads."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_EDGE_")

    listen: str = Field(
        "127.0.0.1:50051", description="The local API's address: host:port (loopback by default), or "
        "unix:///path/edge.sock, a Unix socket that only processes allowed by its file mode reach "
        "(the DaemonSet's choice: no port on the node's network answers Infer or Correct).",
    )
    socket_mode: str = Field(
        "0660", pattern=r"^0?[0-7]{3}$", description="File mode of a unix:// listen socket, octal: "
        "owner and group may call the daemon, others may not.",
    )
    metrics_port: int | None = Field(9464, ge=0, le=65535, description="Prometheus port; None: off.")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the Prometheus port binds; 0.0.0.0 lets a scraper reach it by "
        "pod IP (Kubernetes).",
    )
    max_concurrent_rpcs: int | None = Field(
        2048, ge=1, description="RPCs the gRPC server runs at once (escalations waiting on the cloud "
        "included); beyond it gRPC answers RESOURCE_EXHAUSTED. None: unbounded.",
    )
    tasks: dict[str, Path] = Field(
        default_factory=dict, description="Task name → student artifact directory."
    )
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads per inference.")
    allow_spinning: bool = Field(
        False, description="Let ONNX Runtime threads spin; costs CPU on a shared device."
    )
    max_batch: int = Field(
        32, ge=1, description="Most concurrent requests run as one batch; 1 disables batching."
    )
    max_queue: int = Field(
        1024, ge=1, description="Requests waiting for the model, per task; beyond it Infer answers "
        "RESOURCE_EXHAUSTED at once (counted in tandem_edge_shed_total) instead of queueing without bound.",
    )
    device_id: str = Field(
        default_factory=socket.gethostname, description="Names this device in escalations and feedback."
    )
    redaction: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PATTERNS),
        description="Name → regex; matches become `[NAME]` in every text before it leaves the device "
        "or is stored, in this order. Defaults: card numbers, e-mail addresses, phone numbers.",
    )
    policy: PolicyConfig = PolicyConfig()
    cloud: CloudLinkConfig = CloudLinkConfig()
    # Factories, not instances: their default paths read TANDEM_CACHE_DIR when a config is built.
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    updater: UpdaterConfig = Field(default_factory=UpdaterConfig)
    loop_health: LoopHealthConfig = LoopHealthConfig()

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket `listen` names, or None for host:port."""
        if not self.listen.startswith("unix:"):
            return None
        return Path(self.listen.removeprefix("unix:").removeprefix("//"))

    @field_validator("tasks")
    @classmethod
    def _expand_home(cls, tasks: dict[str, Path]) -> dict[str, Path]:
        # The names go on the wire, where the cloud takes only contract names.
        return {check_name(f"tasks.{name}", name): path.expanduser() for name, path in tasks.items()}

    @field_validator("device_id")
    @classmethod
    def _device_id_fits(cls, device_id: str) -> str:
        # Checked here, or the cloud would refuse every escalation and feedback record.
        return check_device_id("device_id", device_id)

    @field_validator("redaction")
    @classmethod
    def _compiles(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regex: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> "EdgeConfig":
        if not self.tasks:
            raise ValueError("tasks: at least one task → artifact directory is required")
        if self.cloud.target is None and self.policy.mode != "edge_only":
            raise ValueError(
                f"policy.mode {self.policy.mode!r} escalates, so cloud.target is required "
                "(or set policy.mode to edge_only)"
            )
        if self.updater.enabled and self.cloud.target is None:
            raise ValueError("updater.enabled needs cloud.target (the registry is reached through it)")
        return self
