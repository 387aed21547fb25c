"""Latency recording in an HDR histogram: exact enough, constant memory, mergeable."""

from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyRecorder:
    """Records seconds at microsecond resolution (3 significant digits), up to 5 minutes."""

    def __init__(self) -> None:
        self._hist = HdrHistogram(1, 300_000_000, 3)

    def record(self, seconds: float) -> None:
        self._hist.record_value(max(1, round(seconds * 1e6)))

    @property
    def count(self) -> int:
        return self._hist.get_total_count()

    def percentile_ms(self, p: float) -> float:
        return self._hist.get_value_at_percentile(p) / 1e3

    def summary(self) -> dict[str, float]:
        """p50_ms, p90_ms, p99_ms, p99.9_ms and count."""
        out = {f"p{p:g}_ms": self.percentile_ms(p) for p in PERCENTILES}
        out["count"] = self.count
        return out
