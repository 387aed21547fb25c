"""Cloud application configuration (`tandem cloud serve --config cloud/cloud.yaml`).

Overridable from the environment with the prefix TANDEM_CLOUD_, e.g.
TANDEM_CLOUD_GRPC_PORT=9100 or TANDEM_CLOUD_EXPERT_TIMEOUT_S=10 (list items such as
`experts` are set in the file).
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cloud.proxy import ProxyOptions
from tandem import envs
from tandem.contract import FLEET_APPLICATION, NAME, check_name
from tandem.settings import Section, TandemSettings
from tandem.tasks import TaskFile, banking77

# The running cloud's own files, in the registry's folder (shared with the fleet replica) under a
# name no task can have (names start with a letter or digit).
STATE_DIR = ".cloud"
ROUTES_FILE = "routes.json"
RAY_ADDRESS_FILE = "ray-address.json"


class DeploymentOptions(Section):
    """Ray Serve options of one expert's deployment."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replicas; 1 unless autoscaling_config is set.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...)."
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Concurrent requests per replica: vLLM batches them (continuous batching)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting beyond that; more are refused with RESOURCE_EXHAUSTED. -1: unbounded."
    )
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs, to pin it to the nodes that "
        "offer them (in k8s, a worker group for the experts, which holds no store credentials or signing key).",
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.autoscaling_config is None and self.num_replicas is None:
            self.num_replicas = 1
        return self


class FleetOptions(Section):
    """Ray Serve options and bounds of the fleet application's one deployment (one replica:
    the feedback store's one writer). Every edge's feedback (escalation receipts included),
    model downloads and routes share its slots."""

    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent Fleet RPCs in the replica. Serve's default is "
        "small enough that a few slow FetchModel readers would hold every slot and starve ReportFeedback.",
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting beyond that; more are refused with RESOURCE_EXHAUSTED, which edges "
        "retry later. -1: unbounded.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Longest one step of a Fleet RPC's work may take (storing a feedback batch, reading "
        "a manifest or a model chunk); past it the RPC fails with DEADLINE_EXCEEDED and frees its slot.",
    )
    device_quota_per_day: int = Field(
        20_000, ge=1, description="Feedback records one device may store per UTC day; a batch that would pass it is "
        "refused with RESOURCE_EXHAUSTED. Escalation receipts do not count: they are the cloud's own answers, "
        "as many as its experts gave. Counted from the store's records of the day at start, so a restart resets nothing.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the replica needs, to pin it to the nodes that offer "
        "them: in k8s, the one worker group that holds the feedback store's credentials.",
    )


class ExpertConfig(Section):
    """A vLLM model that answers escalations for some tasks."""

    name: str = Field(
        pattern=NAME.pattern,
        description="Serve application and deployment name: edges send it as the `application` "
        "metadata for the tasks this expert answers (Fleet.GetRoutes tells them); shows in metrics and answers.",
    )
    kind: Literal["generate", "classify"] = Field(
        description="generate: instruct LLM constrained to the label set. classify: a "
        "sequence-classification checkpoint on vLLM's pooling runner."
    )
    model: str = Field(
        description="Local directory, or a hub id where a hub is reachable (e.g. Qwen/Qwen2.5-7B-Instruct). "
        "Relative paths resolve against TANDEM_CACHE_DIR/models."
    )
    dtype: str = Field("bfloat16", description="vLLM dtype; a classifier on CPU wants float32.")
    max_model_len: int = Field(2048, ge=64)
    enforce_eager: bool = Field(
        True, description="Skip torch.compile/CUDA graphs. On CPU the compiled mode recompiles at "
        "every start (minutes) and flipped greedy answers; set false on GPUs.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm AsyncEngineArgs, e.g. gpu_memory_utilization."
    )
    env: dict[str, str] = Field(
        # PASSIVE: OpenMP threads that finished their work sleep instead of spinning, so an
        # idle engine leaves the CPUs to the other replicas.
        # TORCH_CPP_LOG_LEVEL and PYTHONWARNINGS: the engine's start-up notices from torch's C++
        # core and vLLM's triton shim (no triton on CPU), which are not the operator's business.
        default_factory=lambda: {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "TORCH_CPP_LOG_LEVEL": "ERROR",
            "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher",
        },
        description="Environment of the replica and its engine (vLLM reads its settings from there).",
    )
    prompt: Literal["names", "descriptions", "retrieval"] = Field(
        "retrieval", description="generate experts: what the prompt shows besides the text. names: the label names; "
        "descriptions: each label's description from the task file; retrieval: descriptions plus the task's "
        "`retrieval_k` training texts nearest the query by embedding similarity.",
    )
    retrieval_k: int = Field(8, ge=1, le=64, description="generate experts: training examples retrieved per query, "
                             "and the most candidate labels scored for the answer's distribution (besides out of scope).")
    deployment: DeploymentOptions = DeploymentOptions()

    def model_path(self) -> str:
        path = Path(self.model).expanduser()
        if path.is_absolute() or self.model.startswith((".", "~")):
            return str(path)
        local = envs.TANDEM_CACHE_DIR / "models" / self.model
        return str(local) if local.exists() else self.model


class RolloutOptions(Section):
    """How `tandem cloud rollout-expert` replaces an expert's checkpoint (blue/green)."""

    ready_timeout_s: float = Field(
        900.0, gt=0, description="Longest the new version may take to be RUNNING and answer a probe; past it, it is "
        "removed and the old version keeps serving.",
    )
    drain_s: float = Field(
        10.0, ge=0, description="How long the old version keeps serving after the route switches, before it is "
        "deleted: at least the edges' cloud.routes_refresh_s (default 5 s: how often they re-ask the routes) plus "
        "their longest escalation deadline (cloud.deadline_ms, default 2 s). An edge still on the old version after "
        "it is gone re-asks the routes and retries once, within its deadline.",
    )


class CloudTask(Section):
    """A task the cloud answers, and which expert answers it."""

    task: TaskFile = Field(description="The task file (tasks/<name>.yaml); this entry's key is the name edges "
                           "route by, which may differ from the file's (one task through two experts).")
    expert: str = Field(description="Name of the expert that answers this task.")


class CloudConfig(TandemSettings):
    """What `tandem cloud serve` reads."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_CLOUD_")

    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP proxy (health, KubeRay).")
    ray_metrics_port: int = Field(
        8080, ge=1, le=65535, description="Where Ray exports Serve's and Tandem's metrics for Prometheus."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the replicas' logs (Tandem's and Serve's), on the console and in Ray's log files."
    )
    access_log: bool = Field(True, description="Serve's access log: one line per request, per replica.")
    expert_timeout_s: float = Field(
        30.0, gt=0, description="Longest an expert may take before DEADLINE_EXCEEDED. A caller that sends its "
        "remaining deadline (the `tandem-timeout-ms` metadata) bounds the work further, and an answer after it is "
        "not returned.",
    )
    fleet: FleetOptions = Field(default_factory=FleetOptions, description="The fleet application's deployment.")
    insecure: bool = Field(
        False, description="Development only: no TLS proxy in front of Serve, and the device id is whatever a "
        "message claims (logged as a warning). Otherwise every call must come through the proxy with a verified "
        "device certificate.",
    )
    proxy: ProxyOptions = Field(default_factory=ProxyOptions, description="The TLS proxy that edges connect to.")

    registry_dir: Path = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "registry",
        description="Model registry root: <task>/<version>/ signed students, <task>/promoted.json.",
    )
    feedback_uri: str = Field(
        default_factory=lambda: str(envs.TANDEM_CACHE_DIR / "feedback"),
        description="Feedback store: a local directory or a pyarrow filesystem URI, e.g. "
        "s3://bucket/feedback?region=eu-west-1 (S3-compatible stores take endpoint_override=...).",
    )
    feedback_max_batch: int = Field(
        1000, ge=1, description="Most records one ReportFeedback may carry; more are refused with INVALID_ARGUMENT."
    )
    receipt_key: Path = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "receipt.key",
        description="The secret (at least 32 bytes) under which experts sign the receipts of their answers and the "
        "fleet checks them when edges deliver them (cloud/feedback/receipts.py). Read where every expert and the "
        "fleet replica run; `tandem cloud serve` creates it (mode 0600) if missing. Keep it: a new key makes the "
        "receipts edges still hold undeliverable. In Kubernetes, a Secret.",
    )

    keyring: Path | None = Field(
        None, description="The keyring (`tandem keys trust`) that expert checkpoints must be signed under: "
        "`tandem cloud rollout-expert` refuses a checkpoint whose signed manifest or files do not verify. "
        "Unset: no rollout.",
    )
    rollout: RolloutOptions = Field(default_factory=RolloutOptions, description="Expert rollouts (blue/green).")

    tasks: dict[str, CloudTask] = Field(
        default_factory=lambda: {"banking77": CloudTask(task=banking77(), expert="banking77-classifier")}
    )
    experts: list[ExpertConfig] = Field(
        default_factory=lambda: [
            ExpertConfig(name="banking77-classifier", kind="classify", model="banking77/teacher", dtype="float32")
        ]
    )

    @field_validator("keyring")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()

    @model_validator(mode="after")
    def _experts_exist(self) -> "CloudConfig":
        for task in self.tasks:
            check_name("tasks", task)
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique: {names}")
        for task, t in self.tasks.items():
            if t.expert not in names:
                raise ValueError(f"tasks.{task}.expert: no expert named {t.expert!r} (have {names})")
        idle = set(names) - {t.expert for t in self.tasks.values()}
        if idle:
            raise ValueError(f"experts {sorted(idle)} answer no task")
        if FLEET_APPLICATION in names:
            raise ValueError(f"expert name {FLEET_APPLICATION!r} is the fleet application's; applications need unique names")
        return self

    def logging_config(self) -> dict[str, Any]:
        """Serve's LoggingConfig for every application and Serve's own actors."""
        return {"log_level": self.log_level, "enable_access_log": self.access_log}

    def routes(self) -> dict[str, str]:
        """Task -> the expert that answers it (its Serve application, until a rollout names a
        version of it: `routes_file`)."""
        return {task: t.expert for task, t in self.tasks.items()}

    def routes_file(self) -> Path:
        """Each expert's serving application, which rollouts switch (`cloud.registry.routes`)."""
        return self.registry_dir / STATE_DIR / ROUTES_FILE

    def ray_address_file(self) -> Path:
        """Where `tandem cloud serve` writes its Ray cluster's address, for `tandem cloud rollout-expert`."""
        return self.registry_dir / STATE_DIR / RAY_ADDRESS_FILE
