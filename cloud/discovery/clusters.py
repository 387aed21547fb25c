"""Texts grouped by meaning: average-linkage agglomerative clustering on cosine similarity
(numpy only), and the clusters an operator is shown.

Poisoning resistance: a cluster is shown only if its texts come from at least `min_devices`
distinct devices, each device counted once per cluster however many texts it sent, so one
device (or one stolen certificate) cannot make an intent appear.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from cloud.experts.retrieval import Embedder
from tandem.settings import Section


class DiscoveryConfig(Section):
    """How out-of-scope traffic is clustered and which clusters are shown."""

    min_similarity: float = Field(
        0.5, gt=-1, lt=1, description="Two clusters merge while the mean cosine similarity of their texts "
        "(all-MiniLM-L6-v2 sentence embeddings) is at least this.",
    )
    min_size: int = Field(3, ge=1, description="Clusters with fewer distinct texts are not shown.")
    max_texts: int = Field(
        2000, ge=2, description="Cluster at most this many distinct texts, the most recent: the clustering "
        "costs O(n^2) memory and O(n^3) time in the worst case.",
    )
    examples: int = Field(5, ge=1, description="Example texts shown per cluster, the most central first.")


@dataclass(frozen=True)
class FieldText:
    """A distinct out-of-scope text from the field and the devices that sent it."""

    text: str
    devices: frozenset[str]


@dataclass(frozen=True)
class Cluster:
    id: str  # a hash of its texts: the same texts, the same id, in every run
    texts: tuple[str, ...]  # the most central first
    devices: int  # distinct devices that sent any of its texts
    cohesion: float  # mean cosine similarity of its texts to their centroid

    @property
    def size(self) -> int:
        return len(self.texts)


def agglomerate(vectors: np.ndarray, min_similarity: float) -> np.ndarray:
    """A cluster index per row of L2-normalised `vectors` (0, 1, ... in order of first row):
    the most similar pair of clusters merges while their mean pairwise similarity (average
    linkage, updated by the Lance-Williams formula) is at least `min_similarity`. Ties go to
    the lowest indices, so the result depends on the rows' order only."""
    n = len(vectors)
    sim = (vectors @ vectors.T).astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    size = np.ones(n)
    owner = np.arange(n)
    while n > 1:
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[i, j] < min_similarity:
            break
        i, j = min(i, j), max(i, j)
        merged = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        sim[i, :] = sim[:, i] = merged
        sim[j, :] = sim[:, j] = -np.inf
        sim[i, i] = -np.inf
        size[i] += size[j]
        owner[owner == j] = i
    _, first = np.unique(owner, return_index=True)
    renumber = {int(owner[f]): k for k, f in enumerate(sorted(first))}
    return np.array([renumber[int(o)] for o in owner])


def find_clusters(texts: Sequence[FieldText], embedder: Embedder, cfg: DiscoveryConfig,
                  min_devices: int) -> list[Cluster]:
    """The clusters of `texts` an operator is shown (see the module's docstring), best first:
    most devices, then most texts, then the tightest."""
    if not texts:
        return []
    texts = sorted(texts[-cfg.max_texts:], key=lambda t: t.text)  # an order of their own: deterministic
    return rank(texts, embedder.encode([t.text for t in texts]), cfg, min_devices)


def rank(texts: Sequence[FieldText], vectors: np.ndarray, cfg: DiscoveryConfig, min_devices: int) -> list[Cluster]:
    """`find_clusters` on texts already embedded (one L2-normalised row each)."""
    which = agglomerate(vectors, cfg.min_similarity)
    shown = []
    for k in range(int(which.max()) + 1 if len(which) else 0):
        rows = np.flatnonzero(which == k)
        devices = frozenset().union(*(texts[r].devices for r in rows))
        if len(rows) < cfg.min_size or len(devices) < min_devices:
            continue
        centroid = vectors[rows].mean(0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        closeness = vectors[rows] @ centroid
        ordered = tuple(texts[r].text for r in rows[np.argsort(-closeness, kind="stable")])
        shown.append(Cluster(cluster_id(ordered), ordered, len(devices), float(closeness.mean())))
    return sorted(shown, key=lambda c: (-c.devices, -c.size, -c.cohesion, c.id))


def cluster_id(texts: Sequence[str]) -> str:
    digest = hashlib.sha256("\0".join(sorted(texts)).encode())
    return f"c-{digest.hexdigest()[:8]}"


def format_clusters(clusters: Sequence[Cluster], examples: int, min_devices: int) -> str:
    """A table for people: id, size, devices, cohesion, then example texts."""
    if not clusters:
        return f"no cluster of out-of-scope texts from at least {min_devices} devices"
    lines = [f"{'cluster':<11} {'texts':>5} {'devices':>7} {'cohesion':>8}  examples"]
    for c in clusters:
        shown = c.texts[:examples]
        lines.append(f"{c.id:<11} {c.size:5d} {c.devices:7d} {c.cohesion:8.2f}  {_quoted(shown[0])}")
        lines += [f"{'':<36}{_quoted(t)}" for t in shown[1:]]
    lines.append(f"\nname one: tandem intents name CLUSTER LABEL --description TEXT "
                 f"(clusters from fewer than {min_devices} devices are not shown)")
    return "\n".join(lines)


def _quoted(text: str, width: int = 90) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= width else one_line[: width - 1] + "…")
