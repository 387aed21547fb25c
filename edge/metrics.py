"""The daemon's Prometheus metrics, registered on a registry passed in."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Local answers take a few milliseconds: buckets must resolve sub-millisecond differences.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tandem_edge_requests", "Answered requests by source.", ["task", "source"], registry=registry
        )
        self.latency = Histogram(
            "tandem_edge_request_seconds", "End-to-end latency in the daemon by source.",
            ["task", "source"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.out_of_scope = Counter(
            "tandem_edge_out_of_scope", "Requests answered out of scope (fitting none of the task's intents), by source.",
            ["task", "source"], registry=registry,
        )
        self.inference = Histogram(
            "tandem_edge_inference_seconds", "Tokenizer plus ONNX Runtime time per batch.",
            ["task"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "tandem_edge_batch_size", "Size of the model run each request was part of.", ["task"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry,
        )
        self.decisions = Counter(
            "tandem_edge_decisions", "Policy decisions and fallbacks by reason.", ["task", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "tandem_edge_rejected", "Requests refused as invalid, by field.", ["field"], registry=registry
        )
        self.model = Gauge(
            "tandem_edge_model_info", "1 for the student version serving each task.", ["task", "version"],
            registry=registry,
        )
        self.threshold = Gauge(
            "tandem_edge_threshold", "The confidence below which each task's policy escalates, for the student "
            "serving it: pinned (policy.threshold), its own fitted one, the one it certifies for policy.epsilon "
            "(risk mode) or the fallback 0.5. +Inf: every request escalates (cloud_only, or risk mode with no "
            "certified threshold); 0: none (edge_only). target_rate mode: the threshold until its window fills.",
            ["task"], registry=registry,
        )
        self.feedback_recorded = Counter(
            "tandem_edge_feedback_recorded", "Feedback records accepted into the outbox, by kind.",
            ["task", "kind"], registry=registry,
        )
        self.feedback_refused = Counter(
            "tandem_edge_feedback_refused", "Feedback records not kept, by reason: full (the outbox), error (its "
            "storage), no_receipt (a cloud answer without the receipt an ESCALATION record needs).",
            ["task", "kind", "reason"], registry=registry,
        )
        self.outbox_depth = Gauge(
            "tandem_edge_outbox_records", "Feedback records waiting for the cloud's acknowledgement.",
            registry=registry,
        )
        self.feedback_delivered = Counter(
            "tandem_edge_feedback_delivered", "Feedback records the cloud acknowledged.", registry=registry
        )
        self.feedback_dead = Counter(
            "tandem_edge_feedback_dead", "Feedback records the cloud refused for good (invalid, or a receipt it "
            "does not verify), moved aside.",
            registry=registry,
        )
        self.delivery_failures = Counter(
            "tandem_edge_feedback_delivery_failures", "Failed ReportFeedback calls by status; retried.",
            ["code"], registry=registry,
        )
        self.updates = Counter(
            "tandem_edge_model_updates", "Registry polls by outcome (updated, unchanged, rejected, failed, "
            "known_bad, or the cloud error).", ["task", "outcome"], registry=registry,
        )
        self.breaker_state = Gauge(
            "tandem_edge_cloud_breaker_state", "The cloud circuit breaker: 0 closed, 1 half-open (a probe is "
            "out), 2 open (escalations answered locally at once).", registry=registry,
        )
        self.breaker_transitions = Counter(
            "tandem_edge_cloud_breaker_transitions", "Circuit breaker state changes, by the state entered.",
            ["to"], registry=registry,
        )
        self.shed = Counter(
            "tandem_edge_shed", "Infer requests refused with RESOURCE_EXHAUSTED because the task's queue "
            "was full.", ["task"], registry=registry,
        )
        self.swap_drain_timeouts = Counter(
            "tandem_edge_swap_drain_timeouts", "Model swaps that stopped waiting for the replaced version "
            "to answer its queue (swap_drain_timeout_s).", ["task"], registry=registry,
        )
        self.loop_serving = Gauge(
            "tandem_edge_loop_serving", "1 while a background loop (delivery, updater) works, 0 while it "
            "keeps failing; its grpc.health sub-service says the same.", ["loop"], registry=registry,
        )
        self.storage_faults = Counter(
            "tandem_edge_storage_faults", "Unreadable or corrupt files found at start and set aside "
            "(outbox, model_state).", ["store"], registry=registry,
        )
        self.dead_records = Gauge(
            "tandem_edge_feedback_dead_records", "Records in the outbox's dead table (refused for good).",
            registry=registry,
        )
        self.dead_dropped = Counter(
            "tandem_edge_feedback_dead_dropped", "Dead records dropped, oldest first, to keep the dead table "
            "within max_dead.", registry=registry,
        )
        self.feedback_deferred = Counter(
            "tandem_edge_feedback_deferred", "Records the cloud refused for a configuration it lacks (an "
            "unknown task or label), kept in the outbox and retried later, by field.", ["field"],
            registry=registry,
        )
