"""`tandem bench chaos` settings: the traffic and the fault schedule."""

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.settings import TandemSettings


class ChaosConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_CHAOS_")

    requests: int = Field(10_000, ge=100, description="Requests of the steady stream, at least: it goes on until "
                          "the fault schedule has run.")
    rate_rps: float = Field(15.0, gt=0, description="Poisson rate of the steady stream, over all edges.")
    edges: int = Field(3, ge=3, description="Edge daemons in cascade mode.")
    cloud_only_edges: int = Field(2, ge=1, description="Edge daemons in cloud-only mode, besides: they take the "
                                  "overload between them.")
    steady_s: float = Field(30.0, gt=5, description="Steady traffic before the first fault: the baselines "
                            "(RSS, the edge-only p50).")
    settle_s: float = Field(15.0, ge=5, description="Steady traffic after each fault has recovered, before the next; "
                            "the one before the overload is its RSS baseline.")
    replica_kills: int = Field(4, ge=1, description="Serve replicas SIGKILLed one after another, the "
                               "applications taking turns.")
    cut_s: float = Field(20.0, gt=0, description="Length of the network cut between the edges and the cloud.")
    latency_s: float = Field(20.0, gt=0, description="Length of the added network latency.")
    delay_ms: float = Field(100.0, ge=0, description="Latency added to every chunk, each way.")
    jitter_ms: float = Field(50.0, ge=0, description="Uniform jitter around delay_ms.")
    disk_full_s: float = Field(20.0, gt=0, description="How long the disk under one edge's outbox stays full.")
    disk_mb: int = Field(32, ge=8, description="Size of that edge's outbox filesystem (a tmpfs).")
    capacity_s: float = Field(10.0, gt=0, description="Length of the closed-loop measurement of the cloud's capacity.")
    capacity_concurrency: int = Field(32, ge=1, description="Calls in flight while measuring the capacity.")
    overload_factor: float = Field(5.0, gt=1, description="Offered overload, as a multiple of the measured capacity.")
    overload_s: float = Field(60.0, gt=0, description="Length of the overload.")
    door_burst: int = Field(2000, ge=1, description="Requests fired at once at one edge (max_queue 64) to test its "
                            "own load shedding, apart from the run.")
    drain_timeout_s: float = Field(240.0, gt=0, description="How long the edges' outboxes may take to empty after "
                                   "the traffic ends.")
    teacher: Path | None = Field(None, description="The expert's checkpoint; default: the teacher `tandem train "
                                 "teacher` caches (trained if missing).")
    student: Path | None = Field(None, description="The student the edges serve; default: the cached one (trained "
                                 "if missing).")
    seed: int = 0


# One of each fault, briefly: the run `make test` includes.
SHORT: dict[str, Any] = {"requests": 1500, "rate_rps": 10.0, "steady_s": 15.0, "settle_s": 5.0, "replica_kills": 2,
                         "cut_s": 5.0, "latency_s": 5.0, "disk_full_s": 5.0, "capacity_s": 5.0, "overload_s": 15.0,
                         "door_burst": 500}
