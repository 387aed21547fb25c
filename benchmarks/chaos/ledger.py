"""Reconciling what the clients were answered with what the feedback store holds: counted in
the store's raw Parquet files, not through `FeedbackStore.read`, which hides duplicates.

Each answered request owes the store one record: an ESCALATION for a cloud answer (its signed
receipt, delivered by the edge), a FALLBACK for a local answer the cloud did not give. Confident
local answers owe none (the run samples no AUDIT records). A record the edge refused at its own
door (its outbox full or its disk failing) is counted by the edge, as refused, and is not lost."""

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.chaos.traffic import Outcome

OWED_KIND = {"CLOUD": "ESCALATION", "EDGE_FALLBACK": "FALLBACK"}


@dataclass(frozen=True)
class StoreScan:
    files: int
    rows: Counter[str]  # request id -> rows holding it
    kinds: dict[str, set[str]]  # request id -> the kinds stored for it

    @property
    def records(self) -> int:
        return sum(self.rows.values())


def part_files(root: Path) -> list[Path]:
    """The store's data files: quarantined files and the audit log (under '_' folders) excluded."""
    return sorted(p for p in root.glob("task=*/date=*/part-*.parquet"))


def scan_store(root: Path) -> StoreScan:
    rows: Counter[str] = Counter()
    kinds: dict[str, set[str]] = defaultdict(set)
    files = part_files(root)
    for path in files:
        table = pq.read_table(path, columns=["request_id", "kind"])
        for request_id, kind in zip(table["request_id"].to_pylist(), table["kind"].to_pylist(), strict=True):
            rows[request_id] += 1
            kinds[request_id].add(kind)
    return StoreScan(len(files), rows, dict(kinds))


def request_ids(path: Path) -> set[str]:
    return set(pq.read_table(path, columns=["request_id"])["request_id"].to_pylist())


@dataclass(frozen=True)
class Reconciled:
    owed: int  # records the answers owe the store
    missing: int  # owed and not in the store
    lost: int  # missing, less those the edges refused at their door
    duplicated: int  # rows beyond the first for a request
    escalations_answered: int
    escalations_unrecorded: int


def reconcile(outcomes: Iterable[Outcome], store: StoreScan, refused: dict[tuple[str, str], float],
              destroyed: set[str]) -> Reconciled:
    """`refused`: (edge, kind) -> records that edge refused; `destroyed`: request ids whose
    records were in a file the run corrupted on purpose (neither owed nor lost)."""
    missing: Counter[tuple[str, str]] = Counter()
    owed = answered_cloud = 0
    requests = set()
    for o in outcomes:
        requests.add(o.request_id)
        kind = OWED_KIND.get(o.source)
        if not o.answered or kind is None or o.request_id in destroyed:
            continue
        owed += 1
        answered_cloud += o.source == "CLOUD"
        if kind not in store.kinds.get(o.request_id, ()):
            missing[(o.edge, kind)] += 1
    lost = {key: max(0, n - int(refused.get(key, 0))) for key, n in missing.items()}
    return Reconciled(
        owed=owed,
        missing=sum(missing.values()),
        lost=sum(lost.values()),
        duplicated=sum(n - 1 for r, n in store.rows.items() if r in requests and n > 1),
        escalations_answered=answered_cloud,
        escalations_unrecorded=sum(n for (_, kind), n in lost.items() if kind == "ESCALATION"),
    )


def window(outcomes: Sequence[Outcome], start: float, end: float) -> list[Outcome]:
    """The outcomes scheduled within [start, end)."""
    return [o for o in outcomes if start <= o.sent < end]
