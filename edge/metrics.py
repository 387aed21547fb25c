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
        self.feedback_recorded = Counter(
            "tandem_edge_feedback_recorded", "Feedback records accepted into the outbox, by kind.",
            ["task", "kind"], registry=registry,
        )
        self.feedback_refused = Counter(
            "tandem_edge_feedback_refused", "Feedback records not accepted: outbox full, or storage error.",
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
            "tandem_edge_feedback_dead", "Feedback records the cloud refused as invalid, moved aside.",
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
